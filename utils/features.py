"""Log-mel features for every clip of a split (preprocessing step 02), resumable and crash-safe.

Output: `<features_dir>/{split}_audio_logmels.hdf5` (paths.features_dir, default the dataset
folder), one float32 dataset `[frames, n_mels]` per fid (dataset name = fid; dataset attrs
`fname`, `sr`, and `size`, `mtime_ns`: the wav's size and modification time when it was read),
the feature parameters as file attrs, and the clips left out as unusable as file attrs
`skipped_fids` (JSON list) and `skipped_signatures` (JSON {fid: [size, mtime_ns] or null}).

Crash safety and resuming — why the final file can always be trusted:

1. Work in progress lives in `<features_dir>/{split}_audio_logmels.parts/`. The clips to compute
   are cut into chunks of at most `features.flush_every`; each chunk is computed and written as
   one small HDF5 shard `shard-NNNNN.h5`, built in memory and written to a temporary name
   renamed into place (utils.io_utils.atomic_open), so a shard that exists is whole. A kill
   loses at most the chunks in progress (`workers` x `flush_every` clips); on Ctrl-C the workers
   first finish and save the chunks they started.
2. A rerun opens every shard, keeps the clips whose feature parameters and wav size and mtime
   match, and computes only the others. Leftover temporary files from a kill are removed.
3. When every clip is in a shard, the shards are merged, in audio_info.pkl order, into a
   temporary file that is renamed onto `{split}_audio_logmels.hdf5`; the parts folder is then
   deleted. The final name therefore only ever appears complete.
4. An existing final file is checked before the split is reported complete: it must open and
   every clip's header must read (a damaged file, e.g. with zeroed internal headers, is deleted
   and rebuilt), carry the current parameters and exactly the expected fids (computed or
   skipped), every computed clip's wav must still have the recorded size and mtime, every skipped
   clip's wav must be unchanged since it was skipped, and the split's skip list must name exactly
   the clips the file left out. Otherwise the file is outdated: it is renamed into the parts
   folder as one more shard (so no outdated final survives a crash, and its clips that are still
   valid are reused like any shard's).

Stale wavs: a wav replaced under the same name is recomputed, because each clip records the
wav's size and st_mtime_ns. Size + mtime rather than a content hash: hashing Clotho's ~7 GB of
wavs on every run would take minutes, while a replaced file gets a new mtime (a copy keeps the
old one only with `cp -p`/`rsync -t`, and then nearly always differs in size). The price: a
dataset copied without keeping mtimes (plain `cp -r`) has every clip recomputed once.

Workers: `features.workers` processes (a ProcessPoolExecutor) each take a chunk, read and
transform its wavs and write its shard; the parent only keeps the books and merges. (Writing in
the workers matters: sending every log-mel back to one parent that writes them all cost that
parent ~5 ms of CPU per clip, taken from the two workers on a 2-core machine.) With
`features.device` cuda (or auto with a GPU) the workers only read audio and the parent computes
the log-mels on the GPU (utils.audio_utils.log_mel_torch) and writes the shards. A worker ends
when its parent does, even by SIGKILL (Linux: PR_SET_PDEATHSIG; elsewhere a thread watches the
parent's pid), so no orphan keeps computing or holding the features folder's lock.

Unusable audio — missing, empty, unreadable, "non-finite" (NaN or inf samples), or "no log-mel"
(the wav reads but has no log-mel, e.g. a sample rate too low for the 40 ms window) — stops the step
after everything else is computed and flushed, listing every such file, unless
`data.skip_bad_audio`; then the clips are left out of the HDF5 and listed as step 02's rows of the
split's skip list `{split}_skipped_audio.csv` (utils.clotho.update_skipped; step 01's rows stay).

Sample rates: each clip's log-mels are taken at its wav's own rate (the baseline's), recorded as
its `sr` attr; `sample_rate_notes` names a split whose clips mix rates, or are at a rate the
training split has none at, since a mel band then spans other frequencies per rate.

Disk full: a worker or the merge that fails for lack of space is one line, "no space left on
<features_dir>", with what was kept (a file-size limit, EFBIG, says so instead); a worker that
died outright is reported so too when the features folder has (almost) no free space, else as
killed (out of memory?). HDF5 never writes a shard to the disk itself (see write_shard); the
merge's errors come back from h5py with the errno in their text.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import h5py
import numpy as np
from tqdm import tqdm

from utils.audio_utils import (EPS, AudioError, keep_freed_memory, limit_threads, load_audio, log_mel,
                               log_mel_torch)
from utils.clotho import (HDF5_ERRORS, STEP_01, STEP_02, bad_audio_error, features_dir,
                          format_bad_audio, logmel_path, make_fid, read_skipped, resolve_wav,
                          skipped_path, split_paths, update_skipped)
from utils.devices import resolve_device
from utils.errors import Terminated, UserError, os_error_errno, raise_if_stopped
from utils.io_utils import atomic_open, atomic_path, ensure_dir, load_pickle, remove_stale_temps

FORMAT_VERSION = 1  # bump when the computation changes: older files and shards are then redone
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NO_ROOM = (*DISK_FULL, errno.EFBIG)  # a write that did not fit: the disk, a quota, a file-size limit
LOW_DISK_BYTES = 64 << 20  # a worker that died with less free space than this: the disk is full

Signature = tuple[int, int]  # (size in bytes, st_mtime_ns) of a wav


def parts_dir(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"{split}_audio_logmels.parts"


def feature_params(features_cfg: dict) -> dict:
    """What determines the features (stored as HDF5 attrs; a mismatch means recompute)."""
    return {"window_s": float(features_cfg["window_s"]), "hop_s": float(features_cfg["hop_s"]),
            "n_mels": int(features_cfg["n_mels"]), "eps": EPS, "format_version": FORMAT_VERSION,
            "definition": "log(librosa melspectrogram power=2 hann centred zero-pad + eps), [frames, n_mels]"}


CONFIG_PARAMS = ("window_s", "hop_s", "n_mels")  # the feature_params a config sets


def check_definition(out_dir: str | Path, split: str, features_cfg: dict,
                     run_config: Path | None = None) -> None:
    """Refuse a split's log-mel file computed with other window/hop/bands than `features_cfg`
    says (UserError). Training and scoring read the file, while query.py, the submission and
    the API compute log-mels from `features_cfg`: a run whose config misdescribed its features
    would embed the same clip differently there. `run_config`: `features_cfg` is that trained
    run's (as saved, without --set), so the file is what changed. A file without these attrs
    passes."""
    path = logmel_path(out_dir, split)
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs[k] for k in CONFIG_PARAMS if k in f.attrs}
    except HDF5_ERRORS:  # missing or damaged: the reader that follows says so
        return
    want = feature_params(features_cfg)
    differ = [k for k in attrs if not _attrs_match({k: attrs[k]}, {k: want[k]})]
    if differ:
        found = ", ".join(f"{k} {attrs[k]}" for k in differ)
        asked = ", ".join(f"{k} {want[k]}" for k in differ)
        if run_config is not None:  # step 02 was rerun with other settings after training
            raise UserError(f"{path}: log-mels computed with {found}, but the run was trained on "
                            f"{asked} — rerun preprocessing/02_audio_logmel.py --conf {run_config} "
                            "(the run's settings)")
        sets = " ".join(f"features.{k}={attrs[k]}" for k in differ)
        raise UserError(f"{path}: log-mels computed with {found}, but the config says {asked} — "
                        f"rerun preprocessing/02_audio_logmel.py with this config, or --set {sets}")


def _attrs_match(attrs, params: dict) -> bool:
    for key, value in params.items():
        if key not in attrs:
            return False
        stored = attrs[key]
        stored = stored.decode() if isinstance(stored, bytes) else stored
        if isinstance(value, float) and not np.isclose(float(stored), value, rtol=0, atol=1e-12):
            return False
        if not isinstance(value, float) and stored != value:
            return False
    return True


def wav_signature(path: str | Path) -> Signature:
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _clips(f: h5py.File) -> Iterator[tuple[str, h5py.Dataset]]:
    """(fid, dataset) of every clip; ValueError for one whose header cannot be parsed (h5py
    gives None for it)."""
    for fid, ds in f.items():
        if not isinstance(ds, h5py.Dataset):
            raise ValueError(f"clip {fid}: unreadable object header")
        yield fid, ds


def _stored_signature(attrs) -> Signature:
    """A clip's recorded wav signature; (-1, -1), which no wav has, for clips without one."""
    return int(attrs.get("size", -1)), int(attrs.get("mtime_ns", -1))


