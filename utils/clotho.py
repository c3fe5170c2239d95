"""Clotho v2.1 captions and audio index (preprocessing step 01), and where a split's files are.

Two folder layouts are recognised (`find_layout`, `split_paths`; every step uses them):

- Zenodo (as the archives extract, and as step 00 writes it):
  `<dataset_dir>/clotho_captions_{split}.csv`, `<dataset_dir>/{split}/*.wav`;
- aac-datasets (`Clotho(root, subset=...)`, version v2.1): `<root>/CLOTHO_v2.1/clotho_csv_files/
  clotho_captions_{split}.csv`, `<root>/CLOTHO_v2.1/clotho_audio_files/{split}/*.wav`, with
  `paths.dataset_dir` pointing at `<root>` or at `<root>/CLOTHO_v2.1`.

Step 01 reads a split's captions CSV (header `file_name,caption_1,...,caption_5`), matches every
row to its wav, probes the wav for its duration, cleans the captions and writes into
`paths.features_dir` (default: the dataset folder; atomically; formats in CONTRIBUTING.md):

- `audio_info.pkl`   {"audio_fid2fname": {split: {fid: fname}}, "audio_durations": {split: [s, ...]}}
- `{split}_text.csv` tid,fid,fname,raw_text,text,tokens (one row per caption, CSV order)
- `vocab_info.pkl`   {"vocabulary": [...], "word_bags": {split: {word: n}}, "split_info": {...}}
- `{split}_skipped_audio.csv` (fname,reason,step): the split's one skip list, kept by steps 01 and
  02 (each replaces only its own rows), present only while `data.skip_bad_audio` skipped clips.

A `file_name` must name a file directly inside its split's audio folder: a path (`../x.wav`,
`sub/x.wav`, `/abs/x.wav`), `.`/`..`, an empty name or one holding a NUL, slash or backslash is
refused while the CSV is read, before any file is looked at, so the message is the same whether
or not such a file exists. Two rows whose names differ only by leading spaces (`x.wav`,
` x.wav`) are refused too: they would be matched to the same wav (names with a leading space are
matched to the wav without it, as extraction tools drop it), so one recording would count as
two clips with five captions each; merging them into one clip of ten captions would break the
five-captions-per-clip definition of the audio-to-text metrics, and the official CSVs have no
such pair, so it can only be an edited file.

Ids are deterministic: fid = uuid5(NAMESPACE, "{split}/{fname}").hex with fname as written in the
CSV (leading space included), tid = uuid5(NAMESPACE, "{fid}/{caption_number}").hex, n in 1..5.

Caption cleaning (`clean_caption`): raw_text is kept verbatim; text is lower-cased; apostrophes
are deleted so a possessive stays one word ("dog's" -> "dogs"; Clotho v2.1 has none); every other
punctuation mark becomes a space ("back-and-forth" -> "back and forth"); "echos" -> "echoes";
runs of spaces collapse; a function word typed twice in a row ("a a", "the the", "to to",
"on on", "then then", "and and" ...: DOUBLED_DROP) keeps one copy, while repeated content words
stay, since in captions they are nearly always intentional ("tick tick", "beep beep", "rain rain").
British spellings stay as written.
"""
from __future__ import annotations

import csv
import io
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from utils.audio_utils import AudioError, probe_audio
from utils.errors import UserError
from utils.io_utils import atomic_open, save_pickle
from utils.locks import exclusive

NAMESPACE = uuid.UUID("faed236c-0068-4bd6-b018-18d0c821f08f")  # fixed forever: ids depend on it
CAPTION_COLUMNS = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
CAPTIONS_PER_CLIP = len(CAPTION_COLUMNS) - 1  # every row of a captions CSV has all five
FIVE_CAPTIONS = ("every clip needs exactly five captions, one per column caption_1..caption_5, and no "
                 "other column (the metrics are defined for five; README: your own dataset)")
