"""metrics.json as utils.evaluation builds and reads it: the spec's shape, R@k_any, ranks and
counts against per-query loops, definitions, provenance, the printed table."""
from __future__ import annotations

import json

import numpy as np
import pytest

from utils import evaluation, scores_db
from utils.errors import UserError
from utils.metrics import METRIC_NAMES

SPEC = set(METRIC_NAMES)


def scored(seed=0, n_clips=9, per_clip=5, integer=False, split="evaluation") -> scores_db.ScoredSplit:
    """A split whose captions are in shuffled order (caption_clip is not sorted)."""
    rng = np.random.default_rng(seed)
    caption_clip = rng.permutation(np.repeat(np.arange(n_clips), per_clip))
    q = len(caption_clip)
    scores = (rng.integers(0, 3, (q, n_clips)) if integer else rng.standard_normal((q, n_clips)))
    return scores_db.ScoredSplit(split, [f"f{i}" for i in range(n_clips)],
                                 [f"{i}.wav" for i in range(n_clips)], [f"t{i}" for i in range(q)],
                                 [f"caption {i}" for i in range(q)], caption_clip,
                                 scores.astype(np.float32))


def loop_ranks(s: scores_db.ScoredSplit):
    """From the definitions: t2a rank of each caption's clip; a2t rank of each clip's best-ranked
    own caption; R@k_any of a2t. Stable order on -score: ties go to the lower index."""
    t2a = []
    for q, row in enumerate(s.scores):
        order = list(np.argsort(-row, kind="stable"))
        t2a.append(order.index(s.caption_clip[q]) + 1)
    a2t, any_k = [], {1: [], 5: [], 10: []}
    for c, col in enumerate(s.scores.T):
        order = list(np.argsort(-col, kind="stable"))
        own = [order.index(q) + 1 for q in np.flatnonzero(s.caption_clip == c)]
        a2t.append(min(own))
        for k in any_k:
            any_k[k].append(min(own) <= k)
    return np.array(t2a), np.array(a2t), {f"R@{k}_any": float(np.mean(v)) for k, v in any_k.items()}


def document(*splits, skipped=None):
    results = [evaluation.evaluate_split(s) for s in splits]
    meta = {"run": "tiny-run", "checkpoint": "best", "checkpoint_epoch": "3",
            "checkpoint_sha1": "ab" * 20, "config_sha1": "cd" * 20}
    prov = evaluation.metrics_provenance("outputs/tiny-run", meta, results, skipped)
    return evaluation.metrics_document(results, prov, skipped), results


@pytest.mark.parametrize("integer", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("seed", range(3))
def test_document_numbers_match_loops(seed, integer):
    s = scored(seed, integer=integer)
    doc, [r] = document(s)
    entry = doc["evaluation"]
    t2a, a2t, any_k = loop_ranks(s)
    assert np.array_equal(r.ranks, t2a) and np.array_equal(r.a2t_ranks, a2t)
    for name, value in any_k.items():
        assert entry["a2t"][name] == pytest.approx(value, abs=1e-12)
    for d, ranks in (("t2a", t2a), ("a2t", a2t)):
        assert entry["ranks"][d]["mean"] == pytest.approx(ranks.mean(), abs=1e-12)
        assert entry["ranks"][d]["median"] == pytest.approx(float(np.median(ranks)), abs=1e-12)
    assert entry["ranks"]["t2a"]["queries"] == 45 and entry["ranks"]["t2a"]["candidates"] == 9
    assert entry["ranks"]["a2t"]["queries"] == 9 and entry["ranks"]["a2t"]["candidates"] == 45
    assert entry["counts"] == {"clips": 9, "captions": 45, "skipped_clips": None}
    # the spec's four stay what split_metrics computes (the baseline's definitions)
    assert {m: entry["a2t"][m] for m in METRIC_NAMES} == \
        {m: evaluation.split_metrics(s)["a2t"][m] for m in METRIC_NAMES}


def test_document_shape_definitions_and_provenance():
    doc, _ = document(scored(0, split="validation"), scored(1, split="evaluation"),
                      skipped={"evaluation": 2})
    assert list(evaluation.metrics_splits(doc)) == ["validation", "evaluation"]
    assert set(doc) == {"validation", "evaluation", "definitions", "provenance"}
    for entry in evaluation.metrics_splits(doc).values():
        assert set(entry) == {"t2a", "a2t", "chance", "ci95", "ranks", "counts"}
        for d in ("t2a", "a2t"):  # an interval around each metric
            assert set(entry["ci95"][d]) == set(entry[d])  # every metric, a2t's R@k_any included
            assert all(lo <= entry[d][m] <= hi for m, (lo, hi) in entry["ci95"][d].items())
        assert set(entry["t2a"]) == SPEC
        assert set(entry["a2t"]) == SPEC | {"R@1_any", "R@5_any", "R@10_any"}
        for d in ("t2a", "a2t"):
            assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in entry[d].values())
            assert set(entry["chance"][d]) == set(entry[d])
    # every number in the file has a definition
    defs = " ".join(doc["definitions"])
    for name in ("t2a", "a2t", "R@k", "R@k_any", "mAP@10", "chance", "ci95", "ranks.mean", "ranks.median",
                 "ranks.queries", "ranks.candidates", "counts"):
        assert name in defs, name
    prov = doc["provenance"]
    assert prov["checkpoint"] == "best" and prov["checkpoint_epoch"] == 3
    assert prov["checkpoint_file"] == "checkpoints/best.pt" and prov["run"] == "tiny-run"
    assert prov["splits"] == {"validation": {"clips": 9, "captions": 45, "skipped_clips": None},
                              "evaluation": {"clips": 9, "captions": 45, "skipped_clips": 2}}
    assert doc["evaluation"]["counts"]["skipped_clips"] == 2
    assert set(prov["code"]) == {"commit", "dirty"}


