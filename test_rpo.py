"""The specification of rpo.py, as tests: CPU, offline, tiny random models, data the tests write."""
import io
import json
import math
import os
import subprocess
import sys
from contextlib import redirect_stdout

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_style
import rpo

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True, scope="session")
def private_model_home(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("rpo_home"))
    rpo.RPO_HOME, os.environ["RPO_HOME"] = home, home
    yield


def train(out, *flags):
    """rpo.py's main in this process; returns the end-of-run JSON line and metrics.jsonl."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        rpo.main(["--out", str(out), "--workers", "0", "--eval_pairs", "8", "--eval_draws", "2", *map(str, flags)])
    lines = [l for l in buf.getvalue().splitlines() if l.startswith("{")]
    metrics = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return json.loads(lines[-1]) if lines else None, metrics


def errors(M, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(M, generator=g) * 0.1 + 0.5 for _ in range(4)]


# ------------------------------------------------------------------------------------ the equations

def test_rpo_with_one_pair_equals_dpo():
    for seed in range(5):
        e = errors(1, seed)
        w = rpo.contrast_weights(torch.randn(1, 8), torch.randn(1, 8), tau=0.5)
        assert torch.equal(w, torch.ones(1, 1))
        assert torch.allclose(rpo.rpo_loss(*e, beta=5000, weights=w), rpo.rpo_loss(*e, beta=5000))


def test_dpo_loss_is_diffusion_dpo_train_py_objective():
    err_w, err_l, ref_w, ref_l = errors(6)
    beta = 5000.0
    # Diffusion-DPO's train.py: model_diff = w - l, ref_diff = w - l, inside = -0.5 * beta * (model_diff - ref_diff)
    inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    assert torch.allclose(rpo.rpo_loss(err_w, err_l, ref_w, ref_l, beta), -F.logsigmoid(inside).mean())


def test_rpo_loss_averages_every_winner_against_every_loser():
    err_w, err_l, ref_w, ref_l = errors(3)
    w = torch.softmax(torch.randn(3, 3), dim=1)
    expected = sum(-F.logsigmoid(-2500 * w[i, j] * ((err_w[i] - ref_w[i]) - (err_l[j] - ref_l[j])))
                   for i in range(3) for j in range(3)) / 9
    assert torch.allclose(rpo.rpo_loss(err_w, err_l, ref_w, ref_l, 5000, w), expected)


def test_each_row_of_contrast_weights_sums_to_one():
    w = rpo.contrast_weights(torch.randn(7, 16), torch.randn(7, 16), tau=0.5)
    assert w.shape == (7, 7) and (w > 0).all()
    assert torch.allclose(w.sum(dim=1), torch.ones(7))


def test_contrast_weights_are_softmax_of_cosine_distance_over_tau():
    f_w, f_l = torch.randn(4, 8), torch.randn(4, 8)
    d = 1 - F.cosine_similarity(f_w[:, None], f_l[None, :], dim=-1)
    assert torch.allclose(rpo.contrast_weights(f_w, f_l, 0.3), torch.softmax(-d / 0.3, dim=1), atol=1e-6)


def test_small_tau_puts_the_weight_on_the_nearest_loser():
    f_w = torch.eye(4)
    f_l = torch.eye(4)[[2, 0, 3, 1]] + 0.05 * torch.randn(4, 4)
    w = rpo.contrast_weights(f_w, f_l, tau=0.01)
    assert w.argmax(dim=1).tolist() == [1, 3, 0, 2]
    assert (w.max(dim=1).values > 0.99).all()
    flat = rpo.contrast_weights(f_w, f_l, tau=100.0)
    assert torch.allclose(flat, torch.full((4, 4), 0.25), atol=0.01)


def test_loss_is_log2_when_policy_equals_reference():
    err_w, err_l, _, _ = errors(5)
    w = rpo.contrast_weights(torch.randn(5, 8), torch.randn(5, 8), 0.5)
    for weights in (None, w):
        assert math.isclose(rpo.rpo_loss(err_w, err_l, err_w, err_l, 5000, weights).item(), math.log(2), rel_tol=1e-6)


def test_swapping_winner_and_loser_flips_the_logits():
    for seed in range(5):
        e = errors(1, seed)
        forward, swapped = (rpo.rpo_loss(*e, beta=5000), rpo.rpo_loss(e[1], e[0], e[3], e[2], beta=5000))
        assert math.isclose(math.exp(-forward) + math.exp(-swapped), 1.0, rel_tol=1e-5)  # sigmoid(x) + sigmoid(-x)
    e = errors(6)
    acc = rpo.preference_metrics(*e, beta=5000)["accuracy"]
    assert math.isclose(acc + rpo.preference_metrics(e[1], e[0], e[3], e[2], beta=5000)["accuracy"], 1.0)


def test_implicit_accuracy_counts_ties_half():
    zero = torch.zeros(4)
    err_w, err_l = torch.tensor([0.1, 0.3, 0.2, 0.2]), torch.tensor([0.2, 0.2, 0.2, 0.2])
    assert rpo.preference_metrics(err_w, err_l, zero, zero, 1.0)["accuracy"].item() == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)


def test_gradients_lower_winner_error_and_raise_loser_error():
    err_w, err_l, ref_w, ref_l = (e.requires_grad_() if i < 2 else e for i, e in enumerate(errors(4)))
    rpo.rpo_loss(err_w, err_l, ref_w, ref_l, 5000, rpo.contrast_weights(torch.randn(4, 8), torch.randn(4, 8), 0.5)).backward()
    assert (err_w.grad > 0).all() and (err_l.grad < 0).all()  # descent lowers err_w, raises err_l


# ------------------------------------------------------------------------------------------- the data

def png(color, size=(48, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder, rows, n_files=2):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(folder, exist_ok=True)
    for k in range(n_files):
        part = rows[k::n_files]
        pq.write_table(pa.table({key: [r[key] for r in part] for key in part[0]}), os.path.join(folder, f"part-{k}.parquet"))
    return folder


def pickapic_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = (tuple(int(c) for c in rng.integers(0, 255, 3)) for _ in range(2))
        rows.append(dict(caption=f"caption {i}", jpg_0=png(a, (48 + i % 5, 40)), jpg_1=png(b, (40, 56)),
                         label_0=float([1, 0, 1, 0, 0.5][i % 5]), label_1=float([0, 1, 0, 1, 0.5][i % 5])))
    return rows


def test_toy_heldout_captions_are_never_trained_on():
    train, heldout = set(rpo.toy_captions("train")), set(rpo.toy_captions("heldout"))
    assert heldout and train and not train & heldout
    assert {r["caption"] for r in rpo.toy_rows("train", 200)} <= train


def test_toy_winners_carry_the_style_losers_lack():
    cfg = rpo.parse_config([])
    for i, row in enumerate(rpo.toy_rows("train", 20)):
        pair = rpo.prepare_pair((row, i, cfg.resolution, False, None))
        dark = lambda img: (img.max(axis=0) < 40).mean()  # the black outline
        assert dark(pair["winner"]) > dark(pair["loser"])


def test_winner_comes_first_whatever_label_0_says():
    first, second = png((250, 0, 0)), png((0, 0, 250))
    for label, winner_red in ((1.0, True), (0.0, False)):
        pair = rpo.prepare_pair((dict(caption="c", jpg_0=first, jpg_1=second, label_0=label), 0, 32, False, None))
        assert pair["winner"].shape == (3, 32, 32)
        assert (pair["winner"][0].mean() > pair["winner"][2].mean()) == winner_red


def test_local_shards_drop_ties_and_count_broken_rows(tmp_path):
    rows = pickapic_rows(20)
    rows[1]["jpg_1"] = b"not an image"
    rows[2]["caption"] = None
    rows[3]["label_0"] = 0.3
    folder = write_shards(tmp_path / "shards", rows)
    cfg = rpo.parse_config(["--data", str(folder), "--batch", "2", "--no_flip", "--shuffle_buffer", "1"])
    counts = {k: 0 for k in rpo.SKIP_KEYS}
    seen = []
    for batch, pos in rpo.pair_batches(cfg, 0, 1, None, counts):
        seen += [(p["index"], p["caption"]) for p in batch]
        if pos[0] > 0:
            break
    assert counts["ties"] >= 4 and counts["bad_caption"] >= 1 and counts["bad_label"] >= 1 and counts["bad_image"] >= 1
    assert all(int(c.split()[1]) % 5 != 4 for _, c in seen)  # every fifth row is a tie


def test_missing_column_is_one_clear_error_before_training(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "label_0"} for r in pickapic_rows(4)]
    folder = write_shards(tmp_path / "no_label", rows, 1)
    with pytest.raises(SystemExit, match="lacks column.*label_0"):
        rpo.main(["--data", str(folder), "--out", str(tmp_path / "o"), "--workers", "0"])


def test_all_ties_is_one_clear_error_before_training(tmp_path):
    rows = [dict(r, label_0=0.5) for r in pickapic_rows(6)]
    folder = write_shards(tmp_path / "ties", rows, 1)
    with pytest.raises(SystemExit, match="0 trainable pairs"):
        rpo.main(["--data", str(folder), "--out", str(tmp_path / "o"), "--workers", "0", "--eval_pairs", "0"])


def test_unreachable_hub_dataset_is_one_line_naming_the_id_and_the_way_out(tmp_path, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'yuvalkirstain/pickapic_v2' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as e:
        rpo.open_rows("pickapic", "yuvalkirstain/pickapic_v2", "train")
    msg = str(e.value)
    assert "\n" not in msg and "yuvalkirstain/pickapic_v2" in msg and "--data /path" in msg and "--data_id" in msg


def test_hub_streaming_and_local_reading_give_the_same_pairs_in_the_same_order(tmp_path):
    folder = write_shards(tmp_path / "hub_copy", pickapic_rows(30), 3)  # a local folder stands in for the hub id
    take = lambda cfg: [[p["index"] for p in b] for b, _ in __import__("itertools").islice(rpo.pair_batches(cfg, 0, 1), 5)]
    hub = rpo.parse_config(["--data", "pickapic", "--data_id", str(folder), "--batch", "3", "--shuffle_buffer", "8"])
    local = rpo.parse_config(["--data", str(folder), "--batch", "3", "--shuffle_buffer", "8"])
    assert take(hub) == take(local)
    assert take(local) != sorted(take(local))  # and the shuffle buffer did shuffle


def test_pair_order_does_not_depend_on_the_number_of_decode_workers(tmp_path):
    import itertools
    import multiprocessing
    folder = write_shards(tmp_path / "w", pickapic_rows(24), 2)
    cfg = rpo.parse_config(["--data", str(folder), "--batch", "4", "--shuffle_buffer", "5"])
    serial = [[p["index"] for p in b] for b, _ in itertools.islice(rpo.pair_batches(cfg, 0, 1), 4)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        parallel = [[p["index"] for p in b] for b, _ in itertools.islice(rpo.pair_batches(cfg, 0, 1, pool=pool), 4)]
    assert serial == parallel


def test_tiny_xl_trains_from_local_pickapic_shards_counting_the_corrupt_row(tmp_path):
    rows = pickapic_rows(24)
    rows[0]["jpg_0"] = b"\xff\xd8 truncated jpeg"
    folder = write_shards(tmp_path / "shards", rows, 2)
    summary, metrics = train(tmp_path / "out", "--model", "tiny-xl", "--data", folder, "--batch", 4, "--max_steps", 3,
                             "--save_every", 100, "--sample_steps", 0, "--eval_data", folder)
    assert summary["steps"] == 3 and all(math.isfinite(r["loss"]) for r in metrics)
    assert metrics[-1]["bad_image"] == 1 and metrics[-1]["ties"] >= 4 and 0 <= summary["heldout_accuracy"] <= 1


def test_sdxl_time_ids_record_each_images_own_size_and_crop():
    row = dict(caption="c", jpg_0=png((1, 2, 3), (80, 48)), jpg_1=png((3, 2, 1), (40, 64)), label_0=1.0)
    pair = rpo.prepare_pair((row, 0, 32, False, None))
    assert pair["winner_time_ids"] == [48, 80, 0, 10, 32, 32]  # (orig h, orig w, crop top, crop left, target h, w)
    assert pair["loser_time_ids"] == [64, 40, 9, 0, 32, 32]
    assert pair["small"] == 0


# ------------------------------------------------------------------------------------------ training

def tiny_models(model="tiny", *flags):
    cfg = rpo.parse_config(["--model", model, *flags])
    m = rpo.load_models(cfg, torch.device("cpu"), torch.float32)
    return cfg, m


def toy_batch(cfg, m, split="train", n=8):
    pairs = [rpo.prepare_pair((row, i, cfg.resolution, False, None)) for i, row in enumerate(rpo.toy_rows(split, n))]
    return rpo.encode_pairs(m, rpo.collate(pairs), cfg.embed)


def test_a_few_optimizer_steps_on_one_fixed_batch_raise_its_implicit_accuracy_and_leave_the_reference_alone():
    torch.manual_seed(0)
    cfg, m = tiny_models("tiny", "--lr", "1e-4", "--eval_draws", "4")
    enc = toy_batch(cfg, m)
    before = rpo.evaluate(cfg, m, enc, rpo.nullcontext())
    ref_before = {k: v.clone() for k, v in m.ref_unet.state_dict().items()}
    policy_before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    opt = torch.optim.AdamW(m.unet.parameters(), lr=cfg.lr)
    for step in range(15):
        loss, metrics = rpo.preference_step(cfg, m, m.unet, enc, epoch=step)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = rpo.evaluate(cfg, m, enc, rpo.nullcontext())
    assert after["accuracy"] > before["accuracy"] and after["margin"] > before["margin"]
    assert all(torch.equal(v, ref_before[k]) for k, v in m.ref_unet.state_dict().items())
    assert not all(torch.equal(v, policy_before[k]) for k, v in m.unet.state_dict().items())
    assert not any(p.requires_grad for p in m.ref_unet.parameters())


def test_winner_and_loser_of_a_pair_share_noise_and_timestep_and_pairs_differ():
    cfg, m = tiny_models()
    enc = toy_batch(cfg, m, n=4)
    noise, t = rpo.pair_noise(["a", "b", "a"], enc["latents_w"][:3], 1000)
    assert torch.equal(noise[0], noise[2]) and t[0] == t[2] and not torch.equal(noise[0], noise[1])
    # one forward of [winners; losers] with the noise repeated: identical winner and loser give identical errors
    same = dict(enc, latents_l=enc["latents_w"], time_ids_l=enc["time_ids_w"])
    err_w, err_l = rpo.pair_errors(m.unet, m, same, [f"k{i}" for i in range(4)])
    assert torch.allclose(err_w, err_l)


def test_prompt_dropout_blanks_the_conditioning_but_not_the_pair_weights():
    cfg, m = tiny_models("tiny", "--drop_prompt", "1.0")
    enc = toy_batch(cfg, m, n=4)
    loss_all_dropped, metrics = rpo.preference_step(cfg, m, m.unet, enc, 0)
    blank = dict(enc, prompt=m.empty_prompt.expand_as(enc["prompt"]))
    cfg0 = rpo.parse_config(["--drop_prompt", "0"])
    loss_blank, metrics_blank = rpo.preference_step(cfg0, m, m.unet, blank, 0)
    assert torch.allclose(loss_all_dropped, loss_blank)
    assert metrics["w_diag"] == metrics_blank["w_diag"]  # f still comes from the original captions


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_tiny_models_train_end_to_end_save_a_diffusers_unet_and_resume_at_the_saved_step(tmp_path, model):
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    out = tmp_path / model
    summary, metrics = train(out, "--model", model, "--max_steps", 4, "--save_every", 2, "--batch", 4)
    assert summary["steps"] == 4 and math.isfinite(summary["loss"]) and 0 <= summary["heldout_accuracy"] <= 1
    assert [r["step"] for r in metrics] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in metrics)
    assert (out / "samples_4.png").exists() and (out / "ckpt.pt").exists()
    base = rpo.model_folder(rpo.parse_config(["--model", model]))
    tuned = UNet2DConditionModel.from_pretrained(out / "unet")
    original = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), original.state_dict().values()))
    pipe = DiffusionPipeline.from_pretrained(base, unet=tuned)
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    summary, metrics = train(out, "--model", model, "--max_steps", 6, "--save_every", 2, "--batch", 4, "--resume")
    assert summary["steps"] == 2 and [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]


def test_a_run_of_non_finite_losses_stops_with_a_clear_message_and_the_last_good_weights(tmp_path):
    with pytest.raises(SystemExit, match="non-finite losses in a row"):
        train(tmp_path, "--beta", "inf", "--max_nonfinite", 3, "--max_steps", 10, "--batch", 2)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    base = rpo.load_models(rpo.parse_config([]), torch.device("cpu"), torch.float32).unet.state_dict()
    assert ckpt["step"] == 3 and all(torch.equal(v, base[k]) for k, v in ckpt["unet"].items())


def test_cached_and_uncached_training_give_the_same_losses(tmp_path):
    # beta 100, not 5000: beta/2 multiplies the last-bit differences that batching the encoders differently leaves
    flags = ["--toy_pairs", 12, "--batch", 4, "--max_steps", 6, "--save_every", 100, "--eval_pairs", 0, "--shuffle_buffer", 5,
             "--beta", 100]
    _, plain = train(tmp_path / "plain", *flags)  # 3 steps an epoch: the last 3 steps are a second, reshuffled epoch
    _, cached = train(tmp_path / "cached", *flags, "--cache", tmp_path / "cache")
    assert (tmp_path / "cache" / "chunk-0000000.pt").exists() and json.load(open(tmp_path / "cache" / "meta.json"))["n"] == 12
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    _, again = train(tmp_path / "again", *flags, "--cache", tmp_path / "cache")  # a finished cache is only read
    assert [r["loss"] for r in again] == [r["loss"] for r in cached]


def test_only_uncached_rpo_spends_training_time_on_pair_embeddings(tmp_path):
    # what an RPO step adds to a DPO step: CLIP, which --cache moves out of the loop, and an M x M matrix of scalars
    flags = ["--toy_pairs", 8, "--batch", 4, "--max_steps", 3, "--save_every", 100, "--eval_pairs", 0, "--sample_steps", 0]
    runs = [train(tmp_path / name, *flags, *extra)[0] for name, extra in
            [("rpo", []), ("dpo", ["--loss", "dpo"]), ("cached", ["--cache", tmp_path / "cache"])]]
    assert [r["weight_time_share"] > 0 for r in runs] == [True, False, False]
    assert all(r["median_step_ms"] > 0 and r["pairs_per_s"] > 0 and r["tflops_per_s"] > 0 for r in runs)
    assert all(r["mfu"] is None for r in runs)  # MFU is quoted against a GPU's peak only


@pytest.mark.parametrize("loss", ["rpo", "sft"])
def test_mfu_flop_count_matches_the_counted_flops_of_a_real_micro_step(loss):
    # rpo: 3 policy forwards (forward + backward) + 1 reference forward of the 2M images; sft: 3 of the M winners
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg, m = tiny_models("tiny", "--loss", loss)
    enc = toy_batch(cfg, m, n=4)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        rpo.preference_step(cfg, m, m.unet, enc, epoch=0)[0].backward()
    assert rpo.step_flops(cfg, m, enc) == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path):
    summary, metrics = train(tmp_path, "--precision", "bf16", "--max_steps", 3, "--batch", 2, "--sample_steps", 0)
    assert summary["precision"] == "bf16" and all(math.isfinite(r["loss"]) for r in metrics)
    assert {v.dtype for v in torch.load(tmp_path / "ckpt.pt", weights_only=False)["unet"].values()} == {torch.float32}


def test_a_checkpoint_truncated_mid_write_is_passed_over_for_the_previous_one(tmp_path):
    train(tmp_path, "--max_steps", 4, "--save_every", 2, "--batch", 2, "--keep", 2)
    assert (tmp_path / "ckpt-0000002.pt").exists()
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    assert rpo.load_checkpoint(str(tmp_path))["step"] == 2
    summary, metrics = train(tmp_path, "--max_steps", 5, "--save_every", 2, "--batch", 2, "--keep", 2, "--resume")
    assert summary["steps"] == 3 and [r["step"] for r in metrics] == [1, 2, 3, 4, 5]


def run_script(out, *flags, nproc=1, wait=True):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []) + [os.path.join(HERE, "rpo.py"), "--out", str(out), "--workers", "0", *map(str, flags)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    if not wait:
        return proc
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def final_unet(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["unet"]


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    flags = ["--max_steps", 3, "--save_every", 3, "--eval_pairs", 0, "--toy_pairs", 64]
    one = run_script(tmp_path / "one", *flags, "--batch", 2, "--grad_accum", 2)
    two = run_script(tmp_path / "two", *flags, "--batch", 2, "--grad_accum", 1, nproc=2)
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["accuracy"] == b["accuracy"]
    w1, w2 = final_unet(tmp_path / "one"), final_unet(tmp_path / "two")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    # --global_contrast: 2 ranks x 2 pairs build the 4 x 4 matrix that one process builds from 4 pairs. Forwards of
    # 4 and 8 images round differently in the last bit; beta 100 keeps beta/2 from magnifying that past 1e-5.
    flags += ["--beta", 100]
    one = run_script(tmp_path / "one4", *flags, "--batch", 4, "--grad_accum", 1)
    two = run_script(tmp_path / "two4", *flags, "--batch", 2, "--grad_accum", 1, "--global_contrast", nproc=2)
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["w_diag"] == pytest.approx(b["w_diag"], abs=1e-6)
    w1, w2 = final_unet(tmp_path / "one4"), final_unet(tmp_path / "two4")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


def test_global_contrast_on_one_process_equals_the_local_loss(tmp_path):
    import torch.distributed as dist
    cfg, m = tiny_models("tiny", "--global_contrast")
    enc = toy_batch(cfg, m, n=4)
    local, _ = rpo.preference_step(rpo.parse_config([]), m, m.unet, enc, 0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        gathered, _ = rpo.preference_step(cfg, m, m.unet, enc, 0)
        g = torch.randn(3, 5, requires_grad=True)
        rpo.gather(g).sum().backward()
    finally:
        dist.destroy_process_group()
    assert torch.equal(local, gathered) and torch.equal(g.grad, torch.ones(3, 5))


def test_an_interrupted_run_resumes_to_exactly_the_metrics_of_an_uninterrupted_one(tmp_path):
    import time
    flags = ["--max_steps", 8, "--save_every", 2, "--eval_pairs", 0, "--batch", 4, "--toy_pairs", 20]  # epochs of 5 steps
    full = run_script(tmp_path / "full", *flags)
    proc = run_script(tmp_path / "cut", *flags, wait=False)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    assert len(metrics.read_text().splitlines()) < 8, "the run finished before it could be interrupted"
    resumed = run_script(tmp_path / "cut", *flags, "--resume")
    assert resumed == full


def test_replication_loop_reports_heldout_accuracy_and_rpo_with_one_pair_is_dpo(tmp_path):
    runs = {}
    for loss in ("dpo", "rpo"):  # the README's loop: one rpo.py run per method, end-of-run JSON line read back
        out = tmp_path / loss
        summary, metrics = train(out, "--loss", loss, "--batch", 1, "--seed", 0, "--max_steps", 3, "--toy_pairs", 32,
                                 "--save_every", 100000, "--sample_steps", 0)
        runs[loss] = summary, metrics
        assert 0.0 <= summary["heldout_accuracy"] <= 1.0
        assert summary["loss_type"] == loss and summary["batch"] == 1 and len(metrics) == 3
        assert metrics[-1]["heldout_accuracy"] == summary["heldout_accuracy"]  # evaluated at max_steps
    (dpo, dpo_metrics), (rpo_, rpo_metrics) = runs["dpo"], runs["rpo"]
    # one pair per micro-batch: the 1 x 1 softmax weight is exactly 1, so RPO is DPO step for step
    assert [r["loss"] for r in rpo_metrics] == [r["loss"] for r in dpo_metrics]
    assert [r["accuracy"] for r in rpo_metrics] == [r["accuracy"] for r in dpo_metrics]
    for key in ("heldout_accuracy", "heldout_margin", "loss"):
        assert rpo_[key] == dpo[key], key

# ------------------------------------------------------------------- style alignment (eval_style.py)

def run_style(*argv):
    """eval_style.py's main in this process; returns its stdout."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        eval_style.main([str(a) for a in argv])
    return buf.getvalue()