TEXT_COLUMNS = ["tid", "fid", "fname", "raw_text", "text", "tokens"]
SKIPPED_COLUMNS = ["fname", "reason", "step"]
# "non-finite": the wav reads, but holds NaN/inf samples (step 02: step 01 reads headers only).
# "no log-mel": the wav reads, but cannot be turned into a log-mel (step 02; e.g. its sample
# rate is too low for the 40 ms window)
BAD_AUDIO_REASONS = ("missing", "empty", "unreadable", "non-finite", "no log-mel")
LOCK_NAME = ".features.lock"  # in paths.features_dir, held by steps 01-03 (utils.locks)
AAC_DATASETS_ROOT = "CLOTHO_v2.1"  # aac-datasets' folder for Clotho v2.1 (its _get_clotho_root)
CLOTHO_SPLITS = ("development", "validation", "evaluation")  # the splits step 00 downloads
CAPTIONS_PREFIX = "clotho_captions_"  # a split's captions CSV: clotho_captions_{split}.csv

# Words that are never meant twice in a row: articles, prepositions, conjunctions, pronouns,
# auxiliaries. Content words repeat on purpose in sound descriptions (onomatopoeia), so stay.
DOUBLED_DROP = frozenset("""
    a an the to on in at of for from with by into onto off over under up down out as about
    and or but then than while that which who this these those there
    it its he she they them his her their someone something is are was were be been being
    has have had do does will can
""".split())
SPELLING_FIXES = {"echos": "echoes"}
_APOSTROPHES = re.compile("['\u2019\u2018`\u00b4]")
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def features_dir(cfg: dict) -> Path:
    """Where steps 01–03 write their outputs and every later step reads them: config key
    `paths.features_dir`, or `paths.dataset_dir` when that is null. The wavs and the caption
    CSVs are always read from `paths.dataset_dir`, which may then be read-only.
    (Also `utils.data_utils.features_dir`; defined here so that steps 01–02 need no torch.)"""
    paths = cfg["paths"]
    return Path(paths.get("features_dir") or paths["dataset_dir"])


# the steps that write the features, named in advice (also imported from data_utils, features)
STEP_01 = "preprocessing/01_clotho_dataset.py"
STEP_02 = "preprocessing/02_audio_logmel.py"
STEP_03 = "preprocessing/03_sbert_embeddings.py"
# what h5py raises for a file it cannot parse (zeroed headers, garbage, truncation)
HDF5_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)


def logmel_path(out_dir: str | Path, split: str) -> Path:
    """A split's log-mel file (step 02) in paths.features_dir."""
    return Path(out_dir) / f"{split}_audio_logmels.hdf5"


def features_lock(out_dir: str | Path, step: str):
    """The lock of a features folder (a context manager): steps 01–03 read each other's outputs,
    so one of them at a time works there; a second gets one line naming the holder."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and not os.access(out_dir, os.W_OK):
        raise UserError(f"{out_dir}: not writable — set paths.features_dir to a writable folder "
                        "(the dataset folder itself may stay read-only)")
    return exclusive(out_dir / LOCK_NAME, f"features folder {out_dir} (step {step})")


def make_fid(split: str, fname: str) -> str:
    return uuid.uuid5(NAMESPACE, f"{split}/{fname}").hex


def make_tid(fid: str, caption_number: int) -> str:
    return uuid.uuid5(NAMESPACE, f"{fid}/{caption_number}").hex


def clean_caption(raw: str) -> str:
    """Cleaned caption: lower-case words separated by single spaces (see module docstring)."""
    text = _APOSTROPHES.sub("", raw.lower())
    text = _PUNCTUATION.sub(" ", text)
    words: list[str] = []
    for word in text.split():
        word = SPELLING_FIXES.get(word, word)
        if words and word == words[-1] and word in DOUBLED_DROP:
            continue  # an accidental "the the"
        words.append(word)
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# Where a split's files are

@dataclass(frozen=True)
class Layout:
    name: str  # "Zenodo" or "aac-datasets"
    captions_dir: Path  # holds clotho_captions_{split}.csv
    audio_root: Path  # holds {split}/*.wav

    def captions_csv(self, split: str) -> Path:
        return self.captions_dir / f"{CAPTIONS_PREFIX}{split}.csv"

    def audio_dir(self, split: str) -> Path:
        return self.audio_root / split

    def describe(self) -> str:
        return (f"the {self.name} layout ({self.captions_csv('{split}')}, "
                f"{self.audio_dir('{split}')}/*.wav)")


def _aac_datasets_layout(dataset_dir: Path) -> Layout | None:
    for root in (dataset_dir / AAC_DATASETS_ROOT, dataset_dir):
        if (root / "clotho_csv_files").is_dir() and (root / "clotho_audio_files").is_dir():
            return Layout("aac-datasets", root / "clotho_csv_files", root / "clotho_audio_files")
    return None


def find_layout(dataset_dir: str | Path) -> Layout:
    """The layout of a Clotho folder: Zenodo when a `clotho_captions_*.csv` lies at its top,
    else aac-datasets when its folders are there, else Zenodo (errors then name those paths)."""
    dataset_dir = Path(dataset_dir)
    zenodo = Layout("Zenodo", dataset_dir, dataset_dir)
    if any(dataset_dir.glob("clotho_captions_*.csv")):
        return zenodo
    return _aac_datasets_layout(dataset_dir) or zenodo


def split_paths(dataset_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(captions CSV, audio folder) of `split` in either layout: the one place that says where."""
    layout = find_layout(dataset_dir)
    return layout.captions_csv(split), layout.audio_dir(split)


