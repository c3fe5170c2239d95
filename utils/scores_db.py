"""`<run>/scores.db`: the score of every (caption, clip) pair of the evaluated splits, in SQLite.

Schema (every table keyed by the integer `split_id`; `splits` maps it to the split's name):

    meta(key, value)                         what the scores were computed from (see expected_meta)
    splits(split_id, split, n_clips, n_captions, written_at)
    clips(split_id, clip, fid, fname)                      clip = row index in the matrix' columns
    captions(split_id, caption, tid, fid, clip, raw_text)  caption = row index; clip = its true clip
    scores(split_id, caption, clip, score)   WITHOUT ROWID, primary key (split_id, caption, clip)
        + index scores_by_clip(split_id, clip, caption)    per-clip lookups (audio -> text)
    t2a_ranks(split_id, caption, tid, fname, rank)         rank of each caption's true clip
    views scores_named, t2a_ranks_named                    the same with split names and texts

Reuse: a db is added to (a split rescored, another split added) only when it was computed from
the same checkpoint file (sha1), caption embeddings (sha1) and eval.amp; each split records the
sha1 of its log-mels, caption CSV and skip list (`split:<name>` in meta), checked when it is
read. Keys that do not change a score (training.epochs, demo sizes, wandb, the run folder's name
or place) are not part of it: a renamed or copied run keeps its scores. `--overwrite` builds a
new db beside the old one and swaps it in only when complete (`writing`).

A split is written in ONE transaction (delete its old rows, insert the new ones, rebuild the
index), so a reader sees either the old split or the new one, never a mix; a crash leaves the
previous state. Values only ever travel as bound parameters: any caption text round-trips.

Speed (5.46 M pairs for a Clotho evaluation split): rows go in as multi-row `INSERT ... VALUES`
statements of one caption each (one `executemany` step binds a whole score-matrix row, so no
Python work per pair), in primary-key order (appends to the B-tree); the secondary index is built
after the bulk insert (one sort instead of millions of scattered inserts), and the planner gets
exact row statistics (`sqlite_stat1`) so that per-clip lookups choose that index.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import hashlib
import itertools
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from utils.errors import UserError, raise_if_stopped
from utils.io_utils import atomic_path, ensure_dir, file_sha1, remove_stale_temps

SCHEMA_VERSION = "2"
# the meta entries an existing db must share with this run to be reused: what decides a score
IDENTITY_KEYS = ("schema_version", "checkpoint_sha1", "embeddings_sha1", "eval_amp")
SPLIT_KEY = "split:"   # + split name: the identity of that split's inputs (JSON)
PAGE_SIZE = 65536      # fewer, larger B-tree pages: ~15% faster bulk inserts than 4096
MAX_ROW_BLOCK = 4096   # clips bound per INSERT statement (2 + 4096 parameters < SQLite's 32766)
SIDE_FILES = ("-wal", "-shm", "-journal")
# SQLite's primary result codes, as numbers: the sqlite3 module names them (and gives errors
# their code) only from Python 3.11
_PERM, _READONLY, _IOERR, _CORRUPT, _CANTOPEN, _FULL, _NOTADB = 3, 8, 10, 11, 14, 13, 26
_DAMAGED_CODES = (_CORRUPT, _NOTADB)  # not (or no longer) a valid database
# ... and their messages, for Python 3.10, whose errors carry no code
_MESSAGES = {"malformed": _CORRUPT, "not a database": _NOTADB, "database or disk is full": _FULL,
             "readonly database": _READONLY, "unable to open": _CANTOPEN, "disk i/o error": _IOERR}
# the only command that can replace a db: 02 and query.py only read one
REBUILD = "postprocessing/01_xmodal_scores.py --overwrite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS splits (
    split_id INTEGER PRIMARY KEY, split TEXT NOT NULL UNIQUE,
    n_clips INTEGER NOT NULL, n_captions INTEGER NOT NULL, written_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clips (
    split_id INTEGER NOT NULL, clip INTEGER NOT NULL, fid TEXT NOT NULL, fname TEXT NOT NULL,
    PRIMARY KEY (split_id, clip)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS captions (
    split_id INTEGER NOT NULL, caption INTEGER NOT NULL, tid TEXT NOT NULL, fid TEXT NOT NULL,
    clip INTEGER NOT NULL, raw_text TEXT NOT NULL,
    PRIMARY KEY (split_id, caption)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scores (
    split_id INTEGER NOT NULL, caption INTEGER NOT NULL, clip INTEGER NOT NULL, score REAL NOT NULL,
    PRIMARY KEY (split_id, caption, clip)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS t2a_ranks (
    split_id INTEGER NOT NULL, caption INTEGER NOT NULL, tid TEXT NOT NULL, fname TEXT NOT NULL,
    rank INTEGER NOT NULL, PRIMARY KEY (split_id, caption)) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS scores_named AS
    SELECT sp.split, s.caption, s.clip, ca.raw_text, cl.fname, s.score
    FROM scores s JOIN splits sp USING (split_id)
    JOIN captions ca ON ca.split_id = s.split_id AND ca.caption = s.caption
    JOIN clips cl ON cl.split_id = s.split_id AND cl.clip = s.clip;
CREATE VIEW IF NOT EXISTS t2a_ranks_named AS
    SELECT sp.split, r.caption, r.tid, ca.raw_text, r.fname, r.rank
    FROM t2a_ranks r JOIN splits sp USING (split_id)
    JOIN captions ca ON ca.split_id = r.split_id AND ca.caption = r.caption;
"""
_INDEX = "CREATE INDEX IF NOT EXISTS scores_by_clip ON scores (split_id, clip, caption)"


