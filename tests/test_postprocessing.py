"""postprocessing/01 -> 02 on a tiny run: scores.db, metrics.json, CSVs, plots and bad inputs.

Helpers here (make_run, run_script, error_line) are also used by test_submission.py and
test_query.py.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from models.core import build_model
from tests.tiny_data import REPO, make_tiny_features, tiny_config
from utils import evaluation, scores_db
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import load_config, save_config
from utils.errors import UserError
from utils.provenance import read_provenance
from utils.data_utils import encode_split, relevance
from utils.metrics import retrieval_metrics
from utils.runs import checkpoint_path
from utils.train_utils import load_trained_model
from tests.cli_helpers import error_line, run_in_process
from tests.test_scores_db import damage_scores_table

SCORES = "postprocessing/01_xmodal_scores.py"
RETRIEVAL = "postprocessing/02_xmodal_retrieval.py"


# --------------------------------------------------------------------------- helpers

def make_run(tmp_path: Path, name: str = "tiny-run", embed_dim: int = 16, extra: dict | None = None,
             features: bool = True, seed: int = 0) -> tuple[Path, Path]:
    """Tiny features + a run directory with a config and a (randomly initialised) best checkpoint.
    Returns (config overlay path, run dir)."""
    if features:
        make_tiny_features(tmp_path / "data", embed_dim=embed_dim)
    conf = tiny_config(tmp_path, extra)
    cfg = load_config(conf)
    run = tmp_path / "outputs" / name
    run.mkdir(parents=True)
    save_config(cfg, run)
    torch.manual_seed(seed)
    model = build_model(cfg, text_in_dim=embed_dim)
    save_checkpoint(checkpoint_path(run, "best"), {"model": model.state_dict(), "epoch": 2,
                                                    "text_embed_dim": embed_dim})
    return conf, run


def script_env() -> dict:
    return dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_script(script: str, *args, subproc: bool = False, monkeypatch=None, capsys=None
               ) -> subprocess.CompletedProcess:
    """Run a numbered script: as a subprocess, or in-process (faster: no interpreter/torch start)."""
    if subproc:
        return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=script_env(),
                              capture_output=True, text=True, timeout=300)
    return run_in_process(monkeypatch, script, *args)


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    conf, run_dir = make_run(tmp_path)

    def call(script, *args, subproc=False):
        return run_script(script, "--conf", conf, *args, subproc=subproc, monkeypatch=monkeypatch,
                          capsys=capsys)
    return conf, run_dir, call


def direct_embeddings(run_dir: Path, split: str):
    model, cfg, tid2row = load_trained_model(run_dir, "best")
    return encode_split(model, cfg["paths"]["dataset_dir"], split, tid2row, 8, "cpu")


# --------------------------------------------------------------------------- end to end

def test_scores_then_retrieval_end_to_end(run):
    conf, run_dir, call = run
    records = [{"epoch": e, "train_loss": 3.0 - e, "val_loss": 3.1 - e, "val_t2a_mAP@10": 0.1 * e,
                "val_t2a_R@1": 0.05 * e, "val_t2a_R@5": 0.1 * e, "val_t2a_R@10": 0.2 * e,
                "lr": 1e-3, "seconds": 1.0} for e in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    p = call(SCORES, "--run", run_dir, subproc=True)
    assert p.returncode == 0, p.stderr
    assert "scores.db" in p.stdout
    p = call(RETRIEVAL, "--run", run_dir, subproc=True)
    assert p.returncode == 0, p.stderr

    metrics = evaluation.metrics_splits(evaluation.read_metrics_json(run_dir / "metrics.json"))
    assert set(metrics) == {"validation", "evaluation"}
    for split, entry in metrics.items():
        for d in ("t2a", "a2t"):
            vals = {m: entry[d][m] for m in ("mAP@10", "R@1", "R@5", "R@10")}  # the spec's four
            assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in vals.values())
            assert vals["R@1"] <= vals["R@5"] <= vals["R@10"]

    conn = sqlite3.connect(run_dir / "scores.db")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "splits", "clips", "captions", "scores", "t2a_ranks"} <= tables
    plan = " ".join(r[3] for r in conn.execute(
        "EXPLAIN QUERY PLAN SELECT caption, score FROM scores WHERE split_id = 1 AND clip = 2"))
    assert "USING INDEX scores_by_clip" in plan
    plan = " ".join(r[3] for r in conn.execute(
        "EXPLAIN QUERY PLAN SELECT clip, score FROM scores WHERE split_id = 1 AND caption = 2"))
    assert "USING PRIMARY KEY (split_id=? AND caption=?)" in plan

    for split in ("validation", "evaluation"):
        emb = direct_embeddings(run_dir, split)
        direct = emb.text @ emb.audio.T
        # the db holds exactly text . audio for every pair
        stored = scores_db.read_matrix(conn, split)
        np.testing.assert_allclose(stored, direct, rtol=0, atol=1e-6)
        n = conn.execute("SELECT count(*) FROM scores JOIN splits USING (split_id) WHERE split=?",
                         (split,)).fetchone()[0]
        assert n == direct.size == len(emb.fids) * len(emb.tids)
        # metrics from 02 equal utils.metrics on the matrix computed directly
        rel = relevance(emb)
        assert metrics[split]["t2a"] == pytest.approx(retrieval_metrics(direct, rel), abs=1e-9)
        a2t = {m: metrics[split]["a2t"][m] for m in ("mAP@10", "R@1", "R@5", "R@10")}
        assert a2t == pytest.approx(retrieval_metrics(direct.T, rel.T), abs=1e-9)

        with open(run_dir / f"{split}.t2a_retrieval.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        # top 10, but no column past the split's clips (6 here), which would be empty in every row
        assert rows[0] == ["caption"] + [f"file_name_{i}" for i in range(1, min(10, len(emb.fids)) + 1)]
        assert [r[0] for r in rows[1:]] == emb.captions
        top = np.argsort(-direct, axis=1, kind="stable")
        assert rows[1][1:1 + len(emb.fids)] == [emb.fnames[j] for j in top[0]]
        with open(run_dir / f"{split}.t2a_ranks.csv", newline="", encoding="utf-8") as f:
            ranks = list(csv.DictReader(f))
        assert [r["tid"] for r in ranks] == emb.tids
        db_ranks = [r[0] for r in conn.execute(
            "SELECT rank FROM t2a_ranks JOIN splits USING (split_id) WHERE split=? ORDER BY caption", (split,))]
        assert db_ranks == [int(r["rank"]) for r in ranks]
        r1 = np.mean([int(r["rank"]) == 1 for r in ranks])
        assert r1 == pytest.approx(metrics[split]["t2a"]["R@1"])
    assert (run_dir / "plots" / "recall_at_k.png").is_file()
    assert (run_dir / "plots" / "training_curves.png").is_file()
    conn.close()


@pytest.mark.parametrize("top_k, columns", [(1000, 6), (3, 3)])
def test_retrieval_csv_has_no_column_past_the_splits_clips(run, top_k, columns):
    """eval.top_k 1000 on a 6-clip split: 6 file-name columns, every cell filled (not 1000 with
    994 empty ones); a top_k below the split's size is kept as it is."""
    conf, run_dir, call = run
    assert call(SCORES, "--run", run_dir).returncode == 0
    p = call(RETRIEVAL, "--run", run_dir, "--set", f"eval.top_k={top_k}")
    assert p.returncode == 0, p.stderr
    with open(run_dir / "evaluation.t2a_retrieval.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["caption"] + [f"file_name_{i}" for i in range(1, columns + 1)]
    assert all(len(r) == columns + 1 and all(r) for r in rows[1:])


def test_rerun_replaces_splits_and_other_run_is_refused(run, tmp_path):
    conf, run_dir, call = run
    assert call(SCORES, "--run", run_dir).returncode == 0
    db = run_dir / "scores.db"
    conn = sqlite3.connect(db)
    counts = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("scores", "captions", "clips")]
    conn.close()
    assert call(SCORES, "--run", run_dir).returncode == 0  # same run: splits replaced
    conn = sqlite3.connect(db)
    assert [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("scores", "captions", "clips")] == counts
    conn.close()

    # a second run (other weights) with the first run's scores.db copied in
    _, other = make_run(tmp_path, name="other-run", features=False, seed=1)
    shutil.copy(db, other / "scores.db")
    line = error_line(call(SCORES, "--run", other))
    assert "scores.db" in line and "remove it or pass --overwrite" in line
    line = error_line(call(RETRIEVAL, "--run", other))
    assert "does not belong" in line
    assert call(SCORES, "--run", other, "--overwrite").returncode == 0
    assert call(RETRIEVAL, "--run", other).returncode == 0


