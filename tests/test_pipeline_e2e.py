"""The whole chain through the real scripts, as `make demo` runs it, on a tiny generated dataset.

00_make_demo_dataset -> run.sh stages 1..7 (01 captions, 02 log-mels, 03 sentence embeddings,
04 transfer (nothing to do: init random), main.py, postprocessing 01 scores, 02 metrics).
"""
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml

from utils.io_utils import load_pickle
from utils.provenance import read_provenance

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("development", "validation", "evaluation")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    conf = tmp / "tiny_demo.yaml"
    conf.write_text(yaml.safe_dump({
        "base": str(REPO / "conf_demo.yaml"),
        "paths": {"dataset_dir": str(tmp / "data"), "output_dir": str(tmp / "outputs"),
                  "pretrained_dir": str(tmp / "pretrained")},
        "demo": {"sizes": {"development": 8, "validation": 4, "evaluation": 4},
                 "min_seconds": 1.5, "max_seconds": 2.0, "workers": 1},
        "features": {"workers": 1},
        "audio_encoder": {"channels": [4, 8, 8, 16, 16, 16]},
        "training": {"epochs": 1, "batch_size": 8, "num_workers": 0},
        "wandb": {"mode": "disabled"},
    }))
    env = {**os.environ, "PYTHON": sys.executable, "WANDB_MODE": "disabled"}
    steps = [
        [sys.executable, "preprocessing/00_make_demo_dataset.py", "--conf", str(conf)],
        ["bash", "run.sh", "--conf", str(conf), "--stage", "1", "--stop-stage", "7"],
    ]
    outputs = []
    for cmd in steps:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    runs = [p for p in (tmp / "outputs").iterdir() if p.is_dir()]
    assert len(runs) == 1
    return tmp / "data", runs[0], "\n".join(outputs)


def test_preprocessing_writes_every_file_between_steps(pipeline):
    data, _, _ = pipeline
    info = load_pickle(data / "audio_info.pkl")
    assert set(info["audio_fid2fname"]) == set(SPLITS)
    embeds = load_pickle(data / "sbert_embeds.pkl")
    for split, n_clips in zip(SPLITS, (8, 4, 4)):
        assert len(info["audio_fid2fname"][split]) == n_clips
        text = (data / f"{split}_text.csv").read_text(encoding="utf-8").splitlines()
        assert text[0] == "tid,fid,fname,raw_text,text,tokens" and len(text) == 1 + 5 * n_clips
        with h5py.File(data / f"{split}_audio_logmels.hdf5", "r") as h5:
            assert set(h5) == set(info["audio_fid2fname"][split])
            assert all(h5[fid].shape[1] == 64 and h5[fid].dtype == "float32" for fid in h5)
    assert len(embeds) == 5 * 16 and next(iter(embeds.values())).shape == (384,)
    assert (data / "vocab_info.pkl").is_file()
    for step in ("00_make_demo_dataset", "01_clotho_dataset", "02_audio_logmel", "03_sbert_embeddings"):
        assert (data / f"config.{step}.yaml").is_file(), step


def test_training_and_evaluation_write_the_run_directory(pipeline):
    _, run, stdout = pipeline
    for name in ("config.yaml", "checkpoints/best.pt", "checkpoints/last.pt", "metrics.jsonl",
                 "scores.db", "metrics.json", "validation.t2a_retrieval.csv",
                 "evaluation.t2a_retrieval.csv", "evaluation.t2a_ranks.csv", "evaluation.a2t_per_clip.csv"):
        assert (run / name).is_file(), name
    assert list((run / "plots").glob("*.png"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"validation", "evaluation", "definitions", "provenance"}
    # what produced the numbers: the training code as well as the scoring code, the inputs
    prov = metrics["provenance"]
    assert set(prov["training_code"]) == {"commit", "dirty"} and set(prov["code"]) == {"commit", "dirty"}
    assert prov["training_code"] == {k: read_provenance(run)[0]["git"][k] for k in ("commit", "dirty")}
    assert prov["sbert_model"] and len(prov["embeddings_sha1"]) == 40
    # what training read, by content: here the same files as scoring read
    assert prov["training_data"] == read_provenance(run)[0]["data"]
    assert prov["training_data"]["embeddings_sha1"] == prov["embeddings_sha1"]
    assert prov["training_data"]["splits"]["validation"] == prov["split_inputs"]["validation"]
    assert set(prov["split_inputs"]) == {"validation", "evaluation"}
    assert all(len(v["logmels"]) == 40 for v in prov["split_inputs"].values())
    for split in ("validation", "evaluation"):
        for direction in ("t2a", "a2t"):
            assert {"mAP@10", "R@1", "R@5", "R@10"} <= set(metrics[split][direction])
            assert all(0.0 <= v <= 1.0 for v in metrics[split][direction].values())
    with sqlite3.connect(run / "scores.db") as db:
        (pairs,) = db.execute("SELECT COUNT(*) FROM scores").fetchone()
    assert pairs == 4 * 20 * 2  # clips x captions, validation + evaluation
    header = (run / "evaluation.t2a_retrieval.csv").read_text().splitlines()[0]
    # eval.top_k 10, capped at the split's 4 clips (no column empty in every row)
    assert header == "caption," + ",".join(f"file_name_{i}" for i in range(1, 5))
    assert "mAP@10" in stdout  # the metrics table is printed
    # ... and the demo ends with the report's path (make demo runs the same stages)
    assert stdout.strip().splitlines()[-1].startswith(f"report: {run / 'report' / 'index.html'} (")
    lo, hi = metrics["evaluation"]["ci95"]["t2a"]["mAP@10"]
    assert f"<td>95% CI</td><td>{lo:.3f}–{hi:.3f}</td>" in (run / "report" / "index.html").read_text()
    assert len(list((run / "report" / "audio").rglob("*.opus"))) == 8  # every eval-split clip