@dataclass
class ScoredSplit:
    """One split's score matrix and what its rows and columns are.

    scores: float32 `[Q, C]`, scores[caption, clip]; fids, fnames: `[C]`; tids, captions
    (raw text): `[Q]`; caption_clip: int64 `[Q]`, the column of each caption's own clip.
    """
    split: str
    fids: list[str]
    fnames: list[str]
    tids: list[str]
    captions: list[str]
    caption_clip: np.ndarray
    scores: np.ndarray

    def relevance(self) -> np.ndarray:
        """bool `[Q, C]`: True where the clip is the caption's own."""
        rel = np.zeros(self.scores.shape, dtype=bool)
        rel[np.arange(len(self.tids)), self.caption_clip] = True
        return rel


# --------------------------------------------------------------------------- identity

def config_sha1(cfg: dict) -> str:
    """sha1 of a resolved config without `eval`, `wandb` and `paths.output_dir`: recorded in
    meta and metrics.json to say which config a run had, not checked (most of a config, e.g.
    training.epochs or the demo sizes, changes no score: IDENTITY_KEYS and split_identity are
    what is checked)."""
    relevant = {k: v for k, v in cfg.items() if k not in ("eval", "wandb")}
    relevant["paths"] = {k: v for k, v in cfg.get("paths", {}).items() if k != "output_dir"}
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()


def split_identity(cfg: dict, split: str) -> str:
    """What a split's scores are computed from besides the model: sha1 of its log-mels, of its
    caption CSV and of its skip list (JSON; a file that does not exist is null)."""
    from utils.clotho import skipped_path
    from utils.data_utils import features_dir, logmel_path, text_csv_path

    feats = features_dir(cfg)
    files = {"logmels": logmel_path(feats, split), "captions": text_csv_path(feats, split),
             "skipped": skipped_path(feats, split)}
    return json.dumps({k: file_sha1(p) if p.is_file() else None for k, p in files.items()},
                      sort_keys=True)


def expected_meta(run_dir: str | Path, cfg: dict, checkpoint: str, checkpoint_file: str | Path,
                  checkpoint_epoch: int | None) -> dict[str, str]:
    """The meta rows of a scores.db computed by this run's checkpoint from the current data
    (all strings). IDENTITY_KEYS and the `split:<name>` rows of eval.splits are what a stored
    db must match; run, checkpoint, epoch and config_sha1 only say where it came from."""
    from utils.data_utils import embeddings_sha1, features_dir

    embeddings = features_dir(cfg) / cfg["text_encoder"]["embeddings"]
    meta = {
        "schema_version": SCHEMA_VERSION,
        "run": Path(run_dir).resolve().name,
        "config_sha1": config_sha1(cfg),
        "checkpoint": checkpoint,
        "checkpoint_epoch": "" if checkpoint_epoch is None else str(int(checkpoint_epoch)),
        "checkpoint_sha1": file_sha1(checkpoint_file),
        "embeddings_sha1": embeddings_sha1(embeddings) or "",  # hashed once per process
        "eval_amp": str(cfg["eval"]["amp"]),
    }
    for split in cfg["eval"]["splits"]:
        meta[SPLIT_KEY + split] = split_identity(cfg, split)
    return meta