# ---------------------------------------------------------------------------------------------
# Captions CSV

@dataclass
class CaptionRow:
    fname: str  # as written in the CSV
    captions: list[str]  # the five raw captions
    texts: list[str]  # the five cleaned captions
    line: int  # line number in the CSV (for messages)


def file_name_problem(fname: str) -> str:
    """Why `fname` is not a plain file name inside a split's folder ('' if it is one)."""
    bare = fname.lstrip(" ")  # the form matched on disk when the exact name is absent
    if not bare.strip():
        return "it is empty"
    if any(c in fname for c in "/\\\0"):
        return "a file name holds no slash, backslash or NUL"
    if bare in (".", "..") or fname in (".", ".."):
        return "'.' and '..' are folders"
    return ""


def _split_of(captions_csv: Path) -> str | None:
    """`clotho_captions_train.csv` -> `train`; None for a file not named so."""
    name = captions_csv.name
    if not (name.startswith(CAPTIONS_PREFIX) and name.endswith(".csv")) or name == f"{CAPTIONS_PREFIX}.csv":
        return None
    return name[len(CAPTIONS_PREFIX):-len(".csv")]


def _missing_captions(path: Path) -> UserError:
    """A split's captions CSV is not there. Step 00 makes Clotho's three splits only: for any
    other name (one's own dataset, or a typo such as `Train` for `train`) it would download
    7 GB and still make no such split, so the advice names the CSVs that are there instead."""
    split = _split_of(path)
    if split is None or split in CLOTHO_SPLITS:
        return UserError(f"{path}: captions file not found (neither the Zenodo layout "
                         f"<dataset_dir>/{CAPTIONS_PREFIX}<split>.csv nor the aac-datasets layout "
                         f"<dataset_dir>/{AAC_DATASETS_ROOT}/clotho_csv_files/ is there) — check "
                         "paths.dataset_dir, or run preprocessing/00_download_clotho.py")
    there = sorted(filter(None, map(_split_of, path.parent.glob(f"{CAPTIONS_PREFIX}*.csv"))))
    if there:
        found = (f"the captions CSVs in {path.parent} are for split(s) {', '.join(there)} — name "
                 "one of those in data.splits (and data.train_split, data.val_split, eval.splits)")
    else:
        found = (f"{path.parent} holds no {CAPTIONS_PREFIX}*.csv — check paths.dataset_dir, and "
                 f"that data.splits names your splits (split <s>: {CAPTIONS_PREFIX}<s>.csv and <s>/*.wav)")
    return UserError(f"{path}: captions file not found for split '{split}': {found}")