@pytest.fixture(scope="module")
def style_data(tmp_path_factory):
    """make-data on tiny: 12 toy captions edited by a random InstructPix2Pix, every 4th held out."""
    d = tmp_path_factory.mktemp("style")
    run_style("make-data", "--model", "tiny", "--n", 12, "--test_every", 4, "--steps", 2, "--out", d / "style.parquet")
    return d


@pytest.fixture(scope="module")
def trained(style_data):
    out = style_data / "out"
    with redirect_stdout(io.StringIO()):
        rpo.main(["--model", "tiny", "--data", str(style_data / "style.parquet"), "--max_steps", "2", "--batch", "4",
                  "--workers", "0", "--eval_pairs", "0", "--out", str(out)])
    return out


# ---------------------------------------------------------------------------------------- metrics

def test_frechet_distance_is_zero_for_identical_sets():
    x = np.random.default_rng(0).normal(size=(200, 16))
    assert eval_style.frechet_distance(x, x) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(100, 8)), rng.normal(1.0, 2.0, size=(150, 8)) @ rng.normal(size=(8, 8))
    assert eval_style.frechet_distance(a, b) == pytest.approx(eval_style.frechet_distance(b, a), rel=1e-8)


def test_frechet_distance_matches_the_closed_form_for_two_gaussians():
    rng = np.random.default_rng(2)
    mu_a, mu_b, var_a, var_b = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    # same eigenbasis R: FD = |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2, whatever the rotation
    closed = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    for R in (np.eye(6), np.linalg.qr(rng.normal(size=(6, 6)))[0]):
        s_a, s_b = R @ np.diag(var_a) @ R.T, R @ np.diag(var_b) @ R.T
        assert eval_style.gaussian_frechet(mu_a, s_a, mu_b, s_b) == pytest.approx(closed, rel=1e-9)
    samples = lambda mu, var, n: mu + np.sqrt(var) * rng.normal(size=(n, 6))
    fd = eval_style.frechet_distance(samples(mu_a, var_a, 200_000), samples(mu_b, var_b, 200_000))
    assert fd == pytest.approx(closed, rel=0.02)