# --------------------------------------------------------------------------- opening

def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one split = one transaction.
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys=OFF")
    return conn


def _tune_for_writing(conn: sqlite3.Connection) -> None:
    """Fast and crash-safe. Rollback journal (not WAL): pages appended to the file by a bulk
    insert need no journal copy, whereas WAL writes every page twice (WAL, then checkpoint):
    for a 5.46 M-pair split WAL took 11.8 s to write + 2.5 s to checkpoint, this 7.1 s. synchronous=FULL costs a handful of fsyncs
    per split transaction and keeps the file intact even through a power cut. The page size
    only applies to a new, empty file."""
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA cache_size=-262144")  # 256 MiB: the index build sorts in memory, no spill


def _rollback(conn: sqlite3.Connection) -> None:
    """Undo the open transaction, if SQLite has not already (it does after SQLITE_FULL)."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def damaged_db_error(path: str | Path, e: BaseException | str) -> UserError:
    """One line for a db that SQLite cannot read (foreign file, truncated, pages overwritten):
    its scores are gone, so the only fix is to compute them again."""
    return UserError(f"{path}: not a scores database of this project, or damaged ({e}); "
                     f"rerun {REBUILD} to replace it (or delete it)")


def _primary_code(e: sqlite3.Error) -> int:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF
    text = str(e).lower()
    return next((c for words, c in _MESSAGES.items() if words in text), 0)


@contextlib.contextmanager
def _sqlite_errors(path: Path) -> Iterator[None]:
    """SQLite reports a full disk or an unwritable file as its own OperationalError; raise the
    OSError a plain write would have raised instead, naming the db file, so that it gets the
    same one-line message as every other write (utils.cli). A damaged file is a UserError."""
    try:
        yield
    except sqlite3.DatabaseError as e:
        code = _primary_code(e)
        if code in _DAMAGED_CODES:
            raise damaged_db_error(path, e) from None
        if not isinstance(e, sqlite3.OperationalError):
            raise
        if code == _FULL:
            err = errno.ENOSPC
        elif code in (_READONLY, _CANTOPEN, _PERM):
            err = errno.EROFS if _read_only_fs(path.parent) else errno.EACCES
        elif code == _IOERR:  # SQLite says this of every failed write but a full disk:
            # a quota (EDQUOT) and a file-size limit (EFBIG) among them, not only a bad disk
            raise UserError(f"{path}: could not write the scores (disk I/O error: a disk quota, "
                            "a file-size limit (ulimit -f) or a failing disk) — free space or "
                            "raise the limit, and rerun") from e
        else:
            raise
        raise OSError(err, os.strerror(err), str(path)) from e


def _db_file(conn: sqlite3.Connection) -> Path:
    return Path(conn.execute("PRAGMA database_list").fetchone()[2])


def _db_errors(fn):
    """Run `fn(conn, ...)` under _sqlite_errors for the file `conn` reads or writes."""
    @functools.wraps(fn)
    def wrapper(conn: sqlite3.Connection, *args, **kwargs):
        with _sqlite_errors(_db_file(conn)):
            return fn(conn, *args, **kwargs)
    return wrapper


def _read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
    try:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as e:  # no meta table at all counts too: not ours
        raise damaged_db_error(path, e) from None


_WHY = {"schema_version": "an older version of this project wrote it",
        "checkpoint_sha1": "another checkpoint", "embeddings_sha1": "other caption embeddings",
        "eval_amp": "another eval.amp"}


def _check_pages(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a db damaged inside now, before the caller spends minutes encoding a split whose
    write would only then meet the damage. quick_check reads every page once (~2.4 s for a
    Clotho-sized split's 184 MB); integrity_check would also verify every index (~40x that)."""
    try:
        result = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
    except sqlite3.DatabaseError as e:
        conn.close()
        raise damaged_db_error(path, e) from None
    if result != "ok":  # its "*** in database main *** Page 7: ..." means nothing to a user
        conn.close()
        raise damaged_db_error(path, "database disk image is malformed")


