"""Comparing evaluated runs: their metrics side by side, and for two runs scored on the same
queries, each direction's difference with a paired bootstrap interval
(postprocessing/compare_runs.py).

Text -> audio has one relevant clip per caption, so each caption's values follow from the rank
of its clip in `<run>/{split}.t2a_ranks.csv`: AP@10 = 1/rank within the top 10 (else 0),
R@k = [rank <= k]. Audio -> text values are each clip's, from `{split}.a2t_per_clip.csv`. Their
means are the metrics of metrics.json, exactly.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.evaluation import CI_RESAMPLES, CI_SEED, metrics_splits, read_metrics_json
from utils.metrics import METRIC_NAMES, bootstrap_ci


@dataclass
class PerQuery:
    """One run's values of the four metrics for each query of one direction of a split."""
    keys: list[str]                # the queries (tids for t2a, fids for a2t): pairs across runs
    groups: list[str]              # the clip of each query: the bootstrap resamples clips
    values: dict[str, np.ndarray]  # METRIC_NAMES: float64 [Q]


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: not found — run postprocessing/02_xmodal_retrieval.py on "
                        f"{path.parent} (with the split in eval.splits)")
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def read_per_query(run_dir: str | Path, split: str, direction: str) -> PerQuery:
    """t2a from `{split}.t2a_ranks.csv` (each caption's values follow from its clip's rank),
    a2t from `{split}.a2t_per_clip.csv` (postprocessing 02 writes both)."""
    name = f"{split}.t2a_ranks.csv" if direction == "t2a" else f"{split}.a2t_per_clip.csv"
    path = Path(run_dir) / name
    rows = _read_csv(path)
    try:
        if direction == "t2a":
            ranks = np.array([int(r["rank"]) for r in rows], dtype=np.int64)
            return PerQuery([r["tid"] for r in rows], [r["fname"] for r in rows], t2a_per_query(ranks))
        return PerQuery([r["fid"] for r in rows], [r["fid"] for r in rows],
                        {m: np.array([float(r[m]) for r in rows]) for m in METRIC_NAMES})
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not a file postprocessing 02 wrote ({e}) — rerun "
                        "postprocessing/02_xmodal_retrieval.py") from None


def t2a_per_query(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """{metric: float64 [Q]} of each caption, from the rank of its one relevant clip."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {"mAP@10": np.where(ranks <= 10, 1.0 / ranks, 0.0)}
    out.update({f"R@{k}": (ranks <= k).astype(np.float64) for k in (1, 5, 10)})
    return {name: out[name] for name in METRIC_NAMES}


def paired_difference(a: PerQuery, b: PerQuery, where: str = "") -> dict[str, dict]:
    """{metric: {"a", "b", "difference", "ci95"}}: b minus a over the same queries, with a 95%
    bootstrap interval of the difference resampling clips (each query paired with itself:
    far narrower than comparing the two runs' own intervals)."""
    if a.keys != b.keys:
        raise UserError(f"{where}: the two runs were scored on different queries (other "
                        "features or splits): a paired comparison needs the same ones")
    diffs = {m: b.values[m] - a.values[m] for m in METRIC_NAMES}
    ci = bootstrap_ci(diffs, np.unique(a.groups, return_inverse=True)[1], CI_RESAMPLES, CI_SEED)
    return {m: {"a": float(a.values[m].mean()), "b": float(b.values[m].mean()),
                "difference": float(diffs[m].mean()), "ci95": ci[m]} for m in METRIC_NAMES}


def metrics_rows(run_dirs: list[Path], split: str) -> list[tuple[str, str, dict, dict]]:
    """(run, direction, metrics, ci95) per run and direction of `split`, from metrics.json."""
    rows = []
    for run in run_dirs:
        splits = metrics_splits(read_metrics_json(run))
        if split not in splits:
            raise UserError(f"{run / 'metrics.json'}: no split '{split}' (it has "
                            f"{', '.join(splits)})")
        for d in ("t2a", "a2t"):
            rows.append((run.name, d, splits[split][d], (splits[split].get("ci95") or {}).get(d, {})))
    return rows


DIRECTION_WORDS = {"t2a": "text -> audio", "a2t": "audio -> text"}


def format_comparison(rows, split: str, paired: dict | None = None, names=("A", "B")) -> str:
    """The plain-text table compare_runs.py prints; `paired`: {direction: paired_difference}."""
    lines = [f"split {split}: metric (95% CI over clips)",
             f"{'run':<32} {'dir':<4} " + " ".join(f"{m:>22}" for m in METRIC_NAMES)]
    for run, d, metrics, ci in rows:
        cells = [f"{metrics[m]:.4f}" + (f" [{ci[m][0]:.3f}, {ci[m][1]:.3f}]" if ci.get(m) else "")
                 for m in METRIC_NAMES]
        lines.append(f"{run[:32]:<32} {d:<4} " + " ".join(f"{c:>22}" for c in cells))
    for d, diff in (paired or {}).items():
        lines.append(f"\n{names[1]} - {names[0]}, {DIRECTION_WORDS[d]}, the same queries paired:")
        for m, v in diff.items():
            lo, hi = v["ci95"]
            verdict = "" if lo <= 0 <= hi else "  (the interval excludes 0)"
            lines.append(f"  {m:<7} {v['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]{verdict}")
    return "\n".join(lines)
