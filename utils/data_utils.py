"""Reading the feature files of steps 01–03 for training and evaluation.

All of them live in `features_dir(cfg)` (config key paths.features_dir, default paths.dataset_dir):

- `{split}_text.csv` (step 01): one row per caption, columns `tid,fid,fname,raw_text,text,tokens`.
- `{split}_audio_logmels.hdf5` (step 02): one float32 dataset `[frames, 64]` per fid.
- `{split}_skipped_audio.csv` (steps 01 and 02, with data.skip_bad_audio): the clips left out as
  unusable. Every reader here leaves them and their captions out (`read_split_captions`) and
  says how many (`Skipped`, `skipped_counts`).
- `sbert_embeds.pkl` (step 03): `{tid: float32 vector [D]}`; it becomes one frozen table
  `[N, D]` inside the text encoder, and datasets hand out row ids into it (cheap to batch,
  nothing large travels through DataLoader workers).

A damaged HDF5 file (truncated, or with zeroed internal headers) is one line naming the file and
step 02, which rebuilds it; every clip's header is read when a dataset is built, so a damaged
file is found before training starts rather than in a DataLoader worker.

The HDF5 files are opened lazily, once per process: an open h5py handle can neither be pickled
to DataLoader workers nor shared safely across a fork.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from utils.audio_utils import N_MELS
from utils.clotho import (CAPTIONS_PER_CLIP, HDF5_ERRORS, STEP_01, STEP_02, STEP_03, logmel_path,
                          make_fid, read_skipped, skipped_path)
from utils.clotho import features_dir  # noqa: F401  (the agreed home of the features location)
from utils.devices import amp_mode, autocast
from utils.errors import UserError, raise_if_stopped
from utils.io_utils import file_sha1, load_pickle

STEP_03_CONFIG = "config.03_sbert_embeddings.yaml"  # step 03's config, saved beside its output
REQUIRED_TEXT_COLUMNS = ("tid", "fid", "fname", "raw_text")  # of clotho.TEXT_COLUMNS, what we read


# --------------------------------------------------------------------------- files

def text_csv_path(dataset_dir: str | Path, split: str) -> Path:
    return Path(dataset_dir) / f"{split}_text.csv"


def not_found(path: Path, fix: str) -> UserError:
    """A step's input that is not a file: missing (run the step that writes it), or a folder,
    or under a file where a folder should be (a paths.* key pointing at the wrong thing)."""
    if path.is_dir():
        return UserError(f"{path}: a folder where a file is expected — move it away or point the "
                         "config elsewhere")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return UserError(f"{blocker}: a file where a folder is expected (looking for {path}) — "
                         "point the config's paths at a folder")
    return UserError(f"{path}: not found — {fix}")


def check_features_found(cfg: dict, run_dir: str | Path) -> None:
    """A trained run's features folder must be found before anything is compared with it: a run
    moved (or its checkout moved) away from relative paths would otherwise read as "scores from
    other data" or "run step 03", advice that recomputes what is only not found (UserError)."""
    folder = features_dir(cfg)
    if folder.is_dir():
        return
    key = "paths.features_dir" if cfg["paths"].get("features_dir") else "paths.dataset_dir"
    where = "" if folder.is_absolute() else f" from {Path.cwd()}"
    raise UserError(f"{key} {str(folder)!r} of {Path(run_dir) / 'config.yaml'} is not a folder"
                    f"{where} — run from the directory the run was trained in, or --set "
                    f"{key}=<where it is now>")


def check_split_prepared(dataset_dir: str | Path, split: str, cfg: dict, key: str) -> None:
    """A split named by config key `key` (data.train_split, eval.splits, ...) that steps 01-03
    never prepare, as it is not in data.splits, and whose captions are absent: a typo, most
    likely. Say so, rather than "run step 01", which would not write it either (UserError)."""
    prepared = cfg["data"]["splits"]
    if split in prepared or text_csv_path(dataset_dir, split).exists():
        return
    raise UserError(f"config key '{key}': split '{split}' is not one of data.splits "
                    f"({', '.join(prepared)}), the splits steps 01-03 prepare — correct the name, "
                    f"or add it to data.splits and run steps 01-03")


