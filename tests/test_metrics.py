"""Retrieval metrics against a per-query loop written from the definition (stable sort on -score)."""
import numpy as np
import pytest
import torch

from utils.metrics import rank_of_first_relevant, recall_curve, relevant_ranks, retrieval_metrics


def reference(scores, relevant, max_k=10):
    """Plain loop: stable sort on -score (ties -> lower index first), then count."""
    out = {"mAP@10": [], "R@1": [], "R@5": [], "R@10": []}
    curve, first = [], []
    for s, rel in zip(scores, relevant):
        order = np.argsort(-s, kind="stable")
        hits = rel[order]
        n_rel = rel.sum()
        for k in (1, 5, 10):
            out[f"R@{k}"].append(hits[:k].sum() / n_rel)
        ap, found = 0.0, 0
        for r in range(1, 11):
            if r <= len(hits) and hits[r - 1]:
                found += 1
                ap += found / r
        out["mAP@10"].append(ap / n_rel)
        curve.append([hits[:k].sum() / n_rel for k in range(1, max_k + 1)])
        first.append(int(np.flatnonzero(hits)[0]) + 1)
    return ({k: float(np.mean(v)) for k, v in out.items()}, np.mean(curve, axis=0), np.array(first))


def clotho_like(seed, n_clips=10, per_clip=5, integer=False):
    """Captions x clips scores; caption i belongs to clip i // per_clip."""
    rng = np.random.default_rng(seed)
    n_caps = n_clips * per_clip
    scores = rng.integers(0, 4, (n_caps, n_clips)).astype(np.float32) if integer \
        else rng.standard_normal((n_caps, n_clips)).astype(np.float32)
    relevant = np.zeros((n_caps, n_clips), dtype=bool)
    relevant[np.arange(n_caps), np.arange(n_caps) // per_clip] = True
    return scores, relevant


def assert_matches(scores, relevant):
    want, want_curve, want_first = reference(scores, relevant)
    got = retrieval_metrics(scores, relevant)
    assert list(got) == ["mAP@10", "R@1", "R@5", "R@10"]
    for k in want:
        assert isinstance(got[k], float)
        assert abs(got[k] - want[k]) < 1e-9, (k, got[k], want[k])
    assert np.allclose(recall_curve(scores, relevant), want_curve, atol=1e-9, rtol=0)
    assert np.array_equal(rank_of_first_relevant(scores, relevant), want_first)


@pytest.mark.parametrize("seed", range(5))
def test_text_to_audio_one_relevant(seed):
    assert_matches(*clotho_like(seed))


@pytest.mark.parametrize("seed", range(5))
def test_audio_to_text_five_relevant(seed):
    scores, relevant = clotho_like(seed)
    assert_matches(scores.T.copy(), relevant.T.copy())


@pytest.mark.parametrize("seed", range(5))
def test_many_ties_follow_the_stable_order(seed):
    scores, relevant = clotho_like(seed, n_clips=30, integer=True)
    assert_matches(scores, relevant)
    assert_matches(scores.T.copy(), relevant.T.copy())


def test_all_scores_equal_ranks_by_index():
    scores = np.zeros((2, 6))
    relevant = np.zeros((2, 6), dtype=bool)
    relevant[0, 4] = True
    relevant[1, [1, 3]] = True
    q, r = relevant_ranks(scores, relevant)
    assert q.tolist() == [0, 1, 1] and r.tolist() == [5, 2, 4]
    assert_matches(scores, relevant)


def test_hand_worked_example():
    # query 0: order c2, c0, c1, c3 (c1 and c3 tie, c1 first); relevant c0, c3 -> ranks 2 and 4
    # query 1: order c1, c3, c0, c2; relevant c1 -> rank 1
    scores = np.array([[0.5, 0.1, 0.9, 0.1],
                       [0.2, 0.8, 0.1, 0.3]])
    relevant = np.array([[True, False, False, True],
                         [False, True, False, False]])
    got = retrieval_metrics(scores, relevant)
    ap0 = (1 / 2 + 2 / 4) / 2
    assert got["mAP@10"] == pytest.approx((ap0 + 1.0) / 2, abs=1e-12)
    assert got["R@1"] == pytest.approx((0 + 1) / 2, abs=1e-12)
    assert got["R@5"] == pytest.approx(1.0) and got["R@10"] == pytest.approx(1.0)
    assert np.allclose(recall_curve(scores, relevant, max_k=4), [0.5, 0.75, 0.75, 1.0])
    assert rank_of_first_relevant(scores, relevant).tolist() == [2, 1]


def test_relevant_beyond_top10_counts_in_denominator():
    scores = -np.arange(20, dtype=np.float64)[None, :]  # candidate j ranked j + 1
    relevant = np.zeros((1, 20), dtype=bool)
    relevant[0, [0, 15]] = True
    got = retrieval_metrics(scores, relevant)
    assert got["mAP@10"] == pytest.approx(0.5) and got["R@10"] == pytest.approx(0.5)


def test_torch_input_and_chunking(monkeypatch):
    import utils.metrics as m

    scores, relevant = clotho_like(11, n_clips=40)
    want = retrieval_metrics(scores, relevant)
    monkeypatch.setattr(m, "CHUNK_ELEMENTS", 7)  # forces one pair per chunk
    assert retrieval_metrics(torch.from_numpy(scores), torch.from_numpy(relevant)) \
        == retrieval_metrics(scores, relevant) == want
    # bf16 scores (AMP) are accepted; rounding creates ties, ranked like their float32 copy.
    half = torch.from_numpy(scores).to(torch.bfloat16)
    assert retrieval_metrics(half, relevant) == retrieval_metrics(half.float().numpy(), relevant)


def test_query_without_relevant_item_is_an_error():
    scores, relevant = clotho_like(0)
    relevant[3] = False
    with pytest.raises(ValueError, match=r"1 queries have no relevant candidate \(query index 3\)"):
        retrieval_metrics(scores, relevant)


def test_shape_dtype_and_nan_errors():
    scores, relevant = clotho_like(0)
    with pytest.raises(ValueError, match="must match"):
        retrieval_metrics(scores, relevant[:, :5])
    with pytest.raises(ValueError, match="boolean"):
        retrieval_metrics(scores, relevant.astype(int))
    scores[2, 1] = np.nan
    with pytest.raises(ValueError, match="query 2 contain NaN"):
        retrieval_metrics(scores, relevant)
    for shape in [(4, 0), (0, 4)]:  # numpy's own "zero-size array" error said nothing useful
        with pytest.raises(ValueError, match=r"no queries or no candidates"):
            retrieval_metrics(np.zeros(shape), np.zeros(shape, bool))


def test_chance_metrics_match_the_average_over_random_rankings():
    from utils.metrics import chance_metrics, retrieval_metrics

    rng = np.random.default_rng(3)
    n_clips, per_clip = 12, 5
    clip_of = np.repeat(np.arange(n_clips), per_clip)
    t2a = clip_of[:, None] == np.arange(n_clips)[None, :]
    for relevant in (t2a, t2a.T.copy()):
        runs = [retrieval_metrics(rng.random(relevant.shape), relevant) for _ in range(3000)]
        expected = chance_metrics(relevant)
        for name, value in expected.items():
            assert abs(np.mean([r[name] for r in runs]) - value) < 0.01, name
    assert chance_metrics(t2a)["R@10"] == 10 / 12


# --------------------------------------------------------------------------- R@k_any and ranks

def reference_any(scores, relevant, max_k=10):
    """Per-query loop from the definitions: R@k_any = 1 if any relevant candidate is in the top k
    (stable sort on -score); rank = 1-based position of the first relevant one in that order."""
    any_k = {f"R@{k}_any": [] for k in (1, 5, 10)}
    curve, first = [], []
    for s, rel in zip(scores, relevant):
        hits = rel[np.argsort(-s, kind="stable")]
        for k in (1, 5, 10):
            any_k[f"R@{k}_any"].append(1.0 if hits[:k].any() else 0.0)
        curve.append([1.0 if hits[:k].any() else 0.0 for k in range(1, max_k + 1)])
        for position, is_relevant in enumerate(hits, start=1):
            if is_relevant:
                first.append(position)
                break
    return ({k: float(np.mean(v)) for k, v in any_k.items()}, np.mean(curve, axis=0),
            float(np.mean(first)), float(np.median(first)))


@pytest.mark.parametrize("integer", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("seed", range(4))
def test_any_recall_and_rank_summary_match_the_loop(seed, integer):
    from utils.metrics import ANY_NAMES, evaluate_ranking, recall_any

    scores, relevant = clotho_like(seed, n_clips=30, integer=integer)
    for s, rel in ((scores, relevant), (scores.T.copy(), relevant.T.copy())):  # t2a, a2t
        want_any, want_curve, want_mean, want_median = reference_any(s, rel)
        got = evaluate_ranking(s, rel)
        assert tuple(got.any) == ANY_NAMES and recall_any(s, rel) == got.any
        for name, value in want_any.items():
            assert isinstance(got.any[name], float) and abs(got.any[name] - value) < 1e-12, name
        assert np.allclose(got.curve_any, want_curve, atol=1e-12, rtol=0)
        assert got.mean_rank == pytest.approx(want_mean, abs=1e-12)
        assert got.median_rank == pytest.approx(want_median, abs=1e-12)
        assert got.metrics == retrieval_metrics(s, rel)


def test_any_recall_equals_recall_with_one_relevant_and_bounds_it_otherwise():
    from utils.metrics import evaluate_ranking

    scores, relevant = clotho_like(7, n_clips=25)
    t2a = evaluate_ranking(scores, relevant)
    for k in (1, 5, 10):
        assert t2a.any[f"R@{k}_any"] == pytest.approx(t2a.metrics[f"R@{k}"], abs=1e-12)
    a2t = evaluate_ranking(scores.T.copy(), relevant.T.copy())
    for k in (1, 5, 10):
        assert a2t.any[f"R@{k}_any"] >= a2t.metrics[f"R@{k}"]
    assert a2t.metrics["R@1"] <= 0.2 + 1e-12  # five relevant captions: at most 1/5 in the top 1


def test_hand_worked_any_and_ranks():
    from utils.metrics import evaluate_ranking

    # query 0: relevant ranked 2 and 4 -> first 2; query 1: relevant ranked 1 -> first 1;
    # query 2: all equal, relevant at index 3 -> rank 4 by the index rule
    scores = np.array([[0.5, 0.1, 0.9, 0.1], [0.2, 0.8, 0.1, 0.3], [0.0, 0.0, 0.0, 0.0]])
    relevant = np.array([[True, False, False, True], [False, True, False, False],
                         [False, False, False, True]])
    got = evaluate_ranking(scores, relevant, max_k=4)
    assert got.first.tolist() == [2, 1, 4]
    assert got.any == {"R@1_any": 1 / 3, "R@5_any": 1.0, "R@10_any": 1.0}
    assert np.allclose(got.curve_any, [1 / 3, 2 / 3, 2 / 3, 1.0])
    assert got.mean_rank == pytest.approx(7 / 3) and got.median_rank == 2.0


def test_chance_recall_any_matches_random_rankings():
    from utils.metrics import chance_recall_any, recall_any

    rng = np.random.default_rng(5)
    clip_of = np.repeat(np.arange(12), 5)
    a2t = (clip_of[:, None] == np.arange(12)[None, :]).T.copy()  # [12 clips, 60 captions]
    runs = [recall_any(rng.random(a2t.shape), a2t) for _ in range(3000)]
    for name, value in chance_recall_any(a2t).items():
        assert abs(np.mean([r[name] for r in runs]) - value) < 0.01, name
    # exact small case: 1 of 4 candidates relevant -> k/4; all relevant -> 1
    assert chance_recall_any(np.array([[True, False, False, False]]))["R@1_any"] == 0.25
    assert chance_recall_any(np.ones((1, 3), dtype=bool)) == {"R@1_any": 1.0, "R@5_any": 1.0,
                                                             "R@10_any": 1.0}


def test_chance_curves_agree_with_the_chance_metrics():
    from utils.metrics import (chance_metrics, chance_recall_any, chance_recall_any_curve,
                               chance_recall_curve)

    clip_of = np.repeat(np.arange(7), 5)
    t2a = clip_of[:, None] == np.arange(7)[None, :]  # 7 clips: k beyond C saturates at 1
    for rel in (t2a, t2a.T.copy()):
        curve, any_curve = chance_recall_curve(rel, 12), chance_recall_any_curve(rel, 12)
        assert len(curve) == len(any_curve) == 12
        if rel.shape[1] <= 12:  # t2a: 7 candidates, so the top 12 hold every one
            assert curve[-1] == any_curve[-1] == 1.0
        for k in (1, 5, 10):
            assert curve[k - 1] == pytest.approx(chance_metrics(rel)[f"R@{k}"], abs=1e-12)
            assert any_curve[k - 1] == pytest.approx(chance_recall_any(rel)[f"R@{k}_any"], abs=1e-12)
    assert np.allclose(chance_recall_any_curve(t2a, 7), chance_recall_curve(t2a, 7))  # one relevant


def test_per_query_values_average_to_the_metrics():
    from utils.metrics import evaluate_ranking

    rng = np.random.default_rng(3)
    scores = rng.normal(size=(40, 8))
    relevant = np.zeros((40, 8), dtype=bool)
    relevant[np.arange(40), np.arange(40) // 5] = True
    r = evaluate_ranking(scores, relevant)
    for name, value in r.metrics.items():
        assert r.per_query[name].shape == (40,) and r.per_query[name].mean() == value


def test_bootstrap_resamples_whole_groups():
    """A loop over explicit resamples of the clips (a caption goes with its clip) gives the same
    interval; equal values give no spread; the point estimate lies inside; a seed repeats it."""
    from utils.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 5)
    ap = rng.random(150) * (groups % 3 == 0)                # clip-level structure
    ci = bootstrap_ci({"mAP@10": ap, "flat": np.full(150, 0.25)}, groups, n_boot=400, seed=7)
    draws = np.random.default_rng(7).integers(0, 30, size=(400, 30))
    means = [np.concatenate([ap[groups == g] for g in row]).mean() for row in draws]
    assert ci["mAP@10"] == pytest.approx(list(np.percentile(means, [2.5, 97.5])))
    assert ci["flat"] == pytest.approx([0.25, 0.25])
    assert ci["mAP@10"][0] < ap.mean() < ci["mAP@10"][1]
    assert bootstrap_ci({"m": ap}, groups, 400, 7) == {"m": ci["mAP@10"]}
    # captions resampled alone (each its own group) would understate the spread of clustered data
    alone = bootstrap_ci({"m": ap}, np.arange(150), 400, 7)["m"]
    assert alone[1] - alone[0] < ci["mAP@10"][1] - ci["mAP@10"][0]
