"""Clotho v2.1 captions and audio index (preprocessing step 01).

Reads `<dataset_dir>/clotho_captions_{split}.csv` (header `file_name,caption_1,...,caption_5`),
matches every row to its wav in `<dataset_dir>/{split}/`, probes the wav for its duration, cleans
the captions and writes (atomically, formats in CONTRIBUTING.md):

- `audio_info.pkl`   {"audio_fid2fname": {split: {fid: fname}}, "audio_durations": {split: [s, ...]}}
- `{split}_text.csv` tid,fid,fname,raw_text,text,tokens (one row per caption, CSV order)
- `vocab_info.pkl`   {"vocabulary": [...], "word_bags": {split: {word: n}}, "split_info": {...}}
- `{split}_skipped_audio.csv` (fname,reason), only when `data.skip_bad_audio` skipped clips.

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
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from utils.audio_utils import AudioError, probe_audio
from utils.errors import UserError
from utils.io_utils import atomic_open, save_pickle

NAMESPACE = uuid.UUID("faed236c-0068-4bd6-b018-18d0c821f08f")  # fixed forever: ids depend on it
CAPTION_COLUMNS = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
TEXT_COLUMNS = ["tid", "fid", "fname", "raw_text", "text", "tokens"]
SKIPPED_COLUMNS = ["fname", "reason"]
BAD_AUDIO_REASONS = ("missing", "empty", "unreadable")

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
# Captions CSV

@dataclass
class CaptionRow:
    fname: str  # as written in the CSV
    captions: list[str]  # the five raw captions
    texts: list[str]  # the five cleaned captions
    line: int  # line number in the CSV (for messages)


def read_captions_csv(path: str | Path) -> list[CaptionRow]:
    """Rows of a Clotho captions CSV, validated; UserError naming file/line/column otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: captions file not found")
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
        raise UserError(f"{path}: header is '{','.join(header)}', expected '{','.join(CAPTION_COLUMNS)}' ({what})")
    rows: list[CaptionRow] = []
    seen: dict[str, int] = {}
    try:
        for record in reader:
            line = reader.line_num
            if not record or record == [""]:
                continue  # blank line (e.g. at the end)
            if len(record) != len(CAPTION_COLUMNS):
                raise UserError(f"{path}: line {line}: {len(record)} fields, expected {len(CAPTION_COLUMNS)}")
            fname, captions = record[0], record[1:]
            if not fname.strip():
                raise UserError(f"{path}: line {line}: column file_name is empty")
            if fname in seen:
                raise UserError(f"{path}: line {line}: file_name '{fname}' already on line {seen[fname]}")
            seen[fname] = line
            texts = [clean_caption(c) for c in captions]
            for i, (caption, text) in enumerate(zip(captions, texts), 1):
                if not caption.strip():
                    raise UserError(f"{path}: line {line}: column caption_{i} is empty")
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
    """
    audio_dir = Path(audio_dir)
    exact = audio_dir / fname
    if exact.is_file():
        return exact
    stripped = fname.lstrip(" ")
    if stripped != fname and (audio_dir / stripped).is_file():
        return audio_dir / stripped
    return None


def format_bad_audio(split: str, bad: list[tuple[str, str]]) -> str:
    """'development: 3 unusable audio files (missing: a.wav, b.wav; unreadable: c.wav)'."""
    groups = {r: [f for f, reason in bad if reason.split(":")[0] == r] for r in BAD_AUDIO_REASONS}
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


def read_skipped(path: str | Path) -> list[tuple[str, str]]:
    """Rows of a `{split}_skipped_audio.csv` ([] if there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return [(r["fname"], r["reason"]) for r in csv.DictReader(f)]


def write_skipped(path: str | Path, bad: list[tuple[str, str]]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SKIPPED_COLUMNS)
        writer.writerows(bad)


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
        rows = read_captions_csv(dataset_dir / f"clotho_captions_{split}.csv")
        audio_dir = dataset_dir / split
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
        skipped_csv = out_dir / f"{split}_skipped_audio.csv"
        if audio.bad:
            write_skipped(skipped_csv, audio.bad)
        else:
            skipped_csv.unlink(missing_ok=True)  # a report from an earlier run would mislead step 02
        summaries.append(SplitSummary(split, len(kept), len(text_rows), audio.bad, audio.space_stripped,
                                      audio.uncaptioned, text_csv, skipped_csv if audio.bad else None))

    save_pickle({"audio_fid2fname": fid2fname, "audio_durations": durations},
                out_dir / "audio_info.pkl")
    vocabulary = sorted(set().union(*[set(b) for b in word_bags.values()]))
    split_info = {s.split: {"clips": s.clips, "captions": s.captions} for s in summaries}
    save_pickle({"vocabulary": vocabulary, "word_bags": word_bags, "split_info": split_info},
                out_dir / "vocab_info.pkl")
    return summaries
