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
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.config import flat_config, load_run_config
from utils.errors import UserError
from utils.evaluation import CI_RESAMPLES, CI_SEED, checkpoint_key, metrics_splits, read_metrics_json
from utils.metrics import METRIC_NAMES, bootstrap_ci
from utils.runs import checkpoint_path


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


def default_split(run_dirs: list[Path]) -> str:
    """The split compared when none is named: the last of the first run's eval.splits that
    every run evaluates (Clotho's evaluation split)."""
    splits = [load_run_config(run)["eval"]["splits"] for run in run_dirs]
    common = [s for s in splits[0] if all(s in other for other in splits[1:])]
    if not common:
        listed = "; ".join(f"{run.name}: {', '.join(s)}" for run, s in zip(run_dirs, splits))
        raise UserError(f"the runs evaluate no split in common (eval.splits of {listed}); "
                        "name one with --split")
    return common[-1]


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


MAX_DIFFERENCES = 12  # config keys named in the text output (--json lists every one)


def describe_runs(run_dirs: list[Path]) -> list[dict]:
    """What each run's numbers are of: its checkpoint and epoch, and the commit that trained it
    (metrics.json's provenance)."""
    out = []
    for run in run_dirs:
        prov = read_metrics_json(run).get("provenance") or {}
        out.append({"run": run.name, "checkpoint": prov.get("checkpoint"),
                    "checkpoint_epoch": prov.get("checkpoint_epoch"),
                    "training_commit": (prov.get("training_code") or {}).get("commit")})
    return out


def config_differences(run_dirs: list[Path]) -> dict[str, list]:
    """{dotted key: [value in each run]} for the keys of the runs' config.yaml that differ
    (wandb.* aside: it does not change a number)."""
    flat = [flat_config(load_run_config(run)) for run in run_dirs]
    keys = sorted(set().union(*flat))
    return {k: [f.get(k) for f in flat] for k in keys
            if not k.startswith("wandb.") and any(f.get(k) != flat[0].get(k) for f in flat)}


def input_warnings(run_dirs: list[Path], split: str) -> list[str]:
    """Where the runs' numbers of `split` were computed from different inputs (metrics.json's
    provenance): other files of the split, or other caption embeddings. Differences of the
    metrics then mix the models with the data."""
    provs = [read_metrics_json(run).get("provenance") or {} for run in run_dirs]
    warnings = []
    inputs = [(p.get("split_inputs") or {}).get(split) for p in provs]
    if all(isinstance(i, dict) for i in inputs):
        kinds = sorted({k for i in inputs for k in i if any(j.get(k) != i.get(k) for j in inputs)})
        if kinds:
            warnings.append(f"the runs were scored on different {', '.join(kinds)} files of split "
                            f"'{split}': their differences are not the models' alone")
    sha1s = [p.get("embeddings_sha1") for p in provs]
    if None not in sha1s and len(set(sha1s)) > 1:
        warnings.append("the runs were scored with different caption embeddings "
                        "(text_encoder.embeddings, or another sbert.model)")
    warnings += [w for run, p in zip(run_dirs, provs) if (w := _replaced_checkpoint(run, p))]
    counts = [sorted(set(_process_counts(run))) for run in run_dirs]  # a resume adds a segment
    if all(counts) and len({tuple(c) for c in counts}) > 1:
        listed = "; ".join(f"{run.name}: {', '.join(map(str, c))}" for run, c in zip(run_dirs, counts))
        warnings.append(f"the runs were trained with different numbers of processes ({listed}): "
                        "BatchNorm normalised other shares of the batch, and the batches differ")
    return warnings


def _replaced_checkpoint(run: Path, prov: dict) -> str | None:
    """A warning when the checkpoint that metrics.json scored is no longer the run's (a resume
    replaced best.pt since): its numbers would pass for the run's as its config.yaml now reads."""
    which, scored = prov.get("checkpoint"), prov.get("checkpoint_sha1")
    if which not in ("best", "last") or not scored:
        return None
    ckpt = checkpoint_path(run, which)
    if ckpt.is_file() and ckpt.stat().st_mtime <= (run / "metrics.json").stat().st_mtime:
        return None  # written before its scores: no ~1 GB hash on every comparison
    now = checkpoint_key(ckpt) if ckpt.is_file() else None
    if now == scored:
        return None
    what = "has since been replaced" if now else "is gone"
    return (f"{run.name}: metrics.json scored {which}.pt of epoch {prov.get('checkpoint_epoch')}, "
            f"which {what}: its numbers are not the run's now — rerun "
            f"postprocessing/01_xmodal_scores.py --run {_arg(run)} --overwrite, then "
            # with --run: without it, 02 evaluates the newest run of conf.yaml's output_dir
            f"postprocessing/02_xmodal_retrieval.py --run {_arg(run)}")


def _arg(path: Path) -> str:
    return shlex.quote(str(path))


def _process_counts(run: Path) -> list[int]:
    """The process counts (torchrun's world size) of a run's training segments, in order
    (provenance.json; [] where it recorded none, e.g. an imported run)."""
    from utils.provenance import read_provenance

    return [int(e.get("world_size", 1)) for e in read_provenance(run) if e.get("action") in ("new", "resume")]


DIRECTION_WORDS = {"t2a": "text -> audio", "a2t": "audio -> text"}


def format_runs(described: list[dict], differences: dict[str, list], warnings: list[str]) -> str:
    """The lines compare_runs.py prints above the table: each run's checkpoint, the config
    keys in which the runs differ, and the warnings."""
    lines = []
    for d in described:
        commit = (d["training_commit"] or "")[:10] or "not recorded"
        lines.append(f"{d['run']}: checkpoint {d['checkpoint']} (epoch {d['checkpoint_epoch']}), "
                     f"trained by commit {commit}")
    if differences:
        lines.append("config differences: " + "; ".join(
            f"{k} ({' | '.join(map(repr, v))})" for k, v in list(differences.items())[:MAX_DIFFERENCES])
            + (f"; and {len(differences) - MAX_DIFFERENCES} more (--json lists them all)"
               if len(differences) > MAX_DIFFERENCES else ""))
    else:
        lines.append("config differences: none")
    lines += [f"warning: {w}" for w in warnings]
    return "\n".join(lines)


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
