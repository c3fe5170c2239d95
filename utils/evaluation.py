"""Evaluation of a trained run: score matrices, metrics in both directions, retrieval files,
and ranking of new clips / captions (challenge submission, free-text queries).

Ranking rule everywhere (as utils.metrics): highest score first; equal scores keep the lower
clip index first. So the top-10 lists, the rank CSVs and the metrics always agree.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from utils.errors import UserError, raise_if_stopped
from utils.io_utils import atomic_cache_path, atomic_open, file_sha1
from utils.provenance import git_state
from utils.metrics import (ANY_NAMES, METRIC_NAMES, Ranking, bootstrap_ci, chance_metrics,
                           chance_recall_any, chance_recall_any_curve, chance_recall_curve,
                           evaluate_ranking, recall_any_per_query)
from utils.scores_db import ScoredSplit

DIRECTIONS = ("t2a", "a2t")
CHUNK_ELEMENTS = 1 << 22  # matrix elements handled at once by top_k_indices


# --------------------------------------------------------------------------- devices, model

def checkpoint_epoch(path: str | Path) -> int | None:
    """The `epoch` entry of a checkpoint, read without loading its tensors (mmap)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: load_trained_model reports it properly
        return None
    epoch = state.get("epoch") if isinstance(state, dict) else None
    return int(epoch) if isinstance(epoch, (int, np.integer)) else None


# --------------------------------------------------------------------------- scores

def score_matrix(text: np.ndarray, audio: np.ndarray) -> np.ndarray:
    """float32 `[Q, C]` = text `[Q, E]` @ audio `[C, E]`.T (embeddings are L2-normalised)."""
    text = np.asarray(text, dtype=np.float32)
    audio = np.asarray(audio, dtype=np.float32)
    if text.ndim != 2 or audio.ndim != 2 or text.shape[1] != audio.shape[1]:
        raise ValueError(f"embeddings must be [Q, E] and [C, E], got {text.shape} and {audio.shape}")
    return text @ audio.T


def scored_split(emb) -> ScoredSplit:
    """A utils.data_utils.SplitEmbeddings -> its ScoredSplit (empty splits are an error)."""
    q, c = len(emb.tids), len(emb.fids)
    if q == 0 or c == 0:
        raise UserError(f"split '{emb.split}': {q} captions and {c} clips; nothing to score "
                        f"(is {emb.split}_text.csv empty?)")
    return ScoredSplit(split=emb.split, fids=list(emb.fids), fnames=list(emb.fnames),
                       tids=list(emb.tids), captions=list(emb.captions),
                       caption_clip=np.asarray(emb.caption_clip, dtype=np.int64),
                       scores=score_matrix(emb.text, emb.audio))


# --------------------------------------------------------------------------- metrics

def split_rankings(s: ScoredSplit, max_k: int = 10) -> dict[str, Ranking]:
    """{"t2a": Ranking, "a2t": Ranking} of one split: text->audio (captions query the clips, one
    relevant clip each) and audio->text (clips query the captions, all of the clip's relevant)."""
    rel = s.relevance()
    return {"t2a": evaluate_ranking(s.scores, rel, max_k),
            "a2t": evaluate_ranking(np.ascontiguousarray(s.scores.T), np.ascontiguousarray(rel.T),
                                    max_k)}


def _direction_metrics(rankings: dict[str, Ranking]) -> dict[str, dict[str, float]]:
    # t2a has one relevant clip per caption: its R@k_any would repeat R@k, so only a2t gets it
    return {"t2a": dict(rankings["t2a"].metrics),
            "a2t": {**rankings["a2t"].metrics, **rankings["a2t"].any}}


def split_metrics(s: ScoredSplit) -> dict[str, dict[str, float]]:
    """{"t2a": {mAP@10, R@1, R@5, R@10}, "a2t": {the same, R@1_any, R@5_any, R@10_any}}
    (utils.metrics' definitions; DEFINITIONS below says what each number is)."""
    return _direction_metrics(split_rankings(s))


def split_recall_curves(s: ScoredSplit, max_k: int = 10) -> dict[str, list[float]]:
    """{"t2a": [R@1..R@max_k], "a2t": [...], "a2t_any": [R@1_any..]} for utils.plots."""
    r = split_rankings(s, max_k)
    return {"t2a": r["t2a"].curve.tolist(), "a2t": r["a2t"].curve.tolist(),
            "a2t_any": r["a2t"].curve_any.tolist()}


