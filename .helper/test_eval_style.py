"""eval_style.py's specification, as tests: CPU, offline, tiny random models, data the tests write."""
import io
import json
import math
import os
import sys
from contextlib import redirect_stdout

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, once merged: not needed
import eval_style  # noqa: E402
import rpo  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def private_model_home(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("rpo_home"))
    rpo.RPO_HOME, os.environ["RPO_HOME"] = home, home
    yield


def run(*argv):
    """eval_style.py's main in this process; returns its stdout."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        eval_style.main([str(a) for a in argv])
    return buf.getvalue()


@pytest.fixture(scope="module")
def style_data(tmp_path_factory):
    """make-data on tiny: 12 toy captions edited by a random InstructPix2Pix, every 4th held out."""
    d = tmp_path_factory.mktemp("style")
    run("make-data", "--model", "tiny", "--n", 12, "--test_every", 4, "--steps", 2, "--out", d / "style.parquet")
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
    out = run("score", "--model", "tiny", "--unet", trained / "unet", "--prompts", style_data / "style_test.parquet",
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
    out = run("score", "--model", "tiny", "--images", tmp_path, "--ref", style_data / "style_test.parquet",
              "--prompts", style_data / "style_test.parquet")
    r = json.loads(out.strip().splitlines()[-1])[tmp_path.name]
    assert r["fd"] == pytest.approx(0, abs=1e-4) and r["gram"] == pytest.approx(0, abs=1e-6)


def test_unknown_style_without_instruction_exits_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="eval_style.py: unknown style 'cubism'"):
        run("make-data", "--model", "tiny", "--style", "cubism", "--n", 4, "--out", tmp_path / "s.parquet")


def test_missing_prompts_file_exits_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="eval_style.py: --prompts .* does not exist"):
        run("score", "--model", "tiny", "--prompts", tmp_path / "nope.parquet")
