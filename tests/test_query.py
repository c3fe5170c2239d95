"""postprocessing/query.py: free-text search over a split, with a checkpoint-keyed embedding cache."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from models.core import build_model
from tests.cli_helpers import error_line
from tests.test_postprocessing import make_run, run_script
from utils import evaluation
from utils.checkpoint import save_checkpoint
from utils.config import load_config
from utils.runs import checkpoint_path

QUERY = "postprocessing/query.py"
BUNDLED = "bundled:all-MiniLM-L6-v2"
LINE = re.compile(r"^\s*(\d+)\s+([+-]\d\.\d{4})\s+(\S+)$")


@pytest.fixture
def q(tmp_path, monkeypatch, capsys):
    conf, run_dir = make_run(tmp_path, embed_dim=384, extra={"sbert": {"model": BUNDLED, "device": "cpu"}})

    def call(*args):
        return run_script(QUERY, "--conf", conf, "--run", run_dir, *args, monkeypatch=monkeypatch,
                          capsys=capsys)
    return conf, run_dir, call


def hits(stdout: str) -> list[tuple[int, float, str]]:
    out = []
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m:
            out.append((int(m.group(1)), float(m.group(2)), m.group(3)))
    return out


def test_query_top_k_and_cache(q):
    conf, run_dir, call = q
    p = call("--top-k", "3", "a dog barks in the rain")
    assert p.returncode == 0, p.stderr
    top = hits(p.stdout)
    assert [r for r, _, _ in top] == [1, 2, 3]
    assert all(a >= b for (_, a, _), (_, b, _) in zip(top, top[1:]))  # best first
    assert all(name.startswith("evaluation_") for _, _, name in top)
    cache = evaluation.cache_path(run_dir, "evaluation")
    assert cache.is_file() and "cached" in p.stdout

    p2 = call("--top-k", "3", "a dog barks in the rain")  # from the cache: same answer
    assert p2.returncode == 0 and "cached" not in p2.stdout
    assert hits(p2.stdout) == top

    p3 = call("--split", "validation", "--top-k", "50", "birds")  # k larger than the split
    assert p3.returncode == 0, p3.stderr
    assert len(hits(p3.stdout)) == 6


def test_stale_cache_is_recomputed(q):
    conf, run_dir, call = q
    assert call("anything").returncode == 0
    before = np.load(evaluation.cache_path(run_dir, "evaluation"))["embeds"]
    cfg = load_config(run_dir / "config.yaml")
    torch.manual_seed(123)  # another checkpoint in the same place
    model = build_model(cfg, text_in_dim=384)
    save_checkpoint(checkpoint_path(run_dir, "best"), {"model": model.state_dict(), "epoch": 5,
                                                        "text_embed_dim": 384})
    p = call("anything")
    assert p.returncode == 0 and "cached" in p.stdout
    after = np.load(evaluation.cache_path(run_dir, "evaluation"))["embeds"]
    assert not np.allclose(before, after)


@pytest.mark.parametrize("text", ["", "   \t "])
def test_empty_query(q, text):
    conf, run_dir, call = q
    assert "query is empty" in error_line(call(text))


def test_query_without_checkpoint(q):
    conf, run_dir, call = q
    checkpoint_path(run_dir, "best").unlink()
    assert "no checkpoint" in error_line(call("a dog"))
