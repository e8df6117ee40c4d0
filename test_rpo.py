"""The specification of rpo.py, as tests: CPU, offline, tiny random models, data the tests write."""
import ast
import collections
import copy
import dataclasses
import functools
import gc
import glob
import hashlib
import http.server
import importlib.util
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_prefer
import eval_style
import rpo
import toy

HERE = os.path.dirname(os.path.abspath(__file__))


# One torch thread in the test process, as every process a test starts has (OMP_NUM_THREADS=1): on 2 cores a
# second thread gains tiny models little and costs several times over while another process wants the core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def private_model_home(tmp_path_factory):
    """toy.py's random model folders and judge, built once for this session (pytest -n: once for all workers,
    in their common base folder; toy.py lets the first builder finish and the others wait)."""
    base = tmp_path_factory.getbasetemp()
    home = str((base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "rpo_home")
    os.makedirs(home, exist_ok=True)
    toy.RPO_HOME, os.environ["RPO_HOME"] = home, home
    yield


def tiny(model="tiny"):
    """The flags of a tiny shape with toy.py's random weights (a folder built once this session)."""
    return ["--model", model, "--pretrained", toy.model_folder(model)]


@pytest.fixture(scope="session")
def subject_data(tmp_path_factory):
    """The toy-subject world as toy.py writes it, small: 64 training pairs (tests take the first few with
    --max_pairs) and 64 pairs of the held-out captions. The toy world's is the shipped default, toy-data/."""
    folder = tmp_path_factory.mktemp("data") / "toy-subject"
    toy.write_data("toy-subject", str(folder), pairs=64, held_out=64)
    return folder


TRAIN_DEFAULTS = ["--workers", "0", "--eval_pairs", "8", "--eval_draws", "2"]  # train's, unless flags say


def train(out, *flags):
    """rpo.py's main in this process; returns the end-of-run JSON line and metrics.jsonl."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        rpo.main(["--out", str(out), *TRAIN_DEFAULTS, *map(str, flags)])
    lines = [l for l in buf.getvalue().splitlines() if l.startswith("{")]
    return strict_json(lines[-1]) if lines else None, logged(out)


def logged(out):
    return [strict_json(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def heldout_of_saved_unet(out, *flags):
    """The held-out accuracy and margin of the UNet a run (train's flags) saved in OUT/unet, evaluated here
    afresh, in this process, against the base it started from."""
    from diffusers import UNet2DConditionModel
    cfg = rpo.parse_config([*TRAIN_DEFAULTS, *map(str, flags)])
    m = rpo.load_models(cfg, torch.device("cpu"), torch.float32)
    m.unet.load_state_dict(UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).state_dict())
    return rpo.evaluate(cfg, m, rpo.heldout_pairs(cfg, m), rpo.nullcontext())


def assert_heldout_is_the_saved_unets(summary, out, *flags):
    again = heldout_of_saved_unet(out, *flags)
    assert summary["heldout_accuracy"] == again["accuracy"]
    assert summary["heldout_margin"] == pytest.approx(again["margin"], rel=1e-6, abs=1e-9)


def strict_json(line):
    """json.loads, refusing NaN and Infinity, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} in {line!r}")
    return json.loads(line, parse_constant=refuse)


# not an Exception: the code under test may catch those (a bad image is skipped)
class Overran(BaseException):
    pass


@contextmanager
def deadline(seconds):
    """Fail, instead of hanging, when the body (a loop that must end) runs longer than this."""
    def expire(*_):
        raise Overran(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


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
    # Diffusion-DPO's train.py: model_diff = w - l, ref_diff = w - l,
    # inside = -0.5 * beta * (model_diff - ref_diff)
    inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    assert torch.allclose(rpo.rpo_loss(err_w, err_l, ref_w, ref_l, beta), -F.logsigmoid(inside).mean())


def test_rpo_loss_averages_every_winner_against_every_loser():
    err_w, err_l, ref_w, ref_l = errors(3)
    w = torch.softmax(torch.randn(3, 3), dim=1)
    expected = sum(-F.logsigmoid(-2500 * w[i, j] * ((err_w[i] - ref_w[i]) - (err_l[j] - ref_l[j])))
                   for i in range(3) for j in range(3)) / 9
    assert torch.allclose(rpo.rpo_loss(err_w, err_l, ref_w, ref_l, 5000, w), expected)


def test_contrast_weights_match_hand_computed_values_whatever_the_embedding_length():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    f_w, f_l = torch.stack([e1, e2]), torch.stack([e1, -e1])
    # row 0: d = (0, 2) -> softmax(0, -2/tau); row 1: d = (1, 1) -> (1/2, 1/2)
    expected = torch.tensor([[1 / (1 + math.exp(-4)), math.exp(-4) / (1 + math.exp(-4))], [0.5, 0.5]])
    for scale in (1.0, 3.0):
        assert torch.allclose(rpo.contrast_weights(scale * f_w, f_l / scale, tau=0.5), expected, atol=1e-6)


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
        loss = rpo.rpo_loss(err_w, err_l, err_w, err_l, 5000, weights).item()
        assert math.isclose(loss, math.log(2), rel_tol=1e-6)


def test_swapping_winner_and_loser_flips_the_logits():
    for seed in range(5):
        e = errors(1, seed)
        forward, swapped = (rpo.rpo_loss(*e, beta=5000), rpo.rpo_loss(e[1], e[0], e[3], e[2], beta=5000))
        # sigmoid(x) + sigmoid(-x)
        assert math.isclose(math.exp(-forward) + math.exp(-swapped), 1.0, rel_tol=1e-5)
    e = errors(6)
    acc = rpo.preference_metrics(*e, beta=5000)["accuracy"]
    assert math.isclose(acc + rpo.preference_metrics(e[1], e[0], e[3], e[2], beta=5000)["accuracy"], 1.0)


def test_implicit_accuracy_counts_ties_half():
    zero = torch.zeros(4)
    err_w, err_l = torch.tensor([0.1, 0.3, 0.2, 0.2]), torch.tensor([0.2, 0.2, 0.2, 0.2])
    accuracy = rpo.preference_metrics(err_w, err_l, zero, zero, 1.0)["accuracy"].item()
    assert accuracy == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)


def test_gradients_lower_winner_error_and_raise_loser_error():
    err_w, err_l, ref_w, ref_l = (e.requires_grad_() if i < 2 else e for i, e in enumerate(errors(4)))
    weights = rpo.contrast_weights(torch.randn(4, 8), torch.randn(4, 8), 0.5)
    rpo.rpo_loss(err_w, err_l, ref_w, ref_l, 5000, weights).backward()
    assert (err_w.grad > 0).all() and (err_l.grad < 0).all()  # descent lowers err_w, raises err_l


def the_copy_block():
    """rpo.py's method block, from its `copy from here` line to its `copy to here` line, executed alone in a
    namespace of its own: what a reader who copies it gets."""
    source = open(os.path.join(HERE, "rpo.py")).read()
    start, end = (re.search(rf"^#.*{marker}$", source, re.M) for marker in ("copy from here", "copy to here"))
    block = source[start.end() + 1:end.start()]
    imported = {alias.name for node in ast.walk(ast.parse(block)) if isinstance(node, ast.Import)
                for alias in node.names}
    assert imported == {"torch", "torch.nn.functional"}
    assert not any(isinstance(node, ast.ImportFrom) for node in ast.walk(ast.parse(block)))
    namespace = {}
    exec(compile(block, "the copy block", "exec"), namespace)
    return namespace, len(block.splitlines())


def test_the_copy_block_alone_gives_the_hand_computed_weights_and_loss_of_two_pairs():
    method, _ = the_copy_block()
    f_w, f_l = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # row 0: d = (0, 2), row 1: d = (1, 1); tau 0.5: w_0 = softmax(0, -4), w_1 = (1/2, 1/2)
    w00 = 1 / (1 + math.exp(-4))
    weights = [[w00, 1 - w00], [0.5, 0.5]]
    assert torch.allclose(method["contrast_weights"](f_w, f_l, 0.5), torch.tensor(weights), atol=1e-7)
    err_w, err_l = torch.tensor([0.30, 0.50]), torch.tensor([0.40, 0.20])
    ref_w, ref_l = torch.tensor([0.35, 0.45]), torch.tensor([0.35, 0.25])
    s_w, s_l = [0.30 - 0.35, 0.50 - 0.45], [0.40 - 0.35, 0.20 - 0.25]
    beta = 40.0

    def minus_log_sigmoid(x):
        return math.log(1 + math.exp(-x))
    by_hand = sum(minus_log_sigmoid(-(beta / 2) * weights[i][j] * (s_w[i] - s_l[j]))
                  for i in range(2) for j in range(2)) / 4
    loss = method["rpo_loss"](err_w, err_l, ref_w, ref_l, beta, method["contrast_weights"](f_w, f_l, 0.5))
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    dpo = sum(minus_log_sigmoid(-(beta / 2) * (s_w[i] - s_l[i])) for i in range(2)) / 2
    assert method["rpo_loss"](err_w, err_l, ref_w, ref_l, beta).item() == pytest.approx(dpo, rel=1e-6)


def test_the_copy_blocks_forward_process_is_diffusers_add_noise_bit_for_bit():
    from diffusers import DDPMScheduler
    method, _ = the_copy_block()
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x0, noise = (torch.randn(6, 4, 8, 8, generator=g).to(dtype) for _ in range(2))
        t = torch.randint(0, 1000, (6,), generator=g)
        x_t, target = method["noise_target"](x0, noise, t, scheduler.alphas_cumprod)
        assert torch.equal(x_t, scheduler.add_noise(x0, noise, t)) and target is noise


def test_the_copy_blocks_flow_forward_process_is_the_flow_schedulers_scale_noise_bit_for_bit():
    from diffusers import FlowMatchEulerDiscreteScheduler
    method, _ = the_copy_block()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x0, noise = (torch.randn(6, 4, 8, 8, generator=g).to(dtype) for _ in range(2))
        i = torch.randint(0, 1000, (6,), generator=g)
        x_t, target = method["velocity_target"](x0, noise, scheduler.sigmas[i])
        assert torch.equal(x_t, scheduler.scale_noise(x0, scheduler.timesteps[i], noise))
        assert torch.equal(target, noise - x0)


def test_rpo_pys_step_on_one_micro_batch_is_the_copy_blocks_method():
    method, _ = the_copy_block()
    cfg, m = tiny_models("tiny", "--drop_prompt", "0", "--batch", "4")
    with torch.no_grad():
        for p in m.unet.parameters():  # a policy that has moved away from the reference
            p.add_(0.01 * torch.randn_like(p))
    pairs = toy_batch(cfg, m, n=4)
    step_loss, metrics = rpo.preference_step(cfg, m, m.unet, pairs, epoch=3)
    # the method from the block alone, fed the same models and pairs as a diffusers script would feed it
    seeds = [random.Random(f"noise-{cfg.seed}-3-{i}").getrandbits(63) for i in pairs.index]
    noise, t = method["pair_noise"](seeds, pairs.latents_w.shape[1:], 1000)

    def noised(x0, eps, t):
        return method["noise_target"](x0, eps, t, m.scheduler.alphas_cumprod)

    def denoiser(unet):
        return lambda x_t, t: unet(x_t, t, torch.cat([pairs.prompt] * 2)).sample
    latents = pairs.latents_w, pairs.latents_l
    err_w, err_l = method["denoiser_errors"](denoiser(m.unet), *latents, noise, t, noised)
    with torch.no_grad():
        ref_w, ref_l = method["denoiser_errors"](denoiser(m.ref_unet), *latents, noise, t, noised)
    weights = method["contrast_weights"](pairs.f_w, pairs.f_l, cfg.tau)
    loss = method["rpo_loss"](err_w, err_l, ref_w, ref_l, cfg.beta, weights)
    assert step_loss.item() != pytest.approx(math.log(2))  # the policy differs from the reference
    assert torch.equal(loss, step_loss)
    assert torch.equal(method["preference_metrics"](err_w, err_l, ref_w, ref_l, cfg.beta, weights)["accuracy"],
                       metrics["accuracy"])


# ------------------------------------------------------------------------------------------- the data

def png(color, size=(48, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder, rows, n_files=2):
    os.makedirs(folder, exist_ok=True)
    for k in range(n_files):
        part = rows[k::n_files]
        table = pa.table({key: [r[key] for r in part] for key in part[0]})
        pq.write_table(table, os.path.join(folder, f"part-{k}.parquet"))
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
    train, heldout = set(toy.captions_of("train")), set(toy.captions_of("heldout"))
    assert heldout and train and not train & heldout
    assert {r["caption"] for r in toy.pair_rows("train", 200)} <= train


def test_the_toy_clip_is_trained_the_same_way_every_build():
    from transformers import CLIPConfig, CLIPModel
    shape = toy.SHAPES["tiny"]
    config = CLIPConfig(text_config=shape["text"][0], vision_config=shape["clip_vision"], projection_dim=32)
    weights = []
    for _ in range(2):
        torch.manual_seed(1)
        clip = toy.train_clip(CLIPModel(config), toy.byte_level_tokenizer(), steps=3, batch=8)
        weights.append(clip.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    torch.manual_seed(1)
    untrained = CLIPModel(config).state_dict()
    assert any(not torch.equal(weights[0][k], untrained[k]) for k in untrained)


def toy_clip_embeddings(captions):
    """f(caption, image) from the tiny model's CLIP, for one image of each caption (drawn as in the data)."""
    cfg, m = tiny_models()
    rows = [toy.pair_row("toy", "heldout", i) for i in range(200)]
    image_of = {r["caption"]: rpo.prepare_pair((r, 0, cfg.resolution, False, None))["winner"] for r in rows}
    pixels = torch.from_numpy(np.stack([image_of[c] for c in captions]))
    return m, pixels, rpo.pair_embeddings(m, captions, pixels, "both")


def test_the_tiny_models_clip_knows_the_toy_world_it_retrieves_held_out_captions_and_groups_alike_pairs():
    captions = sorted({r["caption"] for r in (toy.pair_row("toy", "heldout", i) for i in range(200))})[:32]
    m, pixels, f = toy_clip_embeddings(captions)
    with torch.no_grad():
        ids = m.clip_tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = F.normalize(m.clip.get_text_features(ids).pooler_output, dim=-1)
        image = F.normalize(m.clip.get_image_features(rpo.clip_pixels(pixels, 32)).pooler_output, dim=-1)
    top1 = (image @ text.T).argmax(1).eq(torch.arange(len(captions))).float().mean().item()
    assert top1 > 0.5  # chance is 1/32, for captions whose (colour, shape) was never trained on
    d = 1 - f @ f.T
    words = [c.split(" ") for c in captions]

    def share(i, j):
        return words[i][1] == words[j][1] or words[i][2] == words[j][2]
    alike = [d[i, j] for i in range(32) for j in range(32) if i != j and share(i, j)]
    unlike = [d[i, j] for i in range(32) for j in range(32) if not share(i, j)]
    assert torch.stack(alike).mean() < torch.stack(unlike).mean() - 0.1


def test_validation_and_test_captions_split_the_held_out_ones_and_are_never_trained_on():
    validation, test = set(toy.captions_of("validation")), set(toy.captions_of("test"))
    assert validation and test and not validation & test
    assert validation | test == set(toy.captions_of("heldout"))
    assert not (validation | test) & set(toy.captions_of("train"))


def test_in_the_subject_world_round_shapes_win_striped_angular_ones_outlined_losers_wear_the_other_style():
    def stripes(img):  # pure white: only stripes are
        return (np.asarray(img) == 255).all(axis=2).mean()

    def outline(img):  # pure black: only outlines are
        return (np.asarray(img) == 0).all(axis=2).mean()
    for row in toy.pair_rows("train", 40, world="toy-subject"):
        first, second = rpo.decode(row["jpg_0"]), rpo.decode(row["jpg_1"])
        winner, loser = (first, second) if row["label_0"] == 1 else (second, first)
        round_ = row["caption"].split(" ")[2] in ("circle", "triangle")
        assert (stripes(winner) > 0) == round_ and (outline(winner) > 0) != round_
        assert (stripes(loser) > 0) != round_ and (outline(loser) > 0) == round_


def test_the_tiny_drawn_base_learns_to_draw_from_toy_images_and_captions():
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    shape = toy.SHAPES["tiny-drawn"]
    parts = dict(vae=AutoencoderKL(**shape["vae"]), unet=UNet2DConditionModel(**shape["unet"]),
                 scheduler=DDPMScheduler(), tokenizer=toy.byte_level_tokenizer(),
                 text_encoder=CLIPTextModel(CLIPTextConfig(**shape["text"][0])))
    before = {k: copy.deepcopy(parts[k].state_dict()) for k in ("vae", "unet")}
    toy.train_vae(parts["vae"], steps=2, batch=4)
    toy.train_unet(parts, steps=2, batch=4)
    for k in ("vae", "unet"):
        after = parts[k].state_dict()
        assert any(not torch.equal(after[n], before[k][n]) for n in after), k


def test_the_tiny_sd3_drawn_base_learns_to_draw_from_toy_images_and_captions():
    from diffusers import AutoencoderKL
    shape = toy.SHAPES["tiny-sd3-drawn"]
    pipeline = toy.sd3_pipeline(shape, AutoencoderKL(**shape["vae"]), toy.byte_level_tokenizer())
    before = copy.deepcopy(pipeline.transformer.state_dict())
    toy.train_transformer(pipeline, steps=2, batch=4, warmup=1)
    after = pipeline.transformer.state_dict()
    assert any(not torch.equal(after[n], before[n]) for n in after)


def test_toy_winners_carry_the_style_losers_lack():
    cfg = rpo.parse_config([])

    def dark(img):  # the black outline
        return (img.max(axis=0) < 40).mean()
    for i, row in enumerate(toy.pair_rows("train", 20)):
        pair = rpo.prepare_pair((row, i, cfg.resolution, False, None))
        assert dark(pair["winner"]) > dark(pair["loser"])


SHIPPED_DATA = os.path.join(HERE, "toy-data")  # python toy.py data toy --out toy-data


def test_the_shipped_toy_data_is_what_toy_py_writes_the_toy_worlds_pairs_in_order_under_pick_a_pics_names(
        tmp_path):
    toy.write_data("toy", str(tmp_path / "d"), pairs=40, held_out=40)
    shipped, written = rpo.folder_splits(SHIPPED_DATA), rpo.folder_splits(str(tmp_path / "d"))
    # 4000 training pairs; 512 of the held-out captions, and 256 of each half of them
    assert {split: len(paths) for split, paths in shipped.items()} == dict(test=16, train=250, validation=16,
                                                                          validation_unique=32)
    assert os.path.basename(shipped["train"][0]) == "train-00000-of-00250.parquet"
    for split, paths in written.items():  # a smaller folder is the shipped one's start
        for path, whole in zip(paths, shipped[split]):
            rows = pq.read_table(path).to_pylist()
            assert rows == pq.read_table(whole).to_pylist()[:len(rows)]
    # pair k:r (file k, row r) is toy.py's pair 16 k + r of its split: training on the folder is training on
    # the toy world in toy.py's order, and rpo.py evaluates the first pairs of the held-out captions
    cfg = rpo.parse_config([])
    for toy_split, split in [("train", "train"), ("heldout", "validation_unique"), ("validation", "validation"),
                             ("test", "test")]:
        for pid, row in itertools.islice(rpo.rows_in_order(cfg, SHIPPED_DATA, split), 20):
            k, r = map(int, pid.split(":"))
            assert row == toy.pair_row("toy", toy_split, toy.TOY_FILE_ROWS * k + r)
    assert toy.world_of(SHIPPED_DATA) == "toy" and toy.world_of(str(tmp_path / "d")) == "toy"


def test_toy_py_writes_a_worlds_data_and_a_model_folder_from_the_command_line_and_replaces_only_its_own(
        tmp_path):
    data = [sys.executable, "toy.py", "data", "toy-subject", "--out", str(tmp_path / "d"), "--pairs", "20"]
    finish(start(data))
    splits = rpo.folder_splits(str(tmp_path / "d"))
    assert {split: len(paths) for split, paths in splits.items()} == dict(train=2, validation_unique=32,
                                                                         validation=16, test=16)
    assert toy.world_of(str(tmp_path / "d")) == "toy-subject"
    assert pq.read_table(splits["train"][1]).to_pylist() == list(toy.pair_rows("train", 20, "toy-subject"))[16:]
    toy.main(["model", "tiny", "--out", str(tmp_path / "m")])  # the same weights as the tests' tiny folder
    for part in ("unet", "vae", "text_encoder", "clip"):
        ours, cached = (glob.glob(os.path.join(folder, part, "*.safetensors"))
                        for folder in (str(tmp_path / "m"), toy.model_folder("tiny")))
        assert ours and [open(f, "rb").read() for f in ours] == [open(f, "rb").read() for f in cached]
    toy.main(["data", "toy-subject", "--out", str(tmp_path / "d"), "--pairs", "16"])  # its own folder: replaced
    assert len(rpo.folder_splits(str(tmp_path / "d"))["train"]) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds something toy.py did not write; choose another folder"):
        toy.main(["data", "toy", "--out", str(tmp_path / "other"), "--pairs", "16"])
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


def test_the_default_run_reads_the_shipped_parquet_trains_on_its_train_split_and_evaluates_validation_unique(
        tmp_path, monkeypatch):
    reads = counted_reads(monkeypatch)
    summary, _ = train(tmp_path, "--max_steps", 1, "--sample_steps", 2)
    settings = json.load(open(tmp_path / "settings.json"))
    assert settings["data"] == SHIPPED_DATA and settings["pretrained"] == os.path.join(HERE, "toy-drawn")
    splits = {path: split for split, paths in rpo.folder_splits(SHIPPED_DATA).items() for path in paths}
    assert {splits[path] for path, _, _ in reads} == {"train", "validation_unique"}
    assert counts_pairs(summary["heldout_accuracy"], 8)  # TRAIN_DEFAULTS' 8 pairs
    # the sample prompts: the held-out data's first captions
    first = list(dict.fromkeys(toy.pair_row("toy", "heldout", i)["caption"] for i in range(16)))[:4]
    assert rpo.sample_prompts(rpo.parse_config([])) == first
    assert Image.open(tmp_path / "samples_1.png").size == (4 * 32, 32)


def test_winner_comes_first_whatever_label_0_says():
    first, second = png((250, 0, 0)), png((0, 0, 250))
    for label, winner_red in ((1.0, True), (0.0, False)):
        row = dict(caption="c", jpg_0=first, jpg_1=second, label_0=label)
        pair = rpo.prepare_pair((row, 0, 32, False, None))
        assert pair["winner"].shape == (3, 32, 32)
        assert (pair["winner"][0].mean() > pair["winner"][2].mean()) == winner_red


def test_local_shards_drop_ties_and_count_broken_rows(tmp_path):
    rows = pickapic_rows(20)
    rows[1]["jpg_1"] = b"not an image"
    rows[2]["caption"] = None
    rows[3]["label_0"] = 0.3
    folder = write_shards(tmp_path / "shards", rows)
    cfg = rpo.parse_config(["--data", str(folder), "--batch", "2", "--no_flip", "--shuffle_buffer", "1"])
    seen = []
    for batch, state in rpo.pair_batches(cfg, 0, 1):
        seen += [(p["index"], p["caption"]) for p in batch]
        if state["epoch"] > 0:
            break
    counts = state["counts"]
    assert (counts["ties"] >= 4 and counts["bad_caption"] >= 1 and counts["bad_label"] >= 1
            and counts["bad_image"] >= 1)
    assert all(int(c.split()[1]) % 5 != 4 for _, c in seen)  # every fifth row is a tie


def test_missing_column_is_one_clear_error_before_training(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "label_0"} for r in pickapic_rows(4)]
    folder = write_shards(tmp_path / "no_label", rows, 1)
    with pytest.raises(SystemExit, match="no layout rpo.py reads: its parquet .* holds .*label_1.*Known"):
        rpo.main(["--data", str(folder), "--out", str(tmp_path / "o"), "--workers", "0"])


def test_all_ties_is_one_clear_error_before_training(tmp_path):
    rows = [dict(r, label_0=0.5) for r in pickapic_rows(6)]
    folder = write_shards(tmp_path / "ties", rows, 1)
    with pytest.raises(SystemExit, match="0 trainable pairs"):
        rpo.main(["--data", str(folder), "--out", str(tmp_path / "o"), "--workers", "0", "--eval_pairs", "0"])


def test_a_source_where_no_image_decodes_is_one_clear_error_not_an_endless_loop(tmp_path):
    rows = [dict(r, jpg_0=b"not an image") for r in pickapic_rows(10)]
    cfg = rpo.parse_config(["--data", str(write_shards(tmp_path / "broken", rows, 1)), "--batch", "2"])
    with deadline(60), pytest.raises(SystemExit, match="0 trainable pairs for rank 0"):
        next(rpo.pair_batches(cfg, 0, 1))


def test_a_rank_with_fewer_cached_pairs_than_the_batch_is_one_clear_error_not_an_endless_loop(tmp_path):
    with deadline(120), pytest.raises(SystemExit, match="3 trainable pairs for rank 0 in cache"):
        train(tmp_path, "--max_pairs", 3, "--batch", 4, "--cache", tmp_path / "cache", "--eval_pairs", 0)


def test_a_cache_built_for_other_settings_is_one_clear_error(tmp_path):
    flags = ["--max_pairs", 8, "--batch", 4, "--max_steps", 1, "--eval_pairs", 0, "--sample_steps", 0,
             "--cache", tmp_path / "cache"]
    train(tmp_path / "a", *flags)
    with pytest.raises(SystemExit, match="cache .* was built for .* use another --cache folder"):
        train(tmp_path / "b", *flags, "--embed", "text")
    # a cache written before meta.json had the keys layout, image_root and no_t5 is read with them unset
    meta = json.load(open(tmp_path / "cache" / "meta.json"))
    json.dump({k: v for k, v in meta.items() if k not in ("layout", "image_root", "no_t5")},
              open(tmp_path / "cache" / "meta.json", "w"))
    train(tmp_path / "c", *flags)
    with pytest.raises(SystemExit, match=r"built for other settings: image_root None \(now /elsewhere\)"):
        train(tmp_path / "d", *flags, "--image_root", "/elsewhere")


def test_unreachable_hub_dataset_is_one_line_naming_the_id_and_the_way_out_offline_at_once_online_after_its_tries(
        tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants
    calls = []

    def unreachable(*a, **k):
        calls.append(time.monotonic())
        raise ConnectionError("Couldn't reach 'yuvalkirstain/pickapic_v2' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset_builder", unreachable)
    for offline, flags, tries in ((True, [], 1), (False, ["--io_tries", "2"], 2)):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
        rpo.hub_data_files.cache_clear()
        calls.clear()
        with pytest.raises(SystemExit) as e:
            rpo.source_files(rpo.parse_config(flags), "pickapic", "train")
        msg = str(e.value)
        assert ("\n" not in msg and "yuvalkirstain/pickapic_v2" in msg
                and "--data /path" in msg and "--data_id" in msg)
        assert len(calls) == tries  # online, a second try after a second's wait
    assert calls[1] - calls[0] >= 1 and "(tries: 2 in 1 s; --io_tries 2, --io_wait 600)" in msg


def test_hub_streaming_and_local_reading_give_the_same_pairs_in_the_same_order(tmp_path):
    # a local folder stands in for the hub id
    folder = write_shards(tmp_path / "hub_copy", pickapic_rows(30), 3)

    def take(cfg):
        batches = itertools.islice(rpo.pair_batches(cfg, 0, 1), 5)
        return [[p["index"] for p in b] for b, _ in batches]
    hub = rpo.parse_config(["--data", "pickapic", "--data_id", str(folder), "--batch", "3",
                            "--shuffle_buffer", "8"])
    local = rpo.parse_config(["--data", str(folder), "--batch", "3", "--shuffle_buffer", "8"])
    assert take(hub) == take(local)
    assert take(local) != sorted(take(local))  # and the shuffle buffer did shuffle


def test_a_hub_datasets_files_are_read_by_url_through_fsspec_like_local_ones(tmp_path, monkeypatch):
    import datasets
    import fsspec
    folder = write_shards(tmp_path / "local", pickapic_rows(30), 3)
    memory = fsspec.filesystem("memory")
    urls = []
    for path in sorted(os.listdir(folder)):  # fsspec's in-memory filesystem stands in for hf://
        memory.pipe(f"/{tmp_path.name}/{path}", (folder / path).read_bytes())
        urls.append(f"memory://{tmp_path.name}/{path}")
    builder = type("Builder", (), {"config": type("Config", (), {"data_files": {"train": urls}})})
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda data_id: builder)

    def take(cfg):
        batches = itertools.islice(rpo.pair_batches(cfg, 0, 1), 5)
        return [[p["index"] for p in b] for b, _ in batches]
    hub = rpo.parse_config(["--data", "pickapic", "--data_id", "someone/pickapic-copy", "--batch", "3"])
    assert take(hub) == take(rpo.parse_config(["--data", str(folder), "--batch", "3"]))


# --------------------------------------------------------------------- a hub that speaks HTTP, on 127.0.0.1
HUB_BACKOFF_TENFOLD = """
import time, types
import huggingface_hub.utils._http as http
http.time = types.SimpleNamespace(**{**vars(time), "sleep": lambda seconds: time.sleep(seconds / 10)})
"""


class Hub:
    """Enough of the hub's HTTP API, on 127.0.0.1, for the real `datasets` and huggingface_hub clients to resolve
    a repository's files at a pinned commit and read them by byte ranges: what they asked for when logged
    (`requests`). `fault(n, method, path)` may name a fault for the n-th request: 503, 429 (Retry-After 1),
    reset (the connection dies unanswered), cut (the body breaks off), short (fewer bytes, headers agreeing),
    slow (3 s: past the clients' timeout)."""

    def __init__(self):
        self.repos, self.requests, self.fault, self.lock = {}, [], None, threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.answer(self)
            do_HEAD = do_POST = do_GET
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo_id, files, kind="dataset", sha="5" * 40):
        """Repository repo_id of this kind (dataset, model) at commit sha: a local folder, or {name: bytes}."""
        if not isinstance(files, dict):
            files = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(Path(files).rglob("*"))
                     if p.is_file()}
        self.repos[kind, repo_id] = sha, files

    def env(self, home):
        """A client's environment: this hub, online (the suite runs with the hub offline), its own cache, a 2 s
        timeout, no proxy for 127.0.0.1; and huggingface_hub's backoff at a tenth of its waits (the same
        retries, in a tenth of the time: a sitecustomize.py on PYTHONPATH, which every child process runs)."""
        (home / "site").mkdir(parents=True, exist_ok=True)
        (home / "site" / "sitecustomize.py").write_text(HUB_BACKOFF_TENFOLD)
        return dict(HF_ENDPOINT=self.url, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", HF_HOME=str(home),
                    HF_HUB_DOWNLOAD_TIMEOUT="2", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DISABLE_TELEMETRY="1",
                    NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
                    PYTHONPATH=os.pathsep.join([str(home / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def answer(self, request):
        n = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(n) if n else b""
        url = urllib.parse.urlsplit(request.path)
        path = urllib.parse.unquote(url.path)
        with self.lock:
            self.requests.append((request.command, path, request.headers.get("Range")))
            fault = self.fault(len(self.requests), request.command, path) if self.fault else None
        if fault in ("503", "429"):
            return reply(request, int(fault), b"busy", {"Retry-After": "1"} if fault == "429" else {})
        if fault == "reset":
            request.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.close_connection = True
            return
        if fault == "slow":
            time.sleep(3)
        code, data, headers = self.route(request.command, path, url.query, body, request.headers.get("Range"))
        if fault == "short" and code == 206:
            first, rest = headers["Content-Range"].split("-", 1)
            data = data[:len(data) // 2]
            headers["Content-Range"] = f"{first}-{int(first.split()[1]) + len(data) - 1}/{rest.split('/')[1]}"
        reply(request, code, data, headers, cut=fault == "cut" and code in (200, 206))

    def route(self, method, path, query, body, byte_range):
        for (kind, repo_id), (sha, files) in self.repos.items():
            api = f"/api/{kind}s/{repo_id}"
            if path in (api, f"{api}/revision/main", f"{api}/revision/{sha}"):
                return 200, json.dumps(dict(id=repo_id, sha=sha, private=False, gated=False, disabled=False,
                                            tags=[], cardData={}, siblings=[dict(rfilename=p) for p in files])
                                       ).encode(), {"Content-Type": "application/json"}
            tree = re.fullmatch(rf"{api}/tree/(?:main|{sha})/?(.*)", path)
            if tree:  # a folder's entries, or all below it (recursive=true)
                folder = tree.group(1).strip("/") + "/" if tree.group(1).strip("/") else ""
                found = set()
                for p in files:
                    parts = p[len(folder):].split("/") if p.startswith(folder) else []
                    depth = len(parts) if "recursive=true" in query.lower() else min(1, len(parts))
                    found |= {folder + "/".join(parts[:i + 1]) for i in range(depth)}
                if folder and not found:
                    break
                return 200, json.dumps([hub_entry(files, p) for p in sorted(found)]).encode(), \
                    {"Content-Type": "application/json"}
            if re.fullmatch(rf"{api}/paths-info/(?:main|{sha})", path):
                asked = urllib.parse.parse_qs(body.decode()).get("paths", [])
                return 200, json.dumps([hub_entry(files, p) for p in asked if p in files]).encode(), \
                    {"Content-Type": "application/json"}
            resolve = re.fullmatch(rf"/{'' if kind == 'model' else kind + 's/'}{repo_id}/resolve/(?:main|{sha})/(.*)",
                                   path)
            if resolve and resolve.group(1) in files:
                data = files[resolve.group(1)]
                headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": sha,
                           "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
                if not byte_range:
                    return 200, data, headers
                a, b = byte_range.split("=")[1].split("-")
                a, b = int(a), min(int(b or len(data) - 1), len(data) - 1)
                return 206, data[a:b + 1], {**headers, "Content-Range": f"bytes {a}-{b}/{len(data)}"}
        return 404, b'{"error": "not found"}', {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"}

    def ranges(self, name):
        """The byte ranges asked of files whose path ends with name."""
        return [r for method, path, r in self.requests if method == "GET" and r and path.endswith(name)]


def hub_entry(files, path):
    """A file's or a folder's entry in the hub's tree listings."""
    if path not in files:
        return dict(type="directory", path=path, oid="d" * 40)
    data = files[path]
    return dict(type="file", path=path, size=len(data), oid=hashlib.sha1(data).hexdigest(),
                lfs=dict(oid=hashlib.sha256(data).hexdigest(), size=len(data), pointerSize=134))


def reply(request, code, data, headers, cut=False):
    """An answer; cut: the headers promise all of data, the body breaks off halfway and the connection closes."""
    request.send_response(code)
    for key, value in headers.items():
        request.send_header(key, value)
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    if request.command != "HEAD":
        try:
            request.wfile.write(data[:len(data) // 2] if cut else data)
        except ConnectionError:  # the client gave up (a timeout)
            pass
    request.close_connection = request.close_connection or cut


@pytest.fixture
def hub():
    hub = Hub()
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


def noisy_jpeg(rng, size=160):
    """A JPEG of noise, about 45 kB: a row group of 3 rows outgrows the 64 kB read with a parquet footer."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


HUB_TRAIN_ROWS = (6, 9, 12, 9)  # rows of its train files, 3 to a row group: files of 2 to 4 row groups


@pytest.fixture(scope="module")
def hub_copy(tmp_path_factory):
    """A Pick-a-Pic v2 copy as the hub lays it out (data/{split}-0000k-of-0000n.parquet): four train files of
    different sizes, one of them corrupt (cut in half: a counted skip), every fifth row a tie, one image that
    does not decode, one caption that is not a string; and validation_unique, held out."""
    rng = np.random.default_rng(0)
    rows = [dict(r, jpg_0=noisy_jpeg(rng), jpg_1=noisy_jpeg(rng)) for r in pickapic_rows(sum(HUB_TRAIN_ROWS) + 6)]
    rows[3]["jpg_1"], rows[7]["caption"] = b"not an image", None
    folder = tmp_path_factory.mktemp("hub_copy")
    (folder / "data").mkdir()
    starts = np.cumsum([0, *HUB_TRAIN_ROWS])
    for k, (lo, n) in enumerate(zip(starts, HUB_TRAIN_ROWS)):
        pq.write_table(pa.Table.from_pylist(rows[lo:lo + n]),
                       folder / "data" / f"train-{k:05d}-of-{len(HUB_TRAIN_ROWS):05d}.parquet", row_group_size=3)
    pq.write_table(pa.Table.from_pylist(rows[starts[-1]:]),
                   folder / "data" / "validation_unique-00000-of-00001.parquet")
    truncate(folder / "data" / "train-00003-of-00004.parquet")  # the first file of epoch 0 at seed 0
    return folder


# save points at 4 and 8; held-out pairs from validation_unique
HUB_FLAGS = [*tiny(), "--batch", 2, "--max_steps", 8, "--save_every", 4, "--eval_pairs", 4, "--eval_draws", 1,
             "--sample_steps", 0, "--report_to", "none", "--shuffle_buffer", 6, "--resume"]


@pytest.fixture(scope="module")
def hub_copy_read_locally(hub_copy, tmp_path_factory):
    """The run of HUB_FLAGS on the copy's files on local disk: its folder and metrics."""
    out = tmp_path_factory.mktemp("hub_copy_locally")
    return out, train(out, *HUB_FLAGS, "--data", hub_copy)[1]


def from_the_hub(hub, hub_copy, tmp_path):
    """The copy served as someone/copy; the environment that points the clients at it."""
    hub.add("someone/copy", hub_copy)
    return hub.env(tmp_path / "hf_home")


def test_through_the_real_hub_clients_a_run_reads_the_same_pairs_in_the_same_order_one_request_per_row_group(
        hub, hub_copy, tmp_path):
    env = from_the_hub(hub, hub_copy, tmp_path)
    layout_fixture(tmp_path / "wds", "pickapic-wds")  # and webdataset tar shards, as a hub copy may come
    hub.add("someone/wds", tmp_path / "wds")
    epoch = """
        import json, sys, rpo
        for data_id, folder in zip(("someone/copy", "someone/wds"), sys.argv[1:]):
            for data in (["--data", "pickapic", "--data_id", data_id], ["--data", folder]):
                cfg = rpo.parse_config([*data, "--batch", "2", "--shuffle_buffer", "6", "--workers", "0"])
                pairs = []
                for batch, state in rpo.pair_batches(cfg, 0, 1):
                    if state["epoch"] > 0:
                        break
                    pairs.append([(p["index"], p["caption"]) for p in batch])
                print(json.dumps([pairs, state["counts"]]))
    """
    stdout, _ = finish(start([sys.executable, "-c", textwrap.dedent(epoch), str(hub_copy), str(tmp_path / "wds")],
                             env))
    parquet_hub, parquet_disk, tar_hub, tar_disk = map(json.loads, stdout.splitlines()[-4:])
    assert parquet_hub == parquet_disk and parquet_hub[1]["unreadable"] == 1 and len(parquet_hub[0]) > 5
    assert tar_hub == tar_disk and tar_hub[1]["bad_image"] == 1 and len(tar_hub[0]) == 5  # 10 usable pairs
    for k, rows in enumerate(HUB_TRAIN_ROWS):  # the footer, then one request per row group, whatever the size
        name = f"data/train-{k:05d}-of-00004.parquet"
        groups = 0 if k == 3 else math.ceil(rows / 3)  # file 3 is corrupt: its footer read, nothing more
        assert len(hub.ranges(name)) == 1 + groups, (name, hub.ranges(name))
    for k in range(2):  # a tar shard is read in requests of 8 MB: one under that, whole, each time it is read
        size = (tmp_path / "wds" / f"{k:05d}.tar").stat().st_size
        assert set(hub.ranges(f"{k:05d}.tar")) == {f"bytes=0-{size - 1}"}
    revisions = {path.split("/")[5] for method, path, _ in hub.requests if path.endswith((".parquet", ".tar"))}
    assert revisions == {"5" * 40}  # every data file read at the commit resolved first


def flaky(kinds, every):
    """A fault for every `every`-th byte-range request, the kinds in turn."""
    asked = itertools.count(1)

    def fault(n, method, path):
        if method == "GET" and "/resolve/" in path and path.endswith(".parquet"):
            k = next(asked)
            return kinds[(k // every) % len(kinds)] if k % every == 0 else None
    return fault


FAULTS = ("503", "429", "reset", "cut", "short", "slow")


def test_a_persistent_outage_stops_the_run_in_one_line_within_its_bounds_and_the_resume_ends_as_the_local_run(
        hub, hub_copy, hub_copy_read_locally, tmp_path):
    env = from_the_hub(hub, hub_copy, tmp_path)
    out, local_out, local = tmp_path / "run", *hub_copy_read_locally
    flags = [*HUB_FLAGS, "--data", "pickapic", "--data_id", "someone/copy", "--io_tries", 3, "--io_wait", 2]
    down = []

    def outage(n, method, path):  # the hub answers 503 to everything once step 4's checkpoint is written
        if (out / "ckpt-0000004.pt").exists():
            down.append(down[0] if down else time.monotonic())
            return "503"
    hub.fault = outage
    returncode, _, stderr = ended(start(rpo_command(out, *flags), env), 300)
    stopped = time.monotonic()
    lines = [line for line in stderr.splitlines() if line.startswith("rpo.py: cannot read")]
    assert returncode == 1 and len(lines) == 1, stderr[-3000:]
    assert re.fullmatch(rf"rpo.py: cannot read hf://datasets/someone/copy@5{{40}}/data/train-\S+ \(bytes \d+-\d+\): "
                        rf".*503.* \(tries: 1 in \d+ s; --io_tries 3, --io_wait 2\); nothing was skipped, the "
                        rf"checkpoints in {out} are intact. Once the network is back, continue with: python "
                        rf"rpo.py .*--resume", lines[0]), lines[0]
    # no new try after --io_wait, and a try is the client's own retries (huggingface_hub's: 5 in 23 s, here 2.3)
    assert stopped - down[0] < 2 + 2.3 + 15
    step = rpo.load_checkpoint(str(out))["step"]
    assert step >= 4 and len(logged(out)) == step < 8
    hub.fault = None  # the hub is back
    run_script(out, *flags, env=env, timeout=300)
    assert logged(out) == local and same_weights(out, local_out)
    assert local[-1]["unreadable"] == 1 and counts_pairs(local[-1]["heldout_accuracy"], 4)


def test_under_torchrun_two_ranks_reading_a_flaky_hub_end_as_two_ranks_reading_local_files(
        hub, hub_copy, tmp_path):
    env = from_the_hub(hub, hub_copy, tmp_path)
    flags = [*HUB_FLAGS, "--max_steps", 3]
    local = run_script(tmp_path / "local", *flags, "--data", hub_copy, nproc=2, timeout=300)
    hub.fault = flaky(FAULTS, 3)  # every third data request fails: footers (opening a file) and row groups
    proc = start(rpo_command(tmp_path / "hub", *flags, "--data", "pickapic", "--data_id", "someone/copy",
                             nproc=2), env)
    _, stderr = finish(proc, timeout=300)
    assert logged(tmp_path / "hub") == local and same_weights(tmp_path / "hub", tmp_path / "local")
    assert sum(1 for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1] and r[2]) > 12
    # the short bodies, which the client takes for whole answers, were caught and tried again
    assert "a body cut short" in stderr and "try 2 of 10" in stderr


def http_error(status):
    import requests
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


def raised_from(error, cause):
    try:
        try:
            raise cause
        except Exception:
            raise error
    except Exception as e:
        return e


def test_the_networks_failures_are_tried_again_and_the_files_own_are_not(monkeypatch):
    import errno
    import huggingface_hub.constants
    import pyarrow.lib
    client_timeout = type("ReadTimeout", (Exception,), {"__module__": "httpx"})("timed out")
    def library_made():  # transformers' wrapper: no errno
        return OSError("Can't load the model for 'someone/model'")
    tried_again = [OSError(errno.EIO, "Input/output error"), ConnectionResetError(), TimeoutError(),
                   http_error(503), http_error(429), http_error(408), client_timeout,
                   raised_from(library_made(), http_error(502)), raised_from(library_made(), client_timeout)]
    not_again = [FileNotFoundError(errno.ENOENT, "No such file"), PermissionError(errno.EACCES, "denied"),
                 http_error(404), http_error(401), library_made(), raised_from(library_made(), http_error(404)),
                 ValueError("Parquet magic bytes not found"), pyarrow.lib.ArrowInvalid("bad page")]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert [rpo.transient(e) for e in tried_again] == [True] * len(tried_again)
    assert [rpo.transient(e) for e in not_again] == [False] * len(not_again)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # offline by choice: nothing is
    assert not any(rpo.transient(e) for e in tried_again)


def test_pair_order_does_not_depend_on_the_number_of_decode_workers(tmp_path):
    folder = write_shards(tmp_path / "w", pickapic_rows(24), 2)
    cfg = rpo.parse_config(["--data", str(folder), "--batch", "4", "--shuffle_buffer", "5"])
    serial = [[p["index"] for p in b] for b, _ in itertools.islice(rpo.pair_batches(cfg, 0, 1), 4)]
    pool = rpo.Decoders(2)
    batches = itertools.islice(rpo.pair_batches(cfg, 0, 1, pool=pool), 4)
    parallel = [[p["index"] for p in b] for b, _ in batches]
    pool.shutdown()
    assert serial == parallel


def test_tiny_xl_trains_from_local_pickapic_shards_counting_the_corrupt_row(tmp_path):
    rows = pickapic_rows(24)
    rows[0]["jpg_0"] = b"\xff\xd8 truncated jpeg"
    folder = write_shards(tmp_path / "shards", rows, 2)
    # 19 usable pairs: 4 micro-batches of 4 an epoch, so step 5 is in the second epoch, every row seen once
    flags = [*tiny("tiny-xl"), "--data", folder, "--batch", 4, "--eval_data", folder]
    summary, metrics = train(tmp_path / "out", *flags, "--max_steps", 5, "--save_every", 100,
                             "--sample_steps", 0)
    assert summary["steps"] == 5 and all(math.isfinite(r["loss"]) for r in metrics)
    assert metrics[-1]["bad_image"] >= 1 and metrics[-1]["ties"] >= 4
    assert_heldout_is_the_saved_unets(summary, tmp_path / "out", *flags)


def quirky_shards(folder, sizes):
    """Parquet files of these sizes in rows: every fifth row a tie, one image that does not decode,
    one caption that is not a string."""
    rows = pickapic_rows(sum(sizes))
    rows[3]["jpg_1"], rows[7]["caption"] = b"not an image", None
    os.makedirs(folder, exist_ok=True)
    for k, (lo, n) in enumerate(zip(np.cumsum([0, *sizes]), sizes)):
        table = pa.Table.from_pylist(rows[lo:lo + n])
        pq.write_table(table, os.path.join(folder, f"part-{k}.parquet"), row_group_size=4)
    return folder


def counted_reads(monkeypatch):
    """(path, first row, end row) of the rows every call of rpo.read_rows returned, in order."""
    reads, real = [], rpo.read_rows

    def read_and_record(file, a, b):
        rows = real(file, a, b)
        reads.append((file.path, a, a + len(rows)))
        return rows
    monkeypatch.setattr(rpo, "read_rows", read_and_record)
    return reads


def test_each_of_four_ranks_reads_only_its_quarter_of_the_files_and_together_every_row_once(
        tmp_path, monkeypatch):
    folder = quirky_shards(tmp_path / "d", [10] * 8)
    cfg = rpo.parse_config(["--data", str(folder), "--batch", "2", "--shuffle_buffer", "6"])
    reads = counted_reads(monkeypatch)
    rows_by_rank, pairs_by_rank = [], []
    for rank in range(4):
        reads.clear()
        pairs, epoch_reads = [], []
        for batch, state in rpo.pair_batches(cfg, rank, 4):
            if state["epoch"] > 0:
                break
            pairs += [p["index"] for p in batch]
            epoch_reads = list(reads)  # what the epoch had read up to its last micro-batch
        rows_by_rank.append([(path, r) for path, a, b in epoch_reads for r in range(a, b)])
        pairs_by_rank.append(pairs)
    assert [len(rows) for rows in rows_by_rank] == [20] * 4  # 2 of the 8 files each
    everything = [(str(folder / f"part-{k}.parquet"), r) for k in range(8) for r in range(10)]
    assert sorted(sum(rows_by_rank, [])) == everything  # disjoint, and nothing left unread
    assert len(set(sum(pairs_by_rank, []))) == sum(map(len, pairs_by_rank)) > 40


def test_a_resume_reads_only_the_window_it_stopped_in_and_goes_on_with_the_same_pairs_and_counts(
        tmp_path, monkeypatch):
    cfg = rpo.parse_config(["--data", str(quirky_shards(tmp_path / "d", [20] * 6)), "--batch", "2",
                            "--shuffle_buffer", "6"])
    # rank 1 of 2: 60 rows, under 24 micro-batches
    run = list(itertools.islice(rpo.pair_batches(cfg, 1, 2), 30))
    assert run[-1][1]["epoch"] == 1 and run[-1][1]["counts"]["ties"] > 12
    reads = counted_reads(monkeypatch)
    for cut in (4, 21, 22):  # early, 90 % into the epoch, its last micro-batch
        reads.clear()
        resumed = rpo.pair_batches(cfg, 1, 2, start=run[cut][1])
        batch, state = next(resumed)
        assert sum(b - a for _, a, b in reads) <= 2 * 6  # the window it stopped in, at most the next one
        got = ([p["index"] for p in batch], state)
        expected = ([p["index"] for p in run[cut + 1][0]], run[cut + 1][1])
        assert got == expected
        rest = [([p["index"] for p in b], s) for b, s in itertools.islice(resumed, 30 - cut - 2)]
        assert rest == [([p["index"] for p in b], s) for b, s in run[cut + 2:]]


def test_fewer_files_than_ranks_is_one_clear_error_before_training(tmp_path):
    cfg = rpo.parse_config(["--data", str(quirky_shards(tmp_path / "d", [10, 10]))])
    with pytest.raises(SystemExit, match="2 data file.s. for 3 ranks.*at least 3 files"):
        next(rpo.pair_batches(cfg, 0, 3))


PICKAPIC_SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")  # Pick-a-Pic v2's files


def pickapic_copy(folder, form, splits=PICKAPIC_SPLITS):
    """A local copy of Pick-a-Pic v2, one 4-row file per split, in one of the forms `datasets` resolves:
    {split}-*, {split}/ or data/{split}-*. Each row's caption names its split."""
    for split in splits:
        rows = [dict(r, caption=f"{split} {i}") for i, r in enumerate(pickapic_rows(4))]  # no ties in 4
        name = dict(top=f"{split}-00000-of-00001-0a1b2c.parquet", folders=f"{split}/part-0.parquet",
                    data=f"data/{split}-00000-of-00001.parquet")[form]
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / name)
    return str(folder)


@pytest.mark.parametrize("form", ["top", "folders", "data"])
def test_a_local_pick_a_pic_copy_trains_on_its_train_split_alone_and_holds_out_validation_unique(
        tmp_path, monkeypatch, form):
    data = pickapic_copy(tmp_path / "pickapic_v2", form)
    reads = counted_reads(monkeypatch)

    def captions(*flags):
        reads.clear()
        pairs, _ = one_epoch(rpo.parse_config(["--data", data, "--batch", "1", *flags]))
        return sorted(caption for caption, _, _ in pairs), {path for path, _, _ in reads}
    for split in ("train", "test"):  # the split's rows, and nothing read from another split's files
        assert captions("--split", split) == ([f"{split} {i}" for i in range(4)],
                                              set(rpo.folder_splits(data)[split]))
    cfg = rpo.parse_config(["--data", data])
    assert rpo.heldout_source(cfg) == (data, "validation_unique")
    held_out = [row["caption"] for _, row in rpo.rows_in_order(cfg, *rpo.heldout_source(cfg))]
    assert held_out == [f"validation_unique {i}" for i in range(4)]
    # --eval_data names the copy's split the same way
    other = write_shards(tmp_path / "other", pickapic_rows(4), 1)
    other = rpo.parse_config(["--data", str(other), "--eval_data", data])
    assert rpo.heldout_source(other) == (data, "validation_unique")


def test_a_run_on_a_local_pick_a_pic_copy_reports_held_out_accuracy_on_validation_unique(tmp_path):
    data = pickapic_copy(tmp_path / "pickapic_v2", "top")
    summary, _ = train(tmp_path / "o", "--data", data, "--batch", 2, "--max_steps", 1, "--sample_steps", 0)
    assert counts_pairs(summary["heldout_accuracy"], 4)  # validation_unique's 4 pairs
    assert json.load(open(tmp_path / "o" / "settings.json"))["split"] == "train"


def test_a_folder_whose_names_carry_no_split_is_read_whole_without_held_out_pairs(tmp_path):
    data = write_shards(tmp_path / "d", pickapic_rows(8), 2)  # part-0.parquet, part-1.parquet
    cfg = rpo.parse_config(["--data", str(data), "--batch", "1"])
    assert [f.path for f in rpo.source_files(cfg, cfg.data, "train")] == [str(data / "part-0.parquet"),
                                                                          str(data / "part-1.parquet")]
    assert rpo.heldout_source(cfg) == (None, None) and rpo.sample_prompts(cfg) == rpo.SAMPLE_PROMPTS


def test_a_hub_dataset_without_a_validation_split_trains_without_held_out_pairs_unless_one_is_named(monkeypatch):
    import datasets
    splits = {"train": ["hf://datasets/someone/prefs@5555/data/train-00000.parquet"]}
    builder = type("Builder", (), {"config": type("Config", (), {"data_files": splits})})
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda data_id: builder)

    def heldout(*flags):
        rpo.hub_data_files.cache_clear()
        return rpo.heldout_source(rpo.parse_config(["--data", "pickapic", "--data_id", "someone/prefs", *flags]))
    try:
        assert heldout() == (None, None)  # as a local folder without one: the run starts, with no held-out metrics
        assert heldout("--eval_split", "test") == ("pickapic", "test")  # named: a missing one stops the start
        splits["validation"] = ["hf://datasets/someone/prefs@5555/data/validation-00000.parquet"]
        assert heldout() == ("pickapic", "validation")
        splits["validation_unique"] = ["hf://datasets/someone/prefs@5555/data/validation_unique-00000.parquet"]
        assert heldout() == ("pickapic", "validation_unique")
    finally:
        rpo.hub_data_files.cache_clear()


def test_a_split_the_folder_does_not_hold_is_one_line_naming_the_splits_it_holds(tmp_path):
    data = pickapic_copy(tmp_path / "d", "top", splits=("train", "test"))
    assert rpo.heldout_source(rpo.parse_config(["--data", data])) == (None, None)  # no validation split
    with pytest.raises(SystemExit) as e:
        rpo.main(["--data", data, "--split", "validation", "--out", str(tmp_path / "o"), "--workers", "0"])
    assert str(e.value) == (f"rpo.py: dataset {data!r} has no split 'validation', only ['test', 'train'] (as "
                            f"its file and folder names say)")


# --------------------------------------------------------------------------- the layouts people have
WINNER, LOSER = (200, 30, 30), (30, 30, 200)  # a winner is red, a loser blue, in every layout


def layout_fixture(folder, layout, n=12):
    """n pairs in one of the published layouts, in two files: pair 2 a tie where the layout can say so,
    pair 5 an image that does not decode, pair 8 an image file that is missing where images are referenced
    by path, and in hpdv2 pair 10 three images of which the annotator chose the middle one; a JSON file
    also holds an entry that is not a record. Returns the
    captions of the usable pairs, one per pair, and the skips."""
    os.makedirs(folder, exist_ok=True)
    tie, broken, missing = layout in ("pickapic", "pickapic-wds", "hpdv2"), 5, layout in ("hpdv2", "hpdv3")
    skips = dict(ties=int(tie), bad_image=1, missing_image=int(missing))
    records, usable = [], []
    for i in range(n):
        caption, images = f"pair {i}", [png(WINNER, (48 + i, 40)), png(LOSER, (40, 48 + i))]
        winner_first = i % 2 == 0 or layout not in ("pickapic", "pickapic-wds")  # the rest put it first
        if i == broken:
            images[1] = b"not an image"
        images = images if winner_first else images[::-1]
        label_0 = 0.5 if i == 2 and tie else 1.0 if winner_first else 0.0
        if i not in {broken, *([2] if tie else []), *([8] if missing else [])}:
            usable.append(caption)
        records.append((caption, images, label_0))
    half = [records[:n // 2], records[n // 2:]]
    if layout in ("pickapic", "chosen-rejected"):
        for k, part in enumerate(half):
            rows = ([dict(caption=c, jpg_0=a, jpg_1=b, label_0=l, label_1=1 - l) for c, (a, b), l in part]
                    if layout == "pickapic" else
                    [dict(prompt=c, chosen=dict(bytes=a, path=None), rejected=dict(bytes=b, path=None),
                          source="fixture") for c, (a, b), _ in part])
            pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, f"train-{k:05d}.parquet"))
    elif layout == "pickapic-wds":
        import tarfile
        for k, part in enumerate(half):
            with tarfile.open(os.path.join(folder, f"{k:05d}.tar"), "w") as tar:
                for c, (a, b), l in part:
                    key = f"{abs(hash(c)) % 10 ** 8:08d}"
                    for suffix, data in (("original_prompt.txt", c.encode()), ("jpg_0.jpg", a),
                                         ("jpg_1.jpg", b), ("label_0.txt", str(l).encode()),
                                         ("label_1.txt", str(1 - l).encode())):
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    else:  # hpdv2, hpdv3: a JSON list per file, images in a folder of their own
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        for k, part in enumerate(half):
            entries = []
            for c, images, l in part:
                names = [f"images/{c.replace(' ', '_')}-{j}.jpg" for j in range(len(images))]
                if c == "pair 10" and layout == "hpdv2":
                    images, names = [images[1], images[0], png(LOSER)], [*names, "images/pair_10-2.jpg"]
                    usable.append(c)  # two pairs: the chosen image against each of the others
                for name, data in zip(names, images):
                    if c != "pair 8":
                        open(os.path.join(folder, name), "wb").write(data)
                if layout == "hpdv3":
                    entries.append(dict(prompt=c, path1=names[0], path2=names[1], model1="a", model2="b",
                                        confidence=0.99, choice_dist=[5, 0]))
                else:
                    chosen = [1, 1] if l == 0.5 else [0, 1, 0] if len(names) == 3 else [1, 0]
                    entries.append(dict(prompt=c, image_path=names, human_preference=chosen, user_hash="u"))
            json.dump(entries + ["not a record"] * k, open(os.path.join(folder, f"train-{k}.json"), "w"))
        skips["bad_caption"] = 1
    return sorted(usable), skips


LAYOUT_NAMES = ("pickapic", "pickapic-wds", "chosen-rejected", "hpdv3", "hpdv2")


def one_epoch(cfg, rank=0, world=1):
    """(caption, winner, loser) of each pair a rank takes in epoch 0, and the epoch's skip counts."""
    pairs = []
    for batch, state in rpo.pair_batches(cfg, rank, world):
        if state["epoch"] > 0:  # its counts run into epoch 1: take away what epoch 1 counted before it
            _, epoch_1 = next(rpo.pair_batches(cfg, rank, world, dict(epoch=1, at=None,
                                                                    counts=dict.fromkeys(rpo.SKIP_KEYS, 0))))
            return pairs, {k: n - epoch_1["counts"][k] for k, n in state["counts"].items()}
        pairs += [(p["caption"], p["winner"], p["loser"]) for p in batch]


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_each_published_layout_is_recognised_and_gives_winner_first_pairs_counting_ties_broken_and_missing(
        tmp_path, layout):
    usable, skips = layout_fixture(tmp_path / "d", layout)
    cfg = rpo.parse_config(["--data", str(tmp_path / "d"), "--batch", "1", "--no_flip"])
    assert rpo.source_files(cfg, cfg.data, cfg.split)[0].layout == layout
    pairs, counts = one_epoch(cfg)
    assert sorted(caption for caption, _, _ in pairs) == usable
    for _, winner, loser in pairs:
        assert winner[0].mean() > winner[2].mean() + 100 and loser[2].mean() > loser[0].mean() + 100
    assert {k: counts[k] for k in skips} == skips


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_in_every_layout_two_ranks_read_disjoint_shares_that_together_cover_every_pair_once(tmp_path, layout):
    usable, _ = layout_fixture(tmp_path / "d", layout)
    cfg = rpo.parse_config(["--data", str(tmp_path / "d"), "--batch", "1"])
    shares = [sorted(caption for caption, _, _ in one_epoch(cfg, rank, 2)[0]) for rank in (0, 1)]
    assert shares[0] and shares[1] and sorted(shares[0] + shares[1]) == usable


def test_hpdv2s_rule_the_chosen_image_wins_against_each_image_not_chosen_and_all_or_none_chosen_is_a_tie(
        tmp_path):
    layout_fixture(tmp_path / "d", "hpdv2")
    pairs = rpo.json_pairs(str(tmp_path / "d" / "train-1.json"), "hpdv2")
    assert [(r, w, l) for r, w, l in pairs if r == 4] == [(4, 1, 0), (4, 1, 2)]  # pair 10: [0, 1, 0]
    assert rpo.json_pairs(str(tmp_path / "d" / "train-0.json"), "hpdv2")[2] == (2, None, None)  # [1, 1]


def test_a_resume_inside_a_tar_shard_rereads_at_most_that_shard_and_takes_exactly_the_uninterrupted_pairs(
        tmp_path, monkeypatch):
    layout_fixture(tmp_path / "d", "pickapic-wds", n=24)  # two shards of 12 samples
    cfg = rpo.parse_config(["--data", str(tmp_path / "d"), "--batch", "2", "--shuffle_buffer", "4"])
    run = [([p["index"] for p in b], s) for b, s in itertools.islice(rpo.pair_batches(cfg, 0, 1), 14)]
    cut = next(c for c, (_, s) in enumerate(run) if s["at"][1] > 4)  # 5 or more samples into a shard
    read, real = collections.Counter(), rpo.tar_samples

    def counted(path):
        for sample in real(path):
            read[path] += 1
            yield sample
    monkeypatch.setattr(rpo, "tar_samples", counted)
    rpo.tar_stream.cache_clear()  # a new process: no shard open
    resumed = rpo.pair_batches(cfg, 0, 1, start=run[cut][1])
    batch, state = next(resumed)
    first, *later = read  # in the order the shards were opened
    assert read[first] <= 12  # the shard it stopped in, from its start: re-read at most once
    assert sum(read[path] for path in later) <= 4 + 4 * 2  # past it, one window and the decoders' read-ahead
    assert ([p["index"] for p in batch], state) == run[cut + 1]
    assert [([p["index"] for p in b], s) for b, s in itertools.islice(resumed, 14 - cut - 2)] == run[cut + 2:]


def test_a_truncated_or_empty_tar_shard_ends_where_it_breaks_instead_of_stopping_the_run(tmp_path):
    layout_fixture(tmp_path / "d", "pickapic-wds", n=24)  # two shards of 12 samples
    whole = open(tmp_path / "d" / "00001.tar", "rb").read()
    open(tmp_path / "d" / "00001.tar", "wb").write(whole[:len(whole) // 2])  # an interrupted download
    open(tmp_path / "d" / "00002.tar", "wb").close()
    cfg = rpo.parse_config(["--data", str(tmp_path / "d"), "--batch", "1"])
    pairs, _ = one_epoch(cfg)
    second = [int(caption.split()[1]) for caption, _, _ in pairs if int(caption.split()[1]) >= 12]
    assert 12 < len(pairs) < 22 and 0 < len(second) < 12 and max(second) < 18


def test_malformed_json_records_are_counted_skips_not_a_crash(tmp_path):
    folder = tmp_path / "d"
    os.makedirs(folder / "images")
    for name in ("w.jpg", "l.jpg"):
        open(folder / "images" / name, "wb").write(png(WINNER if name == "w.jpg" else LOSER))
    good = dict(prompt="good", image_path=["images/w.jpg", "images/l.jpg"], human_preference=[1, 0])
    json.dump([good, dict(good, prompt=["a list"]), dict(good, human_preference=1), dict(good, image_path=5),
               dict(good, image_path=[None, "images/l.jpg"])], open(folder / "train.json", "w"))
    cfg = rpo.parse_config(["--data", str(folder), "--batch", "1"])
    pairs, counts = one_epoch(cfg)
    assert [caption for caption, _, _ in pairs] == ["good"]
    assert (counts["bad_caption"], counts["ties"], counts["bad_image"]) == (1, 1, 2)


@pytest.mark.parametrize("kind", ["json", "tar"])
def test_an_unknown_layout_is_one_line_naming_what_it_holds_and_the_known_layouts(tmp_path, kind):
    if kind == "json":
        json.dump([dict(text="a cat", good="a.jpg", bad="b.jpg")], open(tmp_path / "pairs.json", "w"))
    else:
        import tarfile
        with tarfile.open(tmp_path / "000.tar", "w") as tar:
            for name in ("k1.txt", "k1.png"):
                info = tarfile.TarInfo(name)
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(SystemExit, match=f"no layout rpo.py reads: its {kind} .* holds .*Known.*hpdv3: json "
                                         "with prompt, path1, path2") as e:
        rpo.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"])
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "o" / "metrics.jsonl")


def test_a_folder_that_mixes_file_kinds_is_one_clear_error_before_training(tmp_path):
    folder = write_shards(tmp_path / "d", pickapic_rows(4), 1)  # names that carry no split: read whole
    json.dump([dict(prompt="a", path1="1.jpg", path2="2.jpg")], open(folder / "rows.json", "w"))
    cfg = rpo.parse_config(["--data", str(folder)])
    with pytest.raises(SystemExit, match=r"is pickapic \(parquet files\) but also holds 1 other.*rows.json"):
        rpo.source_files(cfg, cfg.data, cfg.split)


def test_layout_names_the_layout_when_a_file_would_fit_two(tmp_path):
    rows = [dict(r, prompt=r["caption"], chosen=r["jpg_1"], rejected=r["jpg_0"]) for r in pickapic_rows(4)]
    folder = write_shards(tmp_path / "both", rows, 1)
    cfg = rpo.parse_config(["--data", str(folder)])
    assert rpo.source_files(cfg, cfg.data, cfg.split)[0].layout == "pickapic"  # first in LAYOUTS
    cfg = rpo.parse_config(["--data", str(folder), "--layout", "chosen-rejected"])
    assert rpo.read_rows(rpo.source_files(cfg, cfg.data, cfg.split)[0], 0, 1)[0]["jpg_0"] == rows[0]["jpg_1"]


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_the_tiny_model_trains_from_each_layout_with_held_out_pairs_from_the_same_layout(tmp_path, layout):
    layout_fixture(tmp_path / "d", layout)
    summary, logs = train(tmp_path / "o", "--data", tmp_path / "d", "--eval_data", tmp_path / "d",
                          "--eval_split", "train", "--batch", 2, "--max_steps", 2, "--sample_steps", 0)
    assert [l["step"] for l in logs if "loss" in l] == [1, 2]
    assert all(math.isfinite(l["loss"]) for l in logs if "loss" in l)
    assert any("heldout_accuracy" in l for l in logs) and summary["steps"] == 2


def clustered_shards(folder, n_files=4, rows_per_file=1000, seed=0):
    """Pick-a-Pic's clustering: a prompt's pairs sit side by side in a file (one user session), 1 to 30 of
    them (15 on average, as in Pick-a-Pic v1's 583K pairs of 37.5K prompts). Images are not decoded here."""
    rng, prompt, rows = random.Random(seed), 0, []
    while len(rows) < n_files * rows_per_file:
        rows += [dict(caption=f"prompt {prompt}", jpg_0=b"", jpg_1=b"", label_0=1.0)] * rng.randint(1, 30)
        prompt += 1
    os.makedirs(folder, exist_ok=True)
    for k in range(n_files):
        part = rows[k * rows_per_file:(k + 1) * rows_per_file]
        pq.write_table(pa.Table.from_pylist(part), os.path.join(folder, f"part-{k}.parquet"))
    return folder, [r["caption"] for r in rows]


def same_prompt_share(captions, M):
    """The share of a micro-batch's off-diagonal entries (winner i, loser j != i) whose pairs share a prompt,
    over consecutive micro-batches of M pairs."""
    batches = [captions[i:i + M] for i in range(0, len(captions) - M + 1, M)]
    same = sum(a == b for batch in batches for i, a in enumerate(batch) for b in batch[i + 1:]) * 2
    return same / (len(batches) * M * (M - 1))


def test_one_prompts_pairs_meet_in_a_micro_batch_no_more_than_twice_as_often_as_under_a_global_shuffle(
        tmp_path, monkeypatch):
    folder, captions = clustered_shards(tmp_path / "d")
    cfg = rpo.parse_config(["--data", str(folder), "--batch", "8"])  # windows of 1000 rows, the default

    def stream():
        files = rpo.source_files(cfg, cfg.data, "train")
        return [row["caption"] for _, row, _ in rpo.rank_rows(cfg, files, epoch=0, rank=0, world=1)]
    shuffled = same_prompt_share(stream(), 8)
    global_ = same_prompt_share(random.Random(1).sample(captions, len(captions)), 8)
    monkeypatch.setattr(rpo, "spread", lambda order, captions, gap: order)
    windows_only = same_prompt_share(stream(), 8)
    assert windows_only > 3 * global_  # without spreading, the windows keep each session together
    assert shuffled <= 2 * global_


def test_sdxl_time_ids_record_each_images_own_size_and_crop():
    row = dict(caption="c", jpg_0=png((1, 2, 3), (80, 48)), jpg_1=png((3, 2, 1), (40, 64)), label_0=1.0)
    pair = rpo.prepare_pair(rpo.PairJob(row, 0, 32, time_ids="image"))
    # (orig h, orig w, crop top, crop left, target h, w)
    assert pair["winner_time_ids"] == [48, 80, 0, 10, 32, 32]
    assert pair["loser_time_ids"] == [64, 40, 9, 0, 32, 32]
    assert pair["small"] == 0


def test_with_image_time_ids_a_flipped_image_is_conditioned_on_its_mirrored_crop():
    # 80 x 48 resized to 53 x 32: the centre crop starts 10 px from the left and ends 11 px from the right
    row = dict(caption="c", jpg_0=png((1, 2, 3), (80, 48)), jpg_1=png((3, 2, 1), (40, 64)), label_0=1.0)
    plain, flipped = (rpo.prepare_pair(rpo.PairJob(row, 0, 32, flip, time_ids="image")) for flip in (0, 1))
    assert flipped["winner_time_ids"] == [48, 80, 0, 11, 32, 32]
    assert flipped["loser_time_ids"] == [64, 40, 9, 0, 32, 32]  # 40 px wide: no horizontal crop to mirror
    assert np.array_equal(flipped["winner"], plain["winner"][:, :, ::-1])


def test_by_default_sdxl_conditions_winner_and_loser_alike_as_uncropped_images_of_the_training_size(tmp_path):
    # Pick-a-Pic's original sizes tell which generator made an image, and so correlate with the label
    data = write_shards(tmp_path / "d", pickapic_rows(10))
    cfg = rpo.parse_config([*tiny("tiny-xl"), "--data", str(data)])
    jobs = [job for _, job in rpo.epoch_jobs(cfg, rpo.source_files(cfg, cfg.data, cfg.split), 0, 0, 1, None)]

    def usable(jobs):
        return [p for p in map(rpo.prepare_pair, jobs) if not isinstance(p, str)]
    pairs, own = usable(jobs), usable([job._replace(time_ids="image") for job in jobs])
    assert len(pairs) == 8 and all(p["winner_time_ids"] != p["loser_time_ids"] for p in own)
    uncropped = [32, 32, 0, 0, 32, 32]
    assert all(p["winner_time_ids"] == p["loser_time_ids"] == uncropped for p in pairs)


def test_the_cache_holds_each_flips_own_time_ids_as_the_uncached_path_makes_them(tmp_path):
    data = quirky_shards(tmp_path / "d", [8, 8])
    cfg, m = tiny_models("tiny-xl", "--data", str(data), "--time_ids", "image", "--batch", "2",
                         "--cache", str(tmp_path / "cache"))
    rpo.build_cache(cfg, m, 0, 1, None)
    for epoch in range(2):  # other flips each epoch
        source = rpo.epoch_jobs(cfg, rpo.source_files(cfg, cfg.data, cfg.split), epoch, 0, 1, None)
        cached = rpo.epoch_jobs(cfg, rpo.cache_files(cfg), epoch, 0, 1, None)
        for (_, job), (_, cached_job) in zip(source, cached, strict=True):
            pair, hit = rpo.prepare_pair(job), rpo.cached_pair(cached_job)
            if isinstance(pair, str):
                assert hit == pair
                continue
            assert hit["time_ids"].tolist() == [pair["winner_time_ids"], pair["loser_time_ids"]]


# ------------------------------------------------------------------------------------------ training

def tiny_models(model="tiny", *flags):
    cfg = rpo.parse_config([*tiny(model), *flags])
    m = rpo.load_models(cfg, torch.device("cpu"), torch.float32)
    return cfg, m


def toy_pairs(cfg, split="train", n=8):
    rows = enumerate(toy.pair_rows(split, n))
    return [rpo.prepare_pair((row, i, cfg.resolution, False, None)) for i, row in rows]


def toy_batch(cfg, m, split="train", n=8):
    return rpo.encode_pairs(m, toy_pairs(cfg, split, n), cfg.embed)


def test_a_few_optimizer_steps_on_one_fixed_batch_raise_its_implicit_accuracy_and_leave_the_reference_alone():
    torch.manual_seed(0)
    cfg, m = tiny_models("tiny", "--lr", "1e-4", "--eval_draws", "4")
    enc = toy_batch(cfg, m)
    before = rpo.evaluate(cfg, m, [enc], rpo.nullcontext())
    ref_before = {k: v.clone() for k, v in m.ref_unet.state_dict().items()}
    policy_before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    opt = torch.optim.AdamW(m.unet.parameters(), lr=cfg.lr)
    for step in range(15):
        loss, metrics = rpo.preference_step(cfg, m, m.unet, enc, epoch=step)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = rpo.evaluate(cfg, m, [enc], rpo.nullcontext())
    assert after["accuracy"] > before["accuracy"] and after["margin"] > before["margin"]
    assert all(torch.equal(v, ref_before[k]) for k, v in m.ref_unet.state_dict().items())
    assert not all(torch.equal(v, policy_before[k]) for k, v in m.unet.state_dict().items())
    assert not any(p.requires_grad for p in m.ref_unet.parameters())


def test_pair_embedding_is_the_normalised_sum_of_normalised_clip_text_and_image_features():
    from transformers import CLIPImageProcessorPil
    cfg, m = tiny_models()
    pairs = toy_pairs(cfg, n=4)
    captions = [p["caption"] for p in pairs]
    winners = torch.from_numpy(np.stack([p["winner"] for p in pairs]))
    f = {embed: rpo.pair_embeddings(m, captions, winners, embed) for embed in ("text", "image", "both")}
    ids = m.clip_tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    text = F.normalize(m.clip.get_text_features(ids).pooler_output, dim=-1)
    # CLIP's own preprocessing (the tiny CLIP sees 32 px, the training resolution: no resize)
    processor = CLIPImageProcessorPil(do_resize=False, do_center_crop=False)
    pixels = processor(images=[Image.fromarray(p["winner"].transpose(1, 2, 0)) for p in pairs],
                       return_tensors="pt").pixel_values
    image = F.normalize(m.clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    assert torch.allclose(f["text"], text, atol=1e-5) and torch.allclose(f["image"], image, atol=1e-4)
    assert torch.allclose(f["both"], F.normalize(text + image, dim=-1), atol=1e-4)
    assert not torch.allclose(f["text"], f["image"], atol=1e-2)


def test_sdxl_prompt_dropout_blanks_the_pooled_embedding_with_the_prompt():
    cfg, m = tiny_models("tiny-xl")
    enc = toy_batch(cfg, m, n=4)
    seen = []
    def record(module, args, kwargs):  # the UNet's conditioning: prompt states and SDXL's pooled embedding
        seen.append((args[2], kwargs["added_cond_kwargs"]["text_embeds"]))
    probe = m.unet.register_forward_pre_hook(record, with_kwargs=True)
    for drop in ("1.0", "0"):
        cfg = rpo.parse_config([*tiny("tiny-xl"), "--drop_prompt", drop])
        rpo.preference_step(cfg, m, m.unet, enc, 0)
    probe.remove()
    (prompt, pooled), (kept_prompt, kept_pooled) = seen
    assert torch.equal(pooled, m.empty_pooled.expand_as(pooled))
    assert torch.equal(prompt, m.empty_prompt.expand_as(prompt))
    assert torch.equal(kept_pooled, torch.cat([enc.pooled] * 2)) and not torch.equal(kept_pooled, pooled)


def test_the_learning_rate_warms_up_linearly_and_each_step_logs_the_rate_it_used(tmp_path):
    _, metrics = train(tmp_path, "--lr", 1e-4, "--warmup_steps", 4, "--max_steps", 6, "--save_every", 1,
                       "--keep", 10, "--batch", 2, "--sample_steps", 0, "--eval_pairs", 0)
    assert [r["lr"] for r in metrics] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])
    # AdamW's first update moves each weight by about lr (g / |g|), plus a little weight decay
    base = rpo.load_models(rpo.parse_config([]), torch.device("cpu"), torch.float32).unet.state_dict()
    first = torch.load(tmp_path / "ckpt-0000001.pt", weights_only=True)["unet"]
    assert max((first[k] - base[k]).abs().max().item() for k in base) == pytest.approx(2.5e-5, rel=0.05)


def test_the_learning_rate_is_the_presets_rate_per_pair_times_the_effective_batch_unless_lr_is_set(
        tmp_path, capsys):
    # Diffusion-DPO's recipe, 1e-8 per pair: 2.048e-5 only at its 2048 pairs a step
    sdxl = rpo.parse_config(["--model", "sdxl"])  # 4 pairs x 64 accumulation
    assert rpo.learning_rate(sdxl, 1) == pytest.approx(1e-8 * 256)
    assert rpo.learning_rate(sdxl, 8) == pytest.approx(2.048e-5)
    assert rpo.learning_rate(rpo.parse_config(["--model", "sdxl", "--lr", "3e-6"]), 8) == 3e-6
    assert rpo.learning_rate(rpo.parse_config(tiny()), 1) == 1e-5  # the toy's rate at 8 pairs
    _, metrics = train(tmp_path, *tiny(), "--batch", 2, "--grad_accum", 3, "--warmup_steps", 1,
                       "--max_steps", 1, "--sample_steps", 0, "--eval_pairs", 0)
    assert metrics[0]["lr"] == pytest.approx(1e-5 / 8 * 6)
    assert "= 6 pairs a step, lr 7.5e-06 = 1.25e-06 per pair x 6" in capsys.readouterr().err


def test_a_skipped_non_finite_step_still_advances_the_warmup_which_follows_the_step_number(
        tmp_path, monkeypatch):
    poison_gradients(monkeypatch, float("nan"), from_call=2)  # steps 2 to 5 are skipped
    _, metrics = train(tmp_path, "--lr", 1e-4, "--warmup_steps", 4, "--max_steps", 5, "--batch", 2,
                       "--sample_steps", 0, "--eval_pairs", 0)
    assert [r["nonfinite"] for r in metrics] == [0, 1, 2, 3, 4]
    assert [r["lr"] for r in metrics] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4])


def test_each_step_logs_the_diagonals_effective_beta_beside_w_diag(tmp_path):
    # w is a row-softmax inside the sigmoid: the diagonal's logit is (beta/2) w_ii (s_w - s_l)
    for loss in ("rpo", "dpo"):
        _, metrics = train(tmp_path / loss, "--loss", loss, "--batch", 4, "--max_steps", 2,
                           "--sample_steps", 0, "--eval_pairs", 0)
        assert [r["beta_w_diag"] for r in metrics] == pytest.approx([5000 * r["w_diag"] for r in metrics])
    assert all(r["w_diag"] == 1 for r in metrics)  # DPO: the diagonal alone, at beta


def test_winner_and_loser_of_a_pair_share_noise_and_timestep_and_pairs_differ():
    cfg, m = tiny_models()
    enc = toy_batch(cfg, m, n=4)
    noise, t = rpo.pair_noise([11, 22, 11], enc.latents_w.shape[1:], 1000)
    assert torch.equal(noise[0], noise[2]) and t[0] == t[2] and not torch.equal(noise[0], noise[1])
    # one forward of [winners; losers] with the noise repeated: identical winner and loser give
    # identical errors
    same = enc._replace(latents_l=enc.latents_w, time_ids_l=enc.time_ids_w)
    err_w, err_l = rpo.pair_errors(m.unet, m, same, [f"k{i}" for i in range(4)])
    assert torch.allclose(err_w, err_l)


def test_prompt_dropout_blanks_the_conditioning_but_not_the_pair_weights():
    cfg, m = tiny_models("tiny", "--drop_prompt", "1.0")
    enc = toy_batch(cfg, m, n=4)
    _, metrics = rpo.preference_step(cfg, m, m.unet, enc, 0)
    blank = enc._replace(prompt=m.empty_prompt.expand_as(enc.prompt))
    cfg0 = rpo.parse_config(["--drop_prompt", "0"])
    _, blanked = rpo.preference_step(cfg0, m, m.unet, blank, 0)
    _, kept = rpo.preference_step(cfg0, m, m.unet, enc, 0)
    # the denoising error is what the conditioning changes (the loss is log 2 while policy = reference)
    assert torch.allclose(metrics["mse"], blanked["mse"]) and not torch.allclose(metrics["mse"], kept["mse"])
    # the weights still come from the original captions, not from the empty one the UNet saw
    pairs = toy_pairs(cfg, n=4)
    winners, losers = (torch.from_numpy(np.stack([p[k] for p in pairs])) for k in ("winner", "loser"))

    def w_diag(captions):
        f_w, f_l = (rpo.pair_embeddings(m, captions, x, "both") for x in (winners, losers))
        return rpo.contrast_weights(f_w, f_l, cfg.tau).diagonal().mean()
    assert torch.allclose(metrics["w_diag"], w_diag([p["caption"] for p in pairs]))
    assert not torch.allclose(metrics["w_diag"], w_diag([""] * 4))


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_tiny_models_train_end_to_end_save_a_diffusers_unet_and_resume_at_the_saved_step(tmp_path, model):
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    out = tmp_path / model
    summary, metrics = train(out, *tiny(model), "--max_steps", 4, "--save_every", 2, "--batch", 4)
    assert summary["steps"] == 4 and math.isfinite(summary["loss"])
    assert_heldout_is_the_saved_unets(summary, out, *tiny(model), "--batch", 4)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in metrics)
    assert (out / "samples_4.png").exists() and (out / "ckpt.pt").exists()
    base = toy.model_folder(model)
    tuned = UNet2DConditionModel.from_pretrained(out / "unet")
    original = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    assert any(not torch.equal(a, b)
               for a, b in zip(tuned.state_dict().values(), original.state_dict().values()))
    pipe = DiffusionPipeline.from_pretrained(base, unet=tuned)
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    summary, metrics = train(out, *tiny(model), "--max_steps", 6, "--save_every", 2, "--batch", 4,
                             "--resume")
    assert summary["steps"] == 2 and [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]


def infinite_loss(monkeypatch):
    """Every step's loss is infinite (its gradient NaN)."""
    real = rpo.rpo_loss

    def rpo_loss(*args, **kwargs):
        return real(*args, **kwargs) * float("inf")
    monkeypatch.setattr(rpo, "rpo_loss", rpo_loss)


def test_a_run_of_non_finite_losses_stops_with_a_clear_message_and_the_last_good_weights(tmp_path,
                                                                                          monkeypatch):
    infinite_loss(monkeypatch)
    advice = f"start a new --out from those weights, --init_unet {tmp_path}/unet"
    with pytest.raises(SystemExit, match=f"non-finite steps .loss or gradient. in a row .* {advice}"):
        train(tmp_path, "--max_nonfinite", 3, "--max_steps", 10, "--batch", 2)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    base = rpo.load_models(rpo.parse_config([]), torch.device("cpu"), torch.float32).unet.state_dict()
    assert ckpt["step"] == 3 and all(torch.equal(v, base[k]) for k, v in ckpt["unet"].items())


@pytest.mark.parametrize("model", ["tiny-drawn", "tiny-sd3"])
def test_cached_and_uncached_training_give_the_same_losses_and_the_cache_holds_a_captions_text_once(
        tmp_path, model):
    # beta 100, not 5000: beta/2 multiplies the last-bit differences that batching the encoders
    # differently leaves
    # 36 toy pairs: 3 files (16, 16, 4 rows) read in windows of 5 rows, 9 steps an epoch, then a
    # reshuffled epoch
    flags = ["--max_pairs", 36, "--batch", 4, "--max_steps", 11, "--save_every", 100, "--eval_pairs", 0,
             "--shuffle_buffer", 5, "--beta", 100, *(tiny(model) if model != "tiny-drawn" else [])]
    _, plain = train(tmp_path / "plain", *flags)
    _, cached = train(tmp_path / "cached", *flags, "--cache", tmp_path / "cache")
    assert json.load(open(tmp_path / "cache" / "meta.json"))["rows"] == [16, 16, 4]
    repeated = 0
    for k in range(3):
        c = torch.load(tmp_path / "cache" / f"file-{k:06d}.pt", weights_only=True)
        usable = [caption for caption, skip in zip(c["caption"], c["skip"]) if skip is None]
        distinct = list(dict.fromkeys(usable))
        assert len(c["prompt"]) == len(distinct) and [distinct[i] for i in c["text_index"]] == usable
        repeated += len(usable) - len(distinct)
    assert repeated > 0  # the toy files repeat a few captions
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    if model == "tiny-sd3":  # its prompt states hold T5's: a run without T5 cannot use them
        with pytest.raises(SystemExit, match=r"built for other settings: no_t5 None \(now True\)"):
            train(tmp_path / "no_t5", *flags, "--no_t5", "--cache", tmp_path / "cache")
    else:  # a finished cache is only read (whatever the model: one reader)
        _, again = train(tmp_path / "again", *flags, "--cache", tmp_path / "cache")
        assert [r["loss"] for r in again] == [r["loss"] for r in cached]


def test_only_uncached_rpo_spends_training_time_on_pair_embeddings(tmp_path):
    # what an RPO step adds to a DPO step: CLIP, which --cache moves out of the loop, and an M x M
    # matrix of scalars
    flags = ["--max_pairs", 8, "--batch", 4, "--max_steps", 3, "--save_every", 100, "--eval_pairs", 0,
             "--sample_steps", 0]
    runs = [train(tmp_path / name, *flags, *extra)[0] for name, extra in
            [("rpo", []), ("dpo", ["--loss", "dpo"]), ("cached", ["--cache", tmp_path / "cache"])]]
    assert [r["weight_time_share"] > 0 for r in runs] == [True, False, False]
    assert all(r["median_step_ms"] > 0 and r["pairs_per_s"] > 0 and r["tflops_per_s"] > 0 for r in runs)
    assert all(r["mfu"] is None for r in runs)  # MFU is quoted against a GPU's peak only


@pytest.mark.parametrize("loss, unet", [("rpo", "full"), ("sft", "full"), ("rpo", "lora"), ("sft", "lora")])
def test_mfu_flop_count_matches_the_counted_flops_of_a_real_micro_step(loss, unet):
    # rpo: 3 policy forwards (forward + backward) + 1 reference forward of the 2M images; sft: 3 of M winners.
    # LoRA: the frozen UNet's backward is 1 forward, not 2 (no weight gradients)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg, m = tiny_models("tiny", "--loss", loss, *(map(str, LORA) if unet == "lora" else []))
    enc = toy_batch(cfg, m, n=4)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        rpo.preference_step(cfg, m, m.unet, enc, epoch=0)[0].backward()
    assert rpo.step_flops(cfg, m, enc) == pytest.approx(counter.get_total_flops(), rel=0.03)


def loaded_models(monkeypatch):
    """The models rpo.main loads, kept for the test to look at."""
    models, load = [], rpo.load_models

    def load_and_keep(*a, **k):
        models.append(load(*a, **k))
        return models[-1]
    monkeypatch.setattr(rpo, "load_models", load_and_keep)
    return models


def test_bf16_trains_fp32_master_weights_with_every_frozen_model_in_bf16_as_on_a_gpu(tmp_path, monkeypatch):
    models = loaded_models(monkeypatch)
    summary, metrics = train(tmp_path, "--precision", "bf16", "--max_steps", 3, "--batch", 2,
                             "--sample_steps", 0)
    assert summary["precision"] == "bf16" and all(math.isfinite(r["loss"]) for r in metrics)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["unet"]
    assert {v.dtype for v in saved.values()} == {torch.float32}
    m = models[0]
    frozen = (m.ref_unet, m.vae, m.clip, *m.text_encoders)
    assert {p.dtype for model in frozen for p in model.parameters()} == {torch.bfloat16}


def poison_gradients(monkeypatch, value, from_call):
    """From the from_call-th micro-step on, the loss stays finite and its gradient becomes `value`
    (nan or inf)."""
    real, calls = rpo.preference_step, []

    def step(*a, **k):
        loss, metrics = real(*a, **k)
        calls.append(1)
        if len(calls) >= from_call:
            loss.register_hook(lambda grad: grad * value)
        return loss, metrics
    monkeypatch.setattr(rpo, "preference_step", step)


def test_a_non_finite_gradient_under_a_finite_loss_is_skipped_counted_and_never_reaches_the_weights(
        tmp_path, monkeypatch):
    flags = ["--batch", 2, "--sample_steps", 0, "--save_every", 100]
    train(tmp_path / "good", *flags, "--max_steps", 1)
    poison_gradients(monkeypatch, float("nan"), from_call=2)
    with pytest.raises(SystemExit, match="3 non-finite steps"):
        train(tmp_path / "bad", *flags, "--max_steps", 10, "--max_nonfinite", 3)
    metrics = logged(tmp_path / "bad")
    assert (all(math.isfinite(r["loss"]) for r in metrics)
            and [r["nonfinite"] for r in metrics] == [0, 1, 2, 3])
    # the stop's checkpoint: step 1's weights
    good, bad = final_unet(tmp_path / "good"), final_unet(tmp_path / "bad")
    assert all(torch.equal(good[k], bad[k]) for k in good)


def infinite_rate(cfg, world):
    return float("inf")


def test_a_checkpoint_never_holds_non_finite_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(rpo, "learning_rate", infinite_rate)
    with pytest.raises(SystemExit, match="weights became non-finite by step 1 and were not saved"):
        train(tmp_path, "--max_steps", 2, "--save_every", 1, "--batch", 2, "--sample_steps", 0)
    assert not list(tmp_path.glob("ckpt*")) and not (tmp_path / "unet").exists()


def test_fp16_overflows_are_skipped_by_the_grad_scaler_which_halves_its_scale_without_stopping_the_run(
        tmp_path, monkeypatch):
    poison_gradients(monkeypatch, float("inf"), from_call=2)  # steps 2 and 3 overflow
    summary, metrics = train(tmp_path, "--precision", "fp16", "--max_steps", 3, "--batch", 2,
                             "--sample_steps", 0, "--max_nonfinite", 1)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert summary["steps"] == 3 and all(math.isfinite(r["loss"]) for r in metrics)
    # both poisoned steps skipped
    assert [r["nonfinite"] - metrics[0]["nonfinite"] for r in metrics] == [0, 1, 2]
    assert ckpt["scaler"]["scale"] == 2.0 ** 16 * 0.5 ** metrics[-1]["nonfinite"]
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in ckpt["unet"].values())


def on_meta(m):
    """The models and their constants on the meta device, which stands in for a GPU here: like CUDA,
    it refuses to mix in a CPU tensor, and it has no torch.Generator."""
    meta = torch.device("meta")
    for module in (m.unet, m.ref_unet, m.vae, m.clip, *m.text_encoders):
        module.to(meta)
    m.device, m.empty_prompt = meta, m.empty_prompt.to(meta)
    m.empty_pooled = m.empty_pooled.to(meta) if m.empty_pooled is not None else None
    return meta


@pytest.mark.parametrize("loss", ["rpo", "dpo", "sft"])
def test_a_step_and_everything_it_logs_are_made_on_the_training_device(loss):
    cfg, m = tiny_models("tiny-xl", "--loss", loss)
    pairs, device = toy_pairs(cfg, n=4), on_meta(m)
    step_loss, metrics = rpo.preference_step(cfg, m, m.unet, rpo.encode_pairs(m, pairs, cfg.embed,
                                                                               with_f=loss == "rpo"), 0)
    step_loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(m.unet.parameters(), 1.0)
    sums = {k: v.float() / 2 for k, v in dict(metrics, loss=step_loss.detach(), grad_norm=grad_norm).items()}
    # what the training loop all-reduces and logs
    names, vec = rpo.step_vector(sums, {k: 3 for k in rpo.SKIP_KEYS}, [True, False], device)
    assert vec.device == device and vec.dtype == torch.float64 and len(names) == len(vec)
    assert {"loss", "grad_norm", *rpo.SKIP_KEYS, "signalled", "due"} <= set(names)


def test_no_encoder_or_unet_call_sees_more_than_one_micro_batch(tmp_path, monkeypatch):
    sizes = {}

    def probe(name):
        def record(module, args, kwargs):
            x = next(v for v in [*args, *kwargs.values()] if torch.is_tensor(v))
            sizes[name] = max(sizes.get(name, 0), len(x))
        return record
    load = rpo.load_models

    def load_with_probes(*a, **k):
        m = load(*a, **k)
        parts = dict(unet=m.unet, ref_unet=m.ref_unet, vae=m.vae.encoder, clip_text=m.clip.text_model,
                     clip_image=m.clip.vision_model, text=m.text_encoders[0], text_2=m.text_encoders[1])
        for name, module in parts.items():
            module.register_forward_pre_hook(probe(name), with_kwargs=True)
        return m
    monkeypatch.setattr(rpo, "load_models", load_with_probes)
    # 2 pairs a micro-batch and 12 held-out pairs (24 images): the held-out set goes in micro-batches too
    summary, _ = train(tmp_path, *tiny("tiny-xl"), "--batch", 2, "--max_steps", 2, "--eval_pairs", 12,
                       "--sample_steps", 0)
    assert summary["heldout_accuracy"] is not None
    assert sizes == dict(unet=4, ref_unet=4, vae=4, clip_text=2, clip_image=4, text=2, text_2=2)


RUN = ["--batch", 2, "--sample_steps", 0, "--eval_pairs", 0]


def test_a_fresh_run_into_a_folder_that_holds_a_run_stops_before_any_work_and_touches_nothing(
        tmp_path, monkeypatch):
    train(tmp_path, *RUN, "--max_steps", 2, "--save_every", 1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    def no_work(*a, **k):
        raise AssertionError("models were loaded")
    monkeypatch.setattr(rpo, "load_models", no_work)
    line = f"--out {tmp_path} holds a run .*; pass --resume to continue it, or choose another --out"
    with pytest.raises(SystemExit, match=line):
        train(tmp_path, *RUN, "--max_steps", 2, "--save_every", 1, "--seed", 1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_without_out_each_fresh_run_gets_a_folder_of_its_own_and_resume_continues_the_newest(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(*flags):
        with redirect_stdout(io.StringIO()):
            rpo.main(["--workers", "0", *map(str, [*RUN, "--save_every", 2, *flags])])
    run("--max_steps", 2)
    run("--max_steps", 2)
    with pytest.raises(SystemExit):  # a start that fails before its first checkpoint: out/run-3, empty
        run("--max_steps", 2, "--data", "no-such-data")
    run("--max_steps", 3, "--resume")  # the newest run with a checkpoint
    assert sorted(os.listdir("out")) == ["run-1", "run-2", "run-3"]
    assert [[r["step"] for r in logged(f"out/run-{n}")] for n in (1, 2)] == [[1, 2], [1, 2, 3]]


def test_rotation_deletes_only_this_runs_older_checkpoints_never_a_later_one(tmp_path):
    train(tmp_path, *RUN, "--save_every", 2, "--keep", 1, "--max_steps", 4)
    # a later step's checkpoint that does not load (cut mid-write, say): --resume passes it over
    (tmp_path / "ckpt-0000009.pt").write_bytes(b"not a checkpoint")
    train(tmp_path, *RUN, "--save_every", 2, "--keep", 1, "--max_steps", 6, "--resume")
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-0000006.pt", "ckpt-0000009.pt"]
    assert os.readlink(tmp_path / "ckpt.pt") == "ckpt-0000006.pt"


def tensorboard_log(out):
    """What TensorBoard shows for a run folder: {tag: [(step, value)]} of scalars, and the steps of the sample
    grids and of the config text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                            "tensors": 0})
    log.Reload()
    scalars = {tag: [(e.step, e.value) for e in log.Scalars(tag)] for tag in log.Tags()["scalars"]}
    images = [e.step for e in log.Images("samples")] if "samples" in log.Tags()["images"] else []
    return scalars, images, [e.step for e in log.Tensors("config/text_summary")]


def jsonl_scalars(records):
    """metrics.jsonl as {key: [(step, value as TensorBoard stores it, float32)]}; null (not finite) is NaN."""
    scalars = collections.defaultdict(list)
    for r in records:
        for k, v in r.items():
            if k != "step":
                scalars[k].append((r["step"], float(np.float32(math.nan if v is None else v))))
    return dict(scalars)


def same_curves(a, b):
    def same(x, y):  # (step, value), NaN equal to NaN
        return x[0] == y[0] and (x[1] == y[1] or math.isnan(x[1]) and math.isnan(y[1]))
    return a.keys() == b.keys() and all(len(a[k]) == len(b[k]) and all(map(same, a[k], b[k])) for k in a)


def test_tensorboard_holds_every_value_of_metrics_jsonl_at_its_step_each_sample_grid_and_the_config(tmp_path):
    summary, records = train(tmp_path / "o", *tiny(), "--batch", 2, "--max_steps", 4,
                             "--save_every", 2, "--sample_steps", 2)
    scalars, grids, config = tensorboard_log(tmp_path / "o")
    end = {k: v for k, v in scalars.items() if k.startswith("end/")}
    assert same_curves({k: v for k, v in scalars.items() if k not in end}, jsonl_scalars(records))
    assert {"loss", "accuracy", "w_diag", "lr", "grad_norm", "ties", "heldout_accuracy"} <= scalars.keys()
    assert grids == [0, 2, 4] and config == [0]
    assert end["end/pairs_per_s"] == [(4, pytest.approx(summary["pairs_per_s"]))]


@pytest.mark.parametrize("lost", ["the last checkpoint", "every checkpoint"])
def test_a_resumed_run_continues_the_tensorboard_curves_holding_each_step_once(tmp_path, lost):
    out = tmp_path / "o"
    train(out, *tiny(), "--batch", 2, "--max_steps", 5, "--save_every", 2, "--sample_steps", 0)
    # as if killed after logging step 5, before its checkpoint (or before the first one)
    for ckpt in sorted(glob.glob(str(out / "ckpt-*.pt")))[-1 if lost == "the last checkpoint" else 0:]:
        os.remove(ckpt)
    _, records = train(out, *tiny(), "--batch", 2, "--max_steps", 6, "--save_every", 2,
                       "--sample_steps", 0, "--resume")
    scalars, _, _ = tensorboard_log(out)
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6]
    assert same_curves({k: v for k, v in scalars.items() if not k.startswith("end/")}, jsonl_scalars(records))


def test_report_to_wandb_in_offline_mode_writes_a_run_folder_that_a_resume_continues(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # optional: not in requirements.txt
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_script(tmp_path / "o", *tiny(), "--batch", 2, "--max_steps", 2, "--sample_steps", 2,
               "--eval_pairs", 0, "--report_to", "wandb", timeout=300)
    runs = glob.glob(str(tmp_path / "o" / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "*.wandb"))
    run_script(tmp_path / "o", *tiny(), "--batch", 2, "--max_steps", 3, "--sample_steps", 2,
               "--eval_pairs", 0, "--report_to", "wandb", "--resume", timeout=300)
    run_id = json.load(open(tmp_path / "o" / "wandb_id.json"))
    runs = glob.glob(str(tmp_path / "o" / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and all(run.endswith("-" + run_id) for run in runs)  # the resume continues the run


def test_report_to_a_tracker_that_is_not_installed_is_one_line_before_any_work(monkeypatch):
    real = importlib.util.find_spec

    def not_installed(name, *args):
        return None if name == "wandb" else real(name, *args)
    monkeypatch.setattr(importlib.util, "find_spec", not_installed)
    with pytest.raises(SystemExit, match="--report_to wandb needs the wandb package: pip install wandb, or "
                                         "pass --report_to none"):
        rpo.parse_config(["--report_to", "wandb"])


def test_a_resume_may_change_only_settings_that_shape_neither_the_data_order_the_model_nor_the_loss(tmp_path):
    train(tmp_path, *RUN, "--save_every", 2, "--max_steps", 2)
    # the rate follows the batch: tiny-drawn's 1e-4 / 8 per pair
    changed = (r"trained with other settings: --batch 2 \(now 3\), --lr 2.5e-05 \(now 3.75e-05\), --seed 0 "
               r"\(now 1\)\. They shape the data")
    with pytest.raises(SystemExit, match=changed):
        train(tmp_path, *RUN, "--max_steps", 4, "--resume", "--batch", 3, "--seed", 1)
    # the same rate set outright is the same setting
    _, metrics = train(tmp_path, *RUN, "--max_steps", 3, "--resume", "--lr", 2.5e-5, "--save_every", 10)
    assert [r["step"] for r in metrics] == [1, 2, 3]
    free = ["--max_steps", 4, "--save_every", 4, "--keep", 3, "--eval_pairs", 4, "--eval_draws", 1,
            "--sample_steps", 2, "--max_nonfinite", 2]
    _, metrics = train(tmp_path, *RUN, *free, "--resume")
    assert [r["step"] for r in metrics] == [1, 2, 3, 4] and "heldout_accuracy" in metrics[-1]
    # a checkpoint from before a setting existed: one line, not a guess at what it meant
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del ckpt["config"]["time_ids"]
    ckpt["digest"] = rpo.content_digest(ckpt)  # whole as written, by the older code
    torch.save(ckpt, tmp_path / "ckpt-0000009.pt")
    with pytest.raises(SystemExit, match="written by an older rpo.py, without --time_ids; resume it"):
        train(tmp_path, *RUN, "--max_steps", 10, "--resume")


def mapped_file(tensor):
    """The file whose pages hold a tensor's data, or None (from /proc/self/maps)."""
    for line in open("/proc/self/maps"):
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= tensor.data_ptr() < hi:
            return rest[4] if len(rest) > 4 else None
    return None


def test_a_checkpoint_is_loaded_memory_mapped_so_the_ranks_of_one_host_share_its_pages(tmp_path):
    train(tmp_path, *RUN, "--max_steps", 1)
    ckpt = rpo.load_checkpoint(str(tmp_path))
    moments = [v for state in ckpt["optimizer"]["state"].values() for k, v in state.items() if k != "step"]
    assert {mapped_file(v) for v in [*ckpt["unet"].values(), *moments]} == {
        os.path.realpath(tmp_path / "ckpt-0000001.pt")}


def test_every_json_line_rpo_writes_is_strict_json_with_null_for_a_value_that_is_not_a_number(tmp_path,
                                                                                               monkeypatch):
    # train() reads each line with a parser that refuses NaN and Infinity
    summary, _ = train(tmp_path / "sft", *RUN, "--loss", "sft", "--max_steps", 2)
    assert summary["train_accuracy"] is None  # SFT has no implicit accuracy
    infinite_loss(monkeypatch)
    summary, metrics = train(tmp_path / "inf", *RUN, *tiny(), "--max_steps", 2)
    assert summary["loss"] is None and [r["loss"] for r in metrics] == [None, None]


def test_pair_embedding_time_is_a_running_total_that_keeps_only_the_cuda_intervals_still_in_flight():
    class Event:  # what seconds_done reads of a CUDA event
        def __init__(self, at):
            self.at, self.done = at, False

        def query(self):  # whether the GPU has passed it, without waiting
            return self.done

        def elapsed_time(self, end):
            return 1000 * (end.at - self.at)
    in_flight, seconds = collections.deque(), 0.0
    intervals = [(Event(k), Event(k + 0.25)) for k in range(1000)]  # one per micro-step of a long run
    for k, interval in enumerate(intervals):
        if k >= 2:  # the GPU runs two micro-steps behind
            intervals[k - 2][1].done = True
        seconds += rpo.seconds_done(in_flight, interval)
        assert len(in_flight) <= 2
    for _, end in intervals:
        end.done = True
    assert seconds + rpo.seconds_done(in_flight) == 250.0 and not in_flight
    assert rpo.seconds_done(in_flight, (1.0, 1.5)) == 0.5  # perf_counter seconds, on the CPU


def test_a_checkpoint_truncated_mid_write_is_passed_over_for_the_previous_one(tmp_path):
    train(tmp_path, "--max_steps", 4, "--save_every", 2, "--batch", 2, "--keep", 2, "--sample_steps", 0)
    assert (tmp_path / "ckpt-0000002.pt").exists()
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    assert rpo.load_checkpoint(str(tmp_path))["step"] == 2
    summary, metrics = train(tmp_path, "--max_steps", 5, "--save_every", 2, "--batch", 2, "--keep", 2,
                             "--sample_steps", 0, "--resume")
    assert summary["steps"] == 3 and [r["step"] for r in metrics] == [1, 2, 3, 4, 5]
    for path in rpo.checkpoints(str(tmp_path)):  # none loads (storage not back yet): never start over
        open(path, "wb").write(b"")
    with pytest.raises(SystemExit, match=f"none of the 2 checkpoints in {tmp_path} loads"):
        train(tmp_path, "--max_steps", 7, "--batch", 2, "--sample_steps", 0, "--resume")
    assert len(logged(tmp_path)) == 5


def start(cmd, env=None):
    """A child in its own process group (torchrun's ranks included), so that one kill ends all of it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                            start_new_session=True)


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.communicate()


def ended(proc, timeout=180):
    """The exit status, stdout and stderr of a started child; on timeout its whole process group is killed and
    the test fails."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _, stderr = kill_group(proc)
        pytest.fail(f"timed out after {timeout} s (process group killed): {stderr[-2000:]}")
    return proc.returncode, stdout, stderr


def finish(proc, timeout=180):
    """stdout and stderr of a started child that must succeed."""
    returncode, stdout, stderr = ended(proc, timeout)
    assert returncode == 0, stderr[-3000:]
    return stdout, stderr


def rpo_command(out, *flags, nproc=1, script=None, torchrun_options=()):
    torchrun = (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                 *torchrun_options] if nproc > 1 else [])
    return [sys.executable, *torchrun, script or os.path.join(HERE, "rpo.py"),
            "--out", str(out), "--workers", "0", *map(str, flags)]


def run_script(out, *flags, nproc=1, wait=True, script=None, timeout=180, env=None, torchrun_options=()):
    proc = start(rpo_command(out, *flags, nproc=nproc, script=script, torchrun_options=torchrun_options), env)
    if not wait:
        return proc
    finish(proc, timeout)
    return logged(out)


def final_unet(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["unet"]


# beta 100, not 5000: forwards of different batch sizes round differently in the last bit, and beta/2
# magnifies that. lr 1e-5 whatever the batch: a smaller step would leave s at the rounding level, where the
# implicit accuracy is a coin toss
DDP_FLAGS = ["--max_steps", 3, "--save_every", 3, "--eval_pairs", 0, "--max_pairs", 64, "--beta", 100,
             "--sample_steps", 0, "--lr", 1e-5]


def assert_same_training(out_a, metrics_a, out_b, metrics_b, same_forwards=True):
    """Same losses, pair weights and final weights; the same implicit accuracy too when both runs' encoders and
    denoisers saw batches of the same sizes (at step 1 policy = reference: s = 0 up to last bits, which decide
    the ties, and some CPUs' kernels round a batch of 8 differently from two of 4)."""
    assert len(metrics_a) == len(metrics_b) == 3
    for a, b in zip(metrics_a, metrics_b):
        assert (a["loss"] == pytest.approx(b["loss"], abs=1e-5)
                and a["w_diag"] == pytest.approx(b["w_diag"], abs=1e-6))
        assert a["accuracy"] == b["accuracy"] or not same_forwards
    w1, w2 = final_unet(out_a), final_unet(out_b)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


def launcher(folder, name, body):
    """A script that runs rpo.main() after `body` (test-only changes to the module) has run."""
    path = folder / name
    path.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\nimport rpo\n"
                    f"{textwrap.dedent(body)}\nrpo.main()\n")
    return path


# One process that trains on what ranks 0 and 1 of a two-process run read (the data order is a function
# of the seed and the world size): their micro-batches in turn (accumulation) or side by side in one
# micro-batch of twice the size (global contrast).
AS_TWO_RANKS = """
    import dataclasses, torch
    real = rpo.training_batches
    def as_two_ranks(cfg, m, rank, world, start, pool):
        side_by_side = cfg.grad_accum == 1
        half = dataclasses.replace(cfg, batch=cfg.batch // 2) if side_by_side else cfg
        for (a, state), (b, _) in zip(real(half, m, 0, 2, None, pool), real(half, m, 1, 2, None, pool)):
            if not side_by_side:
                yield a, state
                yield b, state
                continue
            yield type(a)(*(x + y if name == "index" else None if x is None else torch.cat([x, y])
                            for name, x, y in zip(a._fields, a, b))), state
    rpo.training_batches = as_two_ranks
"""


@pytest.fixture(scope="module")
def one_process_2x4(tmp_path_factory):
    """One process, 4 micro-batches of 2 pairs a step: the global batch the two-process runs split
    over 2 ranks."""
    out = tmp_path_factory.mktemp("one_process")
    return out, run_script(out, *DDP_FLAGS, "--batch", 2, "--grad_accum", 4,
                           script=launcher(out, "as_two_ranks.py", AS_TWO_RANKS))


def test_two_processes_with_gradient_accumulation_match_one_process_on_the_same_global_batch(
        tmp_path, one_process_2x4):
    # each rank: 2 micro-batches of 2 pairs, the first under DDP's no_sync
    two = run_script(tmp_path, *DDP_FLAGS, "--batch", 2, "--grad_accum", 2, nproc=2)
    assert_same_training(*one_process_2x4, tmp_path, two)


@pytest.mark.parametrize("unet", ["full", "lora"])
def test_global_contrast_on_two_processes_builds_the_matrix_of_one_process_with_the_whole_batch(
        tmp_path, unet):
    # 2 ranks x 2 pairs build the 4 x 4 matrix that one process builds from the same 4 pairs
    flags = [*DDP_FLAGS, *(LORA if unet == "lora" else [])]
    as_two_ranks = launcher(tmp_path, "one.py", AS_TWO_RANKS)
    one = run_script(tmp_path / "one", *flags, "--batch", 4, script=as_two_ranks)
    two = rpo_command(tmp_path / "two", *flags, "--batch", 2, "--global_contrast", nproc=2)
    _, stderr = finish(start(two))
    assert_same_training(tmp_path / "one", one, tmp_path / "two", logged(tmp_path / "two"), same_forwards=False)
    assert "each row of w over 4 pairs" in stderr  # the start-up line: what the diagonal's beta is divided by


def test_ranks_that_find_checkpoints_of_different_steps_stop_saying_out_must_be_on_a_shared_filesystem(
        tmp_path):
    # rank 1 runs on a node of its own, whose --out is its own empty folder: rank 0 alone writes checkpoints
    own_disks = launcher(tmp_path, "own_disks.py", """
        import os, sys
        if os.environ["RANK"] == "1":
            sys.argv[sys.argv.index("--out") + 1] += "-node2"
    """)
    flags = [*DDP_FLAGS, "--batch", 2, "--save_every", 2]
    run_script(tmp_path / "run", *flags, "--max_steps", 2, nproc=2, script=own_disks)
    resumed = rpo_command(tmp_path / "run", *flags, "--max_steps", 4, "--resume", nproc=2, script=own_disks)
    returncode, _, stderr = ended(start(resumed))
    assert returncode != 0 and "--out (and --cache) must be on a filesystem every node sees" in stderr


def test_a_cache_built_by_two_ranks_trains_like_the_uncached_run(tmp_path, one_process_2x4):
    # 64 toy pairs are 4 files of 16 rows: cache files 0 and 2 are written by rank 0, 1 and 3 by rank 1, each
    # in chunks of 8 rows instead of 256
    cache = tmp_path / "cache"
    two = run_script(tmp_path / "two", *DDP_FLAGS, "--batch", 2, "--grad_accum", 2, "--cache", cache, nproc=2,
                     script=launcher(tmp_path, "small_chunks.py", "rpo.CACHE_CHUNK = 8"))
    assert sorted(os.listdir(cache)) == [f"file-{k:06d}.pt" for k in range(4)] + ["meta.json"]
    assert json.load(open(cache / "meta.json"))["rows"] == [16] * 4
    assert_same_training(*one_process_2x4, tmp_path / "two", two, same_forwards=False)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rpo_py_copied_with_the_shipped_folders_but_without_toy_py_runs_its_default_and_trains_a_model_folder(
        tmp_path):
    alone = tmp_path / "alone"  # another codebase: rpo.py, the shipped model and data, and no toy.py beside it
    alone.mkdir()
    shutil.copy(os.path.join(HERE, "rpo.py"), alone)
    for folder in ("toy-drawn", "toy-data"):
        shutil.copytree(os.path.join(HERE, folder), alone / folder)
    default = rpo_command(tmp_path / "default", "--max_steps", 2, "--eval_pairs", 8, "--eval_draws", 1,
                          "--sample_steps", 2, script=alone / "rpo.py")
    finish(start(default))
    settings = json.load(open(tmp_path / "default" / "settings.json"))
    assert (settings["pretrained"], settings["data"]) == (str(alone / "toy-drawn"), str(alone / "toy-data"))
    assert counts_pairs(logged(tmp_path / "default")[-1]["heldout_accuracy"], 8)
    assert (tmp_path / "default" / "samples_2.png").exists()
    base = toy.model_folder("tiny")  # a diffusers folder, as from the hub
    data = quirky_shards(tmp_path / "d", [8, 8])
    flags = ["--model", "sd15", "--pretrained", base, "--clip", os.path.join(base, "clip"), "--data", data,
             "--resolution", 32, "--batch", 2, "--grad_accum", 1, "--max_steps", 2, "--eval_pairs", 0,
             "--sample_steps", 2]
    finish(start(rpo_command(tmp_path / "out", *flags, script=alone / "rpo.py")))
    assert len(logged(tmp_path / "out")) == 2 and (tmp_path / "out" / "unet").is_dir()
    no_weights = rpo_command(tmp_path / "tiny", "--model", "tiny", script=alone / "rpo.py")
    returncode, _, stderr = ended(start(no_weights))
    assert returncode != 0 and stderr.strip().splitlines() == [
        "rpo.py: --model tiny has no weights of its own: pass --pretrained DIR, a diffusers folder of its "
        "shape (python toy.py model tiny --out DIR writes one)"]


def test_torchrun_with_one_process_takes_the_distributed_path_and_frees_ddp_before_the_process_group(
        tmp_path, monkeypatch):
    import torch.distributed as dist
    flags = ["--max_steps", 2, "--batch", 2, "--grad_accum", 2, "--max_pairs", 16, "--eval_pairs", 0,
             "--beta", 100, "--global_contrast", "--sample_steps", 0]
    _, plain = train(tmp_path / "plain", *flags)
    torchrun_env = dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    for key, value in torchrun_env.items():
        monkeypatch.setenv(key, str(value))
    calls, ddp_alive_at_teardown = [], []

    def counted(name, real):
        def call(*a, **k):
            calls.append(name)
            return real(*a, **k)
        return call
    for name in ("all_reduce", "all_gather", "all_gather_object"):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, counted(name, real))
    destroy = dist.destroy_process_group

    def destroy_and_look(*a, **k):
        # a DDP still alive here would free its Reducer, the group's last holder, after this call: with
        # the GIL held, while gloo's threads may need it (the exit deadlock of two-process runs)
        ddp = torch.nn.parallel.DistributedDataParallel
        ddp_alive_at_teardown.extend(o for o in gc.get_objects() if type(o) is ddp)
        return destroy(*a, **k)
    monkeypatch.setattr(dist, "destroy_process_group", destroy_and_look)
    _, distributed = train(tmp_path / "ddp", *flags)
    assert {"all_reduce", "all_gather", "all_gather_object"} <= set(calls) and not dist.is_initialized()
    assert not ddp_alive_at_teardown
    assert [r["loss"] for r in distributed] == pytest.approx([r["loss"] for r in plain], abs=1e-6)


def test_two_ranks_with_uneven_files_cross_epochs_without_a_hang_and_resume_exactly(tmp_path):
    # 3 files of 24, 12 and 6 rows: each epoch deals 2 files to one rank and 1 to the other, so the
    # ranks' epochs end at different steps; a rank that runs out starts its next epoch instead of waiting
    data = quirky_shards(tmp_path / "d", [24, 12, 6])
    flags = ["--data", data, "--batch", 2, "--eval_pairs", 0, "--save_every", 100, "--sample_steps", 0,
             "--shuffle_buffer", 8]
    full = run_script(tmp_path / "full", *flags, "--max_steps", 24, nproc=2)
    run_script(tmp_path / "cut", *flags, "--max_steps", 12, nproc=2)
    resumed = run_script(tmp_path / "cut", *flags, "--max_steps", 24, "--resume", nproc=2)
    assert [r["step"] for r in full] == list(range(1, 25)) and resumed == full
    states = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["data_states"]
    assert states[0]["epoch"] != states[1]["epoch"]  # at step 24 the ranks are in different epochs
    assert full[-1]["ties"] == sum(s["counts"]["ties"] for s in states)  # each rank counts its own rows


def test_under_torchrun_only_rank_0_writes_the_tensorboard_log(tmp_path):
    records = run_script(tmp_path, *DDP_FLAGS, "--batch", 2, nproc=2)
    assert len(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))) == 1
    scalars, _, _ = tensorboard_log(tmp_path)
    assert same_curves({k: v for k, v in scalars.items() if not k.startswith("end/")}, jsonl_scalars(records))


def test_replication_loop_reports_heldout_accuracy_and_rpo_with_one_pair_is_dpo(tmp_path):
    runs = {}
    # the README's loop: one rpo.py run per method, end-of-run JSON line read back
    for loss in ("dpo", "rpo"):
        out = tmp_path / loss
        summary, metrics = train(out, "--loss", loss, "--batch", 1, "--seed", 0, "--max_steps", 3,
                                 "--max_pairs", 32, "--save_every", 100000, "--sample_steps", 0)
        runs[loss] = summary, metrics
        assert summary["loss_type"] == loss and summary["batch"] == 1 and len(metrics) == 3
        assert metrics[-1]["heldout_accuracy"] == summary["heldout_accuracy"]  # evaluated at max_steps
    (dpo, dpo_metrics), (rpo_, rpo_metrics) = runs["dpo"], runs["rpo"]
    # one pair per micro-batch: the 1 x 1 softmax weight is exactly 1, so RPO is DPO step for step
    assert [r["loss"] for r in rpo_metrics] == [r["loss"] for r in dpo_metrics]
    assert [r["accuracy"] for r in rpo_metrics] == [r["accuracy"] for r in dpo_metrics]
    for key in ("heldout_accuracy", "heldout_margin", "loss"):
        assert rpo_[key] == dpo[key], key
    assert_heldout_is_the_saved_unets(dpo, tmp_path / "dpo", "--batch", 1)

# ---------------------------------------------------------------------------------------------- LoRA
LORA = ["--lora_rank", 4]


def test_with_lora_the_policy_equals_the_reference_before_the_first_step_so_the_first_loss_is_log_2(tmp_path):
    _, metrics = train(tmp_path, *LORA, "--max_steps", 3, "--max_pairs", 32, "--batch", 4, "--eval_pairs", 0,
                       "--sample_steps", 0, "--lr", 1e-3)
    first, last = metrics[0], metrics[-1]
    assert first["mse"] == first["ref_mse"] and first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert last["mse"] != last["ref_mse"]  # the adapters moved; the reference (adapters off) did not


def test_a_lora_step_trains_the_fp32_adapters_and_leaves_the_frozen_unet_in_the_compute_dtype():
    cfg = rpo.parse_config([*tiny("tiny-xl"), *map(str, LORA)])
    m = rpo.load_models(cfg, torch.device("cpu"), torch.bfloat16)
    before = {n: p.detach().clone() for n, p in m.unet.named_parameters()}
    trained = [p for p in m.unet.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained) and m.ref_unet is None
    assert all((p.dtype == torch.bfloat16) != p.requires_grad for p in m.unet.parameters())
    optimizer = rpo.make_optimizer(cfg, trained, rpo.learning_rate(cfg, 1), torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = rpo.preference_step(cfg, m, m.unet, toy_batch(cfg, m, n=4), 0)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in m.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed) and any(".lora_B." in n for n in changed)
    assert len(trained) == sum(".lora_" in n for n, _ in m.unet.named_parameters())


def test_lora_adapters_get_the_same_gradients_under_gradient_checkpointing():
    # the SDXL preset checkpoints; a checkpoint whose inputs need no gradient (a frozen UNet) could silently
    # drop the adapters' gradients
    grads = []
    for checkpointing in ("false", "true"):
        torch.manual_seed(0)
        cfg, m = tiny_models("tiny-xl", *map(str, LORA), "--grad_checkpointing", checkpointing)
        with torch.no_grad():
            for name, p in m.unet.named_parameters():
                if ".lora_B." in name:  # nonzero up-projections, so the down-projections get gradients too
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.01)
        rpo.preference_step(cfg, m, m.unet, toy_batch(cfg, m, n=4), 0)[0].backward()
        grads.append({n: p.grad for n, p in m.unet.named_parameters() if p.requires_grad})
    assert m.unet.is_gradient_checkpointing and grads[0].keys() == grads[1].keys()
    assert all(grads[1][n] is not None and grads[1][n].abs().sum() > 0 for n in grads[1])
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7) for n in grads[0])