def test_retrieval_without_scores_db(run):
    conf, run_dir, call = run
    line = error_line(call(RETRIEVAL, "--run", run_dir))
    assert "scores.db" in line and "01_xmodal_scores.py" in line


def test_split_missing_from_db(run):
    conf, run_dir, call = run
    assert call(SCORES, "--run", run_dir, "--set", "eval.splits=[validation]").returncode == 0
    line = error_line(call(RETRIEVAL, "--run", run_dir))
    assert "split 'evaluation' was not scored" in line


def test_a_misspelt_eval_split_is_named_before_anything_is_scored(run):
    conf, run_dir, call = run
    line = error_line(call(SCORES, "--run", run_dir, "--set", "eval.splits=[validation, evalution]"))
    assert "config key 'eval.splits': split 'evalution' is not one of data.splits" in line
    assert not (run_dir / "scores.db").exists()
    # step 02 names the typo too, rather than advise step 01 with it (which refuses it)
    assert call(SCORES, "--run", run_dir).returncode == 0
    line = error_line(call(RETRIEVAL, "--run", run_dir, "--set", "eval.splits=[validation, evalution]"))
    assert "config key 'eval.splits': split 'evalution' is not one of data.splits" in line


def test_no_checkpoint(run):
    conf, run_dir, call = run
    checkpoint_path(run_dir, "best").unlink()
    line = error_line(call(SCORES, "--run", run_dir, subproc=True))
    assert "checkpoint" in line and str(run_dir) in line
    assert "checkpoint" in error_line(call(RETRIEVAL, "--run", run_dir))


