r"""The preference evaluation of Diffusion-RPO (Gu et al. 2024, arXiv 2406.06382): automated human-preference
scores. The base model and each tuned run draw the same prompts from the same initial noise; PickScore,
HPSv2.1, the LAION aesthetic predictor and CLIP score (the toy world: its judge) score every image; the report
gives each model's mean and each run's win rate against the base with the sign test's p, and a comparison
sheet (PNG) shows the images side by side.

    python rpo.py --loss dpo --out out_dpo && python rpo.py --out out_rpo   # tiny-drawn, the toy world
    python eval_prefer.py --runs out_dpo out_rpo --n 16 --out prefer.json   # offline, CPU

With --model sd15 or sdxl the same command uses the real scorers, Pick-a-Pic and Stable Diffusion. Drawing
with a run's weights, CLIP and the comparison sheet are eval_style.py's.
"""
import argparse
import functools
import html
import itertools
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import eval_style
import rpo

SCRIPT = "eval_prefer.py"  # the one-line errors' prefix, also where eval_style.py's helpers stop


def fail(msg):
    eval_style.fail(msg, SCRIPT)


# -------------------------------------------------------------------------- scores and statistics
# PickScore = exp(logit_scale) * cos(image, prompt)   (its authors' inference code)
def pickscore(image_features, text_features, logit_scale):
    return float(np.exp(logit_scale)) * eval_style.cosine(image_features, text_features)


# HPSv2 = cos(image, prompt)   (hpsv2's img_score: the diagonal of normalised image @ text features)
def hps(image_features, text_features):
    return eval_style.cosine(image_features, text_features)


# aesthetic = MLP(image / |image|), image: CLIP ViT-L/14 image features   (LAION's aesthetic predictor v2)
def aesthetic(mlp, image_features):
    return mlp(F.normalize(torch.as_tensor(image_features).float(), dim=-1)).squeeze(-1).double()


# outcome of a against b on each prompt = [a > b] + [a = b] / 2;  win rate = the mean outcome
def outcomes(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return (a > b) + 0.5 * (a == b)


# two-sided sign test over prompts: p = min(1, 2 P(X <= min(w, l))), X ~ Binomial(w + l, 1/2), from per-prompt
# outcomes (w: above 1/2, l: below 1/2; ties dropped)
def sign_test(won):
    won = np.asarray(won)
    w, l = int((won > 0.5).sum()), int((won < 0.5).sum())
    return min(1.0, 2 * sum(math.comb(w + l, k) for k in range(min(w, l) + 1)) / 2 ** (w + l))


def bootstrap_ci(values, draws=2000, seed=0):
    """The 95 % percentile bootstrap interval of the mean of per-prompt values, prompts resampled."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (draws, len(values)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarize(scores):
    """Each model's mean score with its 95 % interval, each run's win rate against the base, and every pair of
    runs' win rates with the sign test's p, from per-prompt scores {model: {scorer: [P]}}."""
    def rate(a, b):
        won = outcomes(a, b)
        return dict(rate=float(won.mean()), ci=bootstrap_ci(won), p=sign_test(won))
    runs = [name for name in scores if name != "base"]
    return dict(
        runs={name: {s: dict(mean=float(np.mean(v)), ci=bootstrap_ci(v)) for s, v in by.items()}
              for name, by in scores.items()},
        win_rate_vs_base={name: {s: rate(scores[name][s], scores["base"][s]) for s in scores[name]}
                          for name in runs},
        win_rates={f"{a} vs {b}": {s: rate(scores[a][s], scores[b][s]) for s in scores[a]}
                   for a, b in itertools.combinations(runs, 2)})


# ----------------------------------------------------------------------------- preference scorers
# Each scorer loads from the hub as its authors publish it (or from the local hub cache, HF_HUB_OFFLINE=1).
PICKSCORE = "yuvalkirstain/PickScore_v1"  # a CLIP ViT-H/14 fine-tune
CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor, the tokenizer of HPSv2's OpenCLIP
HPS = ("xswu/HPSv2", "HPS_v2.1_compressed.pt")  # an OpenCLIP ViT-H/14 state dict
AESTHETIC = ("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth")
CLIP_L14 = "openai/clip-vit-large-patch14"  # the aesthetic predictor's features; the CLIP score
SCORERS = ("pickscore", "hps", "aesthetic", "clip", "judge")  # judge: the toy world's


def hub_file(repo_id, filename, repo_type=None):
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id, filename, repo_type=repo_type)
    except Exception as e:  # offline, a wrong id, a gated repo
        fail(f"cannot fetch {filename!r} from {repo_id!r}: {rpo.first_line(e)}")


def openclip_as_clip(state):
    """An OpenCLIP CLIP state dict (HPSv2's checkpoint) as transformers' CLIPModel. The shapes give the
    config; heads are width / 80 (vision) and width / 64 (text), ViT-H/14's head widths."""
    from transformers import CLIPConfig, CLIPModel

    def tower(prefix, width, head_width):
        layers = sum(k.startswith(prefix) and k.endswith(".ln_1.weight") for k in state)
        return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // head_width,
                    intermediate_size=len(state[prefix + "resblocks.0.mlp.c_fc.bias"]), hidden_act="gelu")
    width, _, _, patch = state["visual.conv1.weight"].shape
    grid = round((len(state["visual.positional_embedding"]) - 1) ** 0.5)
    vision = dict(tower("visual.transformer.", width, 80), image_size=grid * patch, patch_size=patch)
    vocab, width = state["token_embedding.weight"].shape
    text = dict(tower("transformer.", width, 64), vocab_size=vocab, bos_token_id=vocab - 2,
                eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                max_position_embeddings=len(state["positional_embedding"]))
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision,
                                projection_dim=state["visual.proj"].shape[1]))
    clip.load_state_dict(openclip_keys(state))  # strict: every weight of both, no more
    return clip.eval()


OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                  "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
OPENCLIP_TOP = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                "visual.class_embedding": "vision_model.embeddings.class_embedding",
                "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                "visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
                "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                "positional_embedding": "text_model.embeddings.position_embedding.weight",
                "ln_final": "text_model.final_layer_norm", "logit_scale": "logit_scale"}


def openclip_keys(state):
    """OpenCLIP's names for transformers' CLIPModel's: fused q, k, v split in three, the projections (used as
    x @ proj) transposed."""
    mapped = {"visual_projection.weight": state["visual.proj"].T,
              "text_projection.weight": state["text_projection"].T}
    towers = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
              "transformer.resblocks.": "text_model.encoder.layers."}
    for key, value in state.items():
        tower = next((t for t in towers if key.startswith(t)), None)
        n, name = key[len(tower):].split(".", 1) if tower else ("", key)
        module, _, param = name.rpartition(".")
        if tower and name.startswith("attn.in_proj_"):
            for part, chunk in zip("qkv", value.chunk(3)):
                mapped[f"{towers[tower]}{n}.self_attn.{part}_proj.{param.removeprefix('in_proj_')}"] = chunk
        elif tower and module in OPENCLIP_BLOCK:
            mapped[f"{towers[tower]}{n}.{OPENCLIP_BLOCK[module]}.{param}"] = value
        elif not tower and key in OPENCLIP_TOP:
            mapped[OPENCLIP_TOP[key]] = value
        elif not tower and module in OPENCLIP_TOP:
            mapped[f"{OPENCLIP_TOP[module]}.{param}"] = value
        elif key not in ("visual.proj", "text_projection"):
            fail(f"the OpenCLIP checkpoint holds {key!r}, which has no place in CLIPModel")
    return mapped


def aesthetic_mlp(state):
    """LAION's aesthetic predictor v2: five linear layers, dropout between (its ReLUs are commented out)."""
    width = state["layers.0.weight"].shape[1]
    mlp = torch.nn.Sequential(torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    return mlp.eval()


# OpenCLIP's caption cleaning before tokenizing: ftfy, HTML unescaped twice, whitespace collapsed, lowercase
def openclip_clean(caption):
    import ftfy
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(caption))).split()).lower()