@pytest.mark.parametrize("model", ["tiny", "tiny-xl", "tiny-sd3", "tiny-flux"])
def test_saved_lora_adapters_load_into_a_stock_diffusers_pipeline_in_one_line_and_draw_the_trained_samples(
        tmp_path, model):
    from diffusers import DiffusionPipeline
    out = tmp_path / "run"
    train(out, *tiny(model), *LORA, "--max_steps", 3, "--save_every", 3, "--batch", 4, "--max_pairs", 16,
          "--eval_pairs", 0, "--lr", 1e-2)
    cfg = rpo.parse_config(tiny(model))
    pipe = DiffusionPipeline.from_pretrained(cfg.pretrained)
    pipe.load_lora_weights(out / "lora")
    m = rpo.load_models(cfg, torch.device("cpu"), torch.float32)
    m.unet = getattr(pipe, "transformer", None) or pipe.unet
    rpo.save_samples(cfg, m, str(tmp_path / "loaded.png"), nullcontext())

    def pixels(path):
        return np.asarray(Image.open(path), dtype=np.int16)
    assert np.array_equal(pixels(tmp_path / "loaded.png"), pixels(out / "samples_3.png"))
    pipe.unload_lora_weights()  # the base draws other samples (the same bits, had the adapters done nothing)
    rpo.save_samples(cfg, m, str(tmp_path / "base.png"), nullcontext())
    assert np.abs(pixels(tmp_path / "base.png") - pixels(out / "samples_3.png")).max() > 0


