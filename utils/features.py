"""Log-mel features for every clip of a split (preprocessing step 02), resumable and crash-safe.

Output: `<dataset_dir>/{split}_audio_logmels.hdf5`, one float32 dataset `[frames, n_mels]` per fid
(dataset name = fid, dataset attrs `fname`, `sr`), the feature parameters as file attrs.

Crash safety and resuming — why the final file can always be trusted:

1. Work in progress lives in `<dataset_dir>/{split}_audio_logmels.parts/`. The clips to compute
   are cut into chunks of at most `features.flush_every`; each chunk is computed and written as
   one small HDF5 shard `shard-NNNNN.h5`, to a temporary name renamed into place
   (utils.io_utils.atomic_path), so a shard that exists is whole. A kill loses at most the
   chunks in progress (`workers` x `flush_every` clips); on Ctrl-C the workers first finish and
   save the chunks they started.
2. A rerun opens every shard, keeps the clips whose feature parameters and wav size match, and
   computes only the missing clips. Leftover temporary files from a kill are removed.
3. When every clip is in a shard, the shards are merged, in audio_info.pkl order, into a
   temporary file that is renamed onto `{split}_audio_logmels.hdf5`; the parts folder is then
   deleted. The final name therefore only ever appears complete.
4. If the final file exists, has the current parameters and exactly the expected fids, the split
   is skipped. If it is stale (other parameters, other clips after a new step 01), it is first
   renamed into the parts folder as one more shard (so no outdated final survives a crash, and
   its clips that are still valid are reused like any shard's).

Workers: `features.workers` processes (a ProcessPoolExecutor) each take a chunk, read and
transform its wavs and write its shard; the parent only keeps the books and merges. (Writing in
the workers matters: sending every log-mel back to one parent that writes them all cost that
parent ~5 ms of CPU per clip, taken from the two workers on a 2-core machine.) With
`features.device` cuda (or auto with a GPU) the workers only read audio and the parent computes
the log-mels on the GPU (utils.audio_utils.log_mel_torch) and writes the shards.

Unusable audio (missing, empty, unreadable) stops the step after everything else is computed and
flushed, listing every such file, unless `data.skip_bad_audio`; then the clips are left out of the
HDF5 (file attr `skipped_fids`) and added to `{split}_skipped_audio.csv` (fname,reason).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
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
from utils.clotho import (bad_audio_error, features_dir, format_bad_audio, read_skipped, resolve_wav,
                          write_skipped)
from utils.devices import resolve_device
from utils.errors import UserError
from utils.io_utils import atomic_path, load_pickle, remove_stale_temps

FORMAT_VERSION = 1  # bump when the computation changes: older files and shards are then redone


def logmel_path(dataset_dir: str | Path, split: str) -> Path:
    return Path(dataset_dir) / f"{split}_audio_logmels.hdf5"


def parts_dir(dataset_dir: str | Path, split: str) -> Path:
    return Path(dataset_dir) / f"{split}_audio_logmels.parts"


def feature_params(features_cfg: dict) -> dict:
    """What determines the features (stored as HDF5 attrs; a mismatch means recompute)."""
    return {"window_s": float(features_cfg["window_s"]), "hop_s": float(features_cfg["hop_s"]),
            "n_mels": int(features_cfg["n_mels"]), "eps": EPS, "format_version": FORMAT_VERSION,
            "definition": "log(librosa melspectrogram power=2 hann centred zero-pad + eps), [frames, n_mels]"}


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


# ---------------------------------------------------------------------------------------------
# Workers (top-level functions: they are pickled to the pool)

@dataclass
class Clip:
    fid: str
    fname: str
    path: str  # resolved wav path
    size: int  # wav bytes when the task was made (changes -> recompute)


@dataclass
class Result:
    clip: Clip
    feats: np.ndarray | None = None  # [frames, n_mels] float32 (or the waveform when loading only)
    sr: int = 0
    reason: str = ""  # "missing" | "empty" | "unreadable: ..." when the clip is unusable


@dataclass
class Chunk:
    folder: str  # the split's parts folder
    index: int  # its shard is shard-{index:05d}.h5
    clips: list[Clip]


@dataclass
class ChunkDone:
    clips: int  # clips the chunk had
    shard: Path | None  # None when none of them was usable
    sizes: dict[str, int]  # fid -> wav size of every clip written to the shard
    bad: list[tuple[str, str]]  # (fname, reason) of the unusable ones


_WORKER_PARAMS: dict = {}


def _init_worker(params: dict) -> None:
    limit_threads()  # one thread per worker process: the processes already fill the cores
    keep_freed_memory()  # reuse the per-clip buffers instead of page-faulting them in anew
    _WORKER_PARAMS.clear()
    _WORKER_PARAMS.update(params)


def _init_pool_worker(params: dict) -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it, and the workers
    # finish (and save) the chunks they started instead of dying with a traceback each
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(params)


def _compute(clip: Clip) -> Result:
    """Read one wav and compute its log-mel (or only read it when params['load_only'])."""
    p = _WORKER_PARAMS
    try:
        y, sr = load_audio(clip.path)
    except AudioError as e:
        return Result(clip, reason=e.reason + (f": {e.detail}" if e.reason == "unreadable" and e.detail else ""))
    if p.get("load_only"):
        return Result(clip, y, sr)
    return Result(clip, log_mel(y, sr, p["window_s"], p["hop_s"], p["n_mels"]), sr)


def _finish_chunk(chunk: Chunk, results: list[Result], attrs: dict) -> ChunkDone:
    """Write the usable results of a chunk as its shard."""
    good = [r for r in results if not r.reason]
    shard = write_shard(Path(chunk.folder), chunk.index, good, attrs) if good else None
    return ChunkDone(len(results), shard, {r.clip.fid: r.clip.size for r in good},
                     [(r.clip.fname, r.reason) for r in results if r.reason])


def _compute_chunk(chunk: Chunk) -> ChunkDone:
    """Log-mels of a chunk of clips, written as one shard (in a worker, or in this process)."""
    return _finish_chunk(chunk, [_compute(clip) for clip in chunk.clips], _WORKER_PARAMS["attrs"])


def _cpu_chunks(chunks: list[Chunk], pool) -> Iterable[ChunkDone]:
    if pool is None:
        return map(_compute_chunk, chunks)
    # submitted in order, so the big chunks go first; reported as they finish
    return (future.result() for future in as_completed([pool.submit(_compute_chunk, c) for c in chunks]))


def _gpu_chunks(chunks: list[Chunk], pool, device: str) -> Iterator[ChunkDone]:
    """The pool (or this process) reads the wavs; the log-mels are computed here on `device`."""
    p = _WORKER_PARAMS
    clips = [clip for chunk in chunks for clip in chunk.clips]
    loaded = pool.map(_compute, clips) if pool is not None else map(_compute, clips)  # chunk order
    for chunk in chunks:
        results = [next(loaded) for _ in chunk.clips]
        for r in results:
            if not r.reason:  # [samples] waveform -> [frames, n_mels] log-mel
                r.feats = log_mel_torch(r.feats, r.sr, device, p["window_s"], p["hop_s"], p["n_mels"]).cpu().numpy()
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

def scan_parts(folder: Path, params: dict, log: Callable = print) -> dict[str, tuple[Path, int]]:
    """{fid: (shard path, wav size)} for every finished clip in `folder` with these params.

    Shards written with other parameters, or unreadable, are deleted (their clips are redone).
    """
    done: dict[str, tuple[Path, int]] = {}
    if not folder.is_dir():
        return done
    remove_stale_temps(folder)
    for shard in sorted(folder.glob("shard-*.h5")):
        try:
            with h5py.File(shard, "r") as f:
                if not _attrs_match(f.attrs, params):
                    log(f"{shard.name}: written with other feature parameters, recomputing its clips")
                    raise ValueError
                for fid, ds in f.items():
                    done[fid] = (shard, int(ds.attrs["size"]))
        except (OSError, ValueError, KeyError):
            shard.unlink(missing_ok=True)
    return done


def _next_shard_index(folder: Path) -> int:
    indices = [int(p.stem.split("-")[1]) for p in folder.glob("shard-*.h5") if p.stem.split("-")[1].isdigit()]
    return max(indices, default=-1) + 1


def write_shard(folder: Path, index: int, results: list[Result], params: dict) -> Path:
    """Write finished clips as one shard, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"shard-{index:05d}.h5"
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(params)
            for r in results:
                ds = f.create_dataset(r.clip.fid, data=r.feats)
                ds.attrs.update({"fname": r.clip.fname, "sr": r.sr, "size": r.clip.size})
    return path