def test_write_and_read_back(tmp_path):
    doc, _ = document(scored(2))
    path = evaluation.write_metrics_json(tmp_path / "metrics.json", doc)
    assert evaluation.read_metrics_json(path) == json.loads(json.dumps(doc))
    assert evaluation.read_metrics_json(tmp_path) == evaluation.read_metrics_json(path)  # the run folder
    # a file in the older shape (splits only) still reads
    old = {"evaluation": {d: doc["evaluation"][d] for d in ("t2a", "a2t")}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert evaluation.metrics_splits(evaluation.read_metrics_json(tmp_path / "old.json")) == old


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ('{"definitions": {}, "provenance": {}}', "no split metrics"),
    ('{"evaluation": {"t2a": {"mAP@10": 0.1, "R@1": 0.1, "R@5": 0.2}, "a2t": {}}}', "R@10"),
    ('{"evaluation": {"t2a": {"mAP@10": 1.5, "R@1": 0.1, "R@5": 0.2, "R@10": 0.3}}}', "mAP@10"),
    ('{"evaluation": {"t2a": {"mAP@10": "x", "R@1": 0.1, "R@5": 0.2, "R@10": 0.3}}}', "mAP@10"),
])
def test_bad_metrics_json_is_one_line(tmp_path, text, needle):
    (tmp_path / "metrics.json").write_text(text)
    with pytest.raises(UserError, match=needle) as e:
        evaluation.read_metrics_json(tmp_path / "metrics.json")
    assert "\n" not in str(e.value) and "rerun postprocessing/02_xmodal_retrieval.py" in str(e.value)


def test_missing_metrics_json_names_the_steps(tmp_path):
    with pytest.raises(UserError, match="not found — run postprocessing/01_xmodal_scores.py"):
        evaluation.read_metrics_json(tmp_path / "metrics.json")


def test_table_names_its_definitions_and_rows():
    doc, [r] = document(scored(4))
    table = evaluation.format_table(doc)
    lines = table.splitlines()
    assert lines[0] == "run tiny-run, checkpoint best (epoch 3)"
    header = lines[1].split()
    assert header[:6] == ["split", "dir", "mAP@10", "R@1", "R@5", "R@10"] and "R@10_any" in header
    t2a_row = next(ln for ln in lines if ln.startswith("evaluation   t2a"))
    a2t_row = next(ln for ln in lines if ln.startswith("evaluation   a2t"))
    assert t2a_row.split()[2:6] == [f"{r.metrics['t2a'][m]:.4f}" for m in METRIC_NAMES]
    assert a2t_row.split()[-2:] == ["9", "45"]  # queries, candidates
    assert sum(ln.startswith("  (chance)") for ln in lines) == 2
    assert "CLAP" in table and "DCASE baseline" in table and "best-ranked" in table
    # the older call (splits only, chance separately) still works
    bare = evaluation.format_table({"evaluation": r.metrics}, {"evaluation": r.chance})
    assert "evaluation   a2t" in bare
    # without ranks (benchmarks/reference_scores.py): no empty columns, nor their legend
    assert "mean rk" not in bare and "best-ranked" not in bare
    assert next(ln for ln in bare.splitlines() if ln.startswith("evaluation   a2t")).split()[-1] \
        == f"{r.metrics['a2t']['R@10_any']:.4f}"


def test_flat_metrics_for_wandb():
    doc, [r] = document(scored(5))
    flat = evaluation.flat_metrics(doc)
    assert flat["evaluation/a2t_R@5_any"] == r.metrics["a2t"]["R@5_any"]
    assert flat["evaluation/t2a_mean_rank"] == pytest.approx(r.ranks.mean())
    assert not [k for k in flat if k.startswith(("definitions", "provenance"))]