def test_not_a_run_directory(run, tmp_path):
    conf, run_dir, call = run
    line = error_line(call(SCORES, "--run", tmp_path / "nowhere"))
    assert "not a run directory" in line


def test_empty_split(run, tmp_path):
    conf, run_dir, call = run
    csv_path = tmp_path / "data" / "evaluation_text.csv"
    header = csv_path.read_text(encoding="utf-8").splitlines()[0]
    csv_path.write_text(header + "\n", encoding="utf-8")
    line = error_line(call(SCORES, "--run", run_dir))
    assert "evaluation" in line
    # the split before it was written completely; nothing of the empty one
    conn = sqlite3.connect(run_dir / "scores.db")
    assert [r[0] for r in conn.execute("SELECT split FROM splits")] == ["validation"]
    conn.close()


def test_library_metrics_match_direct_computation():
    rng = np.random.default_rng(1)
    s = scores_db.ScoredSplit("x", [f"f{i}" for i in range(7)], [f"{i}.wav" for i in range(7)],
                              [f"t{i}" for i in range(35)], [f"c{i}" for i in range(35)],
                              np.repeat(np.arange(7), 5), rng.standard_normal((35, 7)).astype(np.float32))
    m = evaluation.split_metrics(s)
    rel = s.relevance()
    assert m["t2a"] == retrieval_metrics(s.scores, rel)
    assert {k: m["a2t"][k] for k in ("mAP@10", "R@1", "R@5", "R@10")} == \
        retrieval_metrics(s.scores.T, rel.T)
    curves = evaluation.split_recall_curves(s, 10)
    assert curves["t2a"][0] == pytest.approx(m["t2a"]["R@1"])
    assert curves["a2t"][9] == pytest.approx(m["a2t"]["R@10"])


# --------------------------------------------------------------------------- damaged inputs