def t2a_ranks(s: ScoredSplit) -> np.ndarray:
    """1-based rank of each caption's own clip, int64 `[Q]`."""
    return evaluate_ranking(s.scores, s.relevance()).first


CI_RESAMPLES, CI_SEED = 1000, 0


def split_ci95(s: ScoredSplit, rankings: dict[str, Ranking] | None = None
               ) -> dict[str, dict[str, list[float]]]:
    """{"t2a"|"a2t": {metric: [low, high]}}: 95% bootstrap intervals over the split's clips (a
    caption is resampled with its clip: utils.metrics.bootstrap_ci) of the four metrics, and
    for a2t of R@k_any too."""
    r = rankings or split_rankings(s)
    a2t = {**r["a2t"].per_query, **recall_any_per_query(r["a2t"].first)}
    return {"t2a": bootstrap_ci(r["t2a"].per_query, np.asarray(s.caption_clip), CI_RESAMPLES, CI_SEED),
            "a2t": bootstrap_ci(a2t, np.arange(len(s.fids)), CI_RESAMPLES, CI_SEED)}


def split_chance(s: ScoredSplit) -> dict[str, dict[str, float]]:
    """The chance level of each direction (expected metrics of a random ranking), same keys as
    split_metrics."""
    rel = s.relevance()
    return {"t2a": chance_metrics(rel), "a2t": {**chance_metrics(rel.T), **chance_recall_any(rel.T)}}


def split_chance_curves(s: ScoredSplit, max_k: int = 10) -> dict[str, list[float]]:
    """The chance level of split_recall_curves' lines (same keys), for the plots."""
    rel_t = np.ascontiguousarray(s.relevance().T)  # [C, Q]: a2t
    return {"t2a": chance_recall_curve(s.relevance(), max_k).tolist(),
            "a2t": chance_recall_curve(rel_t, max_k).tolist(),
            "a2t_any": chance_recall_any_curve(rel_t, max_k).tolist()}


# --------------------------------------------------------------------------- metrics.json

# metrics.json: {split: {"t2a": {...}, "a2t": {...}, "chance": {...}, "ranks": {...},
# "counts": {...}}, ..., "definitions": {...}, "provenance": {...}}. The spec's four metrics
# per direction stay floats in [0, 1]; anything else per split lives in sibling keys.
DEFINITIONS_KEY, PROVENANCE_KEY = "definitions", "provenance"
RESERVED_KEYS = (DEFINITIONS_KEY, PROVENANCE_KEY)
DEFINITIONS = {
    "t2a": "text -> audio: each caption is a query; the candidates are the split's clips; the "
           "caption's own clip is its one relevant candidate",
    "a2t": "audio -> text: each clip is a query; the candidates are the split's captions; the "
           "clip's own captions (5 per clip in Clotho) are relevant",
    "ranking": "candidates sorted by score, highest first; equal scores keep the lower candidate "
               "index first",
    "R@k": "relevant candidates in the top k / relevant candidates of the query, mean over "
           "queries (the DCASE 2023 baseline's definition; a2t R@1 is at most 1/5 with 5 "
           "captions per clip)",
    "R@k_any": "a2t only: fraction of queries with at least one relevant candidate in the top k "
               "(CLAP-style audio -> text recall; for t2a it would equal R@k)",
    "mAP@10": "mean over queries of AP@10 = sum over relevant candidates ranked r <= 10 of "
              "(relevant candidates ranked <= r) / r, divided by the number of relevant "
              "candidates (the DCASE 2023 baseline's definition)",
    "chance": "expected value of each metric under a uniformly random ranking",
    "ci95": "95% percentile bootstrap interval of each metric: 1000 resamples (seed 0) of the "
            "split's clips with replacement, each clip with all its captions (t2a) or as itself "
            "(a2t); the spread a different sample of clips would give, for comparing runs",
    "ranks.mean, ranks.median": "1-based rank of the best-ranked relevant candidate of each "
                                "query, mean and median over queries (t2a: the caption's clip; "
                                "a2t: the best-ranked of the clip's own captions)",
    "ranks.queries, ranks.candidates": "queries ranked and candidates per query in that direction",
    "counts": "clips and captions scored in the split; skipped_clips: clips the dataset steps "
              "left out (data.skip_bad_audio), null where not known",
}