# ---------------------------------------------------------------------------------------------
# Workers (top-level functions: they are pickled to the pool)

@dataclass
class Clip:
    fid: str
    fname: str
    path: str  # resolved wav path
    size: int  # wav bytes when the task was made (changes -> recompute)
    mtime_ns: int = -1  # wav modification time then (changes -> recompute)

    @property
    def signature(self) -> Signature:
        return self.size, self.mtime_ns


@dataclass
class Result:
    clip: Clip
    feats: np.ndarray | None = None  # [frames, n_mels] float32 (or the waveform when loading only)
    sr: int = 0
    # when unusable: "missing" | "empty" | "unreadable: ..." | "non-finite: ..." | "no log-mel: ..."
    reason: str = ""


@dataclass
class Chunk:
    folder: str  # the split's parts folder
    index: int  # its shard is shard-{index:05d}.h5
    clips: list[Clip]


@dataclass
class ChunkDone:
    clips: int  # clips the chunk had
    shard: Path | None  # None when none of them was usable
    sigs: dict[str, Signature]  # fid -> wav signature of every clip written to the shard
    bad: list[tuple[str, str]]  # (fname, reason) of the unusable ones


_WORKER_PARAMS: dict = {}
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _hdf5_close_on_full_disk(exc: BaseException | None) -> bool:
    """The HDF5 objects of a write that failed for lack of space fail again as they are freed
    (h5py prints a traceback through sys.excepthook and sys.unraisablehook); the one line about
    the full disk already says it all."""
    text = str(exc)
    return (isinstance(exc, RuntimeError) and "decrement id ref count" in text
            and any(f"errno = {code}," in text for code in NO_ROOM))


