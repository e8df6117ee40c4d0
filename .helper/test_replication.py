"""The README's "Replication at toy scale" loop, shrunk to two methods, one seed and three steps.

To merge into test_rpo.py: test_rpo.py already has the private_model_home fixture and `train`, so only
the test function below is needed there.
"""
import io
import json
import os
from contextlib import redirect_stdout

import pytest

import rpo


@pytest.fixture(autouse=True, scope="session")
def private_model_home(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("rpo_home"))
    rpo.RPO_HOME, os.environ["RPO_HOME"] = home, home
    yield


def test_replication_loop_reports_heldout_accuracy_and_rpo_with_one_pair_is_dpo(tmp_path):
    runs = {}
    for loss in ("dpo", "rpo"):  # the README's loop: one rpo.py run per method, end-of-run JSON line read back
        out = tmp_path / loss
        buf = io.StringIO()
        with redirect_stdout(buf):
            rpo.main(["--loss", loss, "--batch", "1", "--seed", "0", "--max_steps", "3", "--toy_pairs", "32",
                      "--eval_pairs", "8", "--eval_draws", "2", "--save_every", "100000", "--sample_steps", "0",
                      "--workers", "0", "--out", str(out)])
        summary = json.loads([l for l in buf.getvalue().splitlines() if l.startswith("{")][-1])
        metrics = [json.loads(l) for l in open(out / "metrics.jsonl")]
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
