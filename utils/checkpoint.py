"""One checkpoint dict with everything needed to resume, written atomically, read safely.

Keys (see CONTRIBUTING.md): model, optimizer, scheduler, scaler, epoch, best_metric, best_epoch,
config, rng, text_embed_dim. Loading uses `torch.load(weights_only=True)`, so a checkpoint can
hold only tensors and plain Python data: RNG states are converted to those below.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserError
from utils.io_utils import atomic_path


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` to `path` so that a kill at any moment leaves the previous file intact."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path}: not a checkpoint of this project (no 'model' entry)")
    return state


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain data."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(
            lambda v: v.item() if hasattr(v, "item") else v, np_state[2:])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """random.setstate wants tuples all the way down; a round trip may give lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