def read_captions_csv(path: str | Path) -> list[CaptionRow]:
    """Rows of a Clotho captions CSV, validated; UserError naming file/line/column otherwise."""
    path = Path(path)
    if not path.is_file():
        raise _missing_captions(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a BOM (spreadsheet exports) is not part of the header
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: bytes that are not UTF-8 ({data[e.start:e.start + 4]!r})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path}: empty file, expected the header {','.join(CAPTION_COLUMNS)}") from None
    except csv.Error as e:
        raise UserError(f"{path}: line 1: not valid CSV ({e})") from None
    if header != CAPTION_COLUMNS:
        missing = [c for c in CAPTION_COLUMNS if c not in header]
        what = f"missing column(s) {', '.join(missing)}" if missing else "columns in the wrong order or extra columns"
        raise UserError(f"{path}: header is '{','.join(header)}', expected '{','.join(CAPTION_COLUMNS)}' "
                        f"({what}) — {FIVE_CAPTIONS}")
    rows: list[CaptionRow] = []
    seen: dict[str, tuple[str, int]] = {}  # name without leading spaces -> (name, line)
    try:
        for record in reader:
            line = reader.line_num
            if not record or record == [""]:
                continue  # blank line (e.g. at the end)
            if len(record) != len(CAPTION_COLUMNS):
                why = FIVE_CAPTIONS if len(record) < len(CAPTION_COLUMNS) else \
                    "a caption holding a comma must be in double quotes"
                raise UserError(f"{path}: line {line}: {len(record)} fields, expected {len(CAPTION_COLUMNS)} — {why}")
            fname, captions = record[0], record[1:]
            if not fname.strip():
                raise UserError(f"{path}: line {line}: column file_name is empty")
            problem = file_name_problem(fname)
            if problem:  # decided from the name alone: nothing outside the folder is looked at
                raise UserError(f"{path}: line {line}: file_name {fname!r} must name a file directly "
                                f"inside the split's audio folder ({problem}) — fix the row")
            key = fname.lstrip(" ")
            if key in seen:
                first, first_line = seen[key]
                if first == fname:
                    raise UserError(f"{path}: line {line}: file_name {fname!r} already on line {first_line}")
                raise UserError(f"{path}: lines {first_line} and {line}: file names {first!r} and {fname!r} "
                                "differ only by leading spaces and would both be matched to the same wav "
                                "— remove one of the rows")
            seen[key] = (fname, line)
            texts = [clean_caption(c) for c in captions]
            for i, (caption, text) in enumerate(zip(captions, texts), 1):
                if not caption.strip():
                    raise UserError(f"{path}: line {line}: column caption_{i} is empty — {FIVE_CAPTIONS}")
                if not text:
                    raise UserError(f"{path}: line {line}: column caption_{i} has no words ({caption!r})")
            rows.append(CaptionRow(fname, captions, texts, line))
    except csv.Error as e:
        raise UserError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise UserError(f"{path}: no caption rows after the header")
    return rows


# ---------------------------------------------------------------------------------------------
# Audio

def resolve_wav(audio_dir: str | Path, fname: str) -> Path | None:
    """The wav for a CSV file name: the exact name, else the name without its leading space(s).

    Three Clotho names start with a space; extraction tools may drop it. None if neither exists.
    A name that is not a plain file name (a path, '..') is an error, whatever exists on disk.
    """
    audio_dir = Path(audio_dir)
    problem = file_name_problem(fname)
    if problem:  # audio_info.pkl from an older or edited step 01
        raise UserError(f"file name {fname!r} in the clip index is not a file directly inside "
                        f"{audio_dir} ({problem}) — fix the captions CSV and rerun "
                        "preprocessing/01_clotho_dataset.py")
    exact = audio_dir / fname
    if exact.is_file():
        return exact
    stripped = fname.lstrip(" ")
    if stripped != fname and (audio_dir / stripped).is_file():
        return audio_dir / stripped
    return None


def find_wav(dataset_dir: str | Path, split: str, fname: str) -> Path | None:
    """The wav of clip `fname` of `split` (as named in audio_info.pkl / the text CSV), in either
    layout, or None when it is missing."""
    return resolve_wav(split_paths(dataset_dir, split)[1], fname)