def load_scorers(names, world, clip_id):
    """name -> score(images, prompts, device, dtype, batch) -> one score per image; the models load now, on
    the CPU, and move to the device only while they score."""
    from transformers import CLIPModel, CLIPTokenizer
    scorers, clips = {}, {}

    def shared(clip_id):  # aesthetic and clip both use CLIP ViT-L/14 by default: it loads once
        if clip_id not in clips:
            clips[clip_id] = eval_style.load_clip(clip_id, torch.device("cpu"))
        return clips[clip_id]
    for name in names:
        if name == "judge":
            if not world:
                fail("the judge scores toy-world prompts only: pass --prompts toy or toy-subject")
            scorers[name] = functools.partial(scored_by_judge, rpo.toy_world().load_judge(), world)
        elif name == "pickscore":
            clip = rpo.pretrained(CLIPModel, PICKSCORE).eval()
            formula = functools.partial(pickscore, logit_scale=clip.logit_scale.item())
            scorers[name] = functools.partial(scored_by_clip, clip, rpo.pretrained(CLIPTokenizer, CLIP_H14),
                                              formula)
        elif name == "hps":
            state = torch.load(hub_file(*HPS), map_location="cpu", weights_only=True)
            clip = openclip_as_clip(state.get("state_dict", state))
            tokenizer = rpo.pretrained(CLIPTokenizer, CLIP_H14)
            scorers[name] = functools.partial(scored_by_clip, clip, tokenizer, hps, hpsv2=True)
        elif name == "aesthetic":
            mlp = aesthetic_mlp(torch.load(hub_file(*AESTHETIC), map_location="cpu", weights_only=True))
            formula = functools.partial(aesthetic_of_images, mlp)
            scorers[name] = functools.partial(scored_by_clip, *shared(CLIP_L14), formula)
        elif name == "clip":
            scorers[name] = functools.partial(scored_by_clip, *shared(clip_id), eval_style.clip_scores)
        else:
            fail(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return scorers


def aesthetic_of_images(mlp, image_features, _):
    return aesthetic(mlp, image_features)


@torch.no_grad()
def scored_by_clip(clip, tokenizer, formula, images, prompts, device, dtype, batch, hpsv2=False):
    """formula(image features, text features) of each (image, prompt), batch by batch on the device; hpsv2:
    images and captions prepared as HPSv2 prepares them."""
    clip.to(device, dtype)
    scores = []
    prompts = [openclip_clean(p) for p in prompts] if hpsv2 else prompts
    size = clip.config.vision_config.image_size
    for i in range(0, len(images), batch):
        x = eval_style.clip_inputs(images[i:i + batch], size, device, hpsv2).to(dtype)
        ids = tokenizer(prompts[i:i + batch], padding="max_length", truncation=True, return_tensors="pt",
                        max_length=clip.config.text_config.max_position_embeddings).input_ids.to(device)
        image = clip.get_image_features(pixel_values=x).pooler_output.float().cpu()
        text = clip.get_text_features(input_ids=ids).pooler_output.float().cpu()
        scores.append(formula(image, text))
    clip.to("cpu")
    return torch.cat(scores).numpy()


def scored_by_judge(judge, world, images, prompts, device, dtype, batch):
    return rpo.toy_world().judge_scores(judge, images, prompts, world).numpy()


# ---------------------------------------------------------------------------------------- prompts
PICKAPIC_TEST, PARTI = "test_unique", "nateraw/parti-prompts"  # Pick-a-Pic's 500 test prompts; PartiPrompts
# HPSv2's benchmark: 800 prompts in each of four styles, the hub dataset's benchmark/STYLE.json
HPSV2_BENCHMARK, HPSV2_STYLES = "zhwang/HPDv2", ("anime", "concept-art", "paintings", "photo")


def prompt_sets(args):
    """{style: prompts}, the first --n of each: HPSv2's benchmark by its four styles; any other set is one
    style, "all"."""
    if args.prompts != "hpsv2":
        return {"all": prompt_set(args)[:args.n or None]}
    sets = {}
    for style in HPSV2_STYLES:
        path = hub_file(HPSV2_BENCHMARK, f"benchmark/{style}.json", repo_type="dataset")
        with open(path, encoding="utf-8") as fh:
            try:
                prompts = json.load(fh)
            except ValueError:
                prompts = None
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip()
                                                                   for p in prompts):
            fail(f"{HPSV2_BENCHMARK}'s benchmark/{style}.json is not a list of prompts")
        sets[style] = prompts[:args.n or None]  # as published, in order, duplicates kept
    return sets


def prompt_set(args):
    """The prompts, in order: a toy world's captions of --split, or unique captions read from Pick-a-Pic's
    --split (hub id --data_id), PartiPrompts, or a file: .txt (one per line), .tsv (PartiPrompts' own) or
    parquet files with a caption column."""
    if args.prompts in rpo.TOY_WORLDS:
        return rpo.toy_world().captions_of(args.split or "test")
    if args.prompts.endswith(".txt"):
        if not os.path.isfile(args.prompts):
            fail(f"--prompts {args.prompts!r} does not exist")
        return [line.strip() for line in open(args.prompts) if line.strip()]
    if args.prompts in ("pickapic", "parti"):
        data_id = args.data_id if args.prompts == "pickapic" else PARTI
        split = args.split or (PICKAPIC_TEST if args.prompts == "pickapic" else "train")
        try:
            paths = list(rpo.hub_data_files(data_id)[split])
        except Exception as e:  # offline, a wrong id, no such split
            fail(f"cannot read prompts from {data_id!r} (split {split!r}): {rpo.first_line(e)}; pass a local "
                 f"copy with --prompts PATH")
    else:
        paths = rpo.local_files(args.prompts, (".parquet", ".tsv", ".csv"))
        if not paths:
            fail(f"--prompts {args.prompts!r}: no such file, nor parquet files there")
    captions = [c for path in paths for c in prompt_column(path)]
    return list(dict.fromkeys(c for c in captions if isinstance(c, str) and c.strip()))  # unique, in order