def _quiet_hooks(unraisablehook: Callable, excepthook: Callable) -> tuple[Callable, Callable]:
    """sys.unraisablehook and sys.excepthook that drop the HDF5 noise of a full disk and pass
    everything else on to the given ones."""
    def quiet_unraisable(unraisable) -> None:
        if not _hdf5_close_on_full_disk(unraisable.exc_value):
            unraisablehook(unraisable)

    def quiet_excepthook(exc_type, exc, tb) -> None:
        if not _hdf5_close_on_full_disk(exc):
            excepthook(exc_type, exc, tb)
    return quiet_unraisable, quiet_excepthook


def set_up_process() -> None:
    """Process-wide settings, for the whole life of a process that is step 02's own (a pool
    worker; the step's script, which computes when features.workers is 1): glibc keeps freed
    buffers (keep_freed_memory), and the HDF5 noise of a full disk, which comes as the failed
    write's objects are freed, after the one-line error, is hidden. Never in a caller's own
    process (`_as_worker`): glibc's malloc settings cannot be put back (it has no getter, and
    setting a threshold turns its dynamic mmap threshold off for good)."""
    keep_freed_memory()  # reuse the per-clip buffers instead of page-faulting them in anew
    sys.unraisablehook, sys.excepthook = _quiet_hooks(sys.unraisablehook, sys.excepthook)


def _init_worker(params: dict):
    """Set up a process to compute log-mels; returns what undoes the thread limit (or None)."""
    limiter = limit_threads()  # one thread per worker process: the processes already fill the cores
    _WORKER_PARAMS.clear()
    _WORKER_PARAMS.update(params)
    return limiter


@contextlib.contextmanager
def _as_worker(params: dict) -> Iterator[None]:
    """This process set up as a worker (`_init_worker`) for the block only: a caller of
    compute_logmels / compute_split (a notebook, the tests) gets its threads (torch's included)
    and its exception hooks back after it, and glibc's malloc settings are left alone
    (`set_up_process`)."""
    hooks = sys.unraisablehook, sys.excepthook
    sys.unraisablehook, sys.excepthook = _quiet_hooks(*hooks)
    limiter = _init_worker(params)
    try:
        yield
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
        sys.unraisablehook, sys.excepthook = hooks


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(parent_pid: int) -> None:
    """End this process as soon as `parent_pid` (its parent) ends, however it ends.

    A parent killed with SIGKILL cannot stop its workers, which would go on computing, holding
    the features folder's lock. Linux: the kernel sends SIGKILL (PR_SET_PDEATHSIG; it fires when
    the thread that forked this process ends: the pool forks from the main thread); elsewhere a
    daemon thread polls the parent's pid.
    """
    if sys.platform.startswith("linux"):
        try:
            if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent was gone before the request
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _init_pool_worker(params: dict, parent_pid: int | None = None) -> None:
    # Ctrl-C (and a SIGTERM sent to the group) reaches every process: the parent alone handles
    # it, and the workers finish (and save) the chunks they started instead of dying with a
    # traceback each
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if parent_pid is not None:
        die_with_parent(parent_pid)
    set_up_process()
    _init_worker(params)


def _no_log_mel(clip: Clip, e: Exception) -> Result:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return Result(clip, reason=f"no log-mel: {first}")


def _log_mel_errors() -> tuple:
    from librosa.util.exceptions import LibrosaError  # librosa is imported by then (warm-up)

    return ValueError, ArithmeticError, LibrosaError


def _compute(clip: Clip) -> Result:
    """Read one wav and compute its log-mel (or only read it when params['load_only'])."""
    p = _WORKER_PARAMS
    try:
        y, sr = load_audio(clip.path)
    except AudioError as e:
        detailed = e.reason in ("unreadable", "non-finite") and e.detail
        return Result(clip, reason=e.reason + (f": {e.detail}" if detailed else ""))
    if p.get("load_only"):
        return Result(clip, y, sr)
    try:
        feats = log_mel(y, sr, p["window_s"], p["hop_s"], p["n_mels"])
    except _log_mel_errors() as e:  # e.g. a sample rate too low for the window
        return _no_log_mel(clip, e)
    if not np.isfinite(feats).all():
        return Result(clip, reason="no log-mel: the result holds NaN/inf")
    return Result(clip, feats, sr)


