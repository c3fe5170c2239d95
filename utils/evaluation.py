"""Evaluation of a trained run: score matrices, metrics in both directions, retrieval files,
and ranking of new clips / captions (challenge submission, free-text queries).

Ranking rule everywhere (as utils.metrics): highest score first; equal scores keep the lower
clip index first. So the top-10 lists, the rank CSVs and the metrics always agree.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from utils.devices import resolve_device
from utils.errors import UserError
from utils.io_utils import atomic_open, atomic_path
from utils.metrics import (METRIC_NAMES, chance_metrics, rank_of_first_relevant, recall_curve,
                           retrieval_metrics)
from utils.scores_db import ScoredSplit, file_sha1

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

def split_metrics(s: ScoredSplit) -> dict[str, dict[str, float]]:
    """{"t2a": {...}, "a2t": {...}}: text->audio (one relevant clip per caption) and
    audio->text (every caption of the clip is relevant), utils.metrics' definitions."""
    rel = s.relevance()
    return {"t2a": retrieval_metrics(s.scores, rel),
            "a2t": retrieval_metrics(np.ascontiguousarray(s.scores.T), np.ascontiguousarray(rel.T))}


def split_recall_curves(s: ScoredSplit, max_k: int = 10) -> dict[str, list[float]]:
    """{"t2a": [R@1..R@max_k], "a2t": [...]} for utils.plots.plot_recall_curves."""
    rel = s.relevance()
    return {"t2a": recall_curve(s.scores, rel, max_k).tolist(),
            "a2t": recall_curve(np.ascontiguousarray(s.scores.T), np.ascontiguousarray(rel.T),
                                max_k).tolist()}


def t2a_ranks(s: ScoredSplit) -> np.ndarray:
    """1-based rank of each caption's own clip, int64 `[Q]`."""
    return rank_of_first_relevant(s.scores, s.relevance())


def split_chance(s: ScoredSplit) -> dict[str, dict[str, float]]:
    """The chance level of each direction (expected metrics of a random ranking)."""
    rel = s.relevance()
    return {"t2a": chance_metrics(rel), "a2t": chance_metrics(rel.T)}


def format_table(metrics: dict[str, dict[str, dict[str, float]]],
                 chance: dict[str, dict[str, dict[str, float]]] | None = None) -> str:
    """A plain-text table: one line per split and direction (plus its chance level if given)."""
    lines = [f"{'split':<12} {'dir':<4} " + " ".join(f"{m:>7}" for m in METRIC_NAMES)]
    for split, by_dir in metrics.items():
        for d in DIRECTIONS:
            lines.append(f"{split:<12} {d:<4} " + " ".join(f"{by_dir[d][m]:7.4f}" for m in METRIC_NAMES))
            if chance and split in chance:
                lines.append(f"{'  (chance)':<12} {d:<4} "
                             + " ".join(f"{chance[split][d][m]:7.4f}" for m in METRIC_NAMES))
    return "\n".join(lines)


