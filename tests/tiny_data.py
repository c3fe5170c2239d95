"""Tiny feature files in the formats of steps 01–03, for training and evaluation tests.

Each clip belongs to one of a few classes; its log-mels carry a class-specific band and its
captions' "sentence embeddings" a class-specific direction, so a model can learn to match them.
"""
from __future__ import annotations

import csv
import uuid
from pathlib import Path

import h5py
import numpy as np
import yaml

from utils.io_utils import save_pickle

NAMESPACE = uuid.UUID("6f1c7c5e-5b1b-4c59-9a43-0a8f4f5c7d21")
SPLITS = ("development", "validation", "evaluation")
REPO = Path(__file__).resolve().parents[1]


def make_tiny_features(dataset_dir: Path, n_clips=(12, 6, 6), captions_per_clip=5, embed_dim=16,
                       frames=(64, 100), n_classes=4, seed=0) -> dict:
    """Write {split}_text.csv, {split}_audio_logmels.hdf5, sbert_embeds.pkl, audio_info.pkl.

    Returns {split: [(fid, fname, class)]}.
    """
    rng = np.random.default_rng(seed)
    dataset_dir = Path(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    directions = rng.normal(size=(n_classes, embed_dim)).astype(np.float32)
    embeds, clips, info = {}, {}, {"audio_fid2fname": {}, "audio_durations": {}}
    for split, n in zip(SPLITS, n_clips):
        clips[split] = []
        fid2fname, durations = {}, []
        with h5py.File(dataset_dir / f"{split}_audio_logmels.hdf5", "w") as h5, \
                open(dataset_dir / f"{split}_text.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["tid", "fid", "fname", "raw_text", "text", "tokens"])
            for i in range(n):
                cls = i % n_classes
                fname = f"{split}_{i:03d}.wav"
                fid = uuid.uuid5(NAMESPACE, f"{split}/{fname}").hex
                t = int(rng.integers(frames[0], frames[1] + 1))
                x = rng.normal(scale=0.5, size=(t, 64)).astype(np.float32) - 5
                x[:, cls * 16:(cls + 1) * 16] += 3.0  # (T, F): a band per class
                h5[fid] = x
                fid2fname[fid] = fname
                durations.append(t * 0.02)
                clips[split].append((fid, fname, cls))
                for c in range(captions_per_clip):
                    tid = uuid.uuid5(NAMESPACE, f"{fid}/{c + 1}").hex
                    raw = f"Sound of class {cls}, take {c}; \"quoted\", it's fine"
                    text = f"sound of class {cls} take {c} quoted its fine"
                    writer.writerow([tid, fid, fname, raw, text, text])
                    embeds[tid] = (directions[cls] + rng.normal(scale=0.3, size=embed_dim)).astype(np.float32)
        info["audio_fid2fname"][split] = fid2fname
        info["audio_durations"][split] = durations
    save_pickle(embeds, dataset_dir / "sbert_embeds.pkl")
    save_pickle(info, dataset_dir / "audio_info.pkl")
    return clips


def tiny_config(tmp_path: Path, extra: dict | None = None, name: str = "tiny.yaml") -> Path:
    """A config overlay on the repo's conf.yaml for tiny, fast CPU runs; returns its path."""
    overlay = {
        "base": str(REPO / "conf.yaml"),
        "experiment": "tiny",
        "paths": {"dataset_dir": str(tmp_path / "data"), "pretrained_dir": str(tmp_path / "pretrained"),
                  "output_dir": str(tmp_path / "outputs")},
        "audio_encoder": {"init": "random", "channels": [4, 8, 8, 16, 16, 16], "out_dim": 8},
        "text_encoder": {"out_dim": 8},
        "training": {"epochs": 2, "batch_size": 8, "num_workers": 0, "log_every": 1},
        "eval": {"batch_size": 8},
        "wandb": {"mode": "disabled"},
    }
    for section, values in (extra or {}).items():
        if isinstance(values, dict):
            overlay.setdefault(section, {}).update(values)
        else:
            overlay[section] = values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    return path