def _finish_chunk(chunk: Chunk, results: list[Result], attrs: dict) -> ChunkDone:
    """Write the usable results of a chunk as its shard."""
    good = [r for r in results if not r.reason]
    shard = write_shard(Path(chunk.folder), chunk.index, good, attrs) if good else None
    return ChunkDone(len(results), shard, {r.clip.fid: r.clip.signature for r in good},
                     [(r.clip.fname, r.reason) for r in results if r.reason])


def _compute_chunk(chunk: Chunk) -> ChunkDone:
    """Log-mels of a chunk of clips, written as one shard (in a worker, or in this process)."""
    return _finish_chunk(chunk, [_compute(clip) for clip in chunk.clips], _WORKER_PARAMS["attrs"])


def _cpu_chunks(chunks: list[Chunk], pool) -> Iterable[ChunkDone]:
    if pool is None:
        return map(_compute_chunk, chunks)
    # submitted in order, so the big chunks go first; reported as they finish
    return (future.result() for future in as_completed([pool.submit(_compute_chunk, c) for c in chunks]))


def in_order(pool, fn: Callable, items: list, ahead: int) -> Iterator:
    """`pool.map(fn, items)` with at most `ahead` items submitted and not yet taken. Executor.map
    submits every item at once, so a whole split's audio (~20 GB for Clotho's development set)
    would pile up here whenever the GPU and the shard writes fell behind the readers."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _gpu_chunks(chunks: list[Chunk], pool, device: str, workers: int = 1) -> Iterator[ChunkDone]:
    """The pool of `workers` (or this process) reads the wavs; the log-mels are computed here
    on `device`."""
    p = _WORKER_PARAMS
    clips = [clip for chunk in chunks for clip in chunk.clips]
    # in chunk order; a few clips per worker read ahead, the rest wait their turn
    loaded = in_order(pool, _compute, clips, 4 * workers) if pool is not None else map(_compute, clips)
    for chunk in chunks:
        results = [next(loaded) for _ in chunk.clips]
        for i, r in enumerate(results):
            if r.reason:
                continue
            try:  # [samples] waveform -> [frames, n_mels] log-mel
                r.feats = log_mel_torch(r.feats, r.sr, device, p["window_s"], p["hop_s"], p["n_mels"]).cpu().numpy()
            except _log_mel_errors() as e:
                results[i] = _no_log_mel(r.clip, e)
                continue
            if not np.isfinite(r.feats).all():
                results[i] = Result(r.clip, reason="no log-mel: the result holds NaN/inf")
        yield _finish_chunk(chunk, results, p["attrs"])


def make_chunks(clips: list[Clip], folder: Path, first_index: int, flush_every: int, workers: int) -> list[Chunk]:
    """Cut the clips into chunks of at most `flush_every` that shrink towards the end (guided
    scheduling: each is 1/(2 x workers) of what is left), so that the workers finish together."""
    chunks: list[Chunk] = []
    start = 0
    while start < len(clips):
        size = max(1, min(flush_every, -(-(len(clips) - start) // (2 * workers))))
        chunks.append(Chunk(str(folder), first_index + len(chunks), clips[start:start + size]))
        start += size
    return chunks


# ---------------------------------------------------------------------------------------------
# Shards

def scan_parts(folder: Path, params: dict, log: Callable = print) -> dict[str, tuple[Path, Signature]]:
    """{fid: (shard path, wav signature)} for every finished clip in `folder` with these params.

    Shards written with other parameters, or unreadable, are deleted (their clips are redone).
    """
    done: dict[str, tuple[Path, Signature]] = {}
    if not folder.is_dir():
        return done
    remove_stale_temps(folder)
    for shard in sorted(folder.glob("shard-*.h5")):
        found = {}
        try:
            with h5py.File(shard, "r") as f:
                if not _attrs_match(f.attrs, params):
                    log(f"{shard.name}: written with other feature parameters, recomputing its clips")
                    raise ValueError
                for fid, ds in _clips(f):
                    found[fid] = (shard, _stored_signature(ds.attrs))
        except HDF5_ERRORS:
            shard.unlink(missing_ok=True)
            continue
        done.update(found)
    return done


def _next_shard_index(folder: Path) -> int:
    indices = [int(p.stem.split("-")[1]) for p in folder.glob("shard-*.h5") if p.stem.split("-")[1].isdigit()]
    return max(indices, default=-1) + 1


def write_shard(folder: Path, index: int, results: list[Result], params: dict) -> Path:
    """Write finished clips as one shard, atomically. The HDF5 file is built in memory and its
    bytes written by Python: HDF5 whose own write fails (a full disk) leaves objects that fail
    again as they are freed, and crashed the process (SIGSEGV) instead of the one-line error;
    a Python write fails with a plain OSError naming the shard."""
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f.attrs.update(params)
        for r in results:
            ds = f.create_dataset(r.clip.fid, data=r.feats)
            ds.attrs.update({"fname": r.clip.fname, "sr": r.sr, "size": r.clip.size,
                             "mtime_ns": r.clip.mtime_ns})
    path = ensure_dir(folder) / f"shard-{index:05d}.h5"
    with atomic_open(path, "wb") as out:
        out.write(image.getbuffer())
    return path


# ---------------------------------------------------------------------------------------------
# The final file

def read_final(path: Path) -> tuple[dict, dict[str, Signature], dict[str, Signature | None]]:
    """(file attrs, {fid: wav signature} of its clips, {fid: signature or None} of the clips it
    skipped) of an existing `{split}_audio_logmels.hdf5`; reading every clip's attributes also
    proves that each clip's header is readable. Raises one of HDF5_ERRORS for a damaged file."""
    with h5py.File(path, "r") as f:
        attrs = {k: f.attrs[k] for k in f.attrs}
        have = {fid: _stored_signature(ds.attrs) for fid, ds in _clips(f)}
    if "skipped_signatures" in attrs:
        skipped = {fid: tuple(sig) if sig is not None else None
                   for fid, sig in json.loads(attrs["skipped_signatures"]).items()}
    else:  # an older file: the clips it skipped are retried
        skipped = {fid: (-1, -1) for fid in json.loads(attrs.get("skipped_fids", "[]"))}
    return attrs, have, skipped