def test_frechet_distance_is_finite_and_non_negative_when_n_is_below_d():
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 30):
        fd = eval_style.frechet_distance(rng.normal(size=(n, 64)), rng.normal(0.5, 1, size=(n, 64)))
        assert math.isfinite(fd) and fd >= 0
    x = rng.normal(size=(5, 64))
    assert eval_style.frechet_distance(x, x) == pytest.approx(0, abs=1e-8)


def test_gram_distance_is_zero_for_identical_sets_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    h_a = [torch.randn(4, 16, 8, generator=g) for _ in range(3)]  # 3 layers, 4 images, 16 tokens, 8 channels
    h_b = [torch.randn(4, 16, 8, generator=g) * torch.linspace(0.2, 2, 8) for _ in range(3)]
    a, b = eval_style.mean_grams(h_a), eval_style.mean_grams(h_b)
    assert eval_style.gram_distance(a, a) == 0
    assert 0 < eval_style.gram_distance(a, b) <= 1
    assert eval_style.gram_distance(a, b) == pytest.approx(eval_style.gram_distance(b, a))


def test_mean_gram_is_h_transpose_h_over_tokens_averaged_over_images():
    h = torch.randn(3, 5, 4, dtype=torch.float64)
    expected = sum(h[i].T @ h[i] / 5 for i in range(3)) / 3
    assert np.allclose(eval_style.mean_grams([h])[0], expected.numpy(), atol=1e-5)