def split_counts(r: "SplitResult", skipped_clips: int | None = None) -> dict:
    return {"clips": r.n_clips, "captions": r.n_captions,
            "skipped_clips": None if skipped_clips is None else int(skipped_clips)}


def split_rank_stats(r: "SplitResult") -> dict[str, dict]:
    """{"t2a"|"a2t": {"mean", "median", "queries", "candidates"}} of one split."""
    out = {}
    for d, first, n_cand in (("t2a", r.ranks, r.n_clips), ("a2t", r.a2t_ranks, r.n_captions)):
        first = np.asarray(first)
        out[d] = {"mean": float(first.mean()), "median": float(np.median(first)),
                  "queries": int(len(first)), "candidates": int(n_cand)}
    return out


def metrics_provenance(run_dir: str | Path, meta: dict, results: Sequence["SplitResult"],
                       skipped: dict[str, int | None] | None = None,
                       sbert_model: str | None = None) -> dict:
    """Where the numbers come from: the run, its checkpoint (which, file, epoch, sha1), the
    config hash, the sentence model and the sha1 of its caption embeddings, each split's size
    and input files (sha1 of its log-mels, captions, skip list), the commit of the code that
    trained the run and of the code that scored it, when. `meta` is scores_db.expected_meta's."""
    from utils.provenance import TRAINING_ACTIONS, read_provenance, trained_on
    from utils.scores_db import SPLIT_KEY

    epoch = meta.get("checkpoint_epoch")
    git = git_state()
    # the latest training segment's: a run resumed on newer code wrote its later checkpoints so
    trained = next((e.get("git") or {} for e in reversed(read_provenance(run_dir))
                    if e.get("action", "new") in TRAINING_ACTIONS), {})
    return {
        "run": meta.get("run", Path(run_dir).resolve().name),
        "checkpoint": meta.get("checkpoint"),
        "checkpoint_file": f"checkpoints/{meta.get('checkpoint')}.pt",
        "checkpoint_epoch": int(epoch) if epoch not in (None, "") else None,
        "checkpoint_sha1": meta.get("checkpoint_sha1"),
        "config_sha1": meta.get("config_sha1"),
        "scores": "scores.db",
        "sbert_model": sbert_model,
        "embeddings_sha1": meta.get("embeddings_sha1"),
        "splits": {r.split: split_counts(r, (skipped or {}).get(r.split)) for r in results},
        "split_inputs": {r.split: json.loads(meta[SPLIT_KEY + r.split]) for r in results
                         if SPLIT_KEY + r.split in meta},
        "code": {"commit": git["commit"], "dirty": git["dirty"]},  # the code that scored
        "training_code": {"commit": trained.get("commit"), "dirty": trained.get("dirty")},
        "training_data": trained_on(run_dir),  # provenance.training_data, None if not recorded
        "written": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def metrics_document(results: Sequence["SplitResult"], provenance: dict | None = None,
                     skipped: dict[str, int | None] | None = None) -> dict:
    """The metrics.json document of evaluated splits (see RESERVED_KEYS / DEFINITIONS)."""
    doc: dict = {}
    for r in results:
        doc[r.split] = {"t2a": r.metrics["t2a"], "a2t": r.metrics["a2t"], "chance": r.chance,
                        "ci95": r.ci95, "ranks": split_rank_stats(r),
                        "counts": split_counts(r, (skipped or {}).get(r.split))}
    doc[DEFINITIONS_KEY] = dict(DEFINITIONS)
    doc[PROVENANCE_KEY] = provenance or {}
    return doc


def metrics_splits(doc: dict) -> dict[str, dict]:
    """{split: its entry} of a metrics.json document (the reserved top-level keys left out)."""
    return {k: v for k, v in doc.items() if k not in RESERVED_KEYS}


def read_metrics_json(path: str | Path) -> dict:
    """A run's metrics.json (`path`: the file, or the run folder), checked: each split holds
    "t2a" and "a2t" dicts with the spec's four metrics as floats in [0, 1]. Older files without
    definitions/provenance are accepted."""
    path = Path(path)
    if path.is_dir():
        from utils.runs import METRICS_JSON

        path = path / METRICS_JSON
    redo = "rerun postprocessing/02_xmodal_retrieval.py"
    if not path.is_file():
        raise UserError(f"{path}: not found — run postprocessing/01_xmodal_scores.py, then 02")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e}) — {redo}") from None
    if not isinstance(doc, dict) or not metrics_splits(doc):
        raise UserError(f"{path}: no split metrics in it — {redo}")
    for split, entry in metrics_splits(doc).items():
        for d in DIRECTIONS:
            vals = entry.get(d) if isinstance(entry, dict) else None
            bad = [m for m in METRIC_NAMES if not isinstance((vals or {}).get(m), (int, float))
                   or not 0.0 <= vals[m] <= 1.0]
            if not isinstance(vals, dict) or bad:
                raise UserError(f"{path}: split '{split}', '{d}': missing or invalid "
                                f"{', '.join(bad) or 'metrics'} — {redo}")
    return doc