def read_text_csv(dataset_dir: str | Path, split: str) -> pd.DataFrame:
    """The captions of `split`, every column as str (a caption "null" or "NA" stays text)."""
    path = text_csv_path(dataset_dir, split)
    if not path.is_file():
        raise not_found(path, f"run {STEP_01}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable caption CSV ({str(e).splitlines()[0]}) — "
                        f"rerun {STEP_01}") from None
    missing = [c for c in REQUIRED_TEXT_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} — rerun {STEP_01}")
    if df.empty:
        raise UserError(f"{path}: no captions — rerun {STEP_01}")
    # an edited file: name the row here, not as a clip missing from the log-mels later
    ids = ["tid", "fid", "fname"]  # a caption may be any text, an empty one included
    empty = (df[ids].apply(lambda c: c.str.strip()) == "").any(axis=1)
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        blank = [c for c in ids if not df[c].iloc[row].strip()]
        raise UserError(f"{path}: row {row + 2}: empty {', '.join(blank)} — remove the row or rerun "
                        f"{STEP_01}")
    repeated = df["tid"].duplicated()
    if repeated.any():
        row = int(np.flatnonzero(repeated.to_numpy())[0])
        raise UserError(f"{path}: row {row + 2}: tid {df['tid'].iloc[row]} appears twice — rerun "
                        f"{STEP_01}")
    return df


def texts_path(embeddings_path: str | Path) -> Path:
    """The record of which text each embedding was computed from: `sbert_embeds.texts.json`."""
    return Path(embeddings_path).with_suffix(".texts.json")


def text_digest(text: str) -> str:
    return hashlib.sha1(str(text).encode("utf-8")).hexdigest()[:16]


