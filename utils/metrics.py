"""Retrieval metrics as in the baseline: R@k and mAP@10 over a [queries, candidates] score matrix.

Ranking rule: candidates are sorted by score, highest first; equal scores keep the lower
candidate index first (a stable sort on -score). Only the ranks of the *relevant* candidates
matter for every metric here, and the rank of candidate j in query q is

    1 + #{k : s[q, k] > s[q, j]} + #{k < j : s[q, k] == s[q, j]}

which we count directly, in chunks, instead of sorting whole rows: exact, tie-aware, and
memory-lean (development a2t, 3839 x 19195, never needs a full argsort copy).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METRIC_NAMES = ("mAP@10", "R@1", "R@5", "R@10")  # the baseline's (and the spec's) four
ANY_NAMES = ("R@1_any", "R@5_any", "R@10_any")     # CLAP-style: any relevant item in the top k
CHUNK_ELEMENTS = 1 << 22  # candidate scores compared per chunk (~16 MB of float32 rows)


def _as_numpy(x) -> np.ndarray:
    """numpy arrays pass through; torch tensors (any device, bf16 included) are copied to CPU."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double() if x.element_size() == 8 else x.float()  # numpy has no bfloat16
        x = x.numpy()
    return np.asarray(x)


def _check(scores, relevant) -> tuple[np.ndarray, np.ndarray]:
    scores, relevant = _as_numpy(scores), _as_numpy(relevant)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a [queries, candidates] matrix, got shape {scores.shape}")
    if relevant.shape != scores.shape:
        raise ValueError(f"relevant has shape {relevant.shape}, scores {scores.shape}: they must match")
    if relevant.dtype != bool:
        raise ValueError(f"relevant must be a boolean array, got {relevant.dtype}")
    if not np.issubdtype(scores.dtype, np.floating) and not np.issubdtype(scores.dtype, np.integer):
        raise ValueError(f"scores must be numeric, got {scores.dtype}")
    if scores.size == 0:
        raise ValueError(f"scores of shape {scores.shape}: no queries or no candidates to rank")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(np.min(scores)):  # min propagates NaN
        q = int(np.flatnonzero(np.isnan(scores).any(axis=1))[0])
        raise ValueError(f"scores of query {q} contain NaN; ranks would be undefined")
    empty = ~relevant.any(axis=1)
    if empty.any():
        rows = np.flatnonzero(empty)
        shown = ", ".join(map(str, rows[:5])) + (" ..." if len(rows) > 5 else "")
        raise ValueError(f"{len(rows)} queries have no relevant candidate (query index {shown}); "
                         f"recall and AP are undefined for them")
    return scores, relevant


def relevant_ranks(scores, relevant) -> tuple[np.ndarray, np.ndarray]:
    """The 1-based rank of every relevant (query, candidate) pair under the tie rule above.

    Returns `(query_idx [P], ranks [P])`, P = number of relevant pairs, in row-major order.
    """
    return _ranks(*_check(scores, relevant))