def test_a_lora_run_resumed_from_its_checkpoint_logs_exactly_what_the_uninterrupted_run_logs(tmp_path):
    flags = [*LORA, "--batch", 4, "--max_pairs", 32, "--eval_pairs", 4, "--sample_steps", 0,
             "--save_every", 2, "--lr", 1e-3]
    _, full = train(tmp_path / "full", *flags, "--max_steps", 4)
    train(tmp_path / "cut", *flags, "--max_steps", 2)
    _, resumed = train(tmp_path / "cut", *flags, "--max_steps", 4, "--resume")
    assert resumed == full
    assert all(".lora_" in k and ".default." in k for k in final_unet(tmp_path / "cut"))  # adapters only
    with pytest.raises(SystemExit, match=r"other settings: --lora_rank 4 \(now 0\)"):
        train(tmp_path / "cut", *flags[2:], "--max_steps", 5, "--resume")  # the same run without LoRA
    ckpt = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)  # same settings, other weight names
    ckpt["unet"] = {k.replace(".default.", ".renamed."): v for k, v in ckpt["unet"].items()}
    ckpt["digest"] = rpo.content_digest(ckpt)
    torch.save(ckpt, tmp_path / "cut" / "ckpt-0000005.pt")
    with pytest.raises(SystemExit, match="holds other weights than this run trains, such as .*renamed"):
        train(tmp_path / "cut", *flags, "--max_steps", 6, "--resume")