# ---------------------------------------------------------------------------------------------
# The final file

def final_is_complete(path: Path, params: dict, fids: list[str], allow_skipped: bool) -> tuple[bool, str]:
    """(complete?, why not) for an existing `{split}_audio_logmels.hdf5`.

    A file that left clips out (data.skip_bad_audio) counts as complete only while skipping is
    still allowed; otherwise the skipped clips are retried.
    """
    try:
        with h5py.File(path, "r") as f:
            if not _attrs_match(f.attrs, params):
                return False, "written with other feature parameters"
            skipped = set(json.loads(f.attrs.get("skipped_fids", "[]")))
            have = set(f.keys())
    except (OSError, ValueError) as e:
        return False, f"unreadable ({e})"
    if skipped and not allow_skipped:
        return False, f"{len(skipped)} clips were skipped as unusable and data.skip_bad_audio is now false"
    want = set(fids)
    if have | skipped != want or have & skipped:
        return False, f"its clips differ from audio_info.pkl ({len(want - have - skipped)} missing, {len(have - want)} extra)"
    return True, ""


def merge_shards(path: Path, fids: list[str], done: dict[str, tuple[Path, int]], params: dict,
                 skipped_fids: list[str]) -> None:
    """Copy every clip, in `fids` order, from its shard into `path` (atomically)."""
    shards: dict[Path, h5py.File] = {}
    try:
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as out:
                out.attrs.update(params)
                out.attrs["skipped_fids"] = json.dumps(skipped_fids)
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
    reused: int = 0  # clips taken from an earlier, interrupted run
    skipped_existing: bool = False  # the final file was already complete
    bad: list[tuple[str, str]] = field(default_factory=list)
    skipped_csv: Path | None = None