def _ranks(scores: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q_idx, c_idx = np.nonzero(relevant)
    n_cand = scores.shape[1]
    ranks = np.empty(len(q_idx), dtype=np.int64)
    step = max(1, CHUNK_ELEMENTS // max(n_cand, 1))
    for start in range(0, len(q_idx), step):
        q, c = q_idx[start:start + step], c_idx[start:start + step]
        rows = scores[q]                              # [p, C], one row per relevant pair
        own = scores[q, c][:, None]                   # [p, 1]
        above = np.count_nonzero(rows > own, axis=1)
        ties = np.count_nonzero(rows == own, axis=1)  # includes the candidate itself
        r = above + 1
        tied = np.flatnonzero(ties > 1)
        if tied.size:  # only rows with real ties pay for the index comparison
            before = np.arange(n_cand)[None, :] < c[tied, None]
            r[tied] += np.count_nonzero((rows[tied] == own[tied]) & before, axis=1)
        ranks[start:start + step] = r
    return q_idx, ranks


def retrieval_metrics(scores, relevant) -> dict[str, float]:
    """`scores` `[Q, C]` (higher = better), `relevant` bool `[Q, C]` ->
    `{"mAP@10", "R@1", "R@5", "R@10"}` averaged over the Q queries (floats in [0, 1]).

    R@k = relevant items in the top k / relevant items; AP@10 = sum over relevant items ranked
    r <= 10 of (relevant items ranked <= r) / r, divided by the number of relevant items.
    """
    return evaluate_ranking(scores, relevant).metrics


def recall_curve(scores, relevant, max_k: int = 10) -> np.ndarray:
    """Mean R@k for k = 1..max_k, as a float64 array `[max_k]`."""
    return evaluate_ranking(scores, relevant, max_k).curve


def rank_of_first_relevant(scores, relevant) -> np.ndarray:
    """1-based rank of each query's best-ranked relevant candidate, int64 `[Q]`."""
    return evaluate_ranking(scores, relevant).first


def recall_any(scores, relevant) -> dict[str, float]:
    """`{"R@1_any", "R@5_any", "R@10_any"}`: the fraction of queries with at least one relevant
    candidate in the top k (CLAP-style audio->text recall; equal to R@k with one relevant)."""
    return evaluate_ranking(scores, relevant).any


@dataclass
class Ranking:
    """Everything the evaluation reports about one `[Q, C]` ranking, from one rank count.

    metrics: METRIC_NAMES; any: ANY_NAMES; curve, curve_any: float64 `[max_k]` (R@k and
    R@k_any for k = 1..max_k); first: int64 `[Q]`, rank of each query's best relevant candidate.
    """
    metrics: dict[str, float]
    any: dict[str, float]
    curve: np.ndarray
    curve_any: np.ndarray
    first: np.ndarray
    per_query: dict[str, np.ndarray] = field(default_factory=dict)  # METRIC_NAMES: float64 [Q]

    @property
    def mean_rank(self) -> float:
        return float(self.first.mean())

    @property
    def median_rank(self) -> float:
        return float(np.median(self.first))


def evaluate_ranking(scores, relevant, max_k: int = 10) -> Ranking:
    """All metrics of a ranking (see the module docstring for the tie rule)."""
    scores, relevant = _check(scores, relevant)
    q_idx, ranks = _ranks(scores, relevant)
    n_queries = relevant.shape[0]
    n_rel = np.bincount(q_idx, minlength=n_queries).astype(np.float64)  # [Q]
    w = 1.0 / n_rel[q_idx]                                               # [P]
    per_query = {}  # each query's value; a metric is their mean
    for k in (1, 5, 10):
        per_query[f"R@{k}"] = np.bincount(q_idx, weights=w * (ranks <= k), minlength=n_queries)
    # hits up to rank r for a relevant item = its position among its query's relevant items by rank
    order = np.lexsort((ranks, q_idx))
    q_sorted, r_sorted = q_idx[order], ranks[order]
    first_of_query = np.searchsorted(q_sorted, q_sorted, side="left")
    hits = np.arange(len(q_sorted)) - first_of_query + 1
    prec = np.where(r_sorted <= 10, hits / r_sorted, 0.0)
    per_query["mAP@10"] = np.bincount(q_sorted, weights=prec, minlength=n_queries) / n_rel

    # each relevant item ranked r adds 1/n_rel of its query to R@k for every k >= r
    keep = ranks <= max_k
    at_rank = np.bincount(ranks[keep] - 1, weights=w[keep], minlength=max_k)
    curve = np.cumsum(at_rank[:max_k]) / n_queries

    first = np.full(n_queries, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, q_idx, ranks)
    first_hist = np.bincount(np.minimum(first, max_k + 1) - 1, minlength=max_k + 1)
    curve_any = np.cumsum(first_hist[:max_k]) / n_queries
    any_k = {f"R@{k}_any": float(np.count_nonzero(first <= k) / n_queries) for k in (1, 5, 10)}
    return Ranking(metrics={name: float(per_query[name].mean()) for name in METRIC_NAMES},
                   any={name: any_k[name] for name in ANY_NAMES},
                   curve=curve, curve_any=curve_any, first=first,
                   per_query={name: per_query[name] for name in METRIC_NAMES})


def recall_any_per_query(first: np.ndarray) -> dict[str, np.ndarray]:
    """{R@k_any: float64 [Q]}: 1 where the query's best-ranked relevant item (`Ranking.first`)
    is in its top k; their means are `Ranking.any`."""
    first = np.asarray(first)
    return {f"R@{k}_any": (first <= k).astype(np.float64) for k in (1, 5, 10)}


def bootstrap_ci(values: dict[str, np.ndarray], groups: np.ndarray, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap interval of the mean of each `values[name]` `[Q]`, resampling whole
    groups `[Q]` with replacement (the clips: a clip's 5 captions are not independent queries,
    so resampling captions alone would give too narrow an interval). Deterministic in `seed`."""
    groups = np.asarray(groups)
    ids, inverse = np.unique(groups, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)     # [G]
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))  # [B, G]
    n = counts[draws].sum(axis=1)                                            # [B]
    tail = (1.0 - level) / 2 * 100
    out = {}
    for name, v in values.items():
        sums = np.bincount(inverse, weights=np.asarray(v, dtype=np.float64), minlength=len(ids))
        means = sums[draws].sum(axis=1) / n                                  # [B]
        lo, hi = np.percentile(means, [tail, 100 - tail])
        out[name] = [float(lo), float(hi)]
    return out


def chance_metrics(relevant) -> dict[str, float]:
    """Expected `retrieval_metrics` under a uniformly random ranking (the chance level).

    For a query with m relevant among C candidates, the item at rank r is relevant with
    probability m/C, and then the expected hits up to r are 1 + (r - 1)(m - 1)/(C - 1).
    """
    relevant = np.asarray(relevant, dtype=bool)
    n_cand = relevant.shape[1]
    m = relevant.sum(axis=1).astype(np.float64)  # [Q]
    if (m == 0).any():
        raise ValueError("every query needs at least one relevant candidate")
    out = {f"R@{k}": min(k, n_cand) / n_cand for k in (1, 5, 10)}
    r = np.arange(1, min(10, n_cand) + 1, dtype=np.float64)[None, :]  # [1, R]
    others = (r - 1) * (m[:, None] - 1) / max(n_cand - 1, 1)
    ap = ((1.0 + others) / r).sum(axis=1) / n_cand  # [Q]
    out["mAP@10"] = float(ap.mean())
    return {name: out[name] for name in METRIC_NAMES}


def _relevant_counts(relevant) -> tuple[np.ndarray, int]:
    relevant = np.asarray(relevant, dtype=bool)
    m = relevant.sum(axis=1).astype(np.float64)  # [Q]
    if (m == 0).any():
        raise ValueError("every query needs at least one relevant candidate")
    return m, relevant.shape[1]


def chance_recall_curve(relevant, max_k: int = 10) -> np.ndarray:
    """Expected R@k, k = 1..max_k, under a random ranking: min(k, C) / C for every query."""
    _, n_cand = _relevant_counts(relevant)
    return np.minimum(np.arange(1, max_k + 1), n_cand) / n_cand


def chance_recall_any_curve(relevant, max_k: int = 10) -> np.ndarray:
    """Expected R@k_any, k = 1..max_k, under a random ranking: for a query with m relevant among
    C candidates, 1 - P(none in the top k) = 1 - prod_{i<k} (C - m - i) / (C - i)."""
    m, n_cand = _relevant_counts(relevant)
    i = np.arange(max_k, dtype=np.float64)[None, :]                       # [1, K]
    factor = np.where(i < n_cand, (n_cand - m[:, None] - i) / np.maximum(n_cand - i, 1), 1.0)
    none = np.cumprod(np.clip(factor, 0.0, 1.0), axis=1)                  # [Q, K]
    return (1.0 - none).mean(axis=0)


def chance_recall_any(relevant) -> dict[str, float]:
    """Expected `recall_any` under a uniformly random ranking (see chance_recall_any_curve)."""
    curve = chance_recall_any_curve(relevant, 10)
    return {f"R@{k}_any": float(curve[k - 1]) for k in (1, 5, 10)}