def test_init_lora_starts_policy_and_reference_from_a_previous_runs_adapters(tmp_path):
    flags = ["--batch", 4, "--max_pairs", 16, "--eval_pairs", 0, "--sample_steps", 0, "--lr", 1e-2]
    train(tmp_path / "sft", *flags, *LORA, "--loss", "sft", "--max_steps", 3)
    _, fresh = train(tmp_path / "fresh", *flags, *LORA, "--max_steps", 1)
    _, tuned = train(tmp_path / "rpo", *flags, "--init_lora", tmp_path / "sft" / "lora", "--max_steps", 2)
    assert tuned[0]["mse"] == tuned[0]["ref_mse"] and tuned[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert tuned[0]["ref_mse"] != fresh[0]["ref_mse"]  # the reference is the SFT adapters, not the base UNet
    assert tuned[1]["mse"] != tuned[1]["ref_mse"]


def test_the_beta_sweep_scales_each_methods_first_gradient_by_beta_and_scores_on_the_validation_captions(
        tmp_path, subject_data):
    flags = ["--data", subject_data, "--eval_split", "validation", "--seed", 0, "--max_pairs", 32]
    for loss in ("dpo", "rpo"):
        runs = {}
        for beta in (5, 500):
            runs[beta] = train(tmp_path / f"{loss}{beta}", *flags, "--loss", loss, "--beta", beta,
                               "--max_steps", 2, "--save_every", 100000, "--sample_steps", 0)
        (low, low_metrics), (high, high_metrics) = runs[5], runs[500]
        # at step 1 the policy is the reference: the same pairs and noise, and a gradient beta times the same
        # vector (measured before clipping), so a sweep 100x apart is 100x apart in the first gradient (to the
        # rounding of policy against reference errors, which a beta of 50000 magnifies to 6e-4)
        assert high_metrics[0]["grad_norm"] == pytest.approx(100 * low_metrics[0]["grad_norm"], rel=2e-5)
        assert low_metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
        assert low["loss_type"] == high["loss_type"] == loss and low["loss"] != high["loss"]
        # the end-of-run held-out figures are the saved UNet's on the validation captions
        run = (tmp_path / f"{loss}500", *flags, "--loss", loss, "--beta", 500)
        assert_heldout_is_the_saved_unets(high, *run)
        on_test = heldout_of_saved_unet(*run, "--eval_split", "test")
        assert on_test["margin"] != high["heldout_margin"]  # other captions, other figures


# ------------------------------------------------------------------------------------------ on a GPU
# Skipped without CUDA, so always in CI. On a GPU machine the README's command (section Tests) runs just
# these: sd15 and sdxl shapes with random weights (toy.py's folders, built once under this session's RPO_HOME),
# every loss, bf16 and fp16, --cache, --compile, torchrun with one process (NCCL), SDXL at 1024 px with
# the default held-out set.
on_a_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# ------------------------------------------------------------------- long runs: faults, caused on purpose
# Each fault a shared cluster produces is caused here: a signal, kill -9 (inside a checkpoint write too), a
# second launch, a truncated file, a dead decoding worker, a full disk, a checkpoint changed on disk.

QUICK = ["--batch", 2, "--max_pairs", 32, "--sample_steps", 0, "--eval_pairs", 4, "--eval_draws", 1,
         "--save_every", 4, "--max_steps", 6]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The metrics of an uninterrupted in-process QUICK run."""
    return train(tmp_path_factory.mktemp("quick"), *QUICK)[1]


def wait_for_lines(path, n, proc, timeout=180):
    """Wait until the metrics file of a started run holds n lines; fail (killing its group) if it ends first
    or takes too long."""
    give_up = time.time() + timeout
    while not (os.path.exists(path) and len(open(path).read().splitlines()) >= n):
        if proc.poll() is not None or time.time() > give_up:
            _, stderr = kill_group(proc)
            pytest.fail(f"the run to interrupt wrote {n} lines neither in time nor before it ended: "
                        f"{stderr[-2000:]}")
        time.sleep(0.02)


def signal_in_step(monkeypatch, signum, step):
    """Sends this process `signum` inside optimizer step `step` (one micro-batch a step)."""
    real, calls = rpo.preference_step, []

    def step_and_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    monkeypatch.setattr(rpo, "preference_step", step_and_signal)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_stop_signal_ends_the_run_after_its_step_with_a_checkpoint_exit_status_75_and_the_command_to_go_on(
        tmp_path, monkeypatch, capsys, quick_run, signum):
    signal_in_step(monkeypatch, signum, 3)
    with pytest.raises(SystemExit) as stopped:
        train(tmp_path, *QUICK, "--resume", "false")
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("rpo.py: stopped")]
    assert stopped.value.code == rpo.PREEMPTED == 75 and len(lines) == 1
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"rpo.py: stopped by {name} at step 3 with a checkpoint in {tmp_path}; "
                               f"continue with: python rpo.py ")
    assert rpo.load_checkpoint(str(tmp_path))["step"] == 3 and len(logged(tmp_path)) == 3
    assert signal.getsignal(signum) is not None and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.undo()
    command = shlex.split(lines[0].split("continue with: ")[1])
    assert command[:2] == ["python", "rpo.py"] and command[-1] == "--resume" and "false" not in command
    with redirect_stdout(io.StringIO()):
        rpo.main(command[2:])  # the command it printed, as it is
    assert logged(tmp_path) == quick_run


def test_a_stop_signal_before_training_stops_at_once_with_the_same_exit_status(tmp_path, monkeypatch, capsys):
    real = rpo.load_models

    def load_and_be_signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(rpo, "load_models", load_and_be_signalled)
    with pytest.raises(SystemExit) as stopped:
        train(tmp_path, *QUICK)
    assert stopped.value.code == rpo.PREEMPTED and not (tmp_path / "metrics.jsonl").exists()
    err = capsys.readouterr().err
    assert "rpo.py: stopped by SIGTERM outside the training loop; nothing to checkpoint" in err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_run_of_non_finite_steps_that_a_checkpoint_cuts_in_two_still_stops_the_resumed_run(tmp_path,
                                                                                             monkeypatch):
    flags = ["--batch", 2, "--sample_steps", 0, "--eval_pairs", 0, "--save_every", 100, "--max_nonfinite", 3,
             "--save_every_minutes", 1e-6]  # a checkpoint after every step
    poison_gradients(monkeypatch, float("nan"), from_call=2)
    train(tmp_path, *flags, "--max_steps", 2)  # step 2 is the first of the run
    monkeypatch.undo()
    poison_gradients(monkeypatch, float("nan"), from_call=1)
    with pytest.raises(SystemExit, match="3 non-finite steps .loss or gradient. in a row at step 4"):
        train(tmp_path, *flags, "--max_steps", 10, "--resume")


def test_save_every_minutes_adds_checkpoints_between_save_points_and_changes_nothing_logged(tmp_path,
                                                                                            quick_run):
    _, timed = train(tmp_path, *QUICK, "--save_every_minutes", 1e-6, "--keep", 10)  # due after every step
    assert timed == quick_run
    assert [rpo.checkpoint_step(p) for p in rpo.checkpoints(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in timed if "heldout_accuracy" in r] == [4, 6]  # held-out at save points only


def test_a_checkpoint_counts_only_once_synced_its_file_before_the_rename_its_folder_entry_after(
        tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    train(tmp_path, "--max_steps", 2, "--save_every", 2, "--batch", 2, "--sample_steps", 0, "--eval_pairs", 0)
    out = os.path.realpath(tmp_path)
    # the log lines before the step are on disk before the checkpoint that is ahead of them
    assert events.index(("fsync", f"{out}/metrics.jsonl")) < events.index(
        ("rename", f"{out}/ckpt-0000002.pt.tmp", f"{out}/ckpt-0000002.pt"))
    for path in (f"{out}/ckpt-0000002.pt", f"{out}/unet", f"{out}/metrics.jsonl"):
        renamed = events.index(("rename", path + ".tmp", path))
        assert ("fsync", path + ".tmp") in events[:renamed] and ("fsync", out) in events[renamed + 1:]
    weights = f"{out}/unet.tmp/diffusion_pytorch_model.safetensors"
    assert events.index(("fsync", weights)) < events.index(("rename", f"{out}/unet.tmp", f"{out}/unet"))


def zero_largest_tensor(path):
    """Overwrite the bytes of a torch.save file's largest tensor with zeros, in place: same size, same zip."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        largest = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(largest.header_offset + 26)
        name_length, extra_length = np.frombuffer(fh.read(4), dtype="<u2")
        fh.seek(largest.header_offset + 30 + int(name_length) + int(extra_length))
        fh.write(bytes(largest.file_size))


def test_a_checkpoint_whose_content_changed_on_disk_is_passed_over_in_one_line_for_the_older_one(
        tmp_path, capsys):
    train(tmp_path, "--max_steps", 4, "--save_every", 2, "--batch", 2, "--sample_steps", 0, "--eval_pairs", 0)
    zero_largest_tensor(tmp_path / "ckpt-0000004.pt")
    assert torch.load(tmp_path / "ckpt-0000004.pt", weights_only=True)["step"] == 4  # it still loads
    capsys.readouterr()
    assert rpo.load_checkpoint(str(tmp_path))["step"] == 2
    assert capsys.readouterr().err == (f"rpo.py: checkpoint {tmp_path}/ckpt-0000004.pt fails its content "
                                       f"check (it changed after it was written); trying an older one\n")


def test_a_start_after_a_save_killed_mid_way_removes_its_leftovers_and_gives_the_weights_folder_back(
        tmp_path):
    flags = ["--max_steps", 2, "--save_every", 2, "--batch", 2, "--sample_steps", 0, "--eval_pairs", 0]
    train(tmp_path, *flags)
    whole, weights = sorted(os.listdir(tmp_path)), final_unet(tmp_path)
    (tmp_path / "ckpt-0000004.pt.tmp").write_bytes(b"half a checkpoint")
    os.symlink("ckpt-0000004.pt", tmp_path / "ckpt.pt.tmp")
    (tmp_path / "metrics.jsonl.tmp").write_text('{"step": 1')
    (tmp_path / "unet").rename(tmp_path / "unet.old")  # killed between the two renames of the swap
    (tmp_path / "unet.tmp").mkdir()
    (tmp_path / "unet.tmp" / "config.json").write_text("{")
    train(tmp_path, *flags, "--resume")  # at its last step already: a start, nothing more
    assert sorted(os.listdir(tmp_path)) == whole
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())