def final_state(path: Path, params: dict, sigs: dict[str, Signature | None], allow_skipped: bool,
                listed: set[str]) -> tuple[str, str]:
    """("complete" | "outdated" | "damaged", why) for an existing `{split}_audio_logmels.hdf5`.

    `sigs`: every expected fid -> its wav's signature now (None: no wav); `listed`: the fids the
    skip list says step 02 left out. A file that left clips out (data.skip_bad_audio) counts as
    complete only while skipping is still allowed and none of their wavs changed.
    """
    try:
        attrs, have, skipped = read_final(path)
    except HDF5_ERRORS as e:
        return "damaged", (str(e).strip().splitlines() or [type(e).__name__])[0]
    if not _attrs_match(attrs, params):
        return "outdated", "written with other feature parameters"
    if skipped and not allow_skipped:
        return "outdated", f"{len(skipped)} clips were skipped as unusable and data.skip_bad_audio is now false"
    want = set(sigs)
    if set(have) | set(skipped) != want or set(have) & set(skipped):
        return "outdated", (f"its clips differ from audio_info.pkl ({len(want - set(have) - set(skipped))} "
                            f"missing, {len(set(have) - want)} extra)")
    changed = [fid for fid, sig in have.items() if sigs[fid] != sig]
    if changed:
        return "outdated", f"{len(changed)} wav(s) changed since their log-mels were computed"
    retry = [fid for fid, sig in skipped.items() if sigs[fid] != sig]
    if retry:
        return "outdated", f"{len(retry)} skipped wav(s) changed since they were skipped"
    if listed != set(skipped):
        return "outdated", "the skip list does not name the clips it left out"
    return "complete", ""


def merge_shards(path: Path, fids: list[str], done: dict[str, tuple[Path, Signature]], params: dict,
                 skipped: dict[str, Signature | None]) -> None:
    """Copy every clip, in `fids` order, from its shard into `path` (atomically)."""
    shards: dict[Path, h5py.File] = {}
    try:
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as out:
                out.attrs.update(params)
                out.attrs["skipped_fids"] = json.dumps(list(skipped))
                out.attrs["skipped_signatures"] = json.dumps({f: list(s) if s else None for f, s in skipped.items()})
                for fid in tqdm(fids, desc=f"merge {path.name}", unit="clip", leave=False):
                    shard = done[fid][0]
                    if shard not in shards:
                        shards[shard] = h5py.File(shard, "r")
                    # HDF5's own object copy (data and attrs, no numpy round trip): 4x faster
                    shards[shard].copy(fid, out, name=fid)
    finally:
        for f in shards.values():
            f.close()


# ---------------------------------------------------------------------------------------------
# The step

@dataclass
class SplitFeatures:
    split: str
    path: Path
    clips: int
    computed: int = 0  # clips computed in this run
    reused: int = 0  # clips taken from an earlier, interrupted run or from the outdated file
    updated: bool = False  # the final file was outdated (other clips, or some changed)
    skipped_existing: bool = False  # the final file was already complete
    bad: list[tuple[str, str]] = field(default_factory=list)  # (fname, reason) left out by step 02
    skipped_csv: Path | None = None
    rates: dict[int, int] = field(default_factory=dict)  # {sample rate: clips} of the final file