def _fmt(value, width: int = 7, digits: int = 4) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:{width}.{digits}f}"


def format_table(metrics: dict, chance: dict | None = None) -> str:
    """A plain-text table: one line per split and direction, its chance level under it, and
    what each column means. `metrics` is a metrics.json document or {split: {"t2a", "a2t"}}
    (then `chance` is {split: split_chance(...)}, optional)."""
    splits = metrics_splits(metrics)
    names = METRIC_NAMES + ANY_NAMES
    with_ranks = any(entry.get("ranks") for entry in splits.values())  # metrics.json has them
    header = (f"{'split':<12} {'dir':<4} " + " ".join(f"{m:>8}" for m in names)
              + (f" {'mean rk':>7} {'med rk':>6} {'queries':>7} {'cands':>6}" if with_ranks else ""))
    prov = metrics.get(PROVENANCE_KEY) or {}
    lines = [f"run {prov['run']}, checkpoint {prov.get('checkpoint')} (epoch "
             f"{prov.get('checkpoint_epoch')})"] if prov.get("run") else []
    lines.append(header)
    for split, entry in splits.items():
        for d in DIRECTIONS:
            ranks = (entry.get("ranks") or {}).get(d, {})
            cells = " ".join(_fmt(entry[d].get(m), 8) for m in names)
            if with_ranks:
                cells += (f" {_fmt(ranks.get('mean'), 7, 1)} {_fmt(ranks.get('median'), 6, 1)} "
                          f"{ranks.get('queries', ''):>7} {ranks.get('candidates', ''):>6}")
            lines.append(f"{split:<12} {d:<4} {cells}")
            by_dir = (entry.get("chance") or (chance or {}).get(split) or {}).get(d)
            if by_dir:
                lines.append(f"{'  (chance)':<12} {d:<4} "
                             + " ".join(_fmt(by_dir.get(m), 8) for m in names))
    lines += ["R@k: relevant items in the top k / relevant items (the DCASE baseline's; for a2t "
              "the share of the clip's captions).",
              "R@k_any: share of queries with any relevant item in the top k (CLAP-style). "
              "mAP@10: the baseline's."]
    if with_ranks:
        lines.append("mean/med rk: 1-based rank of the best-ranked relevant item (a2t: the clip's "
                     "best-ranked caption).")
    return "\n".join(lines)


def flat_metrics(metrics: dict) -> dict[str, float]:
    """{"<split>/<dir>_<metric>": value} for wandb, plus "<split>/<dir>_mean_rank" and
    "_median_rank" when `metrics` is a metrics.json document."""
    out = {}
    for split, entry in metrics_splits(metrics).items():
        for d in DIRECTIONS:
            out.update({f"{split}/{d}_{m}": v for m, v in entry[d].items()})
            for stat in ("mean", "median"):
                value = (entry.get("ranks") or {}).get(d, {}).get(stat)
                if value is not None:
                    out[f"{split}/{d}_{stat}_rank"] = value
    return out


def write_metrics_json(path: str | Path, metrics: dict) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    return Path(path)


# --------------------------------------------------------------------------- ranking