def test_a_last_metrics_line_cut_short_by_a_kill_is_dropped_and_logged_again_on_resume(tmp_path, quick_run):
    train(tmp_path, *QUICK, "--max_steps", 4)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lr": 2.5e-0')
    _, resumed = train(tmp_path, *QUICK, "--resume")
    assert resumed == quick_run


def test_a_save_points_checkpoint_comes_before_its_held_out_evaluation_so_a_failure_there_loses_nothing(
        tmp_path, monkeypatch, quick_run):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(rpo, "evaluate", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        train(tmp_path, *QUICK)
    assert rpo.load_checkpoint(str(tmp_path))["step"] == 4 and len(logged(tmp_path)) == 3
    monkeypatch.undo()
    _, resumed = train(tmp_path, *QUICK, "--resume")  # logs step 4 with its held-out metrics, then goes on
    assert resumed == quick_run


def test_a_second_launch_into_a_live_runs_folder_stops_naming_it_and_after_kill_9_a_resume_is_not_blocked(
        tmp_path):
    flags = [*tiny(), "--batch", 2, "--save_every", 3, "--eval_pairs", 0, "--sample_steps", 0]
    proc = run_script(tmp_path, *flags, "--max_steps", 10000, wait=False)
    wait_for_lines(tmp_path / "metrics.jsonl", 4, proc)
    holder = f"host {socket.gethostname()}, pid {proc.pid}"
    for again in ([], ["--resume"]):
        with pytest.raises(SystemExit, match=f"{tmp_path} belongs to a run that is still going "
                                             f"\\({holder}\\)"):
            train(tmp_path, *flags, *again)
    kill_group(proc)
    step = rpo.load_checkpoint(str(tmp_path))["step"]
    _, metrics = train(tmp_path, *flags, "--max_steps", step + 1, "--resume")
    assert [r["step"] for r in metrics] == list(range(1, step + 2))  # each step once


def truncate(path):
    """A download cut short: the first half of the file."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def test_a_truncated_parquet_file_is_reported_at_start_skipped_and_counted_and_resume_stays_exact(
        tmp_path, capsys):
    data = quirky_shards(tmp_path / "d", [16, 16, 8])
    broken = os.path.join(data, "part-1.parquet")
    truncate(broken)
    # one window a whole epoch: each epoch reads every file as it starts
    flags = ["--data", data, "--batch", 2, "--shuffle_buffer", 64, "--eval_pairs", 0, "--sample_steps", 0,
             "--save_every", 4, "--max_steps", 20]
    _, full = train(tmp_path / "full", *flags)
    err = capsys.readouterr().err
    warning = f"{broken} cannot be read (Parquet magic bytes not found"
    assert err.count(warning) == 1 and err.index(warning) < err.index("training tiny-drawn")  # at start, once
    train(tmp_path / "cut", *flags, "--max_steps", 5)
    _, resumed = train(tmp_path / "cut", *flags, "--resume")
    states = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["data_states"]
    epochs = [s["epoch"] for s in states]
    assert resumed == full and full[-1]["unreadable"] == epochs[0] + 1 == 3  # once in each epoch


def corrupt_row_group(path, g):
    """Overwrite the middle of row group g's first column chunk with garbage (a bad disk sector)."""
    meta = pq.ParquetFile(path).metadata.row_group(g).column(0)
    with open(path, "r+b") as fh:
        fh.seek(meta.data_page_offset + meta.total_compressed_size // 2)
        fh.write(b"\xff" * 16)


def forget_reads():
    """Empty rpo.py's caches of opened and parsed files: a file changed on disk is read anew."""
    for cached in (rpo.parquet, rpo.row_group, rpo.json_records, rpo.json_pairs, rpo.tar_stream):
        cached.cache_clear()


@pytest.mark.parametrize("fault", ["no footer", "a broken row group", "JSON that does not parse"])
def test_a_file_that_cannot_be_read_is_a_counted_skip_of_what_it_held_and_the_other_files_are_read_whole(
        tmp_path, fault):
    if fault == "JSON that does not parse":
        layout_fixture(tmp_path / "d", "hpdv3")
        clean, _ = one_epoch(rpo.parse_config(["--data", str(tmp_path / "d"), "--batch", "1"]))
        truncate(tmp_path / "d" / "train-1.json")
        lost, unreadable = [p for p in clean if int(p[0].split()[1]) >= 6], 1
    else:
        rows = pickapic_rows(36)
        for r in rows:
            r["label_0"] = 1.0
        os.makedirs(tmp_path / "d")
        for k in range(3):
            pq.write_table(pa.Table.from_pylist(rows[12 * k:12 * k + 12]), tmp_path / "d" / f"{k}.parquet",
                           row_group_size=4, compression="zstd")
        clean, _ = one_epoch(rpo.parse_config(["--data", str(tmp_path / "d"), "--batch", "1"]))
        if fault == "no footer":
            truncate(tmp_path / "d" / "1.parquet")
            lost, unreadable = [p for p in clean if 12 <= int(p[0].split()[1]) < 24], 1  # its rows unknown
        else:
            corrupt_row_group(tmp_path / "d" / "1.parquet", 1)
            lost, unreadable = [p for p in clean if 16 <= int(p[0].split()[1]) < 20], 4  # the group's rows
    forget_reads()
    pairs, counts = one_epoch(rpo.parse_config(["--data", str(tmp_path / "d"), "--batch", "1"]))
    assert counts["unreadable"] == unreadable and lost
    assert sorted(p[0] for p in pairs) == sorted(p[0] for p in clean if p not in lost)


def test_a_json_file_that_holds_no_list_is_skipped_among_others_and_alone_is_one_line_before_training(
        tmp_path, capsys):
    layout_fixture(tmp_path / "d", "hpdv3")
    json.dump({"not": "a list"}, open(tmp_path / "d" / "train-2.json", "w"))
    _, counts = one_epoch(rpo.parse_config(["--data", str(tmp_path / "d"), "--batch", "1"]))
    err = capsys.readouterr().err
    assert counts["unreadable"] == 1 and "train-2.json cannot be read (it holds no JSON list" in err
    alone = str(tmp_path / "d" / "train-2.json")
    with pytest.raises(SystemExit, match="cannot read .*train-2.json.*holds no JSON list of records"):
        rpo.main(["--data", alone, "--out", str(tmp_path / "o"), "--workers", "0"])


DOOMED = {}  # where the first decoding worker to take a pair claims its death


def decode_or_die(job):
    """prepare_pair, but the first worker to get here dies holding its pair, as under the OOM killer."""
    try:
        os.close(os.open(DOOMED["marker"], os.O_CREAT | os.O_EXCL))
        os.kill(os.getpid(), signal.SIGKILL)
    except FileExistsError:
        pass
    return PREPARE_PAIR(job)


PREPARE_PAIR = rpo.prepare_pair


def test_a_decoding_worker_that_dies_holding_a_pair_is_replaced_and_the_run_goes_on_unchanged(
        tmp_path, monkeypatch, capsys):
    data = quirky_shards(tmp_path / "d", [16, 16])
    flags = ["--data", data, "--batch", 2, "--max_steps", 3, "--eval_pairs", 0, "--sample_steps", 0]
    _, serial = train(tmp_path / "serial", *flags)
    monkeypatch.setitem(DOOMED, "marker", str(tmp_path / "died"))
    monkeypatch.setattr(rpo, "prepare_pair", decode_or_die)
    with deadline(120):  # before, the run waited for the dead worker's pair for ever
        _, parallel = train(tmp_path / "parallel", *flags, "--workers", 2)
    assert (tmp_path / "died").exists() and parallel == serial
    assert "a decoding worker died (out of memory?); 2 new workers decode its" in capsys.readouterr().err


def test_a_cache_built_before_another_source_file_arrived_is_the_built_for_other_settings_line(tmp_path):
    data = write_shards(tmp_path / "d", pickapic_rows(10), 2)
    flags = ["--data", data, "--batch", 2, "--max_steps", 1, "--eval_pairs", 0, "--sample_steps", 0,
             "--cache", tmp_path / "cache"]
    train(tmp_path / "a", *flags)
    write_shards(tmp_path / "more", pickapic_rows(4, seed=1), 1)
    shutil.copy(tmp_path / "more" / "part-0.parquet", tmp_path / "d" / "part-2.parquet")  # a download went on
    with pytest.raises(SystemExit, match="cache .* was built for other settings: files .*part-2.parquet.* "
                                         "use another --cache folder"):
        train(tmp_path / "b", *flags)


@pytest.mark.parametrize("flag, value, rule", [
    ("--keep", 0, ">= 1"), ("--save_every", 0, ">= 1"), ("--batch", 0, ">= 1"), ("--grad_accum", -1, ">= 1"),
    ("--max_steps", 0, ">= 1"), ("--beta", "nan", "> 0"), ("--tau", 0, "> 0"), ("--lr", 0, "> 0"),
    ("--drop_prompt", 1.5, "0 to 1"), ("--save_every_minutes", -5, ">= 0"), ("--eval_draws", 0, ">= 1"),
    ("--workers", -2, ">= 0"), ("--shuffle_buffer", 0, ">= 1"), ("--resolution", 36, "a multiple of 8"),
    ("--guidance", "nan", ">= 0")])
def test_a_numeric_flag_out_of_its_range_is_one_line_before_any_work(tmp_path, flag, value, rule):
    with pytest.raises(SystemExit, match=f"^rpo.py: {flag} must be {re.escape(rule)}"):
        rpo.main(["--out", str(tmp_path / "run"), flag, str(value)])
    assert not (tmp_path / "run").exists()


def test_an_sd3_resolution_must_fill_whole_2x2_latent_patches(tmp_path):
    with pytest.raises(SystemExit, match="^rpo.py: --resolution must be a multiple of 16 for --model tiny-sd3, got 40"):
        rpo.main(["--out", str(tmp_path / "run"), "--model", "tiny-sd3", "--pretrained", str(tmp_path / "m"),
                  "--resolution", "40"])
    assert not (tmp_path / "run").exists()


def test_the_checkpoint_keeps_the_precision_the_run_resolved_so_naming_it_on_resume_is_accepted(tmp_path):
    flags = ["--max_steps", 2, "--save_every", 2, "--batch", 2, "--sample_steps", 0, "--eval_pairs", 0]
    train(tmp_path, *flags)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]["precision"] == "fp32"
    _, metrics = train(tmp_path, *flags, "--max_steps", 3, "--precision", "fp32", "--resume")
    assert [r["step"] for r in metrics] == [1, 2, 3]


@pytest.mark.parametrize("writing", ["the checkpoint", "the weights folder"])
def test_a_save_that_finds_the_disk_full_stops_in_one_line_leaving_the_previous_checkpoint_whole(
        tmp_path, monkeypatch, writing):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    at = rpo.finish_save_point if writing == "the checkpoint" else rpo.save_weights
    calls = []

    def fill_the_disk(*args, **kwargs):  # after the first save point no file may grow past 1 MB
        if writing == "the weights folder" and calls:
            resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
        calls.append(1)
        result = at(*args, **kwargs)
        if writing == "the checkpoint":
            resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
        return result
    monkeypatch.setattr(rpo, at.__name__, fill_the_disk)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not the process
    try:
        with pytest.raises(SystemExit) as stopped:
            train(tmp_path, "--max_steps", 6, "--save_every", 2, "--batch", 2, "--sample_steps", 0,
                  "--eval_pairs", 0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    message, failed = str(stopped.value.code), "ckpt-0000004.pt" if writing == "the checkpoint" else "unet"
    assert message.startswith(f"rpo.py: cannot write {tmp_path}/{failed} (") and "\n" not in message
    assert f"Free space in {tmp_path} and start again" in message
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert rpo.load_checkpoint(str(tmp_path))["step"] == (2 if writing == "the checkpoint" else 4)
    from diffusers import UNet2DConditionModel
    UNet2DConditionModel.from_pretrained(tmp_path / "unet")  # step 2's, whole


def test_the_default_precision_is_bf16_only_on_a_gpu_that_computes_it_natively_and_the_start_up_line_says_so(
        monkeypatch):
    native = {"bf16": True}

    def is_bf16_supported(including_emulation=True):
        return native["bf16"] or including_emulation  # a V100 or T4 emulates it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert rpo.default_precision(cuda) == "bf16" and rpo.default_precision(cpu) == "fp32"
    native["bf16"] = False
    assert rpo.default_precision(cuda) == "fp16"
    cfg, m = tiny_models()
    run = rpo.Run(cuda, 0, 1, 0, False, "fp16", torch.float16, nullcontext(), None)
    trainer = rpo.make_trainer(cfg, m, dataclasses.replace(run, device=cpu))
    assert ", fp16 (this GPU has no native bf16), " in rpo.describe(cfg, m, run, trainer)


class OnDevice(torch.Tensor):
    """A CPU tensor that plays one on a GPU: .cpu() gives a plain copy of it, as from a GPU."""
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.cpu, torch.Tensor.to):
            return args[0].as_subclass(torch.Tensor).clone()
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_cache_file_is_built_with_at_most_one_micro_batch_of_encodings_on_the_device(monkeypatch):
    import weakref
    cfg, m = tiny_models("tiny", "--batch", "2")
    on_device, held, real = weakref.WeakSet(), [], rpo.encode_both_flips

    def encode_on_device(cfg, m, pairs):
        held.append(len(on_device))  # what earlier micro-batches still hold on the device
        encoded = {k: None if v is None else v.as_subclass(OnDevice) for k, v in real(cfg, m, pairs).items()}
        on_device.update(v for v in encoded.values() if v is not None)
        return encoded
    monkeypatch.setattr(rpo, "encode_both_flips", encode_on_device)
    cached = rpo.encode_file(cfg, m, rpo.source_files(cfg, cfg.data, "train", 8)[0], 0, None)
    assert held == [0, 0, 0, 0] and type(cached["latents"]) is torch.Tensor and len(cached["latents"]) == 8


def test_a_resume_on_another_number_of_ranks_says_how_to_go_on_from_the_runs_weights(tmp_path):
    flags = ["--max_steps", "2", "--save_every", "2", "--batch", "2", "--lr", "1e-5", "--sample_steps", "0",
             "--eval_pairs", "0"]
    train(tmp_path, *flags)
    cfg = rpo.parse_config(["--out", str(tmp_path), *flags, "--resume"])
    cpu = torch.device("cpu")
    m = rpo.load_models(cfg, cpu, torch.float32)
    run = rpo.Run(cpu, 0, 2, 0, False, "fp32", torch.float32, nullcontext(), None)  # rank 0 of 2
    with pytest.raises(SystemExit, match=f"trained on 1 rank.s., and its data order depends on that number: "
                                         f"resume it on 1, or start a new --out from its weights with "
                                         f"--init_unet {tmp_path}/unet"):
        rpo.resume(cfg, m, rpo.make_trainer(cfg, m, run), run)


GRADIENT_MEMORY = """
    import copy, json, os, torch, diffusers
    real_make, real_backward, marks = rpo.make_trainer, torch.Tensor.backward, {}

    def resident():  # bytes of this process in RAM; glibc returns each freed block (MALLOC_MMAP_THRESHOLD_)
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def wide_unets(cfg, base, device, dtype):  # the tiny UNet 8 times as wide: 64 M parameters
        config = dict(diffusers.UNet2DConditionModel.load_config(base, subfolder="unet"))
        config["block_out_channels"] = [256, 512]
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel.from_config(config).to(device).train()
        return unet, copy.deepcopy(unet).requires_grad_(False).eval()
    rpo.load_unets = wide_unets

    def make_trainer(cfg, m, run):
        marks.update(before=resident(), backwards=0, unet=m.unet,
                     params=sum(p.numel() * p.element_size() for p in m.unet.parameters()))
        return real_make(cfg, m, run)
    rpo.make_trainer = make_trainer

    def backward(self, *args, **kwargs):  # training's backwards: step 1's two micro-batches, then step 2's
        real_backward(self, *args, **kwargs)
        if "before" not in marks:
            return
        marks["backwards"] += 1
        if marks["backwards"] == 1:  # step 1's first micro-batch, under no_sync
            marks["after"] = resident()
        if marks["backwards"] == 3:  # step 2's first, under no_sync, after a zero_grad
            grads = [p.grad for p in marks.pop("unet").parameters() if p.grad is not None]
            marks.update(grads=len(grads), storages=len({g.untyped_storage().data_ptr() for g in grads}))
            path = os.path.join(os.environ["MEASURE_DIR"], f"rank-{os.environ['RANK']}.json")
            json.dump(marks, open(path, "w"))
            os._exit(0)  # both ranks: the measurement is all this run is for
    torch.Tensor.backward = backward
"""


def test_under_ddp_with_accumulation_gradients_live_in_the_buckets_so_two_ranks_hold_them_once(tmp_path):
    script = launcher(tmp_path, "measure.py", GRADIENT_MEMORY)
    env = dict(MEASURE_DIR=str(tmp_path), MALLOC_MMAP_THRESHOLD_="65536")
    command = rpo_command(tmp_path / "run", *tiny(), "--batch", 2, "--grad_accum", 2,
                          "--eval_pairs", 0, "--sample_steps", 0, "--max_pairs", 32, nproc=2, script=script)
    finish(start(command, env))
    for rank in (0, 1):
        marks = json.load(open(tmp_path / f"rank-{rank}.json"))
        growth = (marks["after"] - marks["before"]) / marks["params"]
        # DDP's buckets (1x the parameters) and the gradients as views of them; a copy of each would be 2x
        assert 0.8 < growth < 1.4, growth
        # and they stay views: a few buckets' storages, not one per gradient
        assert marks["grads"] > 100 and marks["storages"] <= 16, marks


# The chaos tests: kills at random moments, each followed by --resume, end exactly as the uninterrupted run.
SLOW_SAVES = """
    import io, time, torch
    real_save = torch.save

    def save_slowly(obj, f, *args, **kwargs):  # half the bytes, a pause, the rest: a kill can land inside
        if not hasattr(f, "write"):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[:len(data) // 2])
        f.flush()
        time.sleep(0.4)
        f.write(data[len(data) // 2:])
    torch.save = save_slowly
"""


def same_weights(out_a, out_b):
    """The final weights of two runs are equal, in the checkpoint and in DIR/unet."""
    from safetensors.torch import load_file
    a, b = final_unet(out_a), final_unet(out_b)
    unet_a, unet_b = (load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
                      for out in (out_a, out_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and all(
        torch.equal(unet_a[k], unet_b[k]) for k in unet_a)


def test_chaos_a_run_killed_with_sigkill_at_random_moments_and_resumed_each_time_ends_as_the_uninterrupted(
        tmp_path):
    # 3 files, 40 rows: 8 ties, a broken image and a broken caption leave 30 pairs, 15 steps an epoch
    data = quirky_shards(tmp_path / "d", [16, 16, 8])
    flags = ["--data", data, "--eval_data", data, "--eval_pairs", 4, "--eval_draws", 1, "--batch", 2,
             "--shuffle_buffer", 6, "--max_steps", 18, "--save_every", 3, "--keep", 2, "--sample_steps", 2,
             "--workers", 2, "--resume"]
    script = launcher(tmp_path, "slow_saves.py", SLOW_SAVES)
    full = run_script(tmp_path / "full", *flags, script=script)
    out, rng = tmp_path / "cut", random.Random(0)
    moments = ["at start", "after steps", "in a checkpoint write", "after steps", "in a checkpoint write"]
    for moment in moments:
        done = len(logged(out)) if (out / "metrics.jsonl").exists() else 0
        proc = run_script(out, *flags, wait=False, script=script)
        if moment == "at start":
            time.sleep(rng.uniform(0.2, 3.0))
        elif moment == "after steps":
            wait_for_lines(out / "metrics.jsonl", done + rng.randint(1, 3), proc)
            time.sleep(rng.uniform(0, 0.3))
        else:
            give_up = time.time() + 120
            while not [p for p in out.glob("ckpt-*.pt.tmp") if p.stat().st_size] and proc.poll() is None:
                assert time.time() < give_up, "no checkpoint write to interrupt"
                time.sleep(0.01)
        kill_group(proc)
        assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    resumed = run_script(out, *flags, script=script)
    assert resumed == full and same_weights(out, tmp_path / "full")
    assert full[-1]["ties"] >= 8 and full[-1]["bad_image"] >= 1 and full[-1]["bad_caption"] >= 1


# after the first call of rpo.FILL_AFTER (an environment variable) no file may grow past 1 MB: a full disk
DISK_FILLS = """
    import os, resource, signal
    real = getattr(rpo, os.environ["FILL_AFTER"])

    def and_then_the_disk_is_full(*args, **kwargs):
        result = real(*args, **kwargs)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return result
    setattr(rpo, real.__name__, and_then_the_disk_is_full)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not the process
"""
# a truncated data file among the shards; save points at steps 3, 6 and 8, the last two checkpoints kept
FAULT_FLAGS = ["--batch", 2, "--shuffle_buffer", 8, "--eval_pairs", 4, "--eval_draws", 1, "--max_steps", 8,
               "--save_every", 3, "--keep", 2, "--sample_steps", 0, "--report_to", "none", "--resume"]


@pytest.fixture(scope="module")
def fault_data_and_full_run(tmp_path_factory):
    """Shards with one file truncated, and the metrics of an uninterrupted FAULT_FLAGS run on them."""
    root = tmp_path_factory.mktemp("faults")
    data = quirky_shards(root / "d", [16, 16, 8])
    truncate(os.path.join(data, "part-2.parquet"))
    flags = ["--data", data, "--eval_data", data, *FAULT_FLAGS]
    return flags, root / "full", run_script(root / "full", *flags)


@pytest.mark.parametrize("fault", ["the disk fills in a checkpoint write",
                                   "the disk fills in a weights write", "the newest checkpoint is truncated"])
def test_a_real_run_stopped_by_a_full_disk_or_left_a_truncated_checkpoint_resumes_to_the_uninterrupted_result(
        tmp_path, fault_data_and_full_run, fault):
    flags, full_out, full = fault_data_and_full_run
    out = tmp_path / "cut"
    if fault == "the newest checkpoint is truncated":  # a copy or a write cut short: step 7's checkpoint
        run_script(out, *flags, "--max_steps", 7)
        truncate(out / "ckpt-0000007.pt")
    else:  # the disk fills after step 3's checkpoint (its weights then fail) or after its weights (step 6's
        # checkpoint then fails)
        after = "save_checkpoint" if "weights" in fault else "finish_save_point"
        script = launcher(tmp_path, "disk_fills.py", DISK_FILLS)
        returncode, _, stderr = ended(start(rpo_command(out, *flags, script=script),
                                            dict(FILL_AFTER=after)))
        failed = "unet" if "weights" in fault else "ckpt-0000006.pt"
        errors = [line for line in stderr.splitlines() if line.startswith("rpo.py: cannot write")]
        assert returncode == 1 and len(errors) == 1 and errors[0].startswith(f"rpo.py: cannot write {out}/"
                                                                             f"{failed} (")
        assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
        assert rpo.load_checkpoint(str(out))["step"] == 3
    resumed = run_script(out, *flags)
    assert resumed == full and same_weights(out, full_out)
    assert full[-1]["unreadable"] >= 1 and full[-1]["heldout_accuracy"] is not None


def two_ranks():
    """The tiny shape on two ranks; rank 0's clock asks for a checkpoint after every step, and both take it."""
    return [*tiny(), "--max_pairs", 64, "--batch", 2, "--max_steps", 16, "--save_every", 5, "--keep", 2,
            "--eval_pairs", 0, "--sample_steps", 0, "--beta", 100, "--save_every_minutes", 1e-6, "--resume"]


@pytest.fixture(scope="module")
def two_ranks_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    return out, run_script(out, *two_ranks(), nproc=2)


def test_chaos_sigterm_to_torchrun_stops_both_ranks_at_one_checkpointed_step_and_resume_ends_as_uninterrupted(
        tmp_path, two_ranks_run):
    proc = run_script(tmp_path, *two_ranks(), nproc=2, wait=False)
    wait_for_lines(tmp_path / "metrics.jsonl", 5, proc)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to its workers
    returncode, _, stderr = ended(proc)
    stopped = re.findall(r"rpo.py: stopped by SIGTERM at step (\d+) with a checkpoint in (\S+);", stderr)
    assert returncode != 0 and len(stopped) == 1 and stopped[0][1] == str(tmp_path)
    step = int(stopped[0][0])
    assert rpo.load_checkpoint(str(tmp_path))["step"] == step and len(logged(tmp_path)) == step < 16
    resumed = run_script(tmp_path, *two_ranks(), nproc=2)
    assert resumed == two_ranks_run[1] and same_weights(tmp_path, two_ranks_run[0])


ONE_RANK_SIGNALLED = SLOW_SAVES + """
    import atexit, os, signal, time
    if os.environ["RANK"] == "1":  # only rank 1 is asked to stop, inside step 3; its exit time is noted
        real_step, calls = rpo.preference_step, []

        def step_and_signal(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step(*args, **kwargs)
        rpo.preference_step = step_and_signal
        atexit.register(lambda: open(os.environ["EXIT_FILE"], "w").write(repr(time.time())))
"""


def test_a_signal_to_one_rank_stops_every_rank_at_that_step_and_none_leaves_before_its_checkpoint_is_on_disk(
        tmp_path):
    script = launcher(tmp_path, "one_rank.py", ONE_RANK_SIGNALLED)
    proc = run_script(tmp_path / "run", *two_ranks(), nproc=2, wait=False, script=script,
                      env=dict(EXIT_FILE=str(tmp_path / "rank-1-exit")))
    returncode, _, stderr = ended(proc)
    assert returncode != 0 and "stopped by a signal to another rank at step 3 with a checkpoint" in stderr
    assert rpo.load_checkpoint(str(tmp_path / "run"))["step"] == 3 and len(logged(tmp_path / "run")) == 3
    # torchrun ends the other workers 30 s after the first one exits: rank 0 must not be still writing then
    written = os.path.getmtime(tmp_path / "run" / "ckpt-0000003.pt")
    assert float((tmp_path / "rank-1-exit").read_text()) >= written


PID_FILES = """
    import os
    attempt, rank = os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["RANK"]
    open(os.path.join(os.environ["PID_DIR"], f"rank-{rank}-attempt-{attempt}"), "w").write(str(os.getpid()))
"""


def test_chaos_a_rank_killed_under_torchrun_max_restarts_comes_back_by_itself_and_ends_as_uninterrupted(
        tmp_path, two_ranks_run):
    script = launcher(tmp_path, "pid_files.py", PID_FILES)
    env = dict(PID_DIR=str(tmp_path), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # README: Long runs
    out = tmp_path / "run"
    proc = run_script(out, *two_ranks(), nproc=2, wait=False, script=script, env=env,
                      torchrun_options=["--max-restarts", "1"])
    wait_for_lines(out / "metrics.jsonl", 6, proc)
    os.kill(int((tmp_path / "rank-1-attempt-0").read_text()), signal.SIGKILL)
    stdout, stderr = finish(proc)
    assert (tmp_path / "rank-1-attempt-1").exists() and "resumed from step" in stderr
    assert logged(out) == two_ranks_run[1] and same_weights(out, two_ranks_run[0])


SDXL_PEAK_BOUND_MB = 40 * 1024  # an SDXL M = 4 step at 1024 px peaked at 31.2 GB on an H100 (commit 960c675)


def gpu_run(tmp_path, name, on_tiny=False, timeout=400):
    """One of GPU_RUNS in a child process, so that its GPU memory is freed when it ends; returns the end-of-run
    line, metrics.jsonl and stderr. The run's folder goes afterwards: sd15 and sdxl checkpoints are 10 to 20
    GB."""
    out = tmp_path / "out"
    try:
        stdout, stderr = finish(start(gpu_command(tmp_path, name, on_tiny)), timeout)
        summary = json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])
        metrics = logged(out)
        unet = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True, mmap=True)["unet"]
        assert all(torch.isfinite(v).all() for v in unet.values())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(summary))  # the figures, for the closing note (pytest -s shows them)
    return summary, metrics, stderr