def test_clip_score_is_100_times_the_cosine_clipped_at_zero():
    text = torch.tensor([[1.0, 0.0]])
    images = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])  # cosines 1, 1/sqrt(2), -1 -> 0
    assert eval_style.clip_score(images, text) == pytest.approx(100 * (1 + 2 ** -0.5 + 0) / 3)


# ------------------------------------------------------------------------------------ the pipeline

def test_make_data_writes_pick_a_pic_pairs_with_edited_winners_and_held_out_captions(style_data):
    train, test = (pq.read_table(style_data / f).to_pylist() for f in ("style.parquet", "style_test.parquet"))
    assert (len(train), len(test)) == (9, 3)
    assert all(set(rpo.COLUMNS) <= set(r) and r["label_0"] == 1 for r in train + test)
    assert all(r["jpg_0"] != r["jpg_1"] for r in train + test)
    captions = [r["caption"] for r in train]
    assert len(set(captions)) == len(captions) and not set(captions) & {r["caption"] for r in test}
    assert rpo.decode(train[0]["jpg_0"]).size == (32, 32)


def test_rpo_trains_on_the_style_parquet(trained):
    metrics = [json.loads(l) for l in open(trained / "metrics.jsonl")]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert os.path.exists(trained / "unet" / "config.json")


