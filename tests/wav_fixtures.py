"""Helpers that write small test audio files and Clotho-layout datasets (import as `wav_fixtures`).

Every writer returns the path it wrote. Signals are deterministic (seeded).
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf

CAPTION_COLUMNS = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]


def signal(seconds: float = 0.5, sr: int = 44100, channels: int = 1, kind: str = "noise",
           seed: int = 0, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    """float32 [samples] (mono) or [samples, channels]: noise, tone, or silence-ish (1e-4 noise)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    cols = []
    for c in range(channels):
        if kind == "noise":
            x = rng.standard_normal(n) * amplitude / 3
        elif kind == "tone":
            x = amplitude * np.sin(2 * np.pi * freq * (c + 1) * t)
        elif kind == "quiet":
            x = rng.standard_normal(n) * 1e-4
        else:
            raise ValueError(kind)
        cols.append(x)
    y = np.stack(cols, axis=1).astype(np.float32)
    return y[:, 0] if channels == 1 else y


def write_wav(path: str | Path, seconds: float = 0.5, sr: int = 44100, channels: int = 1,
              subtype: str = "PCM_16", kind: str = "noise", seed: int = 0, **kw) -> Path:
    """A wav: subtype PCM_16 | PCM_24 | PCM_32 | FLOAT | DOUBLE."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), signal(seconds, sr, channels, kind, seed, **kw), sr, subtype=subtype, format="WAV")
    return path


def write_zero_length(path: str | Path, sr: int = 44100) -> Path:
    """A valid wav header with no samples."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.zeros(0, np.float32), sr, subtype="PCM_16", format="WAV")
    return path


def write_truncated(path: str | Path, keep: float = 0.5, **kw) -> Path:
    """A wav cut off after `keep` of its bytes (an interrupted copy: header promises more data)."""
    path = write_wav(path, **kw)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def write_header_only(path: str | Path, n_bytes: int = 30) -> Path:
    """The first bytes of a wav header only: libsndfile cannot open it."""
    path = write_wav(path, seconds=0.05)
    path.write_bytes(path.read_bytes()[:n_bytes])
    return path


def write_text_as_wav(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is not audio, it is a text file named .wav\n", encoding="utf-8")
    return path


def copy_many(src: str | Path, dests) -> None:
    """Put the bytes of `src` at every destination quickly (hard links, else copies)."""
    for dest in dests:
        dest = Path(dest)
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)


def write_captions_csv(path: str | Path, rows: dict[str, list[str]], header=None) -> Path:
    """A Clotho captions CSV: {fname: [five captions]}; `header` overrides the official one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header or CAPTION_COLUMNS)
        for fname, captions in rows.items():
            writer.writerow([fname, *captions])
    return path


def make_clotho(root: str | Path, clips: dict[str, int], seconds: float = 0.5, sr: int = 44100,
                vary: bool = True) -> dict[str, dict[str, list[str]]]:
    """A tiny Clotho-layout dataset under `root`: {split: n_clips}. Returns {split: {fname: captions}}.

    Each clip is a different noise (seed) when `vary`, so features differ between clips.
    """
    root = Path(root)
    out = {}
    for split, n in clips.items():
        rows = {}
        for i in range(n):
            fname = f"{split}_clip_{i:03d}.wav"
            write_wav(root / split / fname, seconds=seconds, sr=sr, seed=i if vary else 0)
            rows[fname] = [f"Sound number {i} caption {k}, a noise." for k in range(1, 6)]
        write_captions_csv(root / f"clotho_captions_{split}.csv", rows)
        out[split] = rows
    return out