def counts_pairs(accuracy, n):
    """An implicit accuracy over n held-out pairs is a count of them, ties counting half: k / 2n, 0 <= k <= 2n
    (NaN, a missing figure, or a share of another number of pairs fails)."""
    return accuracy is not None and float(2 * n * accuracy).is_integer() and 0 <= accuracy <= 1


# Each GPU test's run, in one place: its shape, its flags (<tmp>: the test's folder) and whether torchrun starts
# it. On a GPU it trains that shape with random weights from toy.py's folder (built once under this session's
# RPO_HOME, offline); on a CPU, test_each_gpu_run_trains_on_the_tiny_shape_of_its_kind_on_a_cpu runs the same
# command on the tiny shape of its kind at 32 px (for one step, but torchrun's and compile's rows), so that a
# renamed flag cannot break the GPU set unseen.
SD15 = ["--batch", 4, "--grad_accum", 1, "--max_steps", 3, "--max_pairs", 64, "--eval_pairs", 8,
        "--eval_draws", 2]
GPU_RUNS = {
    **{f"sd15 {loss} {precision}": ("sd15", [*SD15, "--loss", loss, "--precision", precision, "--sample_steps",
                                             2 if loss == "rpo" else 0], False)  # the sample grid, once
       for loss, precision in [("rpo", "bf16"), ("dpo", "fp16"), ("sft", "bf16")]},
    "sd15 torchrun": ("sd15", [*SD15, "--global_contrast", "--grad_accum", 2, "--max_steps", 2, "--cache",
                               "<tmp>/cache", "--sample_steps", 0], True),
    "tiny compile": ("tiny", ["--compile", "--max_steps", 5, "--batch", 4, "--eval_pairs", 4,
                              "--sample_steps", 0], False),
    "sdxl 1024": ("sdxl", ["--grad_accum", 1, "--max_steps", 2, "--max_pairs", 64, "--eval_pairs", 64,
                           "--eval_draws", 1, "--sample_steps", 0], False),
    "sdxl lora 64": ("sdxl", ["--lora_rank", 64, "--grad_accum", 1, "--max_steps", 3, "--max_pairs", 16,
                              "--eval_pairs", 4, "--eval_draws", 1, "--sample_steps", 0], False),
    # SD3.5 Medium's transformer and CLIPs, T5-XXL's width at 2 of its layers (toy.py's sd3 shape)
    **{f"sd3 {weights}": ("sd3", [*flags, "--grad_accum", 1, "--max_steps", 3, "--max_pairs", 16, "--eval_pairs", 4,
                                  "--eval_draws", 1, "--sample_steps", 0], False)
       for weights, flags in [("lora 64", ["--lora_rank", 64]), ("full", [])]},
    # FLUX.1-dev's widths at 2 + 4 of its 19 + 38 blocks (toy.py's flux shape), its preset: LoRA 64, M = 2
    "flux lora 64": ("flux", ["--grad_accum", 1, "--max_steps", 3, "--max_pairs", 16, "--eval_pairs", 4,
                              "--eval_draws", 1, "--sample_steps", 0], False),
}


def gpu_command(tmp_path, name, on_tiny=False):
    """The rpo.py command of a GPU run: on its shape's random folder, or on_tiny on the tiny one of its kind
    (SD1.5, SDXL, SD3 or FLUX.1) at 32 px, the rest as it is."""
    shape, flags, torchrun = GPU_RUNS[name]
    weights = dict(sd15="tiny", sdxl="tiny-xl", sd3="tiny-sd3", flux="tiny-flux")[rpo.FAMILY[shape]] if on_tiny \
        else shape
    cmd = rpo_command(tmp_path / "out", "--model", shape, "--pretrained", toy.model_folder(weights),
                      *(str(f).replace("<tmp>", str(tmp_path)) for f in flags),
                      *(["--resolution", 32] if on_tiny else []))
    if torchrun:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    return cmd


@pytest.mark.parametrize("name", list(GPU_RUNS))
def test_each_gpu_run_trains_on_the_tiny_shape_of_its_kind_on_a_cpu(tmp_path, name, monkeypatch):
    shape, flags, torchrun = GPU_RUNS[name]
    if torchrun:  # torchrun's own processes
        summary, metrics, _ = gpu_run(tmp_path, name, on_tiny=True)
    else:  # the same command line in this process, without a child's start-up, for one step
        if "--compile" in flags:  # dynamo's capture, with autograd: inductor's CPU code would take minutes to build
            monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
        _, _, _, out, *args = gpu_command(tmp_path, name, on_tiny=True)
        summary, metrics = train(out, *args, "--max_steps", 1)
    assert summary["steps"] == len(metrics) > 0 and summary["world"] == 1


@on_a_gpu
@pytest.mark.parametrize("loss, precision", [("rpo", "bf16"), ("dpo", "fp16"), ("sft", "bf16")])
def test_on_a_gpu_sd15_shapes_train_with_each_loss_and_precision(tmp_path, loss, precision):
    summary, metrics, _ = gpu_run(tmp_path, f"sd15 {loss} {precision}")
    assert summary["steps"] == 3 and summary["precision"] == precision and summary["mfu"] > 0
    assert counts_pairs(summary["heldout_accuracy"], 8) and len(metrics) == 3
    assert precision == "fp16" or all(math.isfinite(r["loss"]) for r in metrics)  # fp16 may skip an overflow


@on_a_gpu
def test_on_a_gpu_one_torchrun_process_runs_nccl_with_global_contrast_accumulation_and_a_cache(tmp_path):
    summary, metrics, stderr = gpu_run(tmp_path, "sd15 torchrun")
    assert "1 rank(s) (nccl)" in stderr and summary["world"] == 1 and summary["steps"] == 2
    assert all(math.isfinite(r["loss"]) and r["w_diag"] < 1 for r in metrics)


@on_a_gpu
def test_on_a_gpu_compile_trains_the_tiny_model(tmp_path):
    summary, metrics, _ = gpu_run(tmp_path, "tiny compile")
    assert summary["steps"] == 5 and all(math.isfinite(r["loss"]) for r in metrics)


@on_a_gpu
def test_on_a_gpu_sdxl_at_1024_px_trains_m4_and_evaluates_the_default_held_out_set_under_the_memory_bound(
        tmp_path):
    # the preset: 1024 px, M = 4, gradient checkpointing, Adafactor; 64 held-out pairs = 128 images at
    # 1024 px, encoded and evaluated one micro-batch at a time
    summary, metrics, _ = gpu_run(tmp_path, "sdxl 1024", timeout=560)
    assert summary["batch"] == 4 and summary["precision"] == "bf16"
    assert counts_pairs(summary["heldout_accuracy"], 64)  # the toy data's validation_unique holds 512
    assert summary["heldout_accuracy"] == metrics[-1]["heldout_accuracy"]
    assert summary["peak_mem_mb"] < SDXL_PEAK_BOUND_MB, summary["peak_mem_mb"]


@on_a_gpu
def test_on_a_gpu_sdxl_lora_rank_64_at_1024_px_trains_m4_within_a_24_gb_card(tmp_path):
    summary, metrics, _ = gpu_run(tmp_path, "sdxl lora 64", timeout=560)
    assert summary["batch"] == 4 and summary["precision"] == "bf16" and len(metrics) == 3
    assert summary["peak_mem_mb"] < 24 * 1024, summary["peak_mem_mb"]


@on_a_gpu
@pytest.mark.parametrize("weights", ["lora 64", "full"])
def test_on_a_gpu_sd35_medium_shapes_train_m4_at_1024_px_holding_at_least_the_estimated_weights(tmp_path, weights):
    # the expected peak: the estimate of the weights (rpo.py's line before loading) plus the activations, which
    # gradient checkpointing keeps to a few GB at M = 4; printed with the figures
    summary, metrics, _ = gpu_run(tmp_path, f"sd3 {weights}", timeout=560)
    cfg = rpo.parse_config(["--model", "sd3", "--pretrained", toy.model_folder("sd3"),
                            *(["--lora_rank", "64"] if weights == "lora 64" else [])])
    need = rpo.check_memory(cfg, summary["precision"], float("inf"), "")
    print(json.dumps(dict(weights=weights, estimate_mb=round(need / 2**20), peak_mb=summary["peak_mem_mb"])))
    assert summary["batch"] == 4 and summary["precision"] == "bf16" and len(metrics) == 3
    assert need <= summary["peak_mem_mb"] * 2**20


@on_a_gpu
def test_on_a_gpu_flux_dev_shapes_train_lora_64_m2_at_1024_px_holding_at_least_the_estimated_weights(tmp_path):
    # the expected peak: the estimate (4.2 GiB of weights at this depth; 35 GB for the whole FLUX.1-dev) plus
    # the activations of 4096 image and 512 text tokens a sample, which gradient checkpointing keeps to a few GB
    summary, metrics, _ = gpu_run(tmp_path, "flux lora 64", timeout=560)
    cfg = rpo.parse_config(["--model", "flux", "--pretrained", toy.model_folder("flux")])
    need = rpo.check_memory(cfg, summary["precision"], float("inf"), "")
    print(json.dumps(dict(weights="lora 64", estimate_mb=round(need / 2**20), peak_mb=summary["peak_mem_mb"])))
    assert summary["batch"] == 2 and summary["precision"] == "bf16" and len(metrics) == 3
    assert need <= summary["peak_mem_mb"] * 2**20


# ------------------------------------------------------------------- style alignment (eval_style.py)

