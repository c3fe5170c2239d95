"""postprocessing/compare_runs.py and utils.compare: runs side by side, and the paired
difference of two runs in each direction with its bootstrap interval."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests.cli_helpers import error_line
from tests.test_postprocessing import RETRIEVAL, SCORES, make_run, run_script
from utils import compare
from utils.config import load_config, save_config
from utils.errors import UserError
from utils.evaluation import read_metrics_json

COMPARE = "postprocessing/compare_runs.py"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two evaluated runs (other initial weights, a config that differs in training.lr) on the
    same tiny data."""
    tmp = tmp_path_factory.mktemp("compare")
    conf, a = make_run(tmp, name="run-a", seed=0)
    _, b = make_run(tmp, name="run-b", seed=1, features=False, extra={"training": {"lr": 0.002}})
    with pytest.MonkeyPatch.context() as mp:
        for run in (a, b):
            for script in (SCORES, RETRIEVAL):
                assert run_script(script, "--conf", conf, "--run", run, monkeypatch=mp).returncode == 0
    return conf, a, b


@pytest.mark.parametrize("direction", ["t2a", "a2t"])
def test_per_query_values_average_to_the_metrics_json(two_runs, direction):
    _, a, _ = two_runs
    per = compare.read_per_query(a, "evaluation", direction)
    metrics = read_metrics_json(a)["evaluation"][direction]
    assert {m: pytest.approx(v.mean(), abs=1e-12) for m, v in per.values.items()} == \
        {m: metrics[m] for m in per.values}
    n = len(per.keys)
    assert n == (len(set(per.groups)) * 5 if direction == "t2a" else len(set(per.groups)))


def test_paired_difference_of_two_runs(two_runs, monkeypatch):
    conf, a, b = two_runs
    p = run_script(COMPARE, "--conf", conf, a, b.name, "--json", monkeypatch=monkeypatch)  # a path, a name
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    for d in ("t2a", "a2t"):
        ma, mb = (read_metrics_json(r)["evaluation"][d] for r in (a, b))
        for m, v in doc["difference"][d].items():
            assert v["difference"] == pytest.approx(mb[m] - ma[m], abs=1e-12)
            assert v["ci95"][0] <= v["difference"] <= v["ci95"][1]
    assert [(r["run"], r["direction"]) for r in doc["metrics"]] == \
        [("run-a", "t2a"), ("run-a", "a2t"), ("run-b", "t2a"), ("run-b", "a2t")]
    table = run_script(COMPARE, "--conf", conf, a, b, monkeypatch=monkeypatch).stdout
    assert "run-b - run-a, text -> audio, the same queries paired:" in table
    assert "run-b - run-a, audio -> text, the same queries paired:" in table
    # a run against itself: a zero difference with a zero-width interval
    same = compare.read_per_query(a, "evaluation", "t2a")
    assert all(v["difference"] == 0 and v["ci95"] == [0, 0]
               for v in compare.paired_difference(same, same).values())


def test_the_comparison_says_what_differs_between_the_runs(two_runs, monkeypatch):
    """Which checkpoint and epoch each number is of, the config keys that differ (training.lr),
    and a warning when the runs were scored on different data."""
    conf, a, b = two_runs
    doc = json.loads(run_script(COMPARE, "--conf", conf, a, b, "--json", monkeypatch=monkeypatch).stdout)
    assert doc["config_differences"] == {"training.lr": [0.001, 0.002]}
    assert [(c["run"], c["checkpoint"]) for c in doc["checkpoints"]] == [("run-a", "best"), ("run-b", "best")]
    assert all(isinstance(c["checkpoint_epoch"], int) for c in doc["checkpoints"])
    assert doc["warnings"] == []
    text = run_script(COMPARE, "--conf", conf, a, b, monkeypatch=monkeypatch).stdout
    assert "config differences: training.lr (0.001 | 0.002)" in text and "run-a: checkpoint best (epoch " in text

    metrics = read_metrics_json(b)
    saved = (b / "metrics.json").read_bytes()
    metrics["provenance"]["split_inputs"]["evaluation"]["logmels"] = "0" * 40
    (b / "metrics.json").write_text(json.dumps(metrics))
    try:
        warnings = compare.input_warnings([a, b], "evaluation")
    finally:
        (b / "metrics.json").write_bytes(saved)
    assert warnings == ["the runs were scored on different logmels files of split 'evaluation': "
                        "their differences are not the models' alone"]
    # trained by torchrun with 2 processes against 1 (provenance.json's world_size)
    saved = {run: (run / "provenance.json").read_bytes() if (run / "provenance.json").exists() else None
             for run in (a, b)}
    def trained(run, *worlds):
        entries = [{"action": "new" if i == 0 else "resume", "world_size": w} for i, w in enumerate(worlds)]
        (run / "provenance.json").write_text(json.dumps({"invocations": entries}))
    try:
        trained(a, 1)
        trained(b, 1, 1)  # resumed once, by as many processes: nothing to say
        assert compare.input_warnings([a, b], "evaluation") == []
        trained(b, 2)
        warnings = compare.input_warnings([a, b], "evaluation")
    finally:
        for run, data in saved.items():
            if data is None:
                (run / "provenance.json").unlink()
            else:
                (run / "provenance.json").write_bytes(data)
    assert warnings == ["the runs were trained with different numbers of processes (run-a: 1; run-b: 2): "
                        "BatchNorm normalised other shares of the batch, and the batches differ"]