def _pool_context():
    # fork: workers inherit the modules the parent imported and warmed up (librosa's imports
    # take seconds); the parent never initialises CUDA before the pool exists
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def _warm_up(params: dict) -> None:
    """Import and run the transform once in the parent (set up by `_as_worker`), before forking
    the workers."""
    log_mel(np.zeros(4410, np.float32), 44100, params["window_s"], params["hop_s"], params["n_mels"])
    _log_mel_errors()


def _disk_full(out_dir: Path, kept: int, folder: Path) -> UserError:
    return UserError(f"no space left on {out_dir}: the {kept} clips finished are kept in {folder} — "
                     "free some space (or set paths.features_dir to another disk) and rerun "
                     f"{STEP_02} to resume")


def _no_room(e: Exception, out_dir: Path, kept: int, folder: Path) -> UserError | None:
    """The one line for a write that did not fit (NO_ROOM), None for any other error. h5py
    carries the errno only in its message, in an OSError or (a failed copy or close) a
    RuntimeError."""
    code = os_error_errno(e)
    if code in DISK_FULL:
        return _disk_full(out_dir, kept, folder)
    if code == errno.EFBIG:
        return UserError(f"a file in {out_dir} grew past a file-size limit (the process's `ulimit -f`, "
                         f"or the file system's largest file): the {kept} clips finished are kept in "
                         f"{folder} — raise the limit (or set paths.features_dir to another disk) and "
                         f"rerun {STEP_02} to resume")
    return None


def _worker_died(split: str, out_dir: Path, kept: int, folder: Path) -> UserError:
    try:
        free = shutil.disk_usage(out_dir).free
    except OSError:
        free = None
    if free is not None and free < LOW_DISK_BYTES:
        return _disk_full(out_dir, kept, folder)
    return UserError(f"{split}: a features.workers process died (killed, out of memory?); the "
                     f"{kept} clips finished are kept in {folder}, rerun to resume "
                     f"(fewer workers need less memory)")


def _locate_wavs(audio_dir: Path, fid2fname: dict[str, str]) -> dict[str, tuple[Path, Signature] | None]:
    """fid -> (wav path, its signature now), or None when the wav is missing."""
    out = {}
    for fid, fname in fid2fname.items():
        path = resolve_wav(audio_dir, fname)
        try:
            out[fid] = (path, wav_signature(path)) if path is not None else None
        except FileNotFoundError:  # removed in between
            out[fid] = None
    return out


def compute_split(dataset_dir: Path, split: str, fid2fname: dict[str, str], features_cfg: dict,
                  skip_bad_audio: bool = False, log: Callable = print, pool=None,
                  out_dir: Path | None = None) -> SplitFeatures:
    """Log-mels of every clip of a split into `<out_dir>/{split}_audio_logmels.hdf5` (see module
    docstring); the wavs are read from `dataset_dir`, `out_dir` is paths.features_dir.

    `pool`: a ProcessPoolExecutor initialised with `_init_pool_worker(worker_params(...))`, or None
    to compute in this process. Raises UserError listing every unusable wav unless `skip_bad_audio`.
    """
    params = feature_params(features_cfg)
    device = resolve_device(features_cfg["device"], "features.device")
    here = _as_worker(worker_params(features_cfg, device)) if pool is None else contextlib.nullcontext()
    with here:
        out_dir = Path(out_dir) if out_dir is not None else Path(dataset_dir)
        final = logmel_path(out_dir, split)
        folder = parts_dir(out_dir, split)
        out = SplitFeatures(split, final, len(fid2fname))
        remove_stale_temps(final.parent, f"{final.name}.")
        wavs = _locate_wavs(split_paths(dataset_dir, split)[1], fid2fname)
        sigs = {fid: w[1] if w is not None else None for fid, w in wavs.items()}
        if final.exists() and _settle_final(out, fid2fname, params, sigs, skip_bad_audio, folder, log):
            out.rates = clip_rates(final)
            return out  # complete and current: nothing to do

        done = scan_parts(folder, params, log)
        todo, bad = _plan(fid2fname, wavs, done)
        out.reused = sum(fid in done for fid in fid2fname)
        if out.reused and not out.updated:
            log(f"{split}: resuming, {out.reused} of {len(fid2fname)} clips already computed in {folder}")
        workers = int(features_cfg["workers"]) if pool is not None else 1
        bad += _compute_shards(out, todo, done, folder, device, pool, workers, int(features_cfg["flush_every"]))
        _finish(out, fid2fname, done, bad, sigs, params, skip_bad_audio, folder)
        out.rates = clip_rates(final)
        return out