def format_bad_audio(split: str, bad: list[tuple[str, str]]) -> str:
    """'development: 3 unusable audio files (missing: a.wav, b.wav; unreadable: c.wav)'.

    A "no log-mel" file carries its detail (`x.wav [sample rate 8 Hz ...]`): nothing else says why."""
    groups: dict[str, list[str]] = {r: [] for r in BAD_AUDIO_REASONS}
    for fname, reason in bad:
        kind, _, detail = reason.partition(": ")
        if fname != fname.strip() or not fname.isprintable():  # a trailing space, a newline
            fname = repr(fname)
        if kind == "no log-mel":
            fname = f"{fname} [{detail}]" if detail else fname
        groups.setdefault(kind, []).append(fname)
    parts = [f"{r}: {', '.join(names)}" for r, names in groups.items() if names]
    noun = "file" if len(bad) == 1 else "files"
    return f"{split}: {len(bad)} unusable audio {noun} ({'; '.join(parts)})"


def bad_audio_error(messages: list[str]) -> UserError:
    return UserError("; ".join(messages) + " — fix them or set data.skip_bad_audio: true")


@dataclass
class SplitAudio:
    durations: dict[str, float] = field(default_factory=dict)  # fname -> seconds, CSV order
    bad: list[tuple[str, str]] = field(default_factory=list)  # (fname, reason) CSV order
    space_stripped: int = 0  # names matched without their leading space
    uncaptioned: int = 0  # wavs in the folder that no CSV row names


def probe_split_audio(audio_dir: Path, fnames: list[str], split: str = "") -> SplitAudio:
    """Find and probe every wav named in the CSV; count wavs no row names."""
    out = SplitAudio()
    matched: set[str] = set()
    for fname in tqdm(fnames, desc=f"{split} wavs", unit="file", leave=False):
        path = resolve_wav(audio_dir, fname)
        if path is None:
            out.bad.append((fname, "missing"))
            continue
        matched.add(path.name)
        out.space_stripped += path.name != fname
        try:
            frames, sr = probe_audio(path)
        except AudioError as e:
            out.bad.append((fname, e.reason + (f": {e.detail}" if e.detail and e.reason == "unreadable" else "")))
            continue
        out.durations[fname] = frames / sr
    on_disk = {p.name for p in audio_dir.iterdir() if p.suffix.lower() == ".wav"}
    out.uncaptioned = len(on_disk - matched)
    return out


def skipped_path(out_dir: str | Path, split: str) -> Path:
    """The split's skip list, in paths.features_dir."""
    return Path(out_dir) / f"{split}_skipped_audio.csv"


def read_skipped(path: str | Path) -> list[tuple[str, str, str]]:
    """Rows (fname, reason, step) of a `{split}_skipped_audio.csv` ([] if there is none).

    `step` is "01" or "02", the step that found the clip unusable (a list without the column, from
    an older version, counts as step 01's: step 01 rewrites those rows on its next run)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"fname", "reason"} <= set(reader.fieldnames):
                raise UserError(f"{path}: header {reader.fieldnames}, expected {','.join(SKIPPED_COLUMNS)} "
                                "— delete it and rerun preprocessing/01_clotho_dataset.py and 02")
            return [(r["fname"], r["reason"] or "", r.get("step") or "01") for r in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable skip list ({e}) — delete it and rerun "
                        "preprocessing/01_clotho_dataset.py and 02") from None


def update_skipped(path: str | Path, step: str, bad: list[tuple[str, str]],
                   keep_others: set[str] | None = None) -> list[tuple[str, str, str]]:
    """Replace `step`'s rows of the skip list by `bad` [(fname, reason)], keeping the other
    step's rows (only those whose fname is in `keep_others`, when given); the file is removed
    when no row is left. Returns the rows written, step 01's first."""
    path = Path(path)
    mine = {fname for fname, _ in bad}
    others = [r for r in read_skipped(path) if r[2] != step and r[0] not in mine
              and (keep_others is None or r[0] in keep_others)]
    rows = others + [(fname, reason, step) for fname, reason in bad]
    rows.sort(key=lambda r: r[2])  # stable: CSV order within a step
    if rows:
        with atomic_open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(SKIPPED_COLUMNS)
            writer.writerows(rows)
    else:
        path.unlink(missing_ok=True)  # a list from an earlier run would mislead the later steps
    return rows