def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """int64 `[Q, min(k, C)]`: each row's best candidates, best first, ties by lower index.

    argpartition finds each row's k-th best value; every candidate above it plus the
    lowest-indexed ones equal to it are the top k (exact under ties), then only those are sorted.
    """
    scores = np.asarray(scores)
    n_q, n_c = scores.shape
    k = min(int(k), n_c)
    out = np.empty((n_q, k), dtype=np.int64)
    if k == 0:
        return out
    step = max(1, CHUNK_ELEMENTS // max(n_c, 1))
    for q0 in range(0, n_q, step):
        block = scores[q0:q0 + step]
        kth = -np.partition(-block, k - 1, axis=1)[:, k - 1:k]       # [b, 1] k-th best value
        above = block > kth
        equal = block == kth
        room = k - above.sum(axis=1, keepdims=True)                  # slots left for ties
        chosen = above | (equal & (np.cumsum(equal, axis=1) <= room))
        idx = np.nonzero(chosen)[1].reshape(len(block), k)           # ascending index per row
        vals = np.take_along_axis(block, idx, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")             # stable: ties keep index order
        out[q0:q0 + len(block)] = np.take_along_axis(idx, order, axis=1)
    return out


def write_retrieval_csv(path: str | Path, captions: Sequence[str], fnames: Sequence[str],
                        top_idx: np.ndarray, k: int = 10) -> Path:
    """`caption,file_name_1,...,file_name_k` (the DCASE submission format); rows with fewer
    than k candidates are padded with empty cells."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["caption"] + [f"file_name_{i}" for i in range(1, k + 1)])
        for caption, row in zip(captions, top_idx.tolist()):
            names = [fnames[j] for j in row[:k]]
            w.writerow([caption] + names + [""] * (k - len(names)))
    return Path(path)


def write_ranks_csv(path: str | Path, s: ScoredSplit, ranks: np.ndarray) -> Path:
    """`tid,caption,fname,rank`: each caption, its own clip and that clip's 1-based rank."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tid", "caption", "fname", "rank"])
        w.writerows(zip(s.tids, s.captions, (s.fnames[c] for c in s.caption_clip.tolist()),
                        np.asarray(ranks).tolist()))
    return Path(path)


@dataclass
class SplitResult:
    split: str
    metrics: dict[str, dict[str, float]]   # split_metrics
    curves: dict[str, list[float]]         # split_recall_curves
    ranks: np.ndarray        # int64 [Q]: rank of each caption's own clip (t2a)
    top: np.ndarray          # int64 [Q, k]: each caption's top clips
    a2t_ranks: np.ndarray    # int64 [C]: rank of each clip's best-ranked own caption (a2t)
    chance: dict[str, dict[str, float]]    # split_chance
    chance_curves: dict[str, list[float]]  # split_chance_curves
    n_clips: int
    n_captions: int
    ci95: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # split_ci95
    a2t_per_clip: dict[str, np.ndarray] = field(default_factory=dict)  # METRIC_NAMES: float64 [C]


def evaluate_split(s: ScoredSplit, top_k: int = 10, max_k: int = 10) -> SplitResult:
    """Metrics, chance level, recall curves, ranks and top-k clips of one split's matrix."""
    r = split_rankings(s, max_k)
    return SplitResult(split=s.split, metrics=_direction_metrics(r),
                       curves={"t2a": r["t2a"].curve.tolist(), "a2t": r["a2t"].curve.tolist(),
                               "a2t_any": r["a2t"].curve_any.tolist()},
                       ranks=r["t2a"].first, top=top_k_indices(s.scores, top_k),
                       a2t_ranks=r["a2t"].first, chance=split_chance(s),
                       chance_curves=split_chance_curves(s, max_k),
                       n_clips=len(s.fids), n_captions=len(s.tids), ci95=split_ci95(s, r),
                       a2t_per_clip=r["a2t"].per_query)


def write_split_files(run_dir: str | Path, s: ScoredSplit, r: SplitResult, top_k: int = 10
                      ) -> list[Path]:
    """`<run>/{split}.t2a_retrieval.csv`, `{split}.t2a_ranks.csv` and `{split}.a2t_per_clip.csv`.
    The retrieval CSV has min(`top_k`, the split's clips) file-name columns: no column that would
    be empty in every row."""
    run_dir = Path(run_dir)
    return [write_retrieval_csv(run_dir / f"{s.split}.t2a_retrieval.csv", s.captions, s.fnames,
                                r.top, min(top_k, len(s.fnames))),
            write_ranks_csv(run_dir / f"{s.split}.t2a_ranks.csv", s, r.ranks),
            write_a2t_per_clip_csv(run_dir / f"{s.split}.a2t_per_clip.csv", s, r)]


def write_a2t_per_clip_csv(path: str | Path, s: ScoredSplit, r: "SplitResult") -> Path:
    """`fid,fname,best_rank,mAP@10,R@1,R@5,R@10`: each clip as an audio -> text query, the rank
    of its best-ranked own caption and its own values of the four metrics (their means are
    metrics.json's a2t; per clip, for paired comparisons of runs: utils.compare)."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fid", "fname", "best_rank", *METRIC_NAMES])
        values = [r.a2t_per_clip[m].tolist() for m in METRIC_NAMES]
        w.writerows([fid, fname, int(best), *(repr(float(v[c])) for v in values)]
                     for c, (fid, fname, best) in enumerate(zip(s.fids, s.fnames, r.a2t_ranks.tolist())))
    return Path(path)


# --------------------------------------------------------------------------- new clips and captions

@torch.no_grad()
def encode_sentence_embeddings(model, embeds: np.ndarray, batch_size: int, device: str,
                               amp: str = "off") -> np.ndarray:
    """model.text_branch on raw sentence embeddings float `[N, D]` -> float32 `[N, E]`."""
    from utils.data_utils import inference_autocast

    in_dim = model.text_enc.in_dim
    if embeds.ndim != 2 or embeds.shape[1] != in_dim:
        raise UserError(f"the sentence model gives {embeds.shape[-1]}-d embeddings but the run's "
                        f"text encoder expects {in_dim}-d (config key 'sbert.model' must be the one "
                        "the run was trained with)")
    model.eval()
    parts = []
    for s in range(0, len(embeds), batch_size):
        x = torch.as_tensor(embeds[s:s + batch_size], dtype=torch.float32, device=device)
        with inference_autocast(device, amp):
            parts.append(model.text_branch(x).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, model.embed_dim), np.float32)


def embed_texts(cfg: dict, model, texts: list[str], device: str, sbert=None) -> np.ndarray:
    """Captions -> the run's sentence model (same code as preprocessing 03) -> text_branch.
    `sbert`: an already loaded sentence model (else sbert.model is loaded for this call)."""
    from utils.sbert import encode_captions, load_sentence_model

    if sbert is None:
        sbert = load_sentence_model(cfg["sbert"]["model"], cfg["sbert"]["device"])
    raw = encode_captions(sbert, list(texts), cfg["sbert"]["batch_size"])
    return encode_sentence_embeddings(model, raw, cfg["eval"]["batch_size"], device,
                                      cfg["eval"]["amp"])


AUDIO_SUFFIXES = (".wav", ".flac")


def list_audio_files(folder: str | Path) -> list[Path]:
    """The audio files of a folder (not recursive), sorted by name; none is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: audio folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in this folder")
    return files


def training_sample_rates(cfg: dict) -> set[int]:
    """The sample rates of a run's training clips (step 02 records each clip's), or an empty
    set where the training features are not at hand."""
    from utils.data_utils import features_dir, logmel_path
    from utils.features import clip_rates

    return set(clip_rates(logmel_path(features_dir(cfg), cfg["data"]["train_split"])))


def file_rate(path: Path) -> int | None:
    """A sound file's sample rate from its header (None if it cannot tell)."""
    import soundfile

    try:
        return int(soundfile.info(str(path)).samplerate)
    except (RuntimeError, OSError):  # read once already; a header it cannot parse is no news
        return None


def other_rates_message(rates: dict[str, int | None], trained: set[int]) -> str | None:
    """Log-mels are taken at each input's own rate, as step 02 takes them: at another rate than
    the training clips' they span other frequencies than the model has seen, which nothing
    else would say. `rates`: {input name: its rate}; None when all are at a training rate."""
    other = {name: sr for name, sr in rates.items() if sr is not None and trained and sr not in trained}
    if not other:
        return None
    name, sr = next(iter(other.items()))
    want = " or ".join(f"{r} Hz" for r in sorted(trained))
    return (f"{len(other)} of {len(rates)} audio inputs are not at {want}, the rate of the "
            f"training clips ({name}: {sr} Hz); their log-mels cover other frequencies than the "
            f"model was trained on: resample them to {want} for comparable scores")


def read_caption_csv(path: str | Path, column: str = "caption") -> list[str]:
    """The `caption` column of a retrieval captions CSV (e.g. retrieval_captions.csv)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: captions CSV not found")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            if column not in fields:
                raise UserError(f"{path}: no '{column}' column (columns found: "
                                f"{', '.join(fields) if fields else 'none'})")
            if fields.count(column) > 1:  # DictReader would keep the last one's value, silently
                raise UserError(f"{path}: {fields.count(column)} columns are named '{column}'; "
                                "keep one")
            reader.fieldnames = fields
            captions = []
            for line, row in enumerate(reader, start=2):
                text = (row.get(column) or "").strip()
                if not text:
                    raise UserError(f"{path}, line {line}: empty caption")
                captions.append(text)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    if not captions:
        raise UserError(f"{path}: no captions (only a header)")
    return captions


def waveform_logmel(y: np.ndarray, sr: int, features_cfg: dict) -> np.ndarray:
    """A mono waveform -> float32 log-mel `[T, n_mels]`, exactly as preprocessing 02 computes it
    (utils.audio_utils.log_mel with the run's features.*). Raises ValueError when there is none
    (e.g. a sample rate too low for the window) or it is not finite."""
    from librosa.util.exceptions import LibrosaError

    from utils.audio_utils import log_mel

    try:
        x = log_mel(np.asarray(y, dtype=np.float32), int(sr), features_cfg["window_s"],
                    features_cfg["hop_s"], features_cfg["n_mels"])
    except (ArithmeticError, LibrosaError) as e:
        raise ValueError(str(e) or type(e).__name__) from None
    if not np.isfinite(x).all():
        raise ValueError("the log-mel holds NaN/inf")
    return x


def file_logmels(files: Sequence[Path], features_cfg: dict, progress: bool = True
                 ) -> tuple[list[np.ndarray], list[Path], list[tuple[str, str]]]:
    """Read and log-mel every file: (log-mels `[T_i, F]`, their files, (name, reason) of the
    unusable ones: missing, empty, unreadable, non-finite, no log-mel)."""
    from utils.audio_utils import AudioError, load_audio

    feats, good, bad = [], [], []
    for path in tqdm(files, desc="log-mel", unit="clip", disable=not progress or len(files) < 2):
        raise_if_stopped()
        path = Path(path)
        try:
            y, sr = load_audio(path)
            feats.append(waveform_logmel(y, sr, features_cfg))
        except AudioError as e:
            bad.append((path.name, e.reason + (f": {e.detail}" if e.detail else "")))
            continue
        except ValueError as e:
            bad.append((path.name, f"no log-mel: {str(e).strip().splitlines()[0] if str(e) else ''}"))
            continue
        good.append(path)
    return feats, good, bad


@torch.no_grad()
def encode_logmels(model, feats: Sequence[np.ndarray], batch_size: int, device,
                   amp: str = "off", progress: bool = True) -> np.ndarray:
    """model.audio_branch on log-mels `[T_i, F]` -> float32 `[N, E]`, in the input order.

    Clips of similar length share a batch, padded to its longest clip with the padding masked
    out (data_utils.clip_batches, as scoring does), so a clip's embedding never depends on its
    neighbours."""
    from utils.data_utils import clip_batches, inference_autocast

    model.eval()
    out = np.zeros((len(feats), model.embed_dim), dtype=np.float32)  # the joint space's E
    batches = clip_batches([len(x) for x in feats], batch_size, device)
    for idx in tqdm(batches, desc="encode audio", unit="batch",
                    disable=not progress or len(batches) < 2):
        raise_if_stopped()
        lengths = [len(feats[i]) for i in idx]
        x = np.zeros((len(idx), max(lengths), feats[idx[0]].shape[1]), dtype=np.float32)  # [B, T, F]
        for b, i in enumerate(idx):
            x[b, :lengths[b]] = feats[i]
        with inference_autocast(device, amp):
            emb = model.audio_branch(torch.from_numpy(x).to(device), torch.tensor(lengths, device=device))
        out[idx] = emb.float().cpu().numpy()
    return out


@dataclass
class EncodedAudio:
    fnames: list[str]             # the clips that were encoded, in order
    embeds: np.ndarray            # float32 [C, E]
    bad: list[tuple[str, str]]    # (file name, reason) of unusable files


def encode_audio_files(model, files: Sequence[Path], features_cfg: dict, device: str,
                       skip_bad: bool, amp: str, batch_size: int) -> EncodedAudio:
    """Log-mel every file (as preprocessing 02) and run audio_branch on it (encode_logmels).

    All files are read first: unusable ones (missing, empty, unreadable, non-finite, no log-mel)
    stop with one line listing every one of them, unless `skip_bad`, which drops and returns them
    in `.bad`.
    """
    feats, good, bad = file_logmels(files, features_cfg)
    if bad and not skip_bad:
        listed = "; ".join(f"{n} ({why})" for n, why in bad[:20]) + (" ..." if len(bad) > 20 else "")
        raise UserError(f"{Path(files[0]).parent}: {len(bad)} unusable audio file(s): {listed} "
                        "(set data.skip_bad_audio=true to skip them)")
    if not feats:
        raise UserError(f"{Path(files[0]).parent}: none of the {len(files)} audio files is usable")
    return EncodedAudio(fnames=[p.name for p in good],
                        embeds=encode_logmels(model, feats, batch_size, device, amp), bad=bad)


def write_skipped_report(path: str | Path, bad: list[tuple[str, str]]) -> Path:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fname", "reason"])
        w.writerows(bad)
    return Path(path)


# --------------------------------------------------------------------------- clip-embedding cache

def cache_path(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / "cache" / f"{split}_clip_embeds.npz"


def checkpoint_key(checkpoint_file: str | Path) -> str:
    """Identity of a checkpoint for caches: sha1 of the file (once per version of it: a
    notebook builds Retrievers again and again)."""
    return file_sha1(checkpoint_file)


def save_clip_cache(run_dir: str | Path, split: str, fnames: Sequence[str], fids: Sequence[str],
                    embeds: np.ndarray, key: str) -> Path:
    path = cache_path(run_dir, split)
    with atomic_cache_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, fnames=np.array(fnames, dtype=str), fids=np.array(fids, dtype=str),
                     embeds=np.asarray(embeds, dtype=np.float32), checkpoint_sha1=np.array(key))
    return path


def load_clip_cache(run_dir: str | Path, split: str, key: str, dim: int | None = None):
    """(fnames, fids, embeds float32 `[C, E]`) from the cache if it was made by checkpoint `key`
    (and E == `dim` when given), else None: the caller recomputes it.

    The file is checked, not trusted: another checkpoint's, an older layout, a crafted or
    truncated file, wrong keys, shapes or dtypes, NaN/inf all count as no cache.
    """
    path = cache_path(run_dir, split)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:  # a .npy (no context manager) -> TypeError
            if not isinstance(z, np.lib.npyio.NpzFile) or not {
                    "checkpoint_sha1", "fnames", "fids", "embeds"} <= set(z.files):
                return None
            stored_key, fnames, fids, embeds = (z["checkpoint_sha1"], z["fnames"], z["fids"],
                                                z["embeds"])
    except Exception:  # np.load of a crafted file fails in many ways; each means "recompute"
        return None
    if stored_key.shape != () or str(stored_key) != key:
        return None  # stale: another checkpoint made it
    n = len(fnames) if fnames.ndim == 1 else -1
    if (fnames.dtype.kind != "U" or fids.dtype.kind != "U" or fids.shape != (n,) or n == 0
            or embeds.dtype.kind != "f" or embeds.ndim != 2 or embeds.shape[0] != n
            or (dim is not None and embeds.shape[1] != dim) or not np.isfinite(embeds).all()):
        return None
    return fnames.tolist(), fids.tolist(), embeds.astype(np.float32)


def rank_clips(query: np.ndarray, clip_embeds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k clips of queries `[N, E]` against clips `[C, E]` -> (indices [N, k], scores [N, k])."""
    scores = score_matrix(query, clip_embeds)
    idx = top_k_indices(scores, k)
    return idx, np.take_along_axis(scores, idx, axis=1)