def run_main(main, *argv):
    """An evaluation script's main in this process; returns its stdout."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        main([str(a) for a in argv])
    return buf.getvalue()


def run_style(*argv):  # eval_style.py
    return run_main(eval_style.main, *argv)


def run_prefer(*argv):  # eval_prefer.py
    return run_main(eval_prefer.main, *argv)


@pytest.fixture(scope="module")
def style_data(tmp_path_factory):
    """make-data on tiny: 12 toy captions edited by a random InstructPix2Pix, every 4th held out."""
    d = tmp_path_factory.mktemp("style")
    run_style("make-data", "--model", "tiny", "--n", 12, "--test_every", 4, "--steps", 2,
              "--out", d / "style.parquet")
    return d


@pytest.fixture(scope="module")
def trained(style_data):
    out = style_data / "out"
    with redirect_stdout(io.StringIO()):
        rpo.main([*tiny(), "--data", str(style_data / "style.parquet"), "--max_steps", "2",
                  "--batch", "4", "--workers", "0", "--eval_pairs", "0", "--out", str(out)])
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
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    var_a, var_b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    # same eigenbasis R: FD = |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2, whatever the rotation
    closed = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    for R in (np.eye(6), np.linalg.qr(rng.normal(size=(6, 6)))[0]):
        s_a, s_b = R @ np.diag(var_a) @ R.T, R @ np.diag(var_b) @ R.T
        assert eval_style.gaussian_frechet(mu_a, s_a, mu_b, s_b) == pytest.approx(closed, rel=1e-9)

    def samples(mu, var, n):
        return mu + np.sqrt(var) * rng.normal(size=(n, 6))
    fd = eval_style.frechet_distance(samples(mu_a, var_a, 200_000), samples(mu_b, var_b, 200_000))
    assert fd == pytest.approx(closed, rel=0.02)


def test_frechet_distance_is_exact_when_n_is_below_d():
    # with fewer images than features both covariances are singular; a shifted copy has the same covariance,
    # so FD is exactly the squared shift, and rotating both sets changes nothing
    rng = np.random.default_rng(3)
    rotation = np.linalg.qr(rng.normal(size=(64, 64)))[0]
    for n in (1, 2, 5, 30):
        x, shift = rng.normal(size=(n, 64)), rng.normal(0, 0.3, size=64)
        # (the square roots of the ~64 - n rounding-level eigenvalues leave about 1e-5 of the trace)
        assert eval_style.frechet_distance(x, x + shift) == pytest.approx(
            (shift ** 2).sum(), rel=1e-4, abs=1e-9)
        y = rng.normal(0.5, 2, size=(n, 64))
        assert eval_style.frechet_distance(x @ rotation, y @ rotation) == pytest.approx(
            eval_style.frechet_distance(x, y), rel=1e-4)


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
    metrics = logged(trained)
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert os.path.exists(trained / "unet" / "config.json")


def test_a_sheet_column_is_image_0_of_each_prompt_labelled_with_its_own_scores_in_the_scorers_order():
    images = [f"image {k}" for k in range(6)]  # 3 prompts x 2 images
    per_image = {"judge": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "clip": [10, 20, 30, 40, 50, 60]}
    first, labels = eval_prefer.sheet_column("rpo", images, per_image, 2, 2)
    assert first == ["image 0", "image 2"]
    assert labels == [["rpo", "judge 0.1", "clip 10"], ["rpo", "judge 0.3", "clip 30"]]
    assert eval_prefer.sheet_column("base", images, per_image, 2, 8)[0] == ["image 0", "image 2", "image 4"]


def assert_sheet_shows(sheet, columns):
    """The comparison sheet shows image k of column c (files), scaled to the sheet's cell width, whole in its
    column; the images of one prompt side by side in one row, the rows in prompt order, with text under each
    image (its label) and above each row (the caption)."""
    cell, line = eval_prefer.SHEET_CELL, eval_prefer.SHEET_LINE
    sheet = np.asarray(Image.open(sheet).convert("RGB")).astype(int)
    assert sheet.shape[1] == cell * len(columns)
    tops = []
    for c, files in enumerate(columns):
        tops.append([])
        for f in files:
            im = Image.open(f).convert("RGB")
            want = np.asarray(im.resize((cell, cell * im.height // im.width),
                                        Image.NEAREST if im.width < cell else Image.LANCZOS)).astype(int)
            block = sheet[:, c * cell:(c + 1) * cell]
            found = [y for y in range(len(block) - len(want) + 1)
                     if (block[y] == want[0]).all() and (block[y:y + len(want)] == want).all()]
            assert found, f"{f} is not in column {c} of the sheet"
            tops[-1].append(found[0])
    assert all(t == tops[0] for t in tops) and tops[0] == sorted(set(tops[0]))
    dark = sheet.sum(-1) < 200
    for top in tops[0]:
        assert dark[top - line:top].any()  # the caption
        for c in range(len(columns)):
            assert dark[top + cell:top + cell + line, c * cell:(c + 1) * cell].any()  # the model's name


def test_score_prints_a_table_and_json_for_base_and_tuned_models_and_draws_their_comparison_sheet(
        style_data, trained, tmp_path):
    out = run_style("score", "--model", "tiny", "--unet", trained / "unet",
                    "--prompts", style_data / "style_test.parquet", "--steps", 2,
                    "--save", style_data / "generated", "--out", tmp_path / "score.json")
    assert "FD (CLIP)" in out and "Gram" in out and "CLIP score" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert json.load(open(tmp_path / "score.json")) == result
    for name in ("base", "tuned"):
        r = result[name]
        assert r["images"] == 3 and r["clip_score"] == pytest.approx(np.mean(r["clip_scores"]))
        assert name in out and len(os.listdir(style_data / "generated" / name)) == 3
    assert result["base"]["fd"] != result["tuned"]["fd"]  # the tuned UNet draws otherwise
    assert result["reference"]["images"] == 3
    assert_sheet_shows(tmp_path / "score.png", [[style_data / "generated" / name / f"{k:05d}.png"
                                                  for k in range(3)] for name in ("base", "tuned")])


def test_scoring_the_reference_images_themselves_gives_zero_distances(style_data, tmp_path):
    for k, r in enumerate(pq.read_table(style_data / "style_test.parquet").to_pylist()):
        rpo.decode(r["jpg_0"]).save(tmp_path / f"{k}.png")
    out = run_style("score", "--model", "tiny", "--images", tmp_path,
                    "--ref", style_data / "style_test.parquet",
                    "--prompts", style_data / "style_test.parquet", "--out", tmp_path / "s.json")
    r = json.loads(out.strip().splitlines()[-1])[tmp_path.name]
    assert r["fd"] == pytest.approx(0, abs=1e-4) and r["gram"] == pytest.approx(0, abs=1e-6)


def test_make_data_with_an_unknown_style_or_one_file_for_both_splits_exits_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="eval_style.py: unknown style 'cubism'"):
        run_style("make-data", "--model", "tiny", "--style", "cubism", "--n", 4,
                  "--out", tmp_path / "s.parquet")
    with pytest.raises(SystemExit, match="^eval_style.py: --test_out .* is --out: the held-out pairs need a file "
                                         "of their own$"):
        run_style("make-data", "--model", "tiny", "--n", 4, "--out", tmp_path / "s.parquet",
                  "--test_out", tmp_path / "." / "s.parquet")


def test_missing_prompts_file_exits_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="eval_style.py: --prompts .* does not exist"):
        run_style("score", "--model", "tiny", "--prompts", tmp_path / "nope.parquet",
                  "--out", tmp_path / "s.json")


def test_image_folders_that_the_style_report_would_name_alike_exit_with_one_line(tmp_path):
    for folders in (["a/samples", "b/samples"], ["run/reference"]):
        with pytest.raises(SystemExit, match=r"^eval_style.py: --images .*: the report names each folder by its "
                                             r"last part, so these must differ .*$"):
            run_style("score", "--model", "tiny", "--images", *(tmp_path / f for f in folders))


# --------------------------------------------------------------------- preference evaluation: prefer

def test_each_preference_scorer_is_its_published_formula_on_fixed_features():
    image, text = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [-1.0, 0.0]])
    # cosines 24/25 and -1
    assert eval_prefer.hps(image, text).tolist() == pytest.approx([0.96, -1.0])
    assert eval_prefer.pickscore(image, text, math.log(100.0)).tolist() == pytest.approx([96.0, -100.0])
    assert eval_prefer.clip_scores(image, text).tolist() == pytest.approx([96.0, 0.0])
    # the aesthetic predictor: its five linear layers applied by hand to the normalised features
    g = torch.Generator().manual_seed(0)
    sizes = [(1024, 2), (128, 1024), (64, 128), (16, 64), (1, 16)]
    weights = [(torch.randn(o, i, generator=g) / i ** 0.5, torch.randn(o, generator=g)) for o, i in sizes]
    state = {f"layers.{k}.{name}": w for k, (W, b) in zip((0, 2, 4, 6, 7), weights)
             for name, w in (("weight", W), ("bias", b))}
    x = (image / image.norm(dim=-1, keepdim=True)).double()
    for W, b in weights:
        x = x @ W.double().T + b.double()
    assert eval_prefer.aesthetic(eval_prefer.aesthetic_mlp(state), image).tolist() == pytest.approx(
        x.squeeze(-1).tolist(), rel=1e-5)


def test_a_win_is_a_higher_score_on_the_same_prompt_and_a_tie_counts_half():
    assert eval_prefer.outcomes([1, 2, 3, 4], [0, 2, 5, 4]).tolist() == [1, 0.5, 0, 0.5]


def test_the_bootstrap_interval_of_a_share_is_the_binomial_one():
    # resampling 400 outcomes with 200 wins draws Binomial(400, 1/2) / 400 wins: its 2.5 % and 97.5 % points
    n = 400
    cdf = np.cumsum([math.comb(n, k) / 2 ** n for k in range(n + 1)])
    exact = [np.searchsorted(cdf, q) / n for q in (0.025, 0.975)]
    assert eval_prefer.bootstrap_ci([1] * 200 + [0] * 200, draws=20000) == pytest.approx(exact, abs=0.004)
    assert eval_prefer.bootstrap_ci([0.7] * 50) == pytest.approx([0.7, 0.7])


def test_the_sign_test_is_the_two_sided_binomial_tail_over_prompts_that_are_not_ties():
    # 9 wins and 1 loss of 10: 2 (C(10, 0) + C(10, 1)) / 2^10 = 22 / 1024; ties (1/2) count for neither side
    assert eval_prefer.sign_test([1] * 9 + [0] + [0.5] * 5) == 22 / 1024
    assert eval_prefer.sign_test([0] * 9 + [1]) == 22 / 1024
    assert eval_prefer.sign_test([1, 0] * 20) == 1.0 and eval_prefer.sign_test([0.5] * 7) == 1.0
    # outcomes pooled over seeds, as README's comparison of rpo and dpo pools them: above one half is a win
    assert eval_prefer.sign_test([2 / 3] * 6) == 2 / 64
    assert eval_prefer.sign_test([1] * 3000 + [0] * 2000) < 1e-40  # exact even where 2^n overflows a float


def test_hpsv2s_square_places_the_image_as_its_resize_max_size_does_at_any_aspect_ratio():
    # (width, height): content rows and columns inside the 224 px square, as HPSv2's ResizeMaxSize places
    # them (each side round(side x 224 / long side), pad // 2 before the content, the rest after)
    content = {(512, 768): ((0, 223), (37, 185)), (1024, 640): ((42, 181), (0, 223)),
               (832, 1216): ((0, 223), (35, 187)), (1216, 832): ((35, 187), (0, 223)),
               (224, 224): ((0, 223), (0, 223)), (40, 1000): ((0, 223), (107, 115))}
    black = torch.tensor([(0 - m) / s for m, s in zip(rpo.CLIP_MEAN, rpo.CLIP_STD)]).view(3, 1, 1)
    for (w, h), (rows, cols) in content.items():
        x = eval_prefer.clip_inputs([Image.new("RGB", (w, h), "white")], 224, "cpu", hpsv2=True)[0]
        inside = (x - black).abs().amax(0) > 0.1
        assert x.shape == (3, 224, 224)
        got_rows, got_cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
        assert (got_rows[0], got_rows[-1]) == rows and (got_cols[0], got_cols[-1]) == cols, (w, h)
        assert len(got_rows) == rows[1] - rows[0] + 1 and len(got_cols) == cols[1] - cols[0] + 1


def test_hpsv2s_captions_are_cleaned_as_openclip_cleans_them_before_tokenizing():
    assert eval_prefer.openclip_clean("Tom &amp; Jerry") == "tom & jerry"
    # unescaped twice after ftfy, which leaves entities alone in text with markup
    assert eval_prefer.openclip_clean("<i>fish &amp;amp; chips</i>") == "<i>fish & chips</i>"
    assert eval_prefer.openclip_clean("  a\tcat\n\non  a mat ") == "a cat on a mat"
    assert eval_prefer.openclip_clean("cafÃ© au lait") == "café au lait"  # ftfy undoes the mojibake
    assert eval_prefer.openclip_clean("&lt;b&gt;bold&lt;/b&gt;") == "<b>bold</b>"


def openclip_state(v_width=160, t_width=128, layers=2, patch=8, image=32, vocab=514, embed=32, seed=0):
    """A random CLIP laid out as OpenCLIP lays it out (ViT-H/14's layout at a tiny size: head widths 80 and
    64, as its towers have)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    def norm(name, w):  # a LayerNorm near the identity
        return {f"{name}.weight": 1 + rand(w), f"{name}.bias": rand(w)}

    def blocks(prefix, w):
        state = {}
        for n in range(layers):
            b = f"{prefix}resblocks.{n}."
            state.update(**norm(b + "ln_1", w), **norm(b + "ln_2", w))
            state.update({b + "attn.in_proj_weight": rand(3 * w, w), b + "attn.in_proj_bias": rand(3 * w),
                          b + "attn.out_proj.weight": rand(w, w), b + "attn.out_proj.bias": rand(w),
                          b + "mlp.c_fc.weight": rand(4 * w, w), b + "mlp.c_fc.bias": rand(4 * w),
                          b + "mlp.c_proj.weight": rand(w, 4 * w), b + "mlp.c_proj.bias": rand(w)})
        return state
    grid = image // patch
    return {"visual.class_embedding": rand(v_width), "visual.conv1.weight": rand(v_width, 3, patch, patch),
            "visual.positional_embedding": rand(grid * grid + 1, v_width), **norm("visual.ln_pre", v_width),
            **blocks("visual.transformer.", v_width), **norm("visual.ln_post", v_width),
            "visual.proj": rand(v_width, embed), "token_embedding.weight": rand(vocab, t_width),
            "positional_embedding": rand(77, t_width), **blocks("transformer.", t_width),
            **norm("ln_final", t_width), "text_projection": rand(t_width, embed),
            "logit_scale": torch.tensor(math.log(100.0))}