def _mismatch(found: dict[str, str], expected: dict[str, str], splits: bool) -> list[str]:
    """Why a db with meta `found` cannot serve `expected`: its identity differs, or (`splits`)
    one of the splits both name was scored from other log-mels / captions / skip list."""
    bad = [f"{_WHY[k]} ({k} {found.get(k, '<none>')!r}, now {expected[k]!r})"
           for k in IDENTITY_KEYS if k in expected and found.get(k) != expected[k]]
    if splits:
        for key, value in expected.items():
            if key.startswith(SPLIT_KEY) and key in found and found[key] != value:
                old, new = json.loads(found[key]), json.loads(value)
                changed = ", ".join(k for k in sorted(new) if old.get(k) != new.get(k))
                bad.append(f"other {changed} for split '{key[len(SPLIT_KEY):]}'")
    return bad


def remove_db(path: str | Path) -> None:
    """Delete a scores.db with its WAL/journal side files."""
    path = Path(path)
    for p in [path] + [Path(str(path) + s) for s in SIDE_FILES]:
        p.unlink(missing_ok=True)


def open_for_write(path: str | Path, meta: dict[str, str], overwrite: bool = False
                   ) -> sqlite3.Connection:
    """Open (or create) a scores.db for `meta`'s checkpoint and data.

    An existing file computed from another checkpoint, other caption embeddings or another
    eval.amp is never mixed with new scores: a one-line UserError, unless `overwrite`, which
    empties it here (01_xmodal_scores.py's --overwrite uses `writing`, which keeps the old file
    until the new one is complete). Splits are (re)written whole by write_split.
    """
    path = Path(path)
    if overwrite:
        remove_db(path)
    existed = path.is_file() and path.stat().st_size > 0
    with _sqlite_errors(path):
        if existed:
            conn = _connect(path)
            found = read_meta(conn, path)
            bad = _mismatch(found, meta, splits=False)
            if bad:
                conn.close()
                raise UserError(f"{path}: computed from {'; '.join(bad[:3])}; remove it or pass "
                                "--overwrite")
            _check_pages(conn, path)
        else:
            ensure_dir(path.parent)
            conn = _connect(path)
        _tune_for_writing(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            # provenance rows follow the latest writer; split rows only change with their split
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             sorted((k, v) for k, v in meta.items() if not k.startswith(SPLIT_KEY)))
            if not existed:
                conn.execute("INSERT INTO meta (key, value) VALUES ('created', ?)", (_now(),))
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            conn.close()
            raise
    return conn