def _settle_final(out: SplitFeatures, fid2fname: dict[str, str], params: dict, sigs: dict,
                  skip_bad_audio: bool, folder: Path, log: Callable) -> bool:
    """An existing final HDF5: True if it is complete and current (`out` says so); else it is
    deleted (damaged) or moved into `folder` as a shard whose valid clips are reused (outdated)."""
    final, skip_csv = out.path, skipped_path(out.path.parent, out.split)
    fname2fid = {fname: fid for fid, fname in fid2fname.items()}
    listed = {fname2fid.get(r[0], r[0]) for r in read_skipped(skip_csv) if r[2] == "02"}
    state, why = final_state(final, params, sigs, skip_bad_audio, listed)
    if state == "complete":
        out.skipped_existing = True
        out.bad = [(r[0], r[1]) for r in read_skipped(skip_csv) if r[2] == "02"]
        out.skipped_csv = skip_csv if out.bad else None
        return True
    if state == "damaged":  # nothing in it can be trusted
        log(f"{out.split}: {final} is damaged ({why}); rebuilding it")
        final.unlink()
    else:
        # one rename, so no outdated final survives a crash
        log(f"{out.split}: {final} is outdated ({why}); updating it")
        out.updated = True
        ensure_dir(folder)
        os.replace(final, folder / f"shard-{_next_shard_index(folder):05d}.h5")
    return False


def _plan(fid2fname: dict[str, str], wavs: dict, done: dict) -> tuple[list[Clip], list[tuple[str, str]]]:
    """The clips to compute (not in a shard, or their wav changed since) and the missing wavs;
    `done` loses the entries of clips whose wav changed."""
    todo, bad = [], []
    for fid, fname in fid2fname.items():
        if wavs[fid] is None:
            bad.append((fname, "missing"))
            continue
        path, sig = wavs[fid]
        if fid in done and done[fid][1] == sig:
            continue
        done.pop(fid, None)
        todo.append(Clip(fid, fname, str(path), *sig))
    return todo, bad


def _compute_shards(out: SplitFeatures, todo: list[Clip], done: dict, folder: Path, device: str,
                    pool, workers: int, flush_every: int) -> list[tuple[str, str]]:
    """Compute `todo` into new shards of `folder` (adding them to `done`); returns the unusable
    wavs. Each shard is on disk as soon as it is counted: a kill or Ctrl-C keeps it."""
    first = _next_shard_index(folder) if folder.is_dir() else 0
    chunks = make_chunks(todo, folder, first, flush_every, workers)
    finished = _cpu_chunks(chunks, pool) if device == "cpu" else _gpu_chunks(chunks, pool, device, workers)
    bad = []
    out_dir = out.path.parent
    try:
        with tqdm(total=len(todo), desc=f"{out.split} log-mels", unit="clip") as progress:
            for chunk in finished:
                bad += chunk.bad
                done.update((fid, (chunk.shard, sig)) for fid, sig in chunk.sigs.items())
                out.computed += len(chunk.sigs)
                progress.update(chunk.clips)
                raise_if_stopped()
    except BrokenProcessPool:  # a worker was killed (out of memory, a signal); the pool is unusable
        raise _worker_died(out.split, out_dir, len(done), folder) from None
    except OSError as e:  # from a shard write, perhaps a worker's: say what was kept
        no_room = _no_room(e, out_dir, len(done), folder)
        if no_room is not None:
            raise no_room from None
        raise
    return bad


def _finish(out: SplitFeatures, fid2fname: dict[str, str], done: dict, bad: list, sigs: dict,
            params: dict, skip_bad_audio: bool, folder: Path) -> None:
    """Refuse unusable wavs (unless `skip_bad_audio`), else merge the shards into the final
    HDF5, list the skipped clips, and remove the shards."""
    if bad:
        order = {fname: i for i, fname in enumerate(fid2fname.values())}
        bad.sort(key=lambda b: order[b[0]])
        if not skip_bad_audio:
            raise bad_audio_error([format_bad_audio(out.split, bad)])
    bad_names = {f for f, _ in bad}
    keep = [fid for fid in fid2fname if fid2fname[fid] not in bad_names]
    skipped = {fid: sigs[fid] for fid in fid2fname if fid2fname[fid] in bad_names}
    try:
        merge_shards(out.path, keep, done, params, skipped)
    except (OSError, RuntimeError) as e:  # the shards stay: a rerun merges them again
        no_room = _no_room(e, out.path.parent, len(done), folder)
        if no_room is not None:
            raise no_room from None
        raise
    # after the HDF5: killed in between, the list disagrees with the file and a rerun redoes it
    skip_csv = skipped_path(out.path.parent, out.split)
    listed = update_skipped(skip_csv, "02", bad)
    out.bad = bad
    out.skipped_csv = skip_csv if listed else None
    shutil.rmtree(folder, ignore_errors=True)