def damage_db(db: Path, how: str) -> None:
    if how == "foreign":
        db.write_text("not a database at all")
    elif how == "truncated":
        with open(db, "r+b") as f:
            f.truncate(db.stat().st_size // 3)
    else:
        damage_scores_table(db)


def run_files(run_dir: Path, but: str = "") -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("run.lock", but)}


@pytest.mark.parametrize("how", ["pages", "truncated", "foreign"])
def test_a_damaged_scores_db_is_one_line_and_overwrite_replaces_it(run, how):
    conf, run_dir, call = run
    assert call(SCORES, "--run", run_dir).returncode == 0
    db = run_dir / "scores.db"
    damage_db(db, how)
    before = run_files(run_dir)
    for script in (RETRIEVAL, SCORES):
        line = error_line(call(script, "--run", run_dir))
        # 02 has no --overwrite: the advice names the command that has
        assert str(db) in line and "postprocessing/01_xmodal_scores.py --overwrite" in line
        # nothing else touched (01 may have refreshed the provenance rows of the db's meta)
        assert run_files(run_dir, but="scores.db") == {k: v for k, v in before.items()
                                                       if k != "scores.db"}
        assert error_line(call(RETRIEVAL, "--run", run_dir)) == line  # still reported so
    assert call(SCORES, "--run", run_dir, "--overwrite").returncode == 0
    assert call(RETRIEVAL, "--run", run_dir).returncode == 0
    after = run_files(run_dir, but="scores.db")
    written = ("scores.db", "provenance.json")  # the failed calls added no provenance entry
    assert {k: after[k] for k in before if k not in written} == \
        {k: v for k, v in before.items() if k not in written}
    assert [e["action"] for e in read_provenance(run_dir)] == ["scores", "scores", "metrics"]


def test_log_mels_recomputed_with_other_settings_are_refused_and_the_advice_works(run, tmp_path):
    """Step 02 rerun with another hop after training: scoring (and query.py) would embed clips
    of other frames than the model learnt on, and than its own file log-mels: refused."""
    from models.retrieval import Retriever

    conf, run_dir, call = run
    h5_path = tmp_path / "data" / "evaluation_audio_logmels.hdf5"
    with h5py.File(h5_path, "a") as h5:
        h5.attrs.update({"window_s": 0.04, "hop_s": 0.01, "n_mels": 64})
    line = error_line(call(SCORES, "--run", run_dir))
    assert str(h5_path) in line and "computed with hop_s 0.01, but the run was trained on hop_s 0.02" in line
    assert f"preprocessing/02_audio_logmel.py --conf {run_dir / 'config.yaml'}" in line
    # a --set on the scoring step does not make the file the run's: a trained run's log-mels are fixed
    assert (f"--set features.hop_s: {run_dir} was trained on log-mels with 0.02; a trained run's features "
            "cannot change") in error_line(call(SCORES, "--run", run_dir, "--set", "features.hop_s=0.01"))
    with pytest.raises(UserError, match="hop_s 0.01"):
        Retriever.from_run(run_dir).search("rain", split="evaluation")
    with h5py.File(h5_path, "a") as h5:  # what following the advice leaves
        h5.attrs["hop_s"] = 0.02
    assert call(SCORES, "--run", run_dir).returncode == 0


def test_nan_log_mels_blame_the_hdf5_not_the_checkpoint(run, tmp_path):
    conf, run_dir, call = run
    h5_path = tmp_path / "data" / "evaluation_audio_logmels.hdf5"
    with h5py.File(h5_path, "r+") as h5:
        fid = sorted(h5)[2]
        h5[fid][5, 7] = np.nan  # a damaged file: step 02 never writes NaN
    line = error_line(call(SCORES, "--run", run_dir))
    assert str(h5_path) in line and fid in line and "NaN" in line
    assert "checkpoint" not in line


def test_nan_weights_blame_the_checkpoint(run):
    conf, run_dir, call = run
    ckpt = checkpoint_path(run_dir, "best")
    state = load_checkpoint(ckpt)
    state["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    save_checkpoint(ckpt, state)
    line = error_line(call(SCORES, "--run", run_dir))
    assert "the checkpoint is unusable" in line