def prompt_column(path):
    """The prompts of one file: a parquet's caption (Pick-a-Pic) or Prompt (PartiPrompts) column, or a .tsv's
    Prompt column."""
    import fsspec
    if path.endswith((".tsv", ".csv")):
        import pyarrow.csv
        with fsspec.open(path, "rb") as fh:
            table = pyarrow.csv.read_csv(fh, parse_options=pyarrow.csv.ParseOptions(
                delimiter="\t" if path.endswith(".tsv") else ","))
        names = table.column_names
    else:
        names = rpo.parquet(path).schema_arrow.names
    column = next((c for c in ("caption", "Prompt") if c in names), None)
    if column is None:
        fail(f"{path!r} has no caption or Prompt column, only {names}")
    if not path.endswith((".tsv", ".csv")):  # the caption column only: Pick-a-Pic's images stay unread
        table = rpo.parquet(path).read(columns=[column])
    return table.column(column).to_pylist()


# ----------------------------------------------------------------------------------------- prefer
def print_report(report, protocol):
    p = protocol
    print(f"{p['prompts']} prompts x {p['per_prompt']} images, {p['steps']} steps, guidance {p['guidance']}, "
          f"{p['resolution']} px; mean score [95 % interval over prompts]")
    scorers = list(next(iter(report["runs"].values())))
    width = max(12, *(len(name) + 2 for name in report["runs"]))
    print(f"{'':<{width}}" + "".join(f"{s:>30}" for s in scorers))
    for name, by in report["runs"].items():
        cells = (f"{by[s]['mean']:.4g} [{by[s]['ci'][0]:.4g}, {by[s]['ci'][1]:.4g}]" for s in scorers)
        print(f"{name:<{width}}" + "".join(cell.rjust(30) for cell in cells))
    for title, table in (("win rate against the base [95 % interval] p", report["win_rate_vs_base"]),
                         ("win rate between runs [95 % interval] p", report["win_rates"])):
        if table:
            print(title)
            for name, by in table.items():
                cells = (f"{w['rate']:.3f} [{w['ci'][0]:.3f}, {w['ci'][1]:.3f}] p {w['p']:.2g}"
                         for w in (by[s] for s in scorers))
                print(f"{name:<{width}}" + "".join(cell.rjust(30) for cell in cells))
    for s in scorers if "styles" in report else ():  # HPSv2's benchmark table: each style, their mean
        header = [*report["styles"], "averaged"]
        print(f"{s + ': mean by style':<{width}}" + "".join(f"{c:>13}" for c in header))
        for name in report["runs"]:
            means = [report["styles"][style]["runs"][name][s]["mean"] for style in report["styles"]]
            print(f"{name:<{width}}" + "".join(f"{m:>13.4g}" for m in [*means, np.mean(means)]))


def trained_world(paths, default):
    """The toy world the runs were trained in, read from their DIR/settings.json (default without any). Each
    path is checked to be a run first; nothing in it is loaded but that JSON file."""
    worlds = set()
    for path in paths:
        eval_style.run_weights(path, SCRIPT)
        settings = os.path.join(path, rpo.SETTINGS_FILE)
        if os.path.isfile(settings):
            try:
                worlds.add(json.load(open(settings))["data"])
            except (ValueError, KeyError, TypeError) as e:
                fail(f"{settings} is not the settings file rpo.py writes ({rpo.first_line(e)})")
    if len(worlds) > 1:
        fail(f"the runs were trained on different data ({', '.join(sorted(map(str, worlds)))}); pass --prompts")
    world = worlds.pop() if worlds else default
    return world if world in rpo.TOY_WORLDS else default