def openclip_forward(p, pixels, ids):
    """OpenCLIP's image and text features, written out from its model code: pre-norm residual blocks with
    nn.MultiheadAttention's fused projections, the class token (vision) and the EOT token (text) projected."""
    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"])

    def run(x, prefix, heads, mask=None):
        n = 0
        while f"{prefix}resblocks.{n}.ln_1.weight" in p:
            b = f"{prefix}resblocks.{n}."
            h = ln(x, b + "ln_1").transpose(0, 1)
            h = F.multi_head_attention_forward(
                h, h, h, x.shape[-1], heads, p[b + "attn.in_proj_weight"], p[b + "attn.in_proj_bias"],
                None, None, False, 0.0, p[b + "attn.out_proj.weight"], p[b + "attn.out_proj.bias"],
                need_weights=False, attn_mask=mask)[0]
            x = x + h.transpose(0, 1)
            h = F.gelu(F.linear(ln(x, b + "ln_2"), p[b + "mlp.c_fc.weight"], p[b + "mlp.c_fc.bias"]))
            x = x + F.linear(h, p[b + "mlp.c_proj.weight"], p[b + "mlp.c_proj.bias"])
            n += 1
        return x
    conv = p["visual.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([p["visual.class_embedding"].expand(len(x), 1, -1), x], 1)
    x = x + p["visual.positional_embedding"]
    x = run(ln(x, "visual.ln_pre"), "visual.transformer.", x.shape[-1] // 80)
    image = ln(x[:, 0], "visual.ln_post") @ p["visual.proj"]
    t = p["token_embedding.weight"][ids] + p["positional_embedding"][:ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    t = ln(run(t, "transformer.", t.shape[-1] // 64, causal), "ln_final")
    text = t[torch.arange(len(ids)), ids.argmax(-1)] @ p["text_projection"]
    return image, text


def test_hpsv2s_openclip_checkpoint_maps_into_clipmodel_with_the_features_openclip_computes():
    state = openclip_state()
    clip = eval_prefer.openclip_as_clip(state)
    heads = clip.config.vision_config.num_attention_heads, clip.config.text_config.num_attention_heads
    assert heads == (2, 2)  # widths 160 and 128 over head widths 80 and 64
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(2, 77, dtype=torch.long)  # open_clip's tokens: start, text, end (the highest id), zeros
    ids[0, :4], ids[1, :6] = torch.tensor([512, 40, 41, 513]), torch.tensor([512, 7, 8, 9, 10, 513])
    image, text = openclip_forward(state, pixels, ids)
    with torch.no_grad():
        assert torch.allclose(clip.get_image_features(pixel_values=pixels).pooler_output, image, atol=1e-4)
        assert torch.allclose(clip.get_text_features(input_ids=ids).pooler_output, text, atol=1e-4)
    assert clip.logit_scale.item() == pytest.approx(math.log(100.0))
    with pytest.raises(SystemExit, match="holds 'visual.attnpool.weight', which has no place in CLIPModel"):
        eval_prefer.openclip_as_clip(dict(state, **{"visual.attnpool.weight": torch.zeros(1)}))


def test_the_toy_judge_picks_the_winner_of_held_out_pairs_and_gives_noise_no_style():
    judge = toy.load_judge()
    for world in toy.WORLDS:
        assert toy.judge_accuracy(judge, world) >= 0.95
    rng, captions = random.Random(3), toy.captions_of("test")
    noise = [toy.coloured_noise(rng, 32) for _ in captions]
    assert toy.judge_scores(judge, noise, captions, "toy").max() < 0.1


class RecordingPipeline:
    """Stands in for a diffusers pipeline: records the initial latents it is given, draws blank images."""
    vae_scale_factor = 8

    def __init__(self):
        config = type("Config", (), {"in_channels": 4})
        self.unet = type("UNet", (), {"config": config, "dtype": torch.float32})
        self.latents = []

    def __call__(self, prompts, latents, **kwargs):
        self.latents.append(latents)
        return type("Output", (), {"images": [Image.new("RGB", (32, 32)) for _ in prompts]})


def test_every_model_draws_each_prompt_from_the_same_initial_noise(tmp_path):
    args = eval_prefer.parse_args(["--batch", "3", "--seed", "5"])
    args.resolution, args.steps = 32, 2
    base, tuned = RecordingPipeline(), RecordingPipeline()
    prompts = ["a", "b", "c", "d", "e"]
    eval_prefer.generate(base, prompts, args, torch.device("cpu"))
    eval_prefer.generate(tuned, prompts[:2] + ["other", "prompts", "here"], args, torch.device("cpu"))
    noise, again = torch.cat(base.latents), torch.cat(tuned.latents)
    assert noise.shape == (5, 4, 4, 4) and torch.equal(noise, again)  # image k: seed + k, whatever is drawn
    assert not torch.equal(noise[0], noise[1])


def test_prompt_sets_read_pick_a_pic_partiprompts_and_text_files_unique_and_in_order(tmp_path, monkeypatch):
    import datasets
    rows = [dict(caption=c) for c in ["a cat", "a dog", "a cat", None, "a fox"]]
    write_shards(tmp_path / "pickapic", rows, n_files=1)
    builder = type("Builder", (), {"config": type("Config", (), {
        "data_files": {"test_unique": [str(tmp_path / "pickapic" / "part-0.parquet")]}})})
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda data_id: builder)
    (tmp_path / "PartiPrompts.tsv").write_text("Prompt\tCategory\tChallenge\tNote\n"
                                               "a red cube\tArtifacts\tColors\t\nbread\tFood\tBasic\tshort\n")
    (tmp_path / "p.txt").write_text("one\n\ntwo\none\n")

    def prompts(*flags):
        return eval_prefer.prompt_set(eval_prefer.parse_args([*map(str, flags)]))
    assert prompts("--prompts", "pickapic", "--data_id", "someone/pickapic") == ["a cat", "a dog", "a fox"]
    assert prompts("--prompts", tmp_path / "PartiPrompts.tsv") == ["a red cube", "bread"]
    assert prompts("--prompts", tmp_path / "p.txt") == ["one", "two"]
    assert prompts("--prompts", "toy") == toy.captions_of("test")
    assert prompts("--prompts", "toy", "--split", "validation") == toy.captions_of("validation")
    with pytest.raises(SystemExit, match="^eval_prefer.py: --split 'tset': a toy world's prompts are one of test, "
                                         "validation, heldout, train$"):
        prompts("--prompts", "toy", "--split", "tset")


def a_run(folder, **settings):
    """A run's folder as rpo.py leaves it, as far as the evaluations read it before loading: its settings.json
    (rpo.py's defaults, but `settings`) and a unet/ with a config."""
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "settings.json").write_text(json.dumps(dict(dataclasses.asdict(rpo.Config()), **settings)))
    return str(folder)


def test_the_evaluations_draw_with_the_model_and_base_a_run_was_tuned_from_and_refuse_one_of_another_family(
        tmp_path, monkeypatch):
    sdxl = a_run(tmp_path / "sdxl", model="sdxl", pretrained="/bases/sdxl")
    other = a_run(tmp_path / "other", model="sdxl", pretrained="/bases/other-sdxl")
    untold = str(tmp_path / "untold")  # a run without settings.json: rpo.py's defaults for the tiny model
    a_run(tmp_path / "untold")
    os.remove(tmp_path / "untold" / "settings.json")

    def drawn_with(*argv):
        args = eval_prefer.parse_args([*map(str, argv)])
        eval_prefer.trained_as(args, eval_prefer.run_settings(args.runs))
        return args.model, args.base
    assert drawn_with("--runs", sdxl) == ("sdxl", "/bases/sdxl")
    assert drawn_with("--runs", sdxl, other, "--base", "/bases/mine") == ("sdxl", "/bases/mine")
    assert drawn_with("--runs", untold) == ("tiny-drawn", None)  # None: the preset's base
    monkeypatch.setattr(eval_prefer, "presets", lambda model: pytest.fail("work started"))
    for main, argv, message in [
        (eval_prefer.main, ["--runs", sdxl, "--model", "sd15"],
         "eval_prefer.py: a run was trained as --model sdxl, which --model sd15's pipeline cannot draw with: pass "
         "--model sdxl"),
        (eval_prefer.main, ["--runs", sdxl, other],
         "eval_prefer.py: the runs differ in their base (/bases/other-sdxl, /bases/sdxl); pass --base"),
        (eval_style.main, ["score", "--unet", sdxl, "--model", "tiny-sd3"],
         "eval_style.py: a run was trained as --model sdxl, which --model tiny-sd3's pipeline cannot draw with: "
         "pass --model sdxl")]:
        with pytest.raises(SystemExit, match=f"^{re.escape(message)}$"):
            main(argv)


@pytest.mark.parametrize("script, argv, message", [
    ("eval_prefer.py", ["--batch", 0], "--batch must be >= 1, got 0"),
    ("eval_prefer.py", ["--per_prompt", 0], "--per_prompt must be >= 1, got 0"),
    ("eval_prefer.py", ["--steps", 0], "--steps must be >= 1, got 0"),
    ("eval_prefer.py", ["--n", -3], "--n must be >= 0, got -3"),
    ("eval_prefer.py", ["--model", "tiny-sd3", "--resolution", 40],
     "--resolution must be a multiple of 16 for --model tiny-sd3, got 40"),
    ("eval_style.py", ["score", "--batch", 0], "--batch must be >= 1, got 0"),
    ("eval_style.py", ["make-data", "--resolution", 36], "--resolution must be a multiple of 8 for --model "
                                                         "tiny-drawn, got 36")])
def test_an_evaluations_count_or_size_out_of_range_is_one_line_before_any_work(script, argv, message, monkeypatch):
    monkeypatch.setattr(eval_prefer, "presets", lambda model: pytest.fail("work started"))
    main = dict(zip(("eval_prefer.py", "eval_style.py"), (eval_prefer.main, eval_style.main)))[script]
    with pytest.raises(SystemExit, match=f"^{re.escape(script)}: {re.escape(message)}$"):
        main([*map(str, argv)])


def test_the_toy_judge_scores_in_micro_batches_as_it_scores_in_one(monkeypatch):
    judge, seen = toy.judge_net().eval(), []
    real = toy.judge_scores
    monkeypatch.setattr(toy, "judge_scores", lambda j, images, *a: seen.append(len(images)) or real(j, images, *a))
    captions = toy.captions_of("test")[:5]
    images = [Image.fromarray(np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8))
              for k in range(5)]
    scores = eval_prefer.scored_by_judge(judge, "toy", images, captions, torch.device("cpu"), torch.float32, 2)
    assert seen == [2, 2, 1]
    assert scores == pytest.approx(real(judge, images, captions, "toy").numpy(), abs=1e-6)


def in_hub_cache(cache, repo_id, files, repo_type="model"):
    """Files laid out as huggingface_hub keeps a downloaded repository, where from_pretrained and
    hf_hub_download find them offline."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    for name, data in files.items():
        (root / "snapshots" / ("0" * 40) / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "snapshots" / ("0" * 40) / name).write_bytes(data)


def saved_files(save, folder):
    save(str(folder))
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def scorer_repos(tmp_path):
    """{repo id: {file name: bytes}}: tiny random PickScore, HPSv2.1, aesthetic predictor and CLIP ViT-L/14
    under their published ids and file layouts (the tokenizer: rpo's byte-level one)."""
    from transformers import CLIPConfig, CLIPModel
    tokenizer = saved_files(toy.byte_level_tokenizer().save_pretrained, tmp_path / "tokenizer")
    shape, repos = toy.SHAPES["tiny"], {}
    for k, repo_id in enumerate((eval_prefer.PICKSCORE, eval_prefer.CLIP_L14)):
        torch.manual_seed(k)
        clip = CLIPModel(CLIPConfig(text_config=shape["text"][0], vision_config=shape["clip_vision"],
                                    projection_dim=32))
        repos[repo_id] = {**saved_files(clip.save_pretrained, tmp_path / f"clip{k}"),
                          **(tokenizer if repo_id == eval_prefer.CLIP_L14 else {})}
    repos[eval_prefer.CLIP_H14] = tokenizer
    hps_repo, hps_file = eval_prefer.HPS
    repos[hps_repo] = {hps_file: torch_bytes(dict(state_dict=openclip_state()))}
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.Dropout(), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(), torch.nn.Linear(128, 64), torch.nn.Dropout(),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    state = {f"layers.{k}": v for k, v in mlp.state_dict().items()}
    repos[eval_prefer.AESTHETIC[0]] = {eval_prefer.AESTHETIC[1]: torch_bytes(state)}
    return repos


@pytest.fixture
def scorer_hub(tmp_path, monkeypatch):
    """An offline hub cache holding scorer_repos."""
    import huggingface_hub.constants
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for repo_id, files in scorer_repos(tmp_path).items():
        in_hub_cache(cache, repo_id, files)
    return cache


def test_prefer_loads_the_published_scorers_from_the_hub_and_a_run_equal_to_the_base_ties_everywhere(
        tmp_path, scorer_hub):
    from diffusers import UNet2DConditionModel
    base = toy.model_folder("tiny")
    UNet2DConditionModel.from_pretrained(base, subfolder="unet").save_pretrained(tmp_path / "same" / "unet")
    (tmp_path / "prompts.txt").write_text("a red circle on a blue background\na green square\na cat\n")
    scorers = ["pickscore", "hps", "aesthetic", "clip"]
    prompts = tmp_path / "prompts.txt"
    out = run_prefer("--model", "tiny", "--runs", tmp_path / "same", "--prompts", prompts,
                     "--scorers", *scorers, "--steps", 2, "--out", tmp_path / "r.json")
    report, same = json.load(open(tmp_path / "r.json")), "same"  # a run is named by its folder
    assert set(report["runs"]) == {"base", same} and "win rate against the base" in out
    for scorer in scorers:
        assert all(math.isfinite(v) for v in report["scores"]["base"][scorer])
        # the same weights from the same noise: the same images, so every prompt is a tie
        assert report["scores"][same][scorer] == report["scores"]["base"][scorer]
        assert report["win_rate_vs_base"][same][scorer] == dict(rate=0.5, ci=[0.5, 0.5], p=1.0)
    assert report["protocol"]["prompts"] == 3 and report["protocol"]["steps"] == 2


def test_prefer_downloads_scorers_and_prompts_through_the_hub_client_past_transient_faults_a_missing_one_is_one_line(
        hub, tmp_path):
    repos = scorer_repos(tmp_path)
    for repo_id, files in repos.items():
        hub.add(repo_id, files, kind="model")
    hub.add("someone/pickapic", pickapic_copy(tmp_path / "prompts", "data", splits=("test_unique",)))
    # faults on the 3rd and the 6th request
    hub.fault = flaky_downloads = lambda n, method, path: {3: "503", 6: "reset"}.get(n)
    report = tmp_path / "r.json"
    prefer = [sys.executable, os.path.join(HERE, "eval_prefer.py"), "--model", "tiny", "--prompts", "pickapic",
              "--data_id", "someone/pickapic", "--n", 2, "--steps", 1, "--sheet", 0, "--out", report]
    finish(start([*map(str, prefer), "--scorers", "pickscore", "hps", "aesthetic", "clip"],
                 hub.env(tmp_path / "hf_home")), timeout=300)
    scores = json.load(open(report))["scores"]["base"]
    assert {name: len(s) for name, s in scores.items()} == dict(pickscore=2, hps=2, aesthetic=2, clip=2)
    assert all(math.isfinite(v) for s in scores.values() for v in s)
    served = {path.split("/resolve/")[0] for _, path, _ in hub.requests if "/resolve/" in path}
    assert served >= {f"/{repo_id}" for repo_id in repos} | {"/datasets/someone/pickapic"}
    assert len(hub.requests) > 6
    # a file the hub does not have: one line naming it, and where a copy goes for offline use
    del hub.repos["model", eval_prefer.AESTHETIC[0]][1][eval_prefer.AESTHETIC[1]]
    hub.fault = None
    returncode, _, stderr = ended(start([*map(str, prefer), "--scorers", "aesthetic"],
                                        hub.env(tmp_path / "empty_home")), 300)
    assert returncode == 1 and stderr.strip().splitlines()[-1].startswith(
        f"eval_prefer.py: cannot fetch {eval_prefer.AESTHETIC[1]!r} from {eval_prefer.AESTHETIC[0]!r}: ")
    assert "HF_HUB_OFFLINE=1" in stderr.strip().splitlines()[-1]


def test_the_hps_scorer_reads_each_caption_as_openclip_cleans_it(scorer_hub):
    score = eval_prefer.load_scorers(["hps"], None, None)["hps"]
    image = Image.new("RGB", (48, 32), (200, 40, 90))
    captions = ["Tom &amp; Jerry", "tom & jerry", "tom  &amp;amp;  JERRY\n", "tom and jerry"]
    scores = score([image] * 4, captions, torch.device("cpu"), torch.float32, 3)
    assert scores[0] == scores[1] == scores[2] != scores[3]


def test_hpsv2s_benchmark_is_read_from_the_hub_by_style_and_reported_per_style_and_over_all_four(
        tmp_path, scorer_hub):
    styles = eval_prefer.HPSV2_STYLES
    published = {style: [f"{style} prompt {k}" for k in range(3)] + [f"{style} prompt 0"] for style in styles}
    in_hub_cache(scorer_hub, eval_prefer.HPSV2_BENCHMARK,
                 {f"benchmark/{style}.json": json.dumps(p).encode() for style, p in published.items()},
                 repo_type="dataset")

    def sets(*flags):
        return eval_prefer.prompt_sets(eval_prefer.parse_args(["--prompts", "hpsv2", *flags]))
    assert sets("--n", "2") == {style: p[:2] for style, p in published.items()}
    assert sets("--n", "0") == published  # as published: in order, duplicates kept
    out = run_prefer("--model", "tiny", "--prompts", "hpsv2", "--n", 2, "--scorers", "pickscore",
                     "--steps", 1, "--sheet", 0, "--out", tmp_path / "h.json")
    report = json.load(open(tmp_path / "h.json"))
    assert report["protocol"]["styles"] == dict.fromkeys(styles, 2) and report["protocol"]["prompts"] == 8
    scores = report["scores"]["base"]["pickscore"]
    assert list(report["styles"]) == list(styles)
    for k, style in enumerate(styles):
        assert report["styles"][style]["runs"]["base"]["pickscore"]["mean"] == pytest.approx(
            np.mean(scores[2 * k:2 * k + 2]))
    overall = report["runs"]["base"]["pickscore"]["mean"]
    assert overall == pytest.approx(np.mean([report["styles"][s]["runs"]["base"]["pickscore"]["mean"]
                                             for s in styles]))
    # HPSv2's table: each style's mean, then the mean of the four
    table = out[out.index("pickscore: mean by style"):].splitlines()
    assert table[0].split()[4:] == [*styles, "averaged"] and table[1].split()[0] == "base"
    style_means = [report["styles"][s]["runs"]["base"]["pickscore"]["mean"] for s in styles]
    assert table[1].split()[1:] == [f"{m:.4g}" for m in [*style_means, np.mean(style_means)]]
    assert not (tmp_path / "h.png").exists()  # --sheet 0
    # a benchmark file that is no list of prompts is one line
    dataset = f"datasets--{eval_prefer.HPSV2_BENCHMARK.replace('/', '--')}"
    snapshot = scorer_hub / dataset / "snapshots" / ("0" * 40)
    for bad in ("not json", "[]", '["a prompt", "  "]'):
        (snapshot / "benchmark" / "photo.json").write_text(bad)
        with pytest.raises(SystemExit, match="benchmark/photo.json is not a list of prompts"):
            sets("--n", "2")


def test_the_tiny_round_trip_trains_a_unet_and_lora_then_reports_means_and_win_rates_against_the_base(
        tmp_path):
    flags = ["--max_steps", 2, "--batch", 4, "--max_pairs", 16, "--eval_pairs", 0, "--sample_steps", 0,
             "--lr", 1e-3]
    train(tmp_path / "unet_run", *flags)
    train(tmp_path / "lora_run", *flags, *LORA)
    runs = ["unet_run", "lora_run"]
    out = run_prefer("--model", "tiny", "--runs", *(tmp_path / run for run in runs), "--n", 4,
                     "--per_prompt", 2, "--steps", 2, "--out", tmp_path / "prefer.json",
                     "--save", tmp_path / "images")
    report = json.load(open(tmp_path / "prefer.json"))
    for scorer in ("judge", "clip"):
        for name in ("base", *runs):
            mean, (lo, hi) = report["runs"][name][scorer]["mean"], report["runs"][name][scorer]["ci"]
            assert lo <= mean <= hi and name in out
        for name, other in [(run, "base") for run in runs] + [tuple(runs)]:
            won = (report["win_rate_vs_base"][name] if other == "base" else
                   report["win_rates"][f"{name} vs {other}"])[scorer]
            outcomes = eval_prefer.outcomes(report["scores"][name][scorer], report["scores"][other][scorer])
            assert won["ci"][0] <= won["rate"] <= won["ci"][1] and won["rate"] == np.mean(outcomes)
            assert won["p"] == eval_prefer.sign_test(outcomes)
    assert report["protocol"]["judge_accuracy"] >= 0.95
    assert sorted(os.listdir(tmp_path / "images")) == sorted(["base", *runs])
    # the sheet beside the report: image 0 of each prompt (of 2 each), base first
    assert_sheet_shows(tmp_path / "prefer.png", [[tmp_path / "images" / name / f"{2 * k:05d}.png"
                                                   for k in range(4)] for name in ("base", *runs)])
    # style alignment takes a LoRA run too
    (tmp_path / "prompts.txt").write_text("\n".join(toy.captions_of("test")[:3]))
    out = run_style("score", "--model", "tiny", "--unet", tmp_path / "lora_run", "--prompts",
                    tmp_path / "prompts.txt", "--ref", tmp_path / "images" / "base", "--steps", 2,
                    "--out", tmp_path / "score.json")
    assert json.loads(out.strip().splitlines()[-1])["tuned"]["images"] == 3


def test_for_tiny_runs_prefer_judges_the_toy_world_they_were_trained_in(tmp_path, subject_data):
    flags = ["--max_steps", 1, "--batch", 2, "--max_pairs", 16, "--eval_pairs", 0, "--sample_steps", 0]
    train(tmp_path / "subject", *flags, "--data", subject_data)
    run_prefer("--model", "tiny", "--runs", tmp_path / "subject", "--n", 2, "--steps", 1,
               "--scorers", "judge", "--out", tmp_path / "r.json")
    assert json.load(open(tmp_path / "r.json"))["protocol"]["prompt_set"] == "toy-subject"
    train(tmp_path / "plain", *flags)
    with pytest.raises(SystemExit, match="trained on different data .toy, toy-subject.; pass --prompts"):
        run_prefer("--model", "tiny", "--runs", tmp_path / "subject", tmp_path / "plain")


def test_a_negative_sheet_is_one_line_before_any_work():
    for run, command in ((run_prefer, []), (run_style, ["score"])):
        with pytest.raises(SystemExit, match="--sheet -1: the number of prompts in the sheet, 0 for none"):
            run(*command, "--model", "tiny", "--sheet", -1)


def test_a_folder_that_is_not_a_run_is_one_line_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="is not a run: it holds neither a diffusers UNet .unet/. or transformer "
                                         ".transformer/. nor LoRA"):
        run_prefer("--model", "tiny", "--runs", tmp_path)


def test_neither_evaluation_script_imports_toy_py_until_something_of_the_toy_world_is_asked_for():
    code, stdout, stderr = ended(start([sys.executable, "-c",
                                        "import sys, eval_prefer, eval_style; print('toy' in sys.modules)"]))
    assert code == 0 and stdout.strip() == "False", stderr[-3000:]


# ------------------------------------------------------------------------ files from others run no code

class OpensAMarker:
    """What a crafted pickle holds: unpickling it calls open(marker, "w"), so the marker's existence shows
    that a load ran the file's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted(path, marker, protocol=2):
    """A .pt file whose unpickling creates `marker`, shaped like a checkpoint."""
    torch.save(dict(step=1, config={}, rng=OpensAMarker(marker)), path, pickle_protocol=protocol)


def assert_one_line(stderr, *phrases):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and all(p in lines[0] for p in phrases), stderr[-3000:]


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_crafted_checkpoint_under_resume_runs_no_code_and_stops_in_one_line(tmp_path, protocol):
    out, marker = tmp_path / "run", tmp_path / "MARKER"
    out.mkdir()
    crafted(out / "ckpt-0000001.pt", marker, protocol)
    code, _, stderr = ended(start(rpo_command(out, *RUN, "--max_steps", 2, "--report_to", "none",
                                              "--resume")))
    assert not marker.exists() and code == 1
    assert_one_line(stderr, f"rpo.py: checkpoint {out}/ckpt-0000001.pt holds more than tensors and plain "
                            f"values, which a safe load refuses", "convert_checkpoint", "never for a file from")
    assert not (out / "metrics.jsonl").exists()  # refused before any step


def test_a_crafted_file_given_as_a_run_to_the_preference_evaluation_runs_no_code(tmp_path, subject_data):
    marker = tmp_path / "MARKER"
    (tmp_path / "lone").mkdir()
    crafted(tmp_path / "lone" / "ckpt.pt", marker)
    code, _, stderr = ended(start([sys.executable, "eval_prefer.py", "--model", "tiny", "--runs",
                                   str(tmp_path / "lone")]))
    assert not marker.exists() and code == 1
    assert_one_line(stderr, f"eval_prefer.py: {str(tmp_path / 'lone')!r} is not a run")
    # a real run whose checkpoint was swapped for the crafted file: its world comes from DIR/settings.json
    train(tmp_path / "run", *RUN, "--max_steps", 1, "--data", subject_data, "--max_pairs", 16)
    assert json.load(open(tmp_path / "run" / "settings.json"))["data"] == str(subject_data)
    (tmp_path / "run" / "ckpt.pt").unlink()
    crafted(tmp_path / "run" / "ckpt.pt", marker)
    run_prefer("--model", "tiny", "--runs", tmp_path / "run", "--n", 2, "--steps", 1, "--scorers",
               "judge", "--sheet", 0, "--out", tmp_path / "r.json")
    assert not marker.exists()
    assert json.load(open(tmp_path / "r.json"))["protocol"]["prompt_set"] == "toy-subject"
    # and one whose weights file is the crafted pickle: diffusers loads .bin weights safely too
    shutil.rmtree(tmp_path / "run" / "unet")
    (tmp_path / "run" / "unet").mkdir()
    shutil.copy(os.path.join(toy.model_folder("tiny"), "unet", "config.json"),
                tmp_path / "run" / "unet")
    crafted(tmp_path / "run" / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(SystemExit, match="cannot load UNet2DConditionModel from .*run/unet"):
        run_prefer("--model", "tiny", "--runs", tmp_path / "run", "--n", 2, "--steps", 1,
                   "--scorers", "judge", "--sheet", 0, "--out", tmp_path / "r.json")
    assert not marker.exists()


def test_a_crafted_file_in_a_cache_folder_runs_no_code_and_stops_in_one_line_before_training(tmp_path):
    marker, cache = tmp_path / "MARKER", tmp_path / "cache"
    flags = [*RUN, "--max_pairs", 8, "--max_steps", 1, "--report_to", "none", "--cache", cache]
    train(tmp_path / "a", *flags)
    crafted(cache / "file-000000.pt", marker)
    code, _, stderr = ended(start(rpo_command(tmp_path / "b", *flags)))
    assert not marker.exists() and code == 1
    assert_one_line(stderr, f"rpo.py: cache file {cache}/file-000000.pt cannot be read as rpo.py writes it",
                    "safe load refuses", "move the --cache folder away")
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == ""  # not one step trained


def test_a_checkpoint_of_an_earlier_rpo_is_refused_with_a_command_that_converts_it_and_then_resumes_exactly(
        tmp_path, quick_run):
    out = tmp_path / "run"
    train(out, *QUICK[:-1], 4)  # QUICK's run to its step-4 checkpoint
    path = out / "ckpt-0000004.pt"
    ckpt = torch.load(path, weights_only=True)
    n = ckpt["rng"]["numpy"]  # as an earlier rpo.py saved it: numpy's own state, an ndarray inside
    keys = n["keys"].numpy().astype(np.uint32)
    ckpt["rng"]["numpy"] = (n["name"], keys, n["pos"], n["has_gauss"], n["gauss"])
    ckpt["digest"] = rpo.content_digest(ckpt)
    torch.save(ckpt, path)
    with pytest.raises(SystemExit) as refused:
        train(out, *QUICK, "--resume")
    line = str(refused.value)
    assert "numpy" in line and "safe load refuses" in line and len(line.splitlines()) == 1
    command = re.search(r"(python -c \".*\") in rpo.py's folder", line).group(1)
    proc = start(shlex.split(command))
    stdout, _ = finish(proc)
    assert stdout.strip() == f"rpo.py: converted {path}; it now loads safely"
    assert train(out, *QUICK, "--resume")[1] == quick_run


def github_anchors(markdown):
    """The anchors GitHub gives a markdown file's headings: lowercase, punctuation dropped but for hyphens,
    underscores and spaces, spaces to hyphens; a repeated heading gets -1, -2, ..."""
    anchors, seen, fenced = set(), collections.Counter(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r" {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return anchors


def relative_links(markdown):
    """The targets of markdown links [text](target) and <img src="target"> outside code, that are relative."""
    prose = re.sub(r"(?ms)^\s*```.*?^\s*```", "", markdown)  # fenced code blocks
    prose = re.sub(r"`[^`\n]*`", "", prose)  # inline code
    targets = re.findall(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    targets += re.findall(r"<img\b[^>]*?\bsrc\s*=\s*[\"']([^\"']+)[\"']", prose)
    return [t for t in targets if not re.match(r"(?i)(https?:|mailto:|//)", t)]


def test_every_relative_link_in_readme_and_docs_resolves():
    pages = [os.path.join(HERE, "README.md")] + sorted(glob.glob(os.path.join(HERE, "docs", "*.md")))
    assert len(pages) > 1
    broken, checked = [], 0
    for page in pages:
        for target in relative_links(open(page, encoding="utf-8").read()):
            checked += 1
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            where = f"{os.path.relpath(page, HERE)}: {target}"
            if not os.path.exists(resolved):
                broken.append(f"{where} (no {os.path.relpath(resolved, HERE)})")
            elif anchor and resolved.endswith(".md"):
                if anchor not in github_anchors(open(resolved, encoding="utf-8").read()):
                    broken.append(f"{where} (no heading #{anchor})")
    assert checked > 0
    assert not broken, "broken links:\n" + "\n".join(broken)


# ------------------------------------------------------------------------ flow matching: Stable Diffusion 3
SD3 = ["--batch", 2, "--max_pairs", 16, "--eval_pairs", 4, "--eval_draws", 1, "--sample_steps", 0]


def one_flow_pair(model):
    """A tiny flow model whose policy differs from its reference, one toy pair (M = 1, beta 100), and the pair's
    eps and sigma as the step draws them."""
    cfg, m = tiny_models(model, "--batch", "1", "--drop_prompt", "0", "--beta", "100")
    with torch.no_grad():  # a policy that differs from its reference
        for p in m.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = toy_batch(cfg, m, n=1)
    key = f"noise-{cfg.seed}-0-{pairs.index[0]}"
    eps, sigma = rpo.pair_noise([random.Random(key).getrandbits(63)], pairs.latents_w.shape[1:], 1000, m.sigmas)
    assert 0 < sigma.item() < 1 and sigma.item() in m.sigmas.tolist()
    return cfg, m, pairs, eps, sigma


def written_flow_dpo(err, m, pairs):
    """Flow-DPO's loss at beta 100, written out from err(model, x0), a model's velocity error on x0."""
    s_w = err(m.unet, pairs.latents_w) - err(m.ref_unet, pairs.latents_w)
    s_l = err(m.unet, pairs.latents_l) - err(m.ref_unet, pairs.latents_l)
    return -F.logsigmoid(-(100 / 2) * (s_w - s_l)), s_w, s_l


def test_flow_rpo_with_one_pair_is_the_written_flow_dpo_formula_and_a_wrong_target_breaks_it(monkeypatch):
    # L = -log sigmoid(-(beta/2) [(|v_theta(x_t^w) - v^w|^2 - |v_ref(x_t^w) - v^w|^2)
    #                              - (|v_theta(x_t^l) - v^l|^2 - |v_ref(x_t^l) - v^l|^2)]),
    # x_t = (1 - sigma) x_0 + sigma eps, v = eps - x_0; the pair shares eps and sigma; err = mean over elements
    cfg, m, pairs, eps, sigma = one_flow_pair("tiny-sd3")

    def err(model, x0):
        x_t = (1 - sigma) * x0 + sigma * eps
        v = model(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=pairs.prompt,
                  pooled_projections=pairs.pooled).sample
        return ((v - (eps - x0)) ** 2).mean()
    with torch.no_grad():
        written, s_w, s_l = written_flow_dpo(err, m, pairs)
        loss = rpo.preference_step(cfg, m, m.unet, pairs, epoch=0)[0]
        # rel 1e-4: one batched call of winners and losers rounds apart from two calls, and beta/2 magnifies it
        assert loss.item() == pytest.approx(written.item(), rel=1e-4) and abs(s_w - s_l) > 1e-4
        right = rpo.velocity_target
        for wrong in (lambda x0, n, s: (right(x0, n, s)[0], x0 - n),  # the sign flipped
                      lambda x0, n, s: (right(x0, n, s)[0], n)):  # eps as the target
            monkeypatch.setattr(rpo, "velocity_target", wrong)
            assert rpo.preference_step(cfg, m, m.unet, pairs, epoch=0)[0].item() != pytest.approx(
                written.item(), rel=1e-3)


@pytest.mark.parametrize("t5", [True, False])
def test_rpo_py_calls_the_sd3_transformer_as_its_pipeline_does_at_every_denoising_step(t5):
    from diffusers import StableDiffusion3Pipeline
    cfg, m = tiny_models("tiny-sd3", *([] if t5 else ["--no_t5"]))
    folder = toy.model_folder("tiny-sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **({} if t5 else dict(text_encoder_3=None,
                                                                                   tokenizer_3=None)))
    calls = []
    pipe.transformer.register_forward_hook(lambda mod, args, kw, out: calls.append((kw, out[0])),
                                           with_kwargs=True)
    caption = "a red circle on a blue background"
    pipe(caption, num_inference_steps=3, guidance_scale=1.0, height=32, width=32, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    prompt, pooled = rpo.encode_prompts(m, [caption])
    assert len(calls) == 3
    for i, (kw, out) in enumerate(calls):
        sigma = pipe.scheduler.sigmas[i].reshape(1)  # the pipeline's own timestep is sigma x 1000
        with torch.no_grad():
            ours = rpo.predict(m, m.unet, kw["hidden_states"], sigma, prompt, pooled, None)
        assert torch.allclose(ours, out, atol=1e-5), i


@pytest.mark.parametrize("loss, weights", [("rpo", "full"), ("dpo", "full"), ("sft", "full"), ("dpo", "lora"),
                                            ("sft", "lora"), ("rpo", "lora --no_t5")])
def test_sd3_trains_with_each_loss_whole_or_with_lora_and_saves_what_diffusers_loads(tmp_path, loss, weights):
    from diffusers import SD3Transformer2DModel
    flags = [*tiny("tiny-sd3"), *SD3, "--loss", loss, "--max_steps", 2, "--save_every", 2, "--lr", 1e-3,
             *(weights.split()[1:]), *(LORA if weights.startswith("lora") else [])]
    summary, metrics = train(tmp_path, *flags)
    assert len(metrics) == 2 and all(math.isfinite(r["loss"]) for r in metrics)
    assert metrics[-1]["mse"] != (metrics[-1].get("ref_mse") if loss != "sft" else metrics[0]["mse"])
    saved = final_unet(tmp_path)
    if weights == "full":
        loaded = SD3Transformer2DModel.from_pretrained(tmp_path / "transformer").state_dict()
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    else:
        assert os.path.isfile(tmp_path / "lora" / rpo.LORA_FILE) and not os.path.exists(tmp_path / "transformer")


@pytest.mark.parametrize("model, weights", [("tiny-sd3", "full"), ("tiny-sd3", "lora"), ("tiny-flux", "lora")])
def test_a_flow_models_run_resumed_from_its_checkpoint_logs_and_saves_exactly_what_the_uninterrupted_run_does(
        tmp_path, model, weights):
    flags = [*tiny(model), *SD3, "--save_every", 2, "--lr", 1e-3, *(LORA if weights == "lora" else [])]
    _, full = train(tmp_path / "full", *flags, "--max_steps", 4)
    train(tmp_path / "cut", *flags, "--max_steps", 2)
    _, resumed = train(tmp_path / "cut", *flags, "--max_steps", 4, "--resume")
    assert resumed == full
    a, b = final_unet(tmp_path / "full"), final_unet(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a stop message's way out (--init_unet DIR/transformer, --init_lora DIR/lora) names the folder it saved
    cfg = rpo.parse_config(["--out", str(tmp_path / "full"), *TRAIN_DEFAULTS, *map(str, flags)])
    flag, folder = rpo.weights_flag(cfg).split()
    assert flag == ("--init_lora" if weights == "lora" else "--init_unet") and os.path.isdir(folder)


def sd35_large_configs(folder):
    """SD3.5 Large's configs alone (no weights): its transformer, 16-channel VAE, CLIP-L, CLIP-G and T5-XXL, and
    a CLIP ViT-L/14 for the pair weights."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig
    with torch.device("meta"):
        SD3Transformer2DModel(num_layers=38, attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                              caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                              qk_norm="rms_norm").save_config(folder / "transformer")
        AutoencoderKL(**dict(toy.vae_config([128, 256, 512, 512], 1.5305), latent_channels=16,
                             shift_factor=0.0609)).save_config(folder / "vae")
    CLIPTextConfig(**toy.clip_text_config(1280, 32, 20, 1280, act="gelu")).save_pretrained(folder / "text_encoder_2")
    return clip_l_t5_xxl_and_pair_clip_configs(folder, "text_encoder_3")


def clip_l_t5_xxl_and_pair_clip_configs(folder, t5):
    """The configs of CLIP-L's text encoder (text_encoder), T5-XXL's encoder (subfolder t5) and a CLIP ViT-L/14
    for the pair weights (clip), as SD3.5 and FLUX.1 publish them."""
    from transformers import CLIPConfig, CLIPTextConfig, T5Config
    CLIPTextConfig(**toy.clip_text_config(768, 12, 12, 768)).save_pretrained(folder / "text_encoder")
    T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
             feed_forward_proj="gated-gelu").save_pretrained(folder / t5)
    CLIPConfig(text_config=toy.clip_text_config(768, 12, 12, 768), vision_config=toy.VIT_L14,
               projection_dim=768).save_pretrained(folder / "clip")
    return str(folder)


def test_the_memory_estimate_counts_every_loaded_weight_and_refuses_before_loading_what_cannot_fit(tmp_path):
    # the estimate of a tiny run is the written rule applied to the weights load_models actually loads
    for flags in ([], ["--lora_rank", "4"], ["--optimizer", "adafactor", "--no_t5"]):
        cfg, m = tiny_models("tiny-sd3", *flags)
        lora, frozen = bool(cfg.lora_rank), [m.vae, m.clip, *m.text_encoders]
        trained = sum(p.numel() for n, p in m.unet.named_parameters() if "lora_" not in n)
        others = sum(x.numel() for model in frozen for x in [*model.parameters(), *model.buffers()])
        others += sum(b.numel() for b in m.unet.buffers())
        per_param = 4 if lora else 4 + 4 + (8 if cfg.optimizer == "adamw" else 0) + 4
        assert rpo.check_memory(cfg, "fp32", 1e12, "test") == trained * per_param + others * 4
    # SD3.5 Large, whole, with AdamW and a bf16 reference: on no single GPU; with Adafactor, an H200's 141 GB
    large = sd35_large_configs(tmp_path / "large")
    cfg = rpo.parse_config(["--model", "sd3", "--pretrained", large, "--clip", os.path.join(large, "clip")])
    # (8.06B trained x 18 bytes + 6.18B frozen x 2; LoRA: 8.06B x 2 + the same; Adafactor: 8.06B x 10 + the same)
    with pytest.raises(SystemExit, match=r"^rpo.py: sd3 .* full fine-tuning with adamw in bf16 needs about 157 GB "
                                         r"before activations \(8.06B trained-model and 6.18B frozen parameters\), "
                                         r"more than the 80 GB of an H100: LoRA \(--lora_rank 64\) needs about 28 GB$"):
        rpo.check_memory(cfg, "bf16", 80e9, "an H100")
    with pytest.raises(SystemExit, match=r"141 GB of an H200: LoRA .* 28 GB; --optimizer adafactor needs about 93 GB$"):
        rpo.check_memory(cfg, "bf16", 141e9, "an H200")
    cfg = rpo.parse_config(["--model", "sd3", "--pretrained", large, "--clip", os.path.join(large, "clip"),
                            "--lora_rank", "64"])
    assert rpo.check_memory(cfg, "bf16", 80e9, "an H100") < 30e9  # LoRA on the frozen 8B transformer fits


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_both_evaluations_draw_a_flow_runs_transformer_and_its_lora_with_its_own_pipeline(tmp_path, model):
    flags = [*tiny(model), "--max_steps", 2, "--batch", 4, "--max_pairs", 16, "--eval_pairs", 0,
             "--sample_steps", 0]
    train(tmp_path / "full", *flags, "--lr", 1e-1)  # large steps: each run draws visibly apart from the base
    train(tmp_path / "lora", *flags, *LORA, "--lr", 1e-1)
    assert eval_prefer.run_weights(str(tmp_path / "full")) == ("transformer", str(tmp_path / "full" / "transformer"))
    run_prefer("--model", model, "--runs", tmp_path / "full", tmp_path / "lora", "--n", 2, "--steps", 2,
               "--scorers", "judge", "--sheet", 0, "--out", tmp_path / "r.json", "--save", tmp_path / "images")
    report = json.load(open(tmp_path / "r.json"))
    assert sorted(report["runs"]) == ["base", "full", "lora"]

    def pixels(name):
        return [np.asarray(Image.open(p), dtype=np.int16) for p in sorted(glob.glob(str(tmp_path / "images" / name /
                                                                                       "*.png")))]
    base = pixels("base")
    for run in ("full", "lora"):  # each run's own weights draw, from the base's initial noise: not the base's
        assert len(pixels(run)) == len(base) == 2  # images (the base's again, bit for bit, had nothing loaded)
        assert max(np.abs(a - b).max() for a, b in zip(pixels(run), base)) > 0
    (tmp_path / "prompts.txt").write_text("\n".join(toy.captions_of("test")[:2]))
    out = run_style("score", "--model", model, "--unet", tmp_path / "full", "--prompts",
                    tmp_path / "prompts.txt", "--ref", tmp_path / "images" / "base", "--steps", 2,
                    "--out", tmp_path / "score.json")
    assert json.loads(out.strip().splitlines()[-1])["tuned"]["images"] == 2
    pipe = eval_prefer.load_pipeline(model, rpo.parse_config(tiny(model)).pretrained, "cpu", torch.float32)
    drawn = pipe.prepare_latents(1, eval_prefer.denoiser(pipe).config.in_channels // (4 if model == "tiny-flux" else 1),
                                 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(5))
    drawn = drawn[0] if model == "tiny-flux" else drawn  # Flux's: (packed latents, their ids)
    assert torch.equal(eval_prefer.initial_noise(pipe, [5], 32), drawn)  # image k's noise: the pipeline's by seed


# ------------------------------------------------------------------------------ flow matching: FLUX.1
@pytest.fixture(scope="module")
def schnell_shaped(tmp_path_factory):
    """tiny-flux's folder with a transformer that has no guidance embedding, as FLUX.1 [schnell]'s."""
    from diffusers import FluxTransformer2DModel
    folder = tmp_path_factory.mktemp("schnell") / "tiny-flux-schnell"
    shutil.copytree(toy.model_folder("tiny-flux"), folder)
    torch.manual_seed(0)
    FluxTransformer2DModel(**dict(toy.SHAPES["tiny-flux"]["transformer"], guidance_embeds=False)).save_pretrained(
        folder / "transformer")
    return str(folder)


def test_flux_rpo_with_one_pair_is_the_written_flow_dpo_formula_on_packed_latents():
    # the same formula as SD3's, on FLUX.1's packed 2 x 2 patch tokens, with the guidance embedding and the
    # position ids as FluxPipeline builds them, and the transformer given sigma itself
    from diffusers import FluxPipeline
    cfg, m, pairs, eps, sigma = one_flow_pair("tiny-flux")
    b, c, h, w = pairs.latents_w.shape
    pack = functools.partial(FluxPipeline._pack_latents, batch_size=b, num_channels_latents=c, height=h, width=w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)

    def err(model, x0):
        x0, noise = pack(x0), pack(eps)
        x_t = (1 - sigma) * x0 + sigma * noise
        v = model(hidden_states=x_t, timestep=sigma, guidance=torch.full((1,), 3.5), encoder_hidden_states=pairs.prompt,
                  pooled_projections=pairs.pooled, txt_ids=torch.zeros(pairs.prompt.shape[1], 3), img_ids=ids).sample
        return ((v - (noise - x0)) ** 2).mean()
    with torch.no_grad():
        written, s_w, s_l = written_flow_dpo(err, m, pairs)
        loss = rpo.preference_step(cfg, m, m.unet, pairs, epoch=0)[0]
        assert loss.item() == pytest.approx(written.item(), rel=1e-4) and abs(s_w - s_l) > 1e-4
        m.guidance = 1.0  # the guidance value reaches the transformer: another value, another loss
        assert rpo.preference_step(cfg, m, m.unet, pairs, epoch=0)[0].item() != pytest.approx(written.item(), rel=1e-3)


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_rpo_py_calls_the_flux_transformer_as_its_pipeline_does_at_every_denoising_step(kind, schnell_shaped):
    from diffusers import FluxPipeline
    folder = toy.model_folder("tiny-flux") if kind == "dev" else schnell_shaped
    cfg = rpo.parse_config(["--model", "tiny-flux", "--pretrained", folder])
    m = rpo.load_models(cfg, torch.device("cpu"), torch.float32)
    pipe = FluxPipeline.from_pretrained(folder)
    calls = []
    pipe.transformer.register_forward_hook(lambda mod, args, kw, out: calls.append((kw, out[0])),
                                           with_kwargs=True)
    caption = "a red circle on a blue background"
    pipe(caption, num_inference_steps=3, guidance_scale=cfg.guidance, height=32, width=32, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    prompt, pooled = rpo.encode_prompts(m, [caption])
    assert len(calls) == 3 and (calls[0][0]["guidance"] is None) == (kind == "schnell")
    for i, (kw, out) in enumerate(calls):
        packed = kw["hidden_states"]  # the pipeline's packed latents, as rpo.py holds them: [1, 4, 16, 16]
        latents = packed.view(1, 8, 8, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 4, 16, 16)
        assert torch.equal(FluxPipeline._pack_latents(latents, 1, 4, 16, 16), packed)
        with torch.no_grad():
            ours = rpo.predict(m, m.unet, latents, kw["timestep"], prompt, pooled, None)
        assert torch.allclose(FluxPipeline._pack_latents(ours, 1, 4, 16, 16), out, atol=1e-5), i


FLUX = [*SD3, *LORA, "--lr", 1e-3]


@pytest.mark.parametrize("loss, kind", [("rpo", "dev"), ("dpo", "dev"), ("sft", "dev"), ("rpo", "schnell")])
def test_flux_trains_with_each_loss_with_lora_and_the_guidance_free_schnell_shape_trains_too(
        tmp_path, loss, kind, schnell_shaped):
    pretrained = ["--pretrained", schnell_shaped] if kind == "schnell" else []
    summary, metrics = train(tmp_path, *tiny("tiny-flux"), *pretrained, *FLUX, "--loss", loss, "--max_steps", 2,
                             "--save_every", 2)
    assert len(metrics) == 2 and all(math.isfinite(r["loss"]) for r in metrics)
    assert metrics[-1]["mse"] != (metrics[-1].get("ref_mse") if loss != "sft" else metrics[0]["mse"])
    assert os.path.isfile(tmp_path / "lora" / rpo.LORA_FILE) and not os.path.exists(tmp_path / "transformer")


def flux_dev_configs(folder):
    """FLUX.1-dev's configs alone (no weights): its 12B transformer, 16-channel VAE, CLIP-L and T5-XXL, and a
    CLIP ViT-L/14 for the pair weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    with torch.device("meta"):
        FluxTransformer2DModel(guidance_embeds=True).save_config(folder / "transformer")  # diffusers' defaults: dev's
        AutoencoderKL(**dict(toy.vae_config([128, 256, 512, 512], 0.3611), latent_channels=16, shift_factor=0.1159,
                             use_quant_conv=False, use_post_quant_conv=False)).save_config(folder / "vae")
    return clip_l_t5_xxl_and_pair_clip_configs(folder, "text_encoder_2")


def test_flux_dev_whole_is_refused_in_one_line_before_loading_and_its_lora_preset_fits_one_gpu(tmp_path):
    dev = flux_dev_configs(tmp_path / "dev")
    cfg = rpo.parse_config(["--model", "flux", "--pretrained", dev, "--clip", os.path.join(dev, "clip"),
                            "--lora_rank", "0"])
    # 11.90B trained x 18 bytes (fp32 weight and gradient, AdamW's moments, a bf16 reference) + 5.40B frozen x 2
    with pytest.raises(SystemExit, match=r"^rpo.py: flux .* full fine-tuning with adamw in bf16 needs about 225 GB "
                                         r"before activations \(11.90B trained-model and 5.40B frozen parameters\), "
                                         r"more than the 80 GB of an H100: LoRA \(--lora_rank 64\) needs about 35 GB$"):
        rpo.check_memory(cfg, "bf16", 80e9, "an H100")
    # an H200 holds the weights whole with Adafactor (11.90B x 10 + the same), activations not counted
    with pytest.raises(SystemExit, match=r"141 GB of an H200: LoRA .* 35 GB; --optimizer adafactor needs about "
                                         r"130 GB$"):
        rpo.check_memory(cfg, "bf16", 141e9, "an H200")
    cfg = rpo.parse_config(["--model", "flux", "--pretrained", dev, "--clip", os.path.join(dev, "clip")])
    assert cfg.lora_rank == 64 and rpo.check_memory(cfg, "bf16", 80e9, "an H100") < 36e9  # the preset: LoRA


# 20 RPO steps on the toy pairs at the preset's lr 1e-4 and beta 100, then the judge on what the SD3 pipeline
# draws from the same noise with the base's transformer and with the tuned one, for the 49 held-out captions (one
# image each, 8 Euler steps: enough for the judge to see the style). The preset's rate moves the drawings in 20
# steps; a smaller one would need more steps than a test can afford
FLOW_TOY_RUN = ["--model", "tiny-sd3-drawn", "--max_steps", 20, "--save_every", 20, "--eval_pairs", 0,
                "--sample_steps", 0]
FLOW_TOY_DRAW = dict(num_inference_steps=8, guidance_scale=5.0, height=32, width=32)


@pytest.mark.parametrize("target", ["velocity", "flipped"])
def test_flow_rpo_on_the_toy_pairs_makes_the_sd3_pipeline_draw_what_the_judge_prefers_and_a_flipped_target_does_not(
        tmp_path, monkeypatch, target):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    if target == "flipped":  # the same x_t, the velocity's sign flipped: the sampler and the target disagree
        right = rpo.velocity_target
        monkeypatch.setattr(rpo, "velocity_target", lambda x0, n, s: (right(x0, n, s)[0], -right(x0, n, s)[1]))
    train(tmp_path, *FLOW_TOY_RUN)
    pipe = StableDiffusion3Pipeline.from_pretrained(toy.DRAWN_SD3)
    pipe.set_progress_bar_config(disable=True)
    captions, judge = toy.captions_of("heldout"), toy.load_judge()

    def judged():  # image k from the noise of seed k, whichever transformer draws
        latents = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(k))
                               for k in range(len(captions))])
        with torch.no_grad():
            images = pipe(captions, latents=latents, **FLOW_TOY_DRAW).images
        return toy.judge_scores(judge, images, captions, "toy").numpy()
    base = judged()
    pipe.transformer = SD3Transformer2DModel.from_pretrained(tmp_path / "transformer")
    won = eval_prefer.outcomes(judged(), base)
    # the evaluation's rule: the tuned model beats the base on more captions than not, sign test p < 0.01
    raised = won.mean() > 0.5 and eval_prefer.sign_test(won) < 0.01
    assert raised == (target == "velocity"), (won.mean(), eval_prefer.sign_test(won))
