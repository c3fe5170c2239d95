"""Download files with md5 verification and resume, and extract the Clotho audio archives.

Used by `preprocessing/00_download_clotho.py`. Everything is crash-safe: a download streams
into `<name>.part` (resumed with an HTTP Range request on the next run) and is renamed into
place only once its md5 matches; an archive is extracted into a temporary folder that is
renamed into place, and a marker file records that the split is complete. A file already
present is never deleted or overwritten before its verified replacement is complete, and a
caption or metadata CSV the user edited is kept aside under a new name (`fetch_verified`).
"""
from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from utils.errors import UserError
from utils.io_utils import atomic_path, atomic_write_text, ensure_dir, md5sum

CHUNK = 1 << 20  # bytes read per iteration of the download loop
USER_AGENT = "dcase-retrieval/0.1 (python urllib)"
ARCHIVE_RE = re.compile(r"^clotho_audio_(?P<split>[A-Za-z0-9_-]+)\.7z$")
# Files a user may have edited by hand: when one differs from the official file, the user's copy
# is kept aside under a new name before the verified download replaces it.
EDITABLE_SUFFIXES = (".csv",)
MD5_RE = re.compile(r"^[0-9a-f]{32}$")
BY_HAND = ("download the files from the record's page (https://doi.org/10.5281/zenodo.7752975) "
           "into paths.pretrained_dir by hand")


@dataclass
class FetchResult:
    """What happened to one file: status is 'skipped', 'downloaded' or 'failed'."""

    name: str
    path: Path
    status: str
    message: str