def test_bad_comparisons_are_one_line(two_runs, monkeypatch, tmp_path):
    conf, a, b = two_runs

    def call(*args):
        return run_script(COMPARE, "--conf", conf, *args, monkeypatch=monkeypatch)
    assert "the same run is named twice" in error_line(call(a, a))
    assert "no split 'nope'" in error_line(call(a, b, "--split", "nope"))
    assert f"{tmp_path / 'x'}: not a run directory" in error_line(call(a, tmp_path / "x"))
    other = compare.read_per_query(a, "evaluation", "t2a")
    other.keys = other.keys[::-1]
    with pytest.raises(UserError, match="scored on different queries"):
        compare.paired_difference(other, compare.read_per_query(b, "evaluation", "t2a"), where="x")
    for name in ("evaluation.t2a_ranks.csv", "evaluation.a2t_per_clip.csv"):
        path = b / name
        saved = path.read_bytes()
        path.unlink()
        try:
            line = error_line(call(a, b))
            assert f"{path}: not found — run postprocessing/02_xmodal_retrieval.py" in line
        finally:
            path.write_bytes(saved)
    assert np.isfinite(compare.t2a_per_query(np.array([1, 11]))["mAP@10"]).all()


def test_default_split_is_the_runs_last_evaluated_one(two_runs, monkeypatch, tmp_path):
    """Runs that evaluate other splits than Clotho's: without --split, compare_runs looked for a
    split named evaluation."""
    conf, a, b = two_runs
    runs = []
    for run in (a, b):
        shutil.copytree(run, tmp_path / run.name)
        runs.append(tmp_path / run.name)
        save_config(load_config(runs[-1] / "config.yaml", ["eval.splits=[validation]"]), runs[-1])
    p = run_script(COMPARE, "--conf", conf, *runs, "--json", monkeypatch=monkeypatch)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["split"] == "validation"
    save_config(load_config(runs[1] / "config.yaml", ["eval.splits=[evaluation]"]), runs[1])
    line = error_line(run_script(COMPARE, "--conf", conf, *runs, monkeypatch=monkeypatch))
    assert ("the runs evaluate no split in common (eval.splits of run-a: validation; run-b: "
            "evaluation); name one with --split") in line


def test_a_run_whose_checkpoint_was_replaced_since_scoring_is_warned_of(two_runs, monkeypatch):
    """A resume after scoring replaces best.pt: metrics.json's numbers are the old checkpoint's
    while config.yaml already reads like the new run (the compare line mixes both)."""
    conf, a, b = two_runs
    best = b / "checkpoints" / "best.pt"
    saved = best.read_bytes()
    try:
        best.write_bytes(saved + b"\0")  # another file, as a resumed run's new best.pt
        doc = json.loads(run_script(COMPARE, "--conf", conf, a, b, "--json", monkeypatch=monkeypatch).stdout)
        best.unlink()
        gone = compare.input_warnings([a, b], "evaluation")
    finally:
        best.write_bytes(saved)
    [warning] = doc["warnings"]
    assert warning.startswith("run-b: metrics.json scored best.pt of epoch ") and "which has since been replaced" in warning
    assert warning.endswith(f"postprocessing/01_xmodal_scores.py --run {b} --overwrite, then "
                            f"postprocessing/02_xmodal_retrieval.py --run {b}")  # that run, not the newest
    assert gone and "which is gone" in gone[0]
    assert compare.input_warnings([a, b], "evaluation") == []
    # a checkpoint older than its scores is the one scored: not hashed (~1 GB) on every comparison
    scored_at = (b / "metrics.json").stat().st_mtime
    os.utime(best, (scored_at - 10, scored_at - 10))
    monkeypatch.setattr(compare, "checkpoint_key", lambda path: pytest.fail("hashed"))
    assert compare.input_warnings([a, b], "evaluation") == []