def flat_metrics(metrics: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """{"<split>/<dir>_<metric>": value} for wandb."""
    return {f"{split}/{d}_{m}": v for split, by_dir in metrics.items()
            for d, vals in by_dir.items() for m, v in vals.items()}


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
    metrics: dict[str, dict[str, float]]
    curves: dict[str, list[float]]
    ranks: np.ndarray        # int64 [Q]
    top: np.ndarray          # int64 [Q, k]


def evaluate_split(s: ScoredSplit, top_k: int = 10, max_k: int = 10) -> SplitResult:
    """Metrics, recall curves, t2a ranks and top-k clips of one split's matrix."""
    return SplitResult(split=s.split, metrics=split_metrics(s), curves=split_recall_curves(s, max_k),
                       ranks=t2a_ranks(s), top=top_k_indices(s.scores, top_k))


def write_split_files(run_dir: str | Path, s: ScoredSplit, r: SplitResult, top_k: int = 10
                      ) -> list[Path]:
    """`<run>/{split}.t2a_retrieval.csv` and `<run>/{split}.t2a_ranks.csv`."""
    run_dir = Path(run_dir)
    return [write_retrieval_csv(run_dir / f"{s.split}.t2a_retrieval.csv", s.captions, s.fnames,
                                r.top, top_k),
            write_ranks_csv(run_dir / f"{s.split}.t2a_ranks.csv", s, r.ranks)]


# --------------------------------------------------------------------------- new clips and captions

@torch.no_grad()
def encode_sentence_embeddings(model, embeds: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    """model.text_branch on raw sentence embeddings float `[N, D]` -> float32 `[N, E]`."""
    in_dim = model.text_enc.in_dim
    if embeds.ndim != 2 or embeds.shape[1] != in_dim:
        raise UserError(f"the sentence model gives {embeds.shape[-1]}-d embeddings but the run's "
                        f"text encoder expects {in_dim}-d (config key 'sbert.model' must be the one "
                        "the run was trained with)")
    model.eval()
    parts = []
    for s in range(0, len(embeds), batch_size):
        x = torch.as_tensor(embeds[s:s + batch_size], dtype=torch.float32, device=device)
        parts.append(model.text_branch(x).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, model.text_enc.out_dim), np.float32)


def embed_texts(cfg: dict, model, texts: list[str], device: str) -> np.ndarray:
    """Captions -> the run's sentence model (same code as preprocessing 03) -> text_branch."""
    from utils.sbert import encode_captions, load_sentence_model

    sbert = load_sentence_model(cfg["sbert"]["model"], cfg["sbert"]["device"])
    raw = encode_captions(sbert, texts, cfg["sbert"]["batch_size"])
    return encode_sentence_embeddings(model, raw, cfg["eval"]["batch_size"], device)


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


@dataclass
class EncodedAudio:
    fnames: list[str]             # the clips that were encoded, in order
    embeds: np.ndarray            # float32 [C, E]
    bad: list[tuple[str, str]]    # (file name, reason) of unusable files


@torch.no_grad()
def encode_audio_files(model, files: Sequence[Path], features_cfg: dict, device: str,
                       skip_bad: bool, amp: str = "off") -> EncodedAudio:
    """Log-mel every file (utils.audio_utils, as preprocessing 02) and run audio_branch on it.

    All files are read first: unusable ones (missing, empty, unreadable) stop with one line
    listing every one of them, unless `skip_bad`, which drops and returns them in `.bad`.
    One clip per forward pass: clips have different lengths and padding would change the
    encoder's mean/max pooling.
    """
    from utils.audio_utils import AudioError, load_audio, log_mel
    from utils.data_utils import inference_autocast

    feats, names, bad = [], [], []
    for path in tqdm(files, desc="log-mel", unit="clip"):
        try:
            y, sr = load_audio(path)
        except AudioError as e:
            bad.append((path.name, e.reason + (f": {e.detail}" if e.detail else "")))
            continue
        feats.append(log_mel(y, sr, features_cfg["window_s"], features_cfg["hop_s"],
                             features_cfg["n_mels"]))
        names.append(path.name)
    if bad and not skip_bad:
        listed = "; ".join(f"{n} ({why})" for n, why in bad[:20]) + (" ..." if len(bad) > 20 else "")
        raise UserError(f"{Path(files[0]).parent}: {len(bad)} unusable audio file(s): {listed} "
                        "(set data.skip_bad_audio=true to skip them)")
    if not feats:
        raise UserError(f"{Path(files[0]).parent}: none of the {len(files)} audio files is usable")
    model.eval()
    out = []
    for x in tqdm(feats, desc="encode audio", unit="clip"):
        with inference_autocast(device, amp):
            out.append(model.audio_branch(torch.from_numpy(x)[None].to(device)).float().cpu().numpy())
    return EncodedAudio(fnames=names, embeds=np.concatenate(out).astype(np.float32), bad=bad)


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
    """Identity of a checkpoint for caches: sha1 of the file."""
    return file_sha1(checkpoint_file)


def save_clip_cache(run_dir: str | Path, split: str, fnames: Sequence[str], fids: Sequence[str],
                    embeds: np.ndarray, key: str) -> Path:
    path = cache_path(run_dir, split)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, fnames=np.array(fnames, dtype=str), fids=np.array(fids, dtype=str),
                     embeds=np.asarray(embeds, dtype=np.float32), checkpoint_sha1=np.array(key))
    return path


def load_clip_cache(run_dir: str | Path, split: str, key: str):
    """(fnames, fids, embeds) from the cache if it was made by checkpoint `key`, else None."""
    path = cache_path(run_dir, split)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["checkpoint_sha1"]) != key:
                return None  # stale: another checkpoint made it
            return list(z["fnames"]), list(z["fids"]), z["embeds"].astype(np.float32)
    except (OSError, ValueError, KeyError):
        return None  # unreadable cache: recompute


def rank_clips(query: np.ndarray, clip_embeds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k clips of queries `[N, E]` against clips `[C, E]` -> (indices [N, k], scores [N, k])."""
    scores = score_matrix(query, clip_embeds)
    idx = top_k_indices(scores, k)
    return idx, np.take_along_axis(scores, idx, axis=1)