def file_url(base_url: str, name: str) -> str:
    """`{base_url}/{name}` with the name URL-quoted (`Cnn14_mAP=0.431.pth` -> `...mAP%3D0.431.pth`)."""
    return f"{base_url.rstrip('/')}/{urllib.parse.quote(name, safe='')}"


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _open(url: str, offset: int, timeout: float):
    """Open `url`, asking for bytes from `offset` on when resuming; returns the response."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _resume_offset(resp, offset: int) -> int:
    """The offset the response body starts at: `offset` for a matching 206, else 0 (restart)."""
    if offset and resp.status == 206:
        m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
        if m and int(m.group(1)) == offset:
            return offset
    return 0


def download(url: str, dest: Path, timeout: float = 60.0, progress: bool = True) -> Path:
    """Stream `url` into `dest.part`, resuming a previous partial download; return the .part path.

    The caller verifies and renames it. Network errors raise a one-line UserError naming the
    URL; the .part file is kept so that the next run resumes from where this one stopped.
    """
    part = part_path(dest)
    ensure_dir(dest.parent)
    offset = part.stat().st_size if part.is_file() else 0
    try:
        try:
            resp = _open(url, offset, timeout)
        except urllib.error.HTTPError as e:
            if e.code != 416 or not offset:  # 416: the .part is not a prefix we can resume
                raise
            part.unlink()
            offset = 0
            resp = _open(url, 0, timeout)
        with resp:
            start = _resume_offset(resp, offset)  # a server without Range support sends it all
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            with open(part, "ab" if start else "wb") as f, tqdm(
                    total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=dest.name, disable=not progress, leave=False) as bar:
                while block := resp.read(CHUNK):
                    f.write(block)
                    bar.update(len(block))
                size = f.tell()
            # A connection that closes early can look like a normal end of stream.
            if total is not None and size < total:
                raise http.client.IncompleteRead(b"", total - size)
    except urllib.error.HTTPError as e:
        raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise UserError(f"{url}: cannot connect ({e.reason})") from None
    except (http.client.HTTPException, OSError) as e:  # timeouts, resets, truncated bodies
        if isinstance(e, http.client.IncompleteRead):
            what = f"connection closed with {e.expected} bytes still to come"
        else:
            what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        have = part.stat().st_size if part.is_file() else 0
        raise UserError(f"{url}: download interrupted with {have} bytes in {part.name} ({what}); "
                        f"rerun to resume") from None
    return part


def keep_aside(path: Path, md5: str) -> Path:
    """Keep the content of `path` under a free name beside it, `<stem>.local-<md5[:8]><suffix>`
    (e.g. `clotho_captions_development.local-1a2b3c4d.csv`), and return that name.

    A hard link (or, where the file system has none, an atomic copy): `path` itself is left
    untouched, so whatever happens next the user's content exists under at least one name.
    A copy already kept by an earlier, interrupted run is reused.
    """
    for i in itertools.count(1):
        aside = path.with_name(f"{path.stem}.local-{md5[:8]}{'' if i == 1 else f'-{i}'}{path.suffix}")
        if aside.exists():
            if aside.is_file() and md5sum(aside) == md5:
                return aside
            continue
        try:
            os.link(path, aside)
        except OSError:
            with atomic_path(aside) as tmp:
                shutil.copy2(path, tmp)
        return aside
    raise AssertionError("unreachable")


def fetch_verified(url: str, dest: Path, md5: str | None, timeout: float = 60.0,
                   progress: bool = True) -> FetchResult:
    """Make `dest` a verified copy of `url`: skip it if present with the right md5.

    Nothing the user has is deleted or overwritten before a verified replacement is complete:
    the download goes to `dest.part`, and only once its md5 matches does it replace `dest`.
    A present `dest` whose md5 differs stays exactly as it is if the download fails (network
    error, md5 mismatch); if it succeeds, a file the user may have edited by hand (a caption or
    metadata CSV) is first kept aside under `<stem>.local-<md5>.csv`, while a differing binary
    (an archive, a checkpoint) is a corrupt copy and is simply replaced.
    A completed download whose md5 does not match is deleted and reported as 'failed'.
    `md5` None accepts any content (with a warning in the message).
    """
    name = dest.name
    differs = None  # md5 of a present dest that is not the expected file
    if dest.is_file():
        if md5 is None:
            return FetchResult(name, dest, "skipped", f"{name}: present (no md5 to verify), skipping")
        got = md5sum(dest)
        if got == md5:
            return FetchResult(name, dest, "skipped", f"{name}: verified, skipping")
        differs = got
        print(f"{name}: present but md5 {got} != expected {md5}; fetching the official file "
              f"(the present one is left in place until the download is verified)")
    untouched = f"; {dest} was left as it was" if differs else ""
    try:
        part = download(url, dest, timeout=timeout, progress=progress)
    except UserError as e:
        raise UserError(f"{e}{untouched}") from None
    if md5 is None:
        os.replace(part, dest)
        return FetchResult(name, dest, "downloaded", f"{name}: downloaded (warning: no md5 to verify)")
    got = md5sum(part)
    if got != md5:
        part.unlink()
        return FetchResult(name, dest, "failed",
                           f"{name}: md5 mismatch (expected {md5}, got {got}); removed{untouched}")
    note = ""
    if differs and dest.suffix.lower() in EDITABLE_SUFFIXES:
        note = f"; your differing copy is kept as {keep_aside(dest, differs).name}"
    elif differs:
        note = f"; it replaced a corrupt copy (md5 {differs})"
    os.replace(part, dest)
    return FetchResult(name, dest, "downloaded", f"{name}: downloaded, md5 verified{note}")


# --- archives ---------------------------------------------------------------------------------

def archive_split(name: str) -> str | None:
    """`clotho_audio_development.7z` -> `development`; None for any other file."""
    m = ARCHIVE_RE.match(name)
    return m.group("split") if m else None


def marker_path(root: Path, split: str) -> Path:
    return root / f".{split}.extracted"


def is_extracted(root: Path, split: str, md5: str | None) -> bool:
    """True if `<root>/{split}/` was completely extracted from the archive with this md5."""
    marker = marker_path(root, split)
    if not marker.is_file() or not (root / split).is_dir():
        return False
    return md5 is None or marker.read_text(encoding="utf-8").strip() == md5


def _extract_bar(bar: tqdm):
    """A py7zr extraction callback that advances `bar` by one per extracted file."""
    from py7zr.callbacks import ExtractCallback

    class ExtractBar(ExtractCallback):

        def report_start_preparation(self): pass
        def report_start(self, processing_file_path, processing_bytes): pass
        def report_update(self, decompressed_bytes): pass
        def report_warning(self, message): pass
        def report_postprocess(self): pass

        def report_end(self, processing_file_path, wrote_bytes):
            bar.update(1)

    return ExtractBar()


def extract_split(archive: Path, root: Path, split: str, md5: str | None,
                  progress: bool = True) -> int:
    """Extract `archive` so that its wavs land in `<root>/{split}/*.wav`; return the wav count.

    Members may be at the archive's top level or under `{split}/`. Extraction goes to a
    temporary folder beside the target, renamed into place when complete; the marker
    `.{split}.extracted` (holding the archive md5) is written last, so an interrupted run
    redoes the split and a finished one is skipped.
    """
    import py7zr  # heavy import, only needed here

    tmp = root / f".{split}.extracting.tmp"
    old = root / f".{split}.old.tmp"
    for stale in (tmp, old):  # left over by an interrupted run
        if stale.exists():
            shutil.rmtree(stale)
    try:
        with py7zr.SevenZipFile(archive, "r") as z:
            files = [i for i in z.list() if not i.is_directory]
            with tqdm(total=len(files), unit="file", desc=f"extract {archive.name}",
                      disable=not progress, leave=False) as bar:
                z.extractall(path=tmp, callback=_extract_bar(bar))
    except (py7zr.exceptions.ArchiveError, OSError, EOFError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{archive}: cannot extract ({type(e).__name__}: {e})") from None
    src = tmp / split if (tmp / split).is_dir() else tmp
    n_wavs = sum(1 for _ in src.glob("*.wav"))
    if n_wavs == 0:
        shutil.rmtree(tmp)
        raise UserError(f"{archive}: no .wav files at its top level or under '{split}/'")
    target = root / split
    marker_path(root, split).unlink(missing_ok=True)
    if target.exists():  # an earlier incomplete extraction: replace it as a whole
        os.replace(target, old)
    os.replace(src, target)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    atomic_write_text(marker_path(root, split), f"{md5 or md5sum(archive)}\n")
    return n_wavs


# --- the released baseline (DOI 10.5281/zenodo.7752975) ----------------------------------------

def record_files(data: object, url: str) -> dict[str, str | None]:
    """{file name: md5} from a Zenodo record's JSON (`GET /api/records/<id>`).

    Zenodo lists a record's files either as `"files": [{"key": name, "checksum": "md5:<hex>"},
    ...]` or as `"files": {"entries": {name: {"key": name, "checksum": "md5:<hex>"}}}`; both are
    read. A file listed without an md5 maps to None (fetched unverified, with a warning).
    """
    files = data.get("files") if isinstance(data, dict) else None
    if isinstance(files, dict):
        files = list((files.get("entries") or {}).values())
    out: dict[str, str | None] = {}
    for entry in files if isinstance(files, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            continue
        if entry["key"] in ("", ".", "..") or Path(entry["key"]).name != entry["key"]:
            # the name becomes a path in paths.pretrained_dir: nothing may point elsewhere
            raise UserError(f"{url}: lists a file named {entry['key']!r}, which is not a plain "
                            f"file name; {BY_HAND}")
        algorithm, _, digest = str(entry.get("checksum") or "").partition(":")
        out[entry["key"]] = digest.lower() if algorithm == "md5" and MD5_RE.match(digest.lower()) else None
    if not out:
        raise UserError(f"{url}: not a Zenodo record listing (no files in it); {BY_HAND}")
    return out


def read_record_files(url: str, timeout: float = 60.0) -> dict[str, str | None]:
    """Fetch a Zenodo record's JSON from `url` and return its {file name: md5}."""
    try:
        with _open(url, 0, timeout) as resp:
            data = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise UserError(f"{url}: cannot connect ({e.reason})") from None
    except (http.client.HTTPException, OSError) as e:
        raise UserError(f"{url}: cannot read the record listing ({type(e).__name__}: {e})") from None
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{url}: not a Zenodo record listing (not JSON); {BY_HAND}") from None
    return record_files(data, url)


# --- the whole step ---------------------------------------------------------------------------

def download_all(cfg: dict, progress: bool = True, baseline: bool = False
                 ) -> tuple[list[FetchResult], dict[str, int]]:
    """Run step 00: fetch every Clotho and PANNs file, then extract the audio archives; with
    `baseline`, also the released baseline's files (into paths.pretrained_dir).

    Returns the per-file results and {split: wav count} for the archives extracted now.
    Raises UserError on network errors (at once) and, after doing everything else, if any
    file failed md5 verification (one line listing them).
    """
    dl = cfg["download"]
    dataset_dir = Path(cfg["paths"]["dataset_dir"])
    pretrained_dir = Path(cfg["paths"]["pretrained_dir"])
    timeout = float(dl.get("timeout_s", 60.0))
    jobs = [(dl["clotho_url"], dataset_dir, dl["clotho_files"] or {}),
            (dl["panns_url"], pretrained_dir, dl["panns_files"] or {})]
    if baseline:
        jobs.append((dl["baseline_url"], pretrained_dir, read_record_files(dl["baseline_record"], timeout)))
    results: list[FetchResult] = []
    extracted: dict[str, int] = {}
    for base_url, directory, files in jobs:
        ensure_dir(directory)
        for name, md5 in files.items():
            split = archive_split(name) if directory is dataset_dir else None
            if split and is_extracted(dataset_dir, split, md5):
                res = FetchResult(name, directory / name, "skipped",
                                  f"{name}: already extracted to {dataset_dir / split}, skipping")
            else:
                res = fetch_verified(file_url(base_url, name), directory / name, md5,
                                     timeout=timeout, progress=progress)
            print(res.message)
            results.append(res)
            if split and res.status != "failed" and not is_extracted(dataset_dir, split, md5):
                extracted[split] = extract_split(res.path, dataset_dir, split, md5, progress)
                print(f"{name}: extracted {extracted[split]} wavs to {dataset_dir / split}")
            if split and not dl.get("keep_archives", True) and is_extracted(dataset_dir, split, md5):
                if res.path.is_file():
                    res.path.unlink()
                    print(f"{name}: removed (download.keep_archives is false)")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise UserError(f"{len(failed)} download(s) failed md5 verification and were removed "
                        "(files already present were left as they were); rerun to fetch them again, and if it "
                        "repeats compare download.*_files with the md5s on the record's page: "
                        + ", ".join(r.name for r in failed))
    return results, extracted
