"""One checkpoint dict with everything needed to resume, written atomically, read safely.

Keys (see CONTRIBUTING.md): model, optimizer, scheduler, scaler, epoch, best_metric, best_epoch,
config, rng, text_embed_dim, caption_probe. Loading uses `torch.load(weights_only=True)`, so a checkpoint can
hold only tensors and plain Python data: RNG states are converted to those below.
"""
from __future__ import annotations

import copy
import os
import pickle
import pickletools
import random
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from utils.errors import UserError
from utils.io_utils import atomic_link, atomic_path


def save_checkpoint(path: str | Path, state: dict, copies: Sequence[str | Path] = ()) -> Path:
    """Write `state` to `path` so that a kill at any moment leaves the previous file intact.

    `copies` (e.g. best.pt when this epoch is the best) get the same file under their names,
    each in place before `path` is: hard links where the file system has them, so a ~1 GB
    checkpoint is written once, not once per name.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            out = _KeepWriteError(f)
            try:
                torch.save(state, out)
            except RuntimeError:
                if out.error is not None:  # ENOSPC, EDQUOT, EFBIG...: named by atomic_path
                    raise out.error from None
                raise
            f.flush()
            os.fsync(f.fileno())  # on disk before any other name points at it
        for other in copies:
            atomic_link(tmp, other)
    return path


class _KeepWriteError:
    """A file object for torch.save that keeps the OSError of a failed write: torch replaces it
    (a full disk, a quota) with RuntimeError "unexpected pos ...", which says nothing of why."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def snapshot(obj, into=None):
    """A copy of a state dict that later training cannot change: every tensor copied to the CPU
    (off the GPU, or cloned), containers rebuilt. `into`: an earlier snapshot of the same
    structure whose tensors are overwritten instead of allocating ~1 GB anew (for a GPU model
    they are pinned, so the copy runs at full bus speed)."""
    devices: set[torch.device] = set()
    copied = _copy_tensors(obj, into, devices)
    for device in devices:
        torch.cuda.synchronize(device)  # copies into pinned memory are asynchronous
    return copied


def _copy_tensors(obj, into, devices: set):
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        if not (isinstance(into, torch.Tensor) and into.shape == src.shape and into.dtype == src.dtype
                and into.stride() == src.stride()):
            # the source's strides, as torch.save keeps them: channels_last weights and their
            # Adam moments are resumed in the layout they were trained in
            into = torch.empty_like(src, device="cpu", pin_memory=src.is_cuda)
        if src.is_cuda:
            devices.add(src.device)
        return into.copy_(src, non_blocking=src.is_cuda)
    if isinstance(obj, dict):
        into = into if isinstance(into, dict) else {}
        return {k: _copy_tensors(v, into.get(k), devices) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        into = into if isinstance(into, type(obj)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(_copy_tensors(v, w, devices) for v, w in zip(obj, into))
    return copy.deepcopy(obj)


class CheckpointWriter:
    """Writes checkpoints in a background thread, so training goes on while ~1 GB goes to disk
    (a full CNN14 with Adam's state: ~3 s a file on a plain disk, the GPU idle meanwhile).

    One write at a time, in order: `submit` waits for the previous one. A failed write is
    raised, as the OSError it was, by the next `check`, `submit` or `wait`; the file it was
    writing keeps its previous content (writes are atomic).
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""
        self._buffers: dict | None = None

    def snapshot(self, state: dict) -> dict:
        """`snapshot(state)` for the next write, into the buffers of the previous one (waiting
        for it first): no ~1 GB allocation at every epoch's end."""
        self.wait()
        self._buffers = snapshot(state, into=self._buffers)
        return self._buffers

    def submit(self, what: str, fn: Callable[..., object], *args, **kwargs) -> None:
        """Run `fn(*args, **kwargs)` in the background (`what` names it in messages); the
        arguments must not change meanwhile: pass a `snapshot`."""
        self.wait()
        self._what = what

        def run():
            try:
                fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error = e
        # not a daemon: even an unexpected exit lets the file be finished, never half-named
        thread = threading.Thread(target=run, name="checkpoint-writer")
        thread.start()
        self._thread = thread  # only once started: close() must never join a thread not started

    def check(self) -> None:
        """Raise the error of a finished write, if it failed (cheap: call it every step)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self) -> None:
        """Block until the current write is done; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def close(self) -> None:
        """Finish the current write without raising (for a `finally:` while another error is on
        its way out; a failed write is then reported as a warning line)."""
        if self._thread is not None and self._thread.is_alive():
            print(f"waiting for {self._what} to be written ...", file=sys.stderr, flush=True)
        try:
            self.wait()
        except BaseException as e:  # noqa: BLE001 - the error already on its way out wins
            print(f"warning: {self._what} was not written ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)


# torch names a refused global in one of two phrasings, depending on the global
_REFUSED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")


def pickled_globals(path: str | Path, limit: int = 3) -> list[str]:
    """The classes/functions a plain pickle file would import when loaded (the first `limit`),
    read from its opcodes without executing anything; [] if it is not a readable pickle."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
                if len(names) >= limit or op.name == "STOP":
                    break
    except Exception:  # not a pickle, or truncated: nothing to name
        pass
    return names


def _refusal(path: Path, names: list[str]) -> UserError:
    return UserError(f"{path}: holds Python objects besides tensors ({', '.join(names)}); refused "
                     "for safety (loaded with weights_only=True): use a file written by this "
                     "project, or re-save only its tensors (a state dict)")


def torch_load(path: str | Path, map_location="cpu", what: str = "checkpoint") -> object:
    """`torch.load(path, weights_only=True)`: tensors and plain Python data only, never code.

    Every failure is a one-line UserError that says what the file is. A file holding pickled
    Python objects (classes, functions: anything that could run code when loaded) is refused
    for safety; we never fall back to an unrestricted load, and never pass on torch's advice to
    switch weights_only off.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        with warnings.catch_warnings():
            # a plain (non-torch) pickle triggers a protocol warning before the real error below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused:
            raise _refusal(path, [refused.group(1)]) from None
        names = pickled_globals(path)  # a plain pickle: torch stops before naming its globals
        if names:
            raise _refusal(path, names) from None
        detail = _UNPICKLER_DETAIL.search(str(e))
        raise UserError(f"{path}: not a readable {what}: not a PyTorch file saved by torch.save"
                        + (f" ({detail.group(1).strip()[:200]})" if detail else "")) from None
    except (MemoryError, OSError):  # the disk or the permissions, not the file's content:
        raise                        # named as they are, not as a damaged file to delete
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise UserError(f"{path}: not a readable {what}: truncated, or not saved by torch.save "
                        f"({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    state = torch_load(path, map_location, what="checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path}: not a checkpoint of this project (no 'model' state dict)")
    return state


def rng_state(device: torch.device | str | None = None) -> dict:
    """Python, NumPy and torch generator states as tensors and plain data, with the CUDA one of
    `device` (this process's GPU; no other: a resume may see fewer GPUs, and the others' streams
    are not used)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(
            lambda v: v.item() if hasattr(v, "item") else v, np_state[2:])),
        "torch": torch.get_rng_state(),
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | str | None = None) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device is None or torch.device(device).type != "cuda":
        return
    device = torch.device(device)
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU visible then
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def _as_tuple(value):
    """random.setstate wants tuples all the way down; a round trip may give lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