def _pool_context():
    # fork: workers inherit the modules the parent imported and warmed up (librosa's imports
    # take seconds); the parent never initialises CUDA before the pool exists
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def _warm_up(params: dict) -> None:
    """Import and run the transform once in the parent, before forking the workers."""
    _init_worker(params)
    log_mel(np.zeros(4410, np.float32), 44100, params["window_s"], params["hop_s"], params["n_mels"])


def compute_split(dataset_dir: Path, split: str, fid2fname: dict[str, str], features_cfg: dict,
                  skip_bad_audio: bool = False, log: Callable = print, pool=None,
                  out_dir: Path | None = None) -> SplitFeatures:
    """Log-mels of every clip of a split into `<out_dir>/{split}_audio_logmels.hdf5` (see module
    docstring); the wavs are read from `dataset_dir`, `out_dir` is paths.features_dir.

    `pool`: a ProcessPoolExecutor initialised with `_init_pool_worker(worker_params(...))`, or None
    to compute in this process. Raises UserError listing every unusable wav unless `skip_bad_audio`.
    """
    params = feature_params(features_cfg)
    device = resolve_device(features_cfg.get("device", "cpu"), "features.device")
    if pool is None:
        _init_worker(worker_params(features_cfg, device))
    out_dir = Path(out_dir) if out_dir is not None else Path(dataset_dir)
    final = logmel_path(out_dir, split)
    folder = parts_dir(out_dir, split)
    fids = list(fid2fname)
    out = SplitFeatures(split, final, len(fids))
    remove_stale_temps(final.parent, f"{final.name}.")
    if final.exists():
        complete, why = final_is_complete(final, params, fids, skip_bad_audio)
        if complete:
            out.skipped_existing = True
            return out
        # move it out of the way in one rename (no outdated final survives a crash) and treat it
        # as a shard: clips still valid in it are reused, the others recomputed
        log(f"{split}: {final} is outdated ({why}); updating it")
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(final, folder / f"shard-{_next_shard_index(folder):05d}.h5")

    done = scan_parts(folder, params, log)
    todo, bad = [], []
    audio_dir = Path(dataset_dir) / split
    for fid, fname in fid2fname.items():
        path = resolve_wav(audio_dir, fname)
        if path is None:
            bad.append((fname, "missing"))
            continue
        size = path.stat().st_size
        if fid in done and done[fid][1] == size:
            continue
        done.pop(fid, None)
        todo.append(Clip(fid, fname, str(path), size))
    out.reused = sum(fid in done for fid in fids)
    if out.reused:
        log(f"{split}: resuming, {out.reused} of {len(fids)} clips already computed in {folder}")

    first = _next_shard_index(folder) if folder.is_dir() else 0
    workers = int(features_cfg.get("workers", 1)) if pool is not None else 1
    chunks = make_chunks(todo, folder, first, max(1, int(features_cfg.get("flush_every", 64))), workers)
    finished = _cpu_chunks(chunks, pool) if device == "cpu" else _gpu_chunks(chunks, pool, device)
    try:
        with tqdm(total=len(todo), desc=f"{split} log-mels", unit="clip") as progress:
            for chunk in finished:  # shards already on disk: a kill or Ctrl-C from here keeps them
                bad += chunk.bad
                done.update((fid, (chunk.shard, size)) for fid, size in chunk.sizes.items())
                out.computed += len(chunk.sizes)
                progress.update(chunk.clips)
    except BrokenProcessPool:  # a worker was killed (out of memory, a signal); the pool is unusable
        raise UserError(f"{split}: a features.workers process died (killed, out of memory?); the "
                        f"{len(done)} clips finished are kept in {folder}, rerun to resume "
                        f"(fewer workers need less memory)") from None

    if bad:
        order = {fname: i for i, fname in enumerate(fid2fname.values())}
        bad.sort(key=lambda b: order[b[0]])
        if not skip_bad_audio:
            raise bad_audio_error([format_bad_audio(split, bad)])
        out.bad = bad
        out.skipped_csv = out_dir / f"{split}_skipped_audio.csv"
        previous = read_skipped(out.skipped_csv)  # step 01's report, if it skipped clips too
        known = {f for f, _ in previous}
        write_skipped(out.skipped_csv, previous + [b for b in bad if b[0] not in known])
    bad_names = {f for f, _ in bad}
    keep = [fid for fid in fids if fid2fname[fid] not in bad_names]
    skipped_fids = [fid for fid in fids if fid2fname[fid] in bad_names]
    merge_shards(final, keep, done, params, skipped_fids)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def compute_logmels(cfg: dict, log: Callable = print) -> list[SplitFeatures]:
    """Step 02 for every split in `data.splits` (audio_info.pkl from step 01)."""
    dataset_dir = Path(cfg["paths"]["dataset_dir"])
    out_dir = features_dir(cfg)
    info_path = out_dir / "audio_info.pkl"
    if not info_path.is_file():
        raise UserError(f"{info_path}: not found (run preprocessing/01_clotho_dataset.py first)")
    info = load_pickle(info_path)
    fid2fname = info.get("audio_fid2fname") if isinstance(info, dict) else None
    if not isinstance(fid2fname, dict):
        raise UserError(f"{info_path}: no 'audio_fid2fname' (rerun preprocessing/01_clotho_dataset.py)")
    for split in cfg["data"]["splits"]:
        if split not in fid2fname:
            raise UserError(f"{info_path}: no split '{split}' (rerun preprocessing/01_clotho_dataset.py)")
    features_cfg = cfg["features"]
    device = resolve_device(features_cfg.get("device", "cpu"), "features.device")
    params = worker_params(features_cfg, device)
    _warm_up(params)
    workers = int(features_cfg.get("workers", 1))
    pool = ProcessPoolExecutor(workers, _pool_context(), _init_pool_worker, (params,)) if workers > 1 else None
    try:
        return [compute_split(dataset_dir, split, fid2fname[split], features_cfg,
                              cfg["data"]["skip_bad_audio"], log, pool, out_dir)
                for split in cfg["data"]["splits"]]
    except KeyboardInterrupt:
        if pool is not None:
            log("interrupted: the workers save the chunks they started, then stop (Ctrl-C again to stop now)")
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