def test_score_prints_a_table_and_json_for_base_and_tuned_models(style_data, trained):
    out = run_style("score", "--model", "tiny", "--unet", trained / "unet", "--prompts", style_data / "style_test.parquet",
              "--steps", 2, "--save", style_data / "generated")
    assert "FD (CLIP)" in out and "Gram" in out and "CLIP score" in out
    result = json.loads(out.strip().splitlines()[-1])
    for name in ("base", "tuned"):
        r = result[name]
        assert r["images"] == 3 and r["fd"] >= 0 and 0 <= r["gram"] <= 1 and 0 <= r["clip_score"] <= 100
        assert name in out and len(os.listdir(style_data / "generated" / name)) == 3
    assert result["reference"]["images"] == 3


def test_scoring_the_reference_images_themselves_gives_zero_distances(style_data, tmp_path):
    for k, r in enumerate(pq.read_table(style_data / "style_test.parquet").to_pylist()):
        rpo.decode(r["jpg_0"]).save(tmp_path / f"{k}.png")
    out = run_style("score", "--model", "tiny", "--images", tmp_path, "--ref", style_data / "style_test.parquet",
              "--prompts", style_data / "style_test.parquet")
    r = json.loads(out.strip().splitlines()[-1])[tmp_path.name]
    assert r["fd"] == pytest.approx(0, abs=1e-4) and r["gram"] == pytest.approx(0, abs=1e-6)


def test_unknown_style_without_instruction_exits_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="eval_style.py: unknown style 'cubism'"):
        run_style("make-data", "--model", "tiny", "--style", "cubism", "--n", 4, "--out", tmp_path / "s.parquet")


def test_missing_prompts_file_exits_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="eval_style.py: --prompts .* does not exist"):
        run_style("score", "--model", "tiny", "--prompts", tmp_path / "nope.parquet")