def prefer(args, cfg):
    device, dtype = eval_style.device_dtype()
    base = args.base or rpo.model_folder(cfg)
    paths = [os.path.normpath(path) for path in args.runs]
    names = [os.path.basename(path) for path in paths]  # a run is named by its folder, or its path if need be
    tuned = [eval_style.run_weights(path, SCRIPT) for path in paths]
    runs = dict(zip(names if len(set(names)) == len(names) else paths, tuned))
    if len(runs) != len(paths) or "base" in runs:
        fail("--runs must name each run once, and none 'base'")
    sets = prompt_sets(args)
    prompts = [p for ps in sets.values() for p in ps]
    if not prompts:
        fail(f"--prompts {args.prompts!r} has no prompts")
    world = args.prompts if args.prompts in rpo.TOY_WORLDS else None
    scorers = load_scorers(args.scorers, world, args.clip or cfg.clip or os.path.join(base, "clip"))
    pipe = eval_style.load_pipeline(args.model, base, device, dtype)
    each = [p for p in prompts for _ in range(args.per_prompt)]  # prompt k, image j: seed k x per_prompt + j
    scores, sheet = {}, {}
    for name, weights in {"base": None, **runs}.items():
        with eval_style.drawing_with(pipe, weights, device, dtype):
            images = eval_style.generate(pipe, each, args, device, desc=name)
        if args.save:
            eval_style.save_images({name.replace(os.sep, "_"): images}, args.save)
        per_image = {s: score(images, each, device, dtype, args.batch) for s, score in scorers.items()}
        scores[name] = {s: v.reshape(len(prompts), -1).mean(1) for s, v in per_image.items()}
        sheet[name] = eval_style.sheet_column(name, images, per_image, args.per_prompt, args.sheet)
    protocol = dict(model=args.model, base=base, prompts=len(prompts), prompt_set=args.prompts,
                    per_prompt=args.per_prompt, steps=args.steps, guidance=args.guidance,
                    resolution=args.resolution, seed=args.seed, scorers=list(scorers))
    if "judge" in scorers:
        toy = rpo.toy_world()
        protocol["judge_accuracy"] = toy.judge_accuracy(toy.load_judge(), world)
    report = dict(protocol=protocol, **summarize(scores))
    if args.prompts == "hpsv2":  # each style on its own, as HPSv2's benchmark table
        protocol["styles"] = {style: len(ps) for style, ps in sets.items()}
        bounds = np.cumsum([0, *protocol["styles"].values()])
        report["styles"] = {style: summarize({name: {s: v[a:b] for s, v in by.items()}
                                              for name, by in scores.items()})
                            for style, a, b in zip(sets, bounds[:-1], bounds[1:])}
    report["scores"] = {name: {s: v.tolist() for s, v in by.items()} for name, by in scores.items()}
    print_report(report, protocol)
    rpo.atomic_save(report, args.out)
    print(f"-> {args.out}", file=sys.stderr)
    if args.sheet:
        eval_style.save_sheet(args.out, sheet, prompts[:args.sheet])
    return report


# ------------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[eval_style.model_flags()])
    p.add_argument("--runs", nargs="*", default=[],
                   help="tuned runs: rpo.py's OUT folders (unet/ or lora/); the base model is always scored")
    p.add_argument("--prompts", help="toy | toy-subject | pickapic | parti | hpsv2 | a .txt, .tsv or parquet "
                                     "path; default pickapic, or for tiny models the runs' toy world")
    p.add_argument("--data_id", default=rpo.Config.data_id,
                   help="the Pick-a-Pic that --prompts pickapic reads")
    p.add_argument("--split", help=f"default test for toy, {PICKAPIC_TEST} for pickapic, train otherwise")
    p.add_argument("--n", type=int, default=500, help="the first n prompts (hpsv2: of each style); 0 = all")
    p.add_argument("--per_prompt", type=int, default=1, help="images per prompt, their scores averaged")
    p.add_argument("--scorers", nargs="+", choices=SCORERS,
                   help="default judge and clip for tiny models, else pickscore, hps, aesthetic and clip")
    p.add_argument("--base", help="base pipeline id or folder; default rpo.py's for --model")
    p.add_argument("--clip", help="the CLIP of the CLIP score; default rpo.py's for --model")
    p.add_argument("--save", help="write the generated images to SAVE/<model>/")
    p.add_argument("--out", default="prefer.json",
                   help="the report as JSON; the comparison sheet beside it, as .png")
    p.add_argument("--sheet", type=int, default=8, help="prompts in the comparison sheet; 0 = no sheet")
    return p.parse_args(argv)


def fill_defaults(args, cfg):
    """The defaults that depend on --model, as the flags' help texts say."""
    tiny = args.model.startswith("tiny")
    args.steps = args.steps or 50
    args.resolution = args.resolution or cfg.resolution
    # tiny models: the toy world their runs were trained in
    args.prompts = args.prompts or (trained_world(args.runs, "toy") if tiny else "pickapic")
    args.scorers = args.scorers or (["judge", "clip"] if tiny else list(SCORERS[:4]))


def main(argv=None):
    args = parse_args(argv)
    eval_style.check_report(args, SCRIPT)
    cfg = eval_style.presets(args.model)
    fill_defaults(args, cfg)
    return prefer(args, cfg)


if __name__ == "__main__":
    main()
