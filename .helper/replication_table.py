import glob, json, os, statistics as st
runs = {}
for f in sorted(glob.glob("/tmp/repl/*_s[0-9].json")):
    runs.setdefault(os.path.basename(f).rsplit("_s", 1)[0], []).append(json.load(open(f)))
ms = lambda k, rs: f"{st.mean(r[k] for r in rs):.3f} ± {st.stdev(r[k] for r in rs):.3f}" if len(rs) > 1 else f"{rs[0][k]:.3f}"
for title, rows in [("method", "sft dpo rpo-text rpo-image rpo-both"), ("rpo, tau (M 8, both)", "tau0.1 tau0.25 rpo-both tau1.0 tau4.0"),
                    ("rpo, M pairs per batch (tau 0.5, both)", "M2 M4 rpo-both M16")]:
    print(f"\n| {title} | seeds | held-out accuracy | held-out margin |\n|---|---|---|---|")
    for name in rows.split():
        print(f"| {name} | {len(runs[name])} | {ms('heldout_accuracy', runs[name])} | {ms('heldout_margin', runs[name])} |")