def clip_rates(path: Path) -> dict[int, int]:
    """{sample rate: clips} of a `{split}_audio_logmels.hdf5` (each clip records its wav's rate;
    Clotho's 3839 development clips read in ~0.3 s); {} where the file is not at hand."""
    try:
        with h5py.File(path, "r") as f:
            rates = collections.Counter(int(ds.attrs["sr"]) for _, ds in _clips(f) if "sr" in ds.attrs)
    except HDF5_ERRORS:  # missing or damaged: its reader says so
        return {}
    return dict(sorted(rates.items()))


def _rates_text(rates: dict[int, int]) -> str:
    return ", ".join(f"{sr} Hz ({n} clip{'s' if n != 1 else ''})" for sr, n in rates.items())


def sample_rate_notes(results: list[SplitFeatures], train_split: str, out_dir: Path) -> list[str]:
    """One line per split whose clips are at several sample rates, or at a rate the training
    split (data.train_split) has none at. Log-mels are taken at each wav's own rate (the
    baseline's), so a mel band spans other frequencies at each rate: nothing else would say so."""
    rates = {r.split: r.rates for r in results}
    trained = rates[train_split] if train_split in rates else clip_rates(logmel_path(out_dir, train_split))
    notes = []
    for split, have in rates.items():
        other = bool(split != train_split and trained and set(have) - set(trained))
        if len(have) < 2 and not other:
            continue
        what = (f"{split} mixes sample rates: {_rates_text(have)}" if len(have) > 1
                else f"{split} is at {_rates_text(have)}")
        if other:
            what += f", the training split {train_split} at {_rates_text(trained)}"
        notes.append(f"{what} — the log-mels of a mel band then cover other frequencies per rate; "
                     "resample the wavs to one rate first")
    return notes


def compute_logmels(cfg: dict, log: Callable = print) -> list[SplitFeatures]:
    """Step 02 for every split in `data.splits` (audio_info.pkl from step 01)."""
    dataset_dir = Path(cfg["paths"]["dataset_dir"])
    out_dir = features_dir(cfg)
    info_path = out_dir / "audio_info.pkl"
    if not info_path.is_file():
        raise UserError(f"{info_path}: not found (run {STEP_01} first)")
    info = load_pickle(info_path)
    fid2fname = info.get("audio_fid2fname") if isinstance(info, dict) else None
    if not isinstance(fid2fname, dict):
        raise UserError(f"{info_path}: no 'audio_fid2fname' (rerun {STEP_01})")
    for split in cfg["data"]["splits"]:
        if split not in fid2fname:
            raise UserError(f"{info_path}: no split '{split}' (rerun {STEP_01})")
        clips = fid2fname[split]
        if not isinstance(clips, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in clips.items()):
            raise UserError(f"{info_path}: split '{split}' is not a {{fid: file name}} mapping "
                            f"(rerun {STEP_01})")
        # a fid names its clip (make_fid): an edited index would file one clip's log-mels
        # under another's fid, which every later step would trust
        wrong = next((fid for fid, fname in clips.items() if fid != make_fid(split, fname)), None)
        if wrong is not None:
            raise UserError(f"{info_path}: split '{split}': fid {wrong} is not the id of "
                            f"{clips[wrong]!r} (edited, or from another dataset) — rerun {STEP_01}")
    features_cfg = cfg["features"]
    device = resolve_device(features_cfg["device"], "features.device")
    params = worker_params(features_cfg, device)
    with _as_worker(params):
        _warm_up(params)
        return _compute_splits(cfg, dataset_dir, out_dir, fid2fname, params, log)


def _compute_splits(cfg: dict, dataset_dir: Path, out_dir: Path, fid2fname: dict, params: dict,
                    log: Callable) -> list[SplitFeatures]:
    workers = int(cfg["features"]["workers"])
    pool = (ProcessPoolExecutor(workers, _pool_context(), _init_pool_worker, (params, os.getpid()))
            if workers > 1 else None)
    try:
        return [compute_split(dataset_dir, split, fid2fname[split], cfg["features"],
                              cfg["data"]["skip_bad_audio"], log, pool, out_dir)
                for split in cfg["data"]["splits"]]
    except KeyboardInterrupt as e:
        if pool is not None:
            what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            log(f"{what}: the workers save the chunks they started, then stop (Ctrl-C again to stop now)")
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def worker_params(features_cfg: dict, device: str) -> dict:
    """What the workers need: transform parameters and the shard attrs; with a GPU they only
    read the audio."""
    return {"window_s": float(features_cfg["window_s"]), "hop_s": float(features_cfg["hop_s"]),
            "n_mels": int(features_cfg["n_mels"]), "load_only": device != "cpu",
            "attrs": feature_params(features_cfg)}