@contextlib.contextmanager
def writing(path: str | Path, meta: dict[str, str], overwrite: bool = False
            ) -> Iterator[sqlite3.Connection]:
    """A connection to write splits into `path`, closed at the end of the block.

    Without `overwrite`, splits go into `path` itself (created if missing), one transaction
    each: a failure keeps every split finished before it. With `overwrite`, the new db is built
    in a temporary file beside `path` and renamed onto it only when the block succeeds: until
    then the old scores.db stays complete and untouched. Call it holding the run's lock: the
    temporary db (and journal) of a killed earlier --overwrite, up to a scores.db in size, is
    removed first.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # SQLite would only say "unable to open"
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    for stale in remove_stale_temps(path.parent, f"{path.name}."):
        Path(f"{stale}-journal").unlink(missing_ok=True)
    if not overwrite:
        created = not path.exists()
        if created:  # by open(), not SQLite (0644): the mode a plain open() gives (0666 - umask)
            ensure_dir(path.parent)
            with open(path, "ab"):
                pass
        try:
            conn = open_for_write(path, meta)
        except BaseException:
            if created:
                remove_db(path)
            raise
        try:
            yield conn
        finally:
            close(conn)
        return
    with atomic_path(path) as tmp:
        conn = open_for_write(tmp, meta)
        try:
            yield conn
        finally:
            close(conn)
        for side in SIDE_FILES:  # a journal left by a crash beside the OLD file must not be
            Path(str(path) + side).unlink(missing_ok=True)  # replayed into the new one


def open_for_read(path: str | Path, meta: dict[str, str] | None = None) -> sqlite3.Connection:
    """Open an existing scores.db to read its scores; with `meta`, check it belongs to that run.
    The connection can write (postprocessing 02 adds its t2a_ranks table through it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no scores database; run postprocessing/01_xmodal_scores.py first")
    conn = _connect(path)
    try:
        found = read_meta(conn, path)
    except UserError:
        conn.close()
        raise
    if meta is not None:
        bad = _mismatch(found, meta, splits=True)
        if bad:
            conn.close()
            raise UserError(f"{path}: does not belong to this checkpoint and data: computed from "
                            f"{'; '.join(bad[:3])}; rerun postprocessing/01_xmodal_scores.py "
                            "(with --overwrite if it says so)")
    return conn


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- writing

def _split_id(conn: sqlite3.Connection, split: str) -> int | None:
    row = conn.execute("SELECT split_id FROM splits WHERE split = ?", (split,)).fetchone()
    return None if row is None else int(row[0])


@_db_errors
def stored_splits(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT split FROM splits ORDER BY split_id")]


def _check_split(s: ScoredSplit) -> None:
    q, c = len(s.tids), len(s.fids)
    if q == 0 or c == 0:
        raise UserError(f"split '{s.split}': {q} captions and {c} clips; nothing to score "
                        "(is its text csv / hdf5 empty?)")
    if s.scores.shape != (q, c) or len(s.fnames) != c or len(s.captions) != q \
            or len(s.caption_clip) != q:
        raise ValueError(f"split '{s.split}': inconsistent sizes: scores {s.scores.shape}, "
                         f"{c} fids, {len(s.fnames)} fnames, {q} tids, {len(s.captions)} captions")
    if not np.isfinite(s.scores).all():
        raise UserError(f"split '{s.split}': the model produced non-finite scores (NaN/inf); "
                        "the checkpoint is unusable")


def _score_rows(split_id: int, scores: np.ndarray, c0: int, c1: int, bar) -> Iterator[tuple]:
    """Parameter tuples (split_id, caption, s[caption, c0], ..., s[caption, c1-1])."""
    block = scores[:, c0:c1].tolist()  # python floats, converted once in C
    for q, row in enumerate(block):
        if q % 256 == 0:
            bar.update(min(256, len(block) - q) * (c1 - c0))
        yield (split_id, q, *row)


def _insert_scores(conn: sqlite3.Connection, split_id: int, scores: np.ndarray, desc: str,
                   progress: bool) -> None:
    """All pairs, caption-major (= primary-key order), one statement per caption and clip block."""
    n_clips = scores.shape[1]
    with tqdm(total=scores.size, desc=desc, unit="pair", unit_scale=True, disable=not progress) as bar:
        for c0 in range(0, n_clips, MAX_ROW_BLOCK):
            c1 = min(n_clips, c0 + MAX_ROW_BLOCK)
            values = ",".join(f"(?1,?2,{c},?{c - c0 + 3})" for c in range(c0, c1))
            sql = f"INSERT INTO scores (split_id, caption, clip, score) VALUES {values}"
            conn.executemany(sql, _score_rows(split_id, scores, c0, c1, bar))
            raise_if_stopped()


def _write_stats(conn: sqlite3.Connection) -> None:
    """Exact planner statistics for `scores`, so that `WHERE split_id=? AND clip=?` uses
    scores_by_clip (without them SQLite guesses a primary-key range scan of the whole split).
    Format of sqlite_stat1.stat: total rows, then average rows per distinct prefix of the key."""
    rows = conn.execute("SELECT count(*), sum(n_clips * n_captions), sum(n_clips), "
                        "sum(n_captions) FROM splits").fetchone()
    n_splits, n_pairs, n_clips, n_caps = (int(v or 0) for v in rows)
    conn.execute("ANALYZE sqlite_schema")  # creates sqlite_stat1 if it is not there yet
    conn.execute("DELETE FROM sqlite_stat1 WHERE tbl = 'scores'")
    if n_splits:
        per_split = max(1, n_pairs // n_splits)
        per_caption = max(1, n_clips // n_splits)
        per_clip = max(1, n_caps // n_splits)
        conn.executemany("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (?, ?, ?)", [
            ("scores", "scores", f"{n_pairs} {per_split} {per_caption} 1"),
            ("scores", "scores_by_clip", f"{n_pairs} {per_split} {per_clip} 1")])
    conn.execute("ANALYZE sqlite_schema")  # reload the statistics into the planner


@_db_errors
def write_split(conn: sqlite3.Connection, s: ScoredSplit, progress: bool = False,
                identity: str | None = None) -> None:
    """Replace split `s.split` in the db with `s`, atomically (one transaction), and record
    `identity` (split_identity: what its inputs were) with it.

    The old rows are deleted and the new ones inserted in the same transaction; the index is
    dropped first and rebuilt at the end (deleting/inserting millions of rows through it would
    be an order of magnitude slower).
    """
    _check_split(s)
    scores = np.ascontiguousarray(s.scores, dtype=np.float32)
    caption_clip = np.asarray(s.caption_clip, dtype=np.int64)
    conn.execute("BEGIN IMMEDIATE")
    try:
        sid = _split_id(conn, s.split)
        if sid is not None:
            for table in ("scores", "clips", "captions", "t2a_ranks", "splits"):
                conn.execute(f"DELETE FROM {table} WHERE split_id = ?", (sid,))
        else:
            sid = int(conn.execute("SELECT coalesce(max(split_id), 0) + 1 FROM splits").fetchone()[0])
        conn.execute("DROP INDEX IF EXISTS scores_by_clip")
        conn.execute("INSERT INTO splits (split_id, split, n_clips, n_captions, written_at) "
                     "VALUES (?, ?, ?, ?, ?)", (sid, s.split, len(s.fids), len(s.tids), _now()))
        conn.executemany("INSERT INTO clips (split_id, clip, fid, fname) VALUES (?, ?, ?, ?)",
                         zip(itertools.repeat(sid), range(len(s.fids)), s.fids, s.fnames))
        cap_fids = [s.fids[c] for c in caption_clip.tolist()]
        conn.executemany(
            "INSERT INTO captions (split_id, caption, tid, fid, clip, raw_text) VALUES (?, ?, ?, ?, ?, ?)",
            zip(itertools.repeat(sid), range(len(s.tids)), s.tids, cap_fids, caption_clip.tolist(),
                s.captions))
        _insert_scores(conn, sid, scores, f"scores.db {s.split}", progress)
        conn.execute(_INDEX)
        _write_stats(conn)
        if identity is None:  # unknown inputs: no stale record of the previous ones either
            conn.execute("DELETE FROM meta WHERE key = ?", (SPLIT_KEY + s.split,))
        else:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         (SPLIT_KEY + s.split, identity))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


@_db_errors
def write_t2a_ranks(conn: sqlite3.Connection, split: str, ranks: np.ndarray) -> None:
    """Store the rank of every caption's true clip (`ranks` int `[Q]`, 1-based), replacing the
    split's previous ranks in one transaction."""
    sid = _split_id(conn, split)
    if sid is None:
        raise UserError(f"split '{split}' is not in the scores database")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM t2a_ranks WHERE split_id = ?", (sid,))
        caps = conn.execute("SELECT ca.tid, cl.fname FROM captions ca JOIN clips cl "
                            "ON cl.split_id = ca.split_id AND cl.clip = ca.clip "
                            "WHERE ca.split_id = ? ORDER BY ca.caption", (sid,)).fetchall()
        ranks = np.asarray(ranks, dtype=np.int64).tolist()
        if len(ranks) != len(caps):
            raise ValueError(f"split '{split}': {len(ranks)} ranks for {len(caps)} captions")
        conn.executemany("INSERT INTO t2a_ranks (split_id, caption, tid, fname, rank) "
                         "VALUES (?, ?, ?, ?, ?)",
                         ((sid, q, tid, fname, r) for q, ((tid, fname), r) in enumerate(zip(caps, ranks))))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


# --------------------------------------------------------------------------- reading

@_db_errors
def read_split(conn: sqlite3.Connection, split: str, path: str | Path = "scores.db") -> ScoredSplit:
    """Rebuild a split's matrix float32 `[Q, C]` and its clip / caption lists from the db."""
    row = conn.execute("SELECT split_id, n_clips, n_captions FROM splits WHERE split = ?",
                       (split,)).fetchone()
    if row is None:
        have = ", ".join(stored_splits(conn)) or "none"
        raise UserError(f"{path}: split '{split}' was not scored (stored: {have}); run "
                        f"postprocessing/01_xmodal_scores.py --set 'eval.splits=[{split}]'")
    sid, n_clips, n_caps = (int(v) for v in row)
    clips = conn.execute("SELECT fid, fname FROM clips WHERE split_id = ? ORDER BY clip",
                         (sid,)).fetchall()
    caps = conn.execute("SELECT tid, raw_text, clip FROM captions WHERE split_id = ? "
                        "ORDER BY caption", (sid,)).fetchall()
    if len(clips) != n_clips or len(caps) != n_caps:
        raise damaged_db_error(_db_file(conn), f"split '{split}' lost clip or caption rows")
    return ScoredSplit(
        split=split, fids=[r[0] for r in clips], fnames=[r[1] for r in clips],
        tids=[r[0] for r in caps], captions=[r[1] for r in caps],
        caption_clip=np.array([r[2] for r in caps], dtype=np.int64),
        scores=_read_scores(conn, split, sid, n_caps, n_clips))


def _read_scores(conn: sqlite3.Connection, split: str, sid: int, n_caps: int, n_clips: int
                 ) -> np.ndarray:
    cur = conn.execute("SELECT score FROM scores WHERE split_id = ? ORDER BY caption, clip", (sid,))
    try:
        # chain.from_iterable unpacks the 1-tuples in C: no Python frame per pair
        flat = np.fromiter(itertools.chain.from_iterable(cur), dtype=np.float64,
                           count=n_clips * n_caps)
    except ValueError:  # fewer rows than `splits` says were written: pages lost under SQLite
        raise damaged_db_error(_db_file(conn), f"split '{split}' lost score rows") from None
    return flat.astype(np.float32).reshape(n_caps, n_clips)


def read_matrix(conn: sqlite3.Connection, split: str) -> np.ndarray:
    """float32 `[Q, C]` scores of one split."""
    return read_split(conn, split).scores


@_db_errors
def caption_scores(conn: sqlite3.Connection, split: str, caption: int) -> list[tuple[int, float]]:
    """(clip, score) of one caption against every clip (primary-key lookup)."""
    return conn.execute("SELECT s.clip, s.score FROM scores s JOIN splits USING (split_id) "
                        "WHERE splits.split = ? AND s.caption = ? ORDER BY s.clip",
                        (split, int(caption))).fetchall()


@_db_errors
def clip_scores(conn: sqlite3.Connection, split: str, clip: int) -> list[tuple[int, float]]:
    """(caption, score) of one clip against every caption (via scores_by_clip)."""
    return conn.execute("SELECT s.caption, s.score FROM scores s JOIN splits USING (split_id) "
                        "WHERE splits.split = ? AND s.clip = ? ORDER BY s.caption",
                        (split, int(clip))).fetchall()


def close(conn: sqlite3.Connection) -> None:
    """Close, folding the WAL back into the db file (no side files left behind)."""
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.DatabaseError:
        pass
    conn.close()


def db_size_mb(path: str | Path) -> float:
    path = Path(path)
    return sum(os.path.getsize(p) for p in [path] + [Path(str(path) + s) for s in SIDE_FILES]
               if os.path.exists(p)) / 2 ** 20


__all__: Sequence[str] = (
    "ScoredSplit", "config_sha1", "file_sha1", "expected_meta", "open_for_write", "open_for_read",
    "write_split", "write_t2a_ranks", "read_split", "read_matrix", "caption_scores",
    "clip_scores", "stored_splits", "remove_db", "close", "db_size_mb")
