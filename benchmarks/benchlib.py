"""Pieces the benchmark scripts share: the original code's loss, a Clotho-shaped feature set,
and the data loader's throughput. Not part of the library: nothing under utils/ imports it.

`python benchmarks/<script>.py` puts this folder on sys.path, so the scripts import it as
`benchlib`.
"""
from __future__ import annotations

import csv
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from utils.io_utils import save_pickle

# Clotho v2.1: clips of 15-30 s at a 20 ms hop -> 751-1501 frames; 5 captions per clip
CLOTHO_CLIPS = {"development": 3839, "validation": 1045, "evaluation": 1045}
MIN_FRAMES, MAX_FRAMES = 751, 1501
NAMESPACE = uuid.UUID("2b0e5c9e-8a55-4c61-9d5e-5f1f6c0b7a13")


def original_infonce(audio: torch.Tensor, text: torch.Tensor, fids: list, temperature: float = 0.07
                     ) -> torch.Tensor:
    """The original code's loss, as it computes it: a Python loop over the batch; for each pair
    the candidates (itself and every pair of another clip) are gathered, scored with one matmul
    per direction, and a float target built on the device from a Python list feeds
    cross_entropy. The reference that utils.criterion_utils.LogSoftmaxLoss (one masked matrix)
    replaces; both give the same value."""
    n = audio.shape[0]
    loss = torch.zeros((), device=audio.device)
    for i in range(n):
        candidates = [j for j in range(n) if fids[j] != fids[i]] + [i]
        audio_vs_caption_i = audio[candidates] @ text[i] / temperature      # (N')
        clip_i_vs_captions = text[candidates] @ audio[i] / temperature      # (N')
        target = torch.as_tensor([float(j == i) for j in candidates], device=audio.device)
        loss = loss + F.cross_entropy(audio_vs_caption_i, target) + F.cross_entropy(clip_i_vs_captions, target)
    return loss / n


@torch.no_grad()
def embed_per_length(model, dataset, batch_size: int, device) -> np.ndarray:
    """The clip embeddings as encode_audio computed them before padded batches were masked
    (the reference): unpadded batches of clips of exactly the same length, one or more per
    distinct length (Clotho's 1045 validation clips: 581), each clip read in this process.
    `dataset`: a utils.data_utils.ClipDataset -> float32 `[C, E]`."""
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(dataset.lengths):
        by_length.setdefault(int(n), []).append(i)
    was_training = model.training
    model.eval()
    out = []
    for idx in by_length.values():
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size]
            audio = torch.stack([dataset[i][0] for i in part]).to(device)  # [B, T, 64]
            out.append((part, model.audio_branch(audio).float()))
    model.train(was_training)
    emb = np.empty((len(dataset), out[0][1].shape[1]), dtype=np.float32)
    for part, e in out:
        emb[part] = e.cpu().numpy()
    return emb


def batch_max_lengths(rng: np.random.Generator, steps: int, batch: int = 32) -> list[int]:
    """The padded length of `steps` batches of whole clips: the longest of `batch` lengths drawn
    uniformly from Clotho's 751-1501 frames (what collate_pad gives a shuffled epoch)."""
    return [int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1, batch).max()) for _ in range(steps)]


def make_clotho_features(root: Path, clips: dict[str, int] = CLOTHO_CLIPS, embed_dim: int = 768,
                         captions_per_clip: int = 5, seed: int = 0) -> Path:
    """Write step 01-03 outputs of a Clotho-shaped set into `root` (random log-mels of 751-1501
    frames, random sentence embeddings): what main.py and the loaders read. Returns `root`."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    embeds, info = {}, {"audio_fid2fname": {}, "audio_durations": {}}
    for split, n in clips.items():
        fid2fname, durations = {}, []
        with h5py.File(root / f"{split}_audio_logmels.hdf5", "w") as h5, \
                open(root / f"{split}_text.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["tid", "fid", "fname", "raw_text", "text", "tokens"])
            for i in range(n):
                fname = f"{split}_{i:05d}.wav"
                fid = uuid.uuid5(NAMESPACE, f"{split}/{fname}").hex
                frames = int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1))
                h5[fid] = rng.standard_normal((frames, 64), dtype=np.float32) - 5  # (T, F)
                fid2fname[fid] = fname
                durations.append(frames * 0.02)
                for c in range(captions_per_clip):
                    tid = uuid.uuid5(NAMESPACE, f"{fid}/{c + 1}").hex
                    writer.writerow([tid, fid, fname, f"caption {c} of {fname}",
                                     f"caption {c} of {fname}", f"caption {c} of {fname}"])
                    embeds[tid] = rng.standard_normal(embed_dim, dtype=np.float32)
        info["audio_fid2fname"][split] = fid2fname
        info["audio_durations"][split] = durations
    save_pickle(embeds, root / "sbert_embeds.pkl")
    save_pickle(info, root / "audio_info.pkl")
    return root


def loader_throughput(dataset, workers: int, batches: int, batch_size: int = 32,
                      pin_memory: bool = False, seed: int = 0) -> dict:
    """Clips/s the training DataLoader delivers (HDF5 reads + collation [+ pinning]) with
    `workers` processes, shuffled as in training, nothing else running. The first batches,
    which pay for starting the workers, are not timed."""
    from torch.utils.data import DataLoader

    from utils.data_utils import collate_pad

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate_pad, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(seed), prefetch_factor=4 if workers else None)
    it = iter(loader)
    warm = max(2, workers)
    for _ in range(warm):
        next(it)
    start = time.perf_counter()
    clips = frames = 0
    for _ in range(batches):
        audio, _, _ = next(it)
        clips += audio.shape[0]
        frames += audio.shape[0] * audio.shape[1]
    seconds = time.perf_counter() - start
    del it
    return {"workers": workers, "pin_memory": pin_memory, "clips_per_s": clips / seconds,
            "MB_per_s": frames * 64 * 4 / seconds / 1e6, "batches": batches}