def _texts_record(embeddings_path: str | Path) -> dict:
    """Step 03's record beside the embeddings ({"model", "text_sha1", "embeddings_sha1"}), or {}
    where it is absent or unreadable (an older step 03): nothing to check then. A record of
    other embeddings (step 03 stopped between its two files) is refused: trusted, it would
    vouch for the wrong model and texts."""
    try:
        with open(texts_path(embeddings_path), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    described = record.get("embeddings_sha1")
    if described is not None and described != embeddings_sha1(embeddings_path):
        raise UserError(f"{texts_path(embeddings_path)}: describes other caption embeddings than "
                        f"{embeddings_path} (step 03 was stopped between writing the two) — "
                        f"{rerun_step_03(Path(embeddings_path))}")
    return record


def embeddings_sha1(path: str | Path) -> str | None:
    """sha1 of the caption embeddings file (None if absent), computed once per version of it:
    every load checks it against step 03's record (~0.2 s for Clotho's 77 MB)."""
    try:
        return file_sha1(path)
    except FileNotFoundError:
        return None


def read_text_digests(embeddings_path: str | Path) -> dict[str, str] | None:
    """{tid: text_digest} that step 03 embedded, or None where there is no record."""
    digests = _texts_record(embeddings_path).get("text_sha1")
    return digests if isinstance(digests, dict) else None


def rerun_step_03(embeddings_path: Path) -> str:
    """"rerun step 03", with the --conf it ran with when it saved one: a bare rerun reads
    conf.yaml, whose paths may name another dataset (the demo's are in conf_demo.yaml)."""
    saved = Path(embeddings_path).parent / STEP_03_CONFIG
    return f"rerun {STEP_03} --conf {saved}" if saved.is_file() else f"rerun {STEP_03}"


def recorded_sentence_model(embeddings_path: Path) -> str | None:
    """The sentence model step 03 says it computed the embeddings with (None: no record)."""
    recorded = _texts_record(embeddings_path).get("model")
    return recorded if isinstance(recorded, str) else None


def check_sentence_model(embeddings_path: Path, model: str, rerun: str | None = None) -> None:
    """The caption embeddings must come from the sentence model the config names: query.py and
    the API embed typed queries with it, into the space the captions' projection was trained
    on. Refused when step 03's record says another model (absent record: nothing to check).
    `rerun`: for a trained run, whose sentence model is fixed, the step-03 command that embeds
    with it again (the advice then, never a --set sbert.model to whatever step 03 used last)."""
    recorded = recorded_sentence_model(embeddings_path)
    # step 03 before `~` was expanded in the config recorded `~/models/x` as written; the
    # config now says /home/you/models/x, the same folder (utils.config._leaf)
    if recorded is not None and os.path.expanduser(recorded) != os.path.expanduser(model):
        advice = (f"rerun {rerun}, which embeds the captions with the run's model" if rerun is not None
                  else f"--set sbert.model={recorded}, or rerun {STEP_03} with this config")
        raise UserError(f"{embeddings_path}: computed with sentence model {recorded!r}, but the "
                        f"config says sbert.model={model!r} — {advice}")


def check_texts_embedded(dataset_dir: Path, embeddings_path: Path) -> None:
    """A caption edited after step 03 (then step 01 rerun) keeps its tid, so its old embedding
    would be used for the new text without a word: refused, naming the row. Every split's
    text CSV beside the embeddings is checked (those step 03 did not embed have no record)."""
    digests = read_text_digests(embeddings_path)
    if digests is None:
        return
    for csv_path in sorted(Path(dataset_dir).glob("*_text.csv")):
        df = read_text_csv(dataset_dir, csv_path.name[:-len("_text.csv")])
        for row, tid, text in zip(df.index + 2, df["tid"], df["raw_text"]):  # row 1: the header
            if digests.get(tid, text_digest(text)) != text_digest(text):
                raise UserError(f"{csv_path}: row {row}: caption {str(text)[:60]!r} changed since "
                                f"{embeddings_path} was computed — {rerun_step_03(embeddings_path)}")


def load_text_table(dataset_dir: str | Path, filename: str = "sbert_embeds.pkl"
                    ) -> tuple[torch.Tensor, dict[str, int]]:
    """All caption embeddings as one float32 table `[N, D]` and the tid -> row mapping.

    Rows follow the file's order (deterministic: step 03 writes tids in CSV order).
    """
    path = Path(dataset_dir) / filename
    if not path.is_file():
        raise not_found(path, f"run {STEP_03}")
    embeds = load_pickle(path)
    if not isinstance(embeds, dict) or not embeds:
        raise UserError(f"{path}: expected a non-empty {{tid: vector}} dict — rerun {STEP_03}")
    tid2row: dict[str, int] = {}
    rows = []
    dim = None
    for tid, vec in embeds.items():
        vec = np.asarray(vec, dtype=np.float32)
        if vec.ndim != 1 or (dim is not None and vec.shape[0] != dim):
            raise UserError(f"{path}: tid {tid}: vector of shape {list(vec.shape)}, expected "
                            f"[{dim if dim is not None else 'D'}] like the others — rerun {STEP_03}")
        dim = vec.shape[0]
        tid2row[str(tid)] = len(rows)
        rows.append(vec)
    table = torch.from_numpy(np.stack(rows))  # [N, D]
    if not torch.isfinite(table).all():
        bad = next(t for t, r in tid2row.items() if not torch.isfinite(table[r]).all())
        raise UserError(f"{path}: tid {bad}: embedding has NaN/inf values — rerun {STEP_03}")
    check_texts_embedded(Path(dataset_dir), path)
    return table, tid2row


def damaged_hdf5_error(path: str | Path, e: BaseException | str, data: bool = False) -> UserError:
    """One line naming a damaged log-mel file and the command that fixes it. Step 02 reads every
    clip's header before it calls a file complete, so damaged headers need only a rerun; damage
    in the data itself (`data`) it cannot see without reading everything, so the file goes first."""
    first = e if isinstance(e, str) else (str(e).strip().splitlines() or [type(e).__name__])[0]
    fix = f"delete it and rerun {STEP_02}" if data else f"rerun {STEP_02}, which rebuilds it"
    return UserError(f"{path}: damaged HDF5 file ({first[:200]}) — {fix}")


@contextlib.contextmanager
def _hdf5_errors(path: str | Path, data: bool = False):
    """Any failure to parse the HDF5 file inside the block is one line naming it and the fix."""
    try:
        yield
    except UserError:
        raise
    except HDF5_ERRORS as e:
        raise damaged_hdf5_error(path, e, data) from None


def open_logmels(dataset_dir: str | Path, split: str) -> h5py.File:
    """The log-mel HDF5 of `split`, opened read-only (the caller closes it)."""
    path = logmel_path(dataset_dir, split)
    if not path.is_file():
        raise not_found(path, f"run {STEP_02}")
    with _hdf5_errors(path):
        return h5py.File(path, "r")


def logmel_lengths(dataset_dir: str | Path, split: str, fids: Sequence[str]) -> np.ndarray:
    """Frames per clip `[C]` (int64), in the order of `fids`; a fid absent from the HDF5 raises.

    Reads every clip's header, so a damaged file is found here."""
    path = logmel_path(dataset_dir, split)
    with open_logmels(dataset_dir, split) as h5, _hdf5_errors(path):
        check_fids_in_hdf5(h5, fids, path, split=split)
        lengths = np.empty(len(fids), dtype=np.int64)
        for i, fid in enumerate(fids):
            shape = _dataset(h5, fid).shape
            if len(shape) != 2 or shape[1] != N_MELS or shape[0] < 1:
                raise UserError(f"{path}: fid {fid}: dataset of shape "
                                f"{list(shape)}, expected [frames, {N_MELS}] — rerun {STEP_02}")
            lengths[i] = shape[0]
    return lengths


def _missing_logmels_fix(dataset_dir: Path, split: str, fid: str) -> str:
    """Step 02 computes the clips of audio_info.pkl; a clip the captions name but the index does
    not (step 01 stopped between its files, or they were edited) needs step 01 first."""
    try:
        indexed = fid in load_pickle(Path(dataset_dir) / "audio_info.pkl")["audio_fid2fname"][split]
    except (UserError, KeyError, TypeError):
        indexed = False
    if indexed:
        return f"rerun {STEP_02}"
    return f"rerun {STEP_01}, then {STEP_02} (the captions name clips audio_info.pkl lacks)"


def check_fids_in_hdf5(h5: h5py.File, fids: Sequence[str], path: Path,
                       csv_path: Path | None = None, rows: Sequence[int] | None = None,
                       split: str | None = None) -> None:
    """Raise a UserError naming the first fid (and its CSV row) that has no log-mels."""
    with _hdf5_errors(path):
        names = set(h5.keys())
    for i, fid in enumerate(fids):
        if fid not in names:
            where = f"{csv_path}: row {rows[i]}: " if csv_path is not None and rows is not None else ""
            n_missing = sum(f not in names for f in set(fids))
            fix = _missing_logmels_fix(path.parent, split, fid) if split else f"rerun {STEP_02}"
            raise UserError(f"{where}fid {fid} has no log-mels in {path} ({n_missing} clip(s) "
                            f"missing) — {fix}")


@dataclass(frozen=True)
class Skipped:
    """The clips of a split left out as unusable (data.skip_bad_audio), and their captions."""
    clips: int = 0
    captions: int = 0
    path: Path | None = None  # the skip list that names them

    def describe(self, split: str) -> str:
        return (f"{split}: {self.clips} skipped clip(s) and their {self.captions} caption(s) left out "
                f"(listed in {self.path})")


def read_split_captions(dataset_dir: str | Path, split: str) -> tuple[pd.DataFrame, Skipped]:
    """`read_text_csv` without the captions of the clips in the split's skip list, and what was
    left out. The index keeps each caption's position in the CSV (its line is index + 2). Clips
    that step 01 skipped have no rows in the text CSV: they count CAPTIONS_PER_CLIP captions."""
    df = read_text_csv(dataset_dir, split)
    path = skipped_path(dataset_dir, split)
    rows = read_skipped(path)
    if not rows:
        return df, Skipped()
    skipped = {make_fid(split, fname) for fname, _, _ in rows}
    drop = df["fid"].isin(skipped).to_numpy()
    present = set(df["fid"][drop])
    captions = int(drop.sum()) + CAPTIONS_PER_CLIP * len(skipped - present)
    kept = df[~drop]
    if kept.empty:
        raise UserError(f"{path}: every clip of split '{split}' is skipped as unusable — fix the "
                        f"wavs it lists, then rerun {STEP_01} and {STEP_02}")
    return kept, Skipped(len(skipped), captions, path)


def skipped_counts(dataset_dir: str | Path, splits: Sequence[str]) -> dict[str, dict[str, int]]:
    """{split: {"clips": n, "captions": m}}: what every reader leaves out of each split as
    unusable audio (data.skip_bad_audio), for reports and metrics.json."""
    out = {}
    for split in splits:
        _, s = read_split_captions(dataset_dir, split)
        out[split] = {"clips": s.clips, "captions": s.captions}
    return out


def _split_clips(df: pd.DataFrame) -> tuple[list[str], list[str], np.ndarray]:
    """Unique clips in order of first appearance: (fids [C], fnames [C], caption_clip [Q])."""
    fid_index: dict[str, int] = {}
    fnames: list[str] = []
    caption_clip = np.empty(len(df), dtype=np.int64)
    for q, (fid, fname) in enumerate(zip(df["fid"], df["fname"])):
        if fid not in fid_index:
            fid_index[fid] = len(fid_index)
            fnames.append(fname)
        caption_clip[q] = fid_index[fid]
    return list(fid_index), fnames, caption_clip


def _check_split(dataset_dir, split: str, df: pd.DataFrame, tid2row: dict[str, int] | None) -> None:
    """Every caption's fid has readable log-mels and every tid a sentence embedding (else UserError)."""
    csv_path = text_csv_path(dataset_dir, split)
    if tid2row is not None:
        for row, tid in zip(df.index + 2, df["tid"]):  # row 1 is the header
            if tid not in tid2row:
                raise UserError(f"{csv_path}: row {row}: tid {tid} has no sentence embedding in "
                                f"text_encoder.embeddings (written by step 03) — rerun {STEP_03}")
    with open_logmels(dataset_dir, split) as h5:
        check_fids_in_hdf5(h5, list(df["fid"]), logmel_path(dataset_dir, split),
                           csv_path, list(df.index + 2), split)
    logmel_lengths(dataset_dir, split, list(dict.fromkeys(df["fid"])))  # every clip's header reads


# --------------------------------------------------------------------------- datasets

class _LazyHDF5:
    """Opens the HDF5 file on first use in each process (DataLoader workers included)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    def get(self) -> h5py.File:
        # A handle inherited through fork is not safe to use: reopen in the new process.
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5, self._pid = None, None

    def __getstate__(self):
        return {"path": self.path, "_h5": None, "_pid": None}


def _read_clip(h5: h5py.File, fid: str, max_frames: int, train: bool) -> torch.Tensor:
    """`[T, 64]` float32; with max_frames > 0 a longer clip is cropped (random if `train`).

    Only h5py's own calls are under _hdf5_errors: a failure there is the file's (its header was
    read when the dataset was built), whereas one in this code must not pass for damage."""
    with _hdf5_errors(h5.filename, data=True):
        ds = _dataset(h5, fid)
        n = ds.shape[0]
    if max_frames > 0 and n > max_frames:
        if train:
            # torch's RNG: in DataLoader workers seeded anew each epoch from (seed, epoch) (see
            # train_utils.make_train_loader); in the main process restored on resume.
            start = int(torch.randint(0, n - max_frames + 1, ()).item())
        else:
            start = (n - max_frames) // 2
        region = slice(start, start + max_frames)
    else:
        region = slice(None)
    with _hdf5_errors(h5.filename, data=True):
        x = ds[region]
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _dataset(h5: h5py.File, fid: str) -> h5py.Dataset:
    """The clip's dataset; h5py gives None for an object whose header it cannot parse."""
    ds = h5[fid]
    if not isinstance(ds, h5py.Dataset):
        raise ValueError(f"fid {fid}: unreadable object header")
    return ds


class CaptionDataset(Dataset):
    """One item per caption of `split`: (log-mels `[T, 64]`, text row id, clip index).

    Clip indices number the split's clips in order of first appearance in the CSV
    (the same order as `SplitEmbeddings.fids`); they identify "same clip" pairs in the loss.
    Clips in the split's skip list and their captions are left out (`self.skipped` says how many).
    """

    def __init__(self, dataset_dir: str | Path, split: str, tid2row: dict[str, int],
                 max_frames: int = 0, train: bool = False):
        self.dataset_dir, self.split = Path(dataset_dir), split
        self.max_frames, self.train = int(max_frames), bool(train)
        df, self.skipped = read_split_captions(dataset_dir, split)
        _check_split(dataset_dir, split, df, tid2row)
        self.fids, self.fnames, self.caption_clip = _split_clips(df)
        self.tids = list(df["tid"])
        self.rows = np.array([tid2row[t] for t in self.tids], dtype=np.int64)
        self._h5 = _LazyHDF5(logmel_path(dataset_dir, split))

    def __len__(self) -> int:
        return len(self.tids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        clip = int(self.caption_clip[i])
        x = _read_clip(self._h5.get(), self.fids[clip], self.max_frames, self.train)
        return x, int(self.rows[i]), clip

    def close(self) -> None:
        self._h5.close()


class ClipDataset(Dataset):
    """One item per clip: (log-mels `[T, 64]`, clip index into `fids`)."""

    def __init__(self, dataset_dir: str | Path, split: str, fids: Sequence[str]):
        self.dataset_dir, self.split, self.fids = Path(dataset_dir), split, list(fids)
        self.lengths = logmel_lengths(dataset_dir, split, self.fids)  # [C], also validates fids
        self._h5 = _LazyHDF5(logmel_path(dataset_dir, split))

    def __len__(self) -> int:
        return len(self.fids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return _read_clip(self._h5.get(), self.fids[i], 0, False), int(i)

    def close(self) -> None:
        self._h5.close()


def collate_pad(batch: Sequence[tuple], multiple: int = 0) -> tuple[torch.Tensor, ...]:
    """Zero-pad log-mels to the longest clip in the batch (as the baseline).

    `[(x [T_i, 64], id, ...), ...]` -> `(audio [B, T_max, 64], ids LongTensor [B], ...)`: for
    CaptionDataset items that is (audio, text rows, clip ids); for ClipDataset (audio, clip ids).
    `multiple` > 0 (config key training.pad_to_multiple, opt-in) pads T_max further up to a
    multiple of that many frames: fewer distinct shapes for cuDNN and torch.compile, but the
    extra zero frames enter the encoder's pooling, so the numbers differ from the baseline's.
    """
    xs = [item[0] for item in batch]
    t_max = max(x.shape[0] for x in xs)
    if multiple > 0:
        t_max = -(-t_max // multiple) * multiple
    audio = xs[0].new_zeros((len(xs), t_max, xs[0].shape[1]))
    for b, x in enumerate(xs):
        audio[b, :x.shape[0]] = x
    rest = tuple(torch.tensor([item[k] for item in batch], dtype=torch.long)
                 for k in range(1, len(batch[0])))
    return (audio, *rest)


# The most frames a batch of clips holds once padded, when clips are embedded. On the CPU a
# larger batch of long clips is slower (its activations leave the caches): the full CNN14 on 32
# clips of 15-30 s took 7.9 s in batches of 4, 11.2 s in one batch of 32; on clips of 3-4 s,
# batches of 32 were the fastest (2-core CPU machine): 4 Clotho clips of 30 s. On a GPU the
# bound is memory: 32 clips of 30 s, a training batch (CNN14 in fp32 peaked at 2.4 GB on them);
# long recordings (query.py on a folder) go fewer to a batch, and a very long one alone.
CPU_BATCH_FRAMES = 6144
GPU_BATCH_FRAMES = 32 * 1536


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_frames: int = 0
                          ) -> list[list[int]]:
    """Batches of indices in order of clip length, longest first: padded to its longest clip,
    each batch adds little padding, which the encoder masks out (`audio_branch(x, lengths)`).
    A batch holds at most `batch_size` clips and, if `max_frames` > 0, at most that many frames
    once padded (a longer clip is a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))  # stable: ties in order
    batches: list[list[int]] = []
    for i in order:
        if (not batches or len(batches[-1]) == batch_size
                or max_frames and (len(batches[-1]) + 1) * int(lengths[batches[-1][0]]) > max_frames):
            batches.append([])
        batches[-1].append(i)
    return batches


def clip_batches(lengths: Sequence[int], batch_size: int, device) -> list[list[int]]:
    """How clips of these lengths are batched to be embedded on `device` (length_sorted_batches,
    at most CPU_BATCH_FRAMES or GPU_BATCH_FRAMES frames a batch)."""
    cpu = torch.device(device).type == "cpu"
    return length_sorted_batches(lengths, batch_size, CPU_BATCH_FRAMES if cpu else GPU_BATCH_FRAMES)


def collate_clips(batch: Sequence[tuple[torch.Tensor, int]]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ClipDataset items -> (audio `[B, T_max, 64]` zero-padded, lengths `[B]`, clip ids `[B]`)."""
    audio, ids = collate_pad(batch)
    return audio, torch.tensor([len(x) for x, _ in batch], dtype=torch.long), ids


# --------------------------------------------------------------------------- encoding

@dataclass
class SplitEmbeddings:
    """Every clip and caption of one split, each encoded once.

    fids, fnames: `[C]`; audio: float32 `[C, E]`; tids, captions (raw_text): `[Q]`;
    caption_clip: int64 `[Q]`, the index into `fids` of each caption's clip; text: float32 `[Q, E]`.
    skipped: the clips (and captions) of the split left out as unusable audio.
    """
    split: str
    fids: list[str]
    fnames: list[str]
    audio: np.ndarray
    tids: list[str]
    captions: list[str]
    caption_clip: np.ndarray
    text: np.ndarray
    skipped: Skipped = Skipped()


def relevance(emb: SplitEmbeddings) -> np.ndarray:
    """bool `[Q, C]`: True where clip c is the one caption q describes."""
    rel = np.zeros((len(emb.tids), len(emb.fids)), dtype=bool)
    rel[np.arange(len(emb.tids)), emb.caption_clip] = True
    return rel


def inference_precision(device: torch.device | str, amp: str = "off") -> str:
    """What eval.amp computes in on `device`: "fp32" (off, the default, as the original code;
    always on the CPU), else "bf16" or "fp16" (auto: bf16 where the GPU has it natively)."""
    mode = amp_mode(amp, torch.device(device), "eval.amp")
    return "fp32" if mode == "off" else mode


def inference_autocast(device: torch.device | str, amp: str = "off"):
    """Autocast for inference (config key eval.amp), as inference_precision resolves it."""
    return autocast(torch.device(device), amp_mode(amp, torch.device(device), "eval.amp"))


def leave_signals_to_the_parent(worker_id: int) -> None:
    """DataLoader `worker_init_fn`. A SIGTERM to the process group (a cluster's time limit)
    reaches the workers too, and torch's own handler there would end them with it; the parent,
    stopping cleanly (utils.errors.Terminated), would then fail on "worker killed by signal". The
    parent alone handles it and ends its workers, as for Ctrl-C.

    A worker hands each batch's shared memory to the parent over a connection that a helper
    thread serves (multiprocessing.resource_sharer). A parent that stops while taking a batch
    resets that connection, and the thread's traceback (ConnectionResetError) followed the
    parent's one-line message; the worker stays quiet about its link to the parent breaking
    (its main loop never reaches sys.excepthook: torch hands its errors to the parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.excepthook = _quiet_about_a_broken_link(sys.excepthook)


def _quiet_about_a_broken_link(hook):
    def quiet(kind, value, traceback) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            hook(kind, value, traceback)
    return quiet


def clip_loader(dataset: ClipDataset, batch_size: int, device, num_workers: int = 0,
                persistent: bool = False) -> DataLoader:
    """What encode_audio reads `dataset` with: `(audio, lengths, clip ids)` batches of clips of
    similar length (collate_clips over clip_batches). `persistent`: its workers live on
    between passes, for a split encoded again and again (validation, at each epoch's end), where
    a fork of the training process per pass would cost as much as the reads it saves."""
    # A kept loader seeds its workers from a generator of its own: from the global RNG, its
    # persistent workers would draw only at the first pass, a resumed run's in another epoch
    # than the uninterrupted run's, and their dropout masks would part from there on.
    return DataLoader(dataset, batch_sampler=clip_batches(dataset.lengths, batch_size, device),
                      collate_fn=collate_clips, num_workers=num_workers,
                      pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=persistent and num_workers > 0,
                      generator=torch.Generator().manual_seed(0) if persistent else None,
                      worker_init_fn=leave_signals_to_the_parent)


@torch.no_grad()
def encode_audio(model: torch.nn.Module, dataset: ClipDataset, batch_size: int, device,
                 num_workers: int = 0, amp: str = "off", copy_every: int = 256,
                 loader: DataLoader | None = None) -> np.ndarray:
    """`model.audio_branch` on every clip of `dataset`, once, each embedded as it is alone (its
    batch's padding masked out) -> float32 `[C, E]` (embeddings are copied off the device every
    `copy_every` batches). `loader`: a `clip_loader` of `dataset` kept from an earlier pass (its
    batch size and workers apply)."""
    device = torch.device(device)
    if loader is None:
        loader = clip_loader(dataset, batch_size, device, num_workers)
    out: np.ndarray | None = None
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (clip ids [b], embeddings [b, E])

    def flush():
        # one copy for many batches: a copy per batch would wait for the GPU at every batch
        nonlocal out
        ids = torch.cat([i for i, _ in pending]).numpy()
        emb = torch.cat([e for _, e in pending]).cpu().numpy()
        if out is None:
            out = np.empty((len(dataset), emb.shape[1]), dtype=np.float32)
        out[ids] = emb
        pending.clear()

    with _eval_mode(model):
        for audio, lengths, clip_ids in loader:
            raise_if_stopped()
            with inference_autocast(device, amp):
                emb = model.audio_branch(audio.to(device, non_blocking=True),
                                         lengths.to(device, non_blocking=True))
            pending.append((clip_ids, emb.float()))
            if len(pending) == copy_every:
                flush()
        if pending:
            flush()
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


@torch.no_grad()
def encode_text_rows(model: torch.nn.Module, rows: np.ndarray, batch_size: int, device,
                     amp: str = "off") -> np.ndarray:
    """`model.text_branch` on table rows `[Q]` -> float32 `[Q, E]`."""
    device = torch.device(device)
    parts = []
    with _eval_mode(model):
        for s in range(0, len(rows), batch_size):
            ids = torch.as_tensor(rows[s:s + batch_size], dtype=torch.long, device=device)
            with inference_autocast(device, amp):
                parts.append(model.text_branch(ids).float())
    return torch.cat(parts).cpu().numpy()  # one copy: a copy per batch waits for the GPU each time


def encode_split(model: torch.nn.Module, dataset_dir: str | Path, split: str,
                 tid2row: dict[str, int], batch_size: int, device, num_workers: int = 0,
                 amp: str = "off", loader: DataLoader | None = None) -> SplitEmbeddings:
    """Embed each clip and each caption of `split` once (eval mode, no grad; fp32 unless `amp`);
    clips in the split's skip list and their captions are left out (`.skipped`). `loader`: the
    split's `split_clip_loader`, kept from an earlier pass."""
    df, skipped = read_split_captions(dataset_dir, split)
    _check_split(dataset_dir, split, df, tid2row)
    fids, fnames, caption_clip = _split_clips(df)
    tids = list(df["tid"])
    rows = np.array([tid2row[t] for t in tids], dtype=np.int64)
    clips = ClipDataset(dataset_dir, split, fids) if loader is None else loader.dataset
    if clips.fids != fids:  # the split's files were rewritten since the loader was made
        raise UserError(f"split '{split}' in {dataset_dir} changed while it was in use: its clips "
                        "are not those read before; rerun the command")
    try:
        audio = encode_audio(model, clips, batch_size, device, num_workers, amp, loader=loader)
    finally:
        if loader is None:
            clips.close()
    text = encode_text_rows(model, rows, batch_size, device, amp)
    return SplitEmbeddings(split=split, fids=fids, fnames=fnames, audio=audio, tids=tids,
                           captions=list(df["raw_text"]), caption_clip=caption_clip, text=text,
                           skipped=skipped)


def split_clip_loader(dataset_dir: str | Path, split: str, batch_size: int, device,
                      num_workers: int = 0) -> DataLoader:
    """A persistent `clip_loader` of `split`'s clips (those encode_split embeds), for
    encode_split's `loader`."""
    df, _ = read_split_captions(dataset_dir, split)
    fids, _, _ = _split_clips(df)
    return clip_loader(ClipDataset(dataset_dir, split, fids), batch_size, device, num_workers,
                       persistent=True)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode for the block, then the mode the model was in (training resumes correctly)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