# ---------------------------------------------------------------------------------------------
# The step

@dataclass
class SplitSummary:
    split: str
    clips: int
    captions: int
    skipped: list[tuple[str, str]]
    space_stripped: int
    uncaptioned: int
    text_csv: Path
    skipped_csv: Path | None
    skipped_by_02: int = 0  # clips of the index that step 02 listed as unusable (rows kept)


def caption_rows(split: str, rows: list[CaptionRow]) -> list[dict]:
    """One dict per caption with the TEXT_COLUMNS, in CSV order."""
    out = []
    for row in rows:
        fid = make_fid(split, row.fname)
        for n, (raw, text) in enumerate(zip(row.captions, row.texts), 1):
            out.append({"tid": make_tid(fid, n), "fid": fid, "fname": row.fname,
                        "raw_text": raw, "text": text, "tokens": " ".join(text.split())})
    return out


def write_text_csv(path: Path, rows: list[dict]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TEXT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def prepare_clotho(dataset_dir: str | Path, splits: list[str], skip_bad_audio: bool = False,
                   out_dir: str | Path | None = None) -> list[SplitSummary]:
    """Step 01 for every split: reads `dataset_dir`, writes into `out_dir` (paths.features_dir;
    default `dataset_dir`); nothing is written unless every split is usable."""
    dataset_dir = Path(dataset_dir)
    out_dir = Path(out_dir) if out_dir is not None else dataset_dir
    parsed = {}
    messages = []
    for split in splits:
        captions_csv, audio_dir = split_paths(dataset_dir, split)
        rows = read_captions_csv(captions_csv)
        if not audio_dir.is_dir():
            raise UserError(f"{audio_dir}: audio folder for split '{split}' not found")
        audio = probe_split_audio(audio_dir, [r.fname for r in rows], split)
        if audio.bad and not skip_bad_audio:
            messages.append(format_bad_audio(split, audio.bad))
        parsed[split] = (rows, audio)
    if messages:  # every split checked first, so one message lists every bad file
        raise bad_audio_error(messages)

    fid2fname, durations, word_bags, summaries = {}, {}, {}, []
    for split, (rows, audio) in parsed.items():
        kept = [r for r in rows if r.fname in audio.durations]
        fid2fname[split] = {make_fid(split, r.fname): r.fname for r in kept}
        durations[split] = [audio.durations[r.fname] for r in kept]
        text_rows = caption_rows(split, kept)
        word_bags[split] = dict(sorted(Counter(w for t in text_rows for w in t["tokens"].split()).items()))
        text_csv = out_dir / f"{split}_text.csv"
        write_text_csv(text_csv, text_rows)
        # step 02's rows stay for the clips still indexed: it found them unusable (no log-mel)
        # although their header probes fine, and only step 02 can say when that changes
        skipped_csv = skipped_path(out_dir, split)
        listed = update_skipped(skipped_csv, "01", audio.bad, keep_others={r.fname for r in kept})
        summaries.append(SplitSummary(split, len(kept), len(text_rows), audio.bad, audio.space_stripped,
                                      audio.uncaptioned, text_csv, skipped_csv if listed else None,
                                      sum(r[2] != "01" for r in listed)))

    save_pickle({"audio_fid2fname": fid2fname, "audio_durations": durations},
                out_dir / "audio_info.pkl")
    vocabulary = sorted(set().union(*[set(b) for b in word_bags.values()]))
    split_info = {s.split: {"clips": s.clips, "captions": s.captions} for s in summaries}
    save_pickle({"vocabulary": vocabulary, "word_bags": word_bags, "split_info": split_info},
                out_dir / "vocab_info.pkl")
    return summaries
