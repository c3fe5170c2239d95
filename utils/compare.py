"""Comparing evaluated runs: their metrics side by side, and for two runs scored on the same
captions, the difference with a paired bootstrap interval (postprocessing/compare_runs.py).

Text -> audio has one relevant clip per caption, so each caption's values follow from the rank
of its clip in `<run>/{split}.t2a_ranks.csv`: AP@10 = 1/rank within the top 10 (else 0),
R@k = [rank <= k]. Their means are the metrics of metrics.json, exactly.
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
class T2aRanks:
    tids: list[str]
    fnames: list[str]    # each caption's own clip: the bootstrap resamples clips
    ranks: np.ndarray    # int64 [Q]


def read_t2a_ranks(run_dir: str | Path, split: str) -> T2aRanks:
    path = Path(run_dir) / f"{split}.t2a_ranks.csv"
    if not path.is_file():
        raise UserError(f"{path}: not found — run postprocessing/02_xmodal_retrieval.py on "
                        f"{run_dir} (with split '{split}' in eval.splits)")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        ranks = np.array([int(r["rank"]) for r in rows], dtype=np.int64)
        return T2aRanks([r["tid"] for r in rows], [r["fname"] for r in rows], ranks)
    except (KeyError, ValueError, TypeError, csv.Error) as e:
        raise UserError(f"{path}: not a t2a ranks file ({e}) — rerun "
                        "postprocessing/02_xmodal_retrieval.py") from None


def t2a_per_query(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """{metric: float64 [Q]} of each caption, from the rank of its one relevant clip."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {"mAP@10": np.where(ranks <= 10, 1.0 / ranks, 0.0)}
    out.update({f"R@{k}": (ranks <= k).astype(np.float64) for k in (1, 5, 10)})
    return {name: out[name] for name in METRIC_NAMES}


def paired_t2a_difference(a: T2aRanks, b: T2aRanks, where: str = "") -> dict[str, dict]:
    """{metric: {"a", "b", "difference", "ci95"}}: b minus a over the same captions, with a 95%
    bootstrap interval of the difference resampling clips (each caption paired with itself:
    far narrower than comparing the two runs' own intervals)."""
    if a.tids != b.tids:
        raise UserError(f"{where}: the two runs were scored on different captions (other "
                        "features or splits): a paired comparison needs the same ones")
    va, vb = t2a_per_query(a.ranks), t2a_per_query(b.ranks)
    diffs = {m: vb[m] - va[m] for m in METRIC_NAMES}
    ci = bootstrap_ci(diffs, np.unique(a.fnames, return_inverse=True)[1], CI_RESAMPLES, CI_SEED)
    return {m: {"a": float(va[m].mean()), "b": float(vb[m].mean()),
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


def format_comparison(rows, split: str, paired: dict | None = None, names=("A", "B")) -> str:
    """The plain-text table compare_runs.py prints."""
    lines = [f"split {split}: metric (95% CI over clips)",
             f"{'run':<32} {'dir':<4} " + " ".join(f"{m:>22}" for m in METRIC_NAMES)]
    for run, d, metrics, ci in rows:
        cells = [f"{metrics[m]:.4f}" + (f" [{ci[m][0]:.3f}, {ci[m][1]:.3f}]" if ci.get(m) else "")
                 for m in METRIC_NAMES]
        lines.append(f"{run[:32]:<32} {d:<4} " + " ".join(f"{c:>22}" for c in cells))
    if paired:
        lines.append(f"\n{names[1]} - {names[0]}, text -> audio, the same captions paired:")
        for m, v in paired.items():
            lo, hi = v["ci95"]
            verdict = "" if lo <= 0 <= hi else "  (the interval excludes 0)"
            lines.append(f"  {m:<7} {v['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]{verdict}")
    return "\n".join(lines)
