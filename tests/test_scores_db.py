"""utils.scores_db: schema, atomic split writes, exact round trips, indexes, run identity."""
from __future__ import annotations

import errno
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_data import REPO
from utils import evaluation, scores_db
from utils.errors import UserError
from utils.metrics import rank_of_first_relevant

NASTY = [
    "Robert'); DROP TABLE scores;--",
    'a "quoted" dog; barks',
    "SELECT * FROM captions WHERE 1=1 OR ''='",
    "semi;colons;;and 'single' quotes",
    "unicode: café – 鳥のさえずり \\ backslash\nnewline",
    "   leading and trailing spaces   ",
]
META = {"schema_version": scores_db.SCHEMA_VERSION, "run": "run-a", "config_sha1": "c1",
        "checkpoint": "best", "checkpoint_epoch": "3", "checkpoint_sha1": "k1",
        "embeddings_sha1": "e1", "eval_amp": "off"}


def make_split(split="evaluation", n_clips=4, per_clip=3, seed=0, captions=None) -> scores_db.ScoredSplit:
    rng = np.random.default_rng(seed)
    q = n_clips * per_clip
    caption_clip = np.repeat(np.arange(n_clips), per_clip)
    caps = captions or [f"caption {i}" for i in range(q)]
    caps = (caps * q)[:q]
    return scores_db.ScoredSplit(
        split=split, fids=[f"fid{i}" for i in range(n_clips)], fnames=[f"clip {i}.wav" for i in range(n_clips)],
        tids=[f"tid{i}" for i in range(q)], captions=caps, caption_clip=caption_clip,
        scores=rng.standard_normal((q, n_clips)).astype(np.float32))


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "scores.db"
    conn = scores_db.open_for_write(path, META)
    yield path, conn
    conn.close()


def count(conn, table, split=None):
    if split is None:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return conn.execute(f"SELECT count(*) FROM {table} JOIN splits USING (split_id) WHERE split = ?",
                        (split,)).fetchone()[0]


def test_roundtrip_exact_with_nasty_captions(db):
    path, conn = db
    s = make_split(captions=NASTY)
    scores_db.write_split(conn, s)
    back = scores_db.read_split(conn, "evaluation")
    assert back.captions == s.captions  # byte-exact, quotes/semicolons/SQL included
    assert back.fnames == s.fnames and back.fids == s.fids and back.tids == s.tids
    np.testing.assert_array_equal(back.caption_clip, s.caption_clip)
    np.testing.assert_array_equal(back.scores, s.scores)  # float32 exact
    assert {"scores", "clips", "captions", "splits", "meta", "t2a_ranks"} <= {
        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    # every pair is a row, equal to the matrix entry
    rows = conn.execute("SELECT caption, clip, score FROM scores").fetchall()
    assert len(rows) == s.scores.size
    for q, c, v in rows:
        assert np.float32(v) == s.scores[q, c]
    raw = conn.execute("SELECT raw_text FROM captions ORDER BY caption").fetchall()
    assert [r[0] for r in raw] == s.captions


def test_rerun_replaces_split_and_keeps_others(db):
    path, conn = db
    scores_db.write_split(conn, make_split("validation", seed=1))
    scores_db.write_split(conn, make_split("evaluation", seed=2))
    before = {t: count(conn, t) for t in ("scores", "clips", "captions", "splits")}
    new = make_split("evaluation", seed=3)
    scores_db.write_split(conn, new)
    assert {t: count(conn, t) for t in before} == before
    np.testing.assert_array_equal(scores_db.read_matrix(conn, "evaluation"), new.scores)
    np.testing.assert_array_equal(scores_db.read_matrix(conn, "validation"), make_split("validation", seed=1).scores)
    assert scores_db.stored_splits(conn) == ["validation", "evaluation"]


def test_failed_write_leaves_previous_split(db):
    path, conn = db
    old = make_split(seed=1)
    scores_db.write_split(conn, old)
    bad = make_split(seed=2)
    bad.captions = bad.captions[:-1] + [None]  # NOT NULL violation in the middle of the insert
    with pytest.raises(sqlite3.IntegrityError):
        scores_db.write_split(conn, bad)
    np.testing.assert_array_equal(scores_db.read_matrix(conn, "evaluation"), old.scores)
    assert count(conn, "scores") == old.scores.size


def test_lookups_use_indexes(db):
    path, conn = db
    scores_db.write_split(conn, make_split("validation"))
    scores_db.write_split(conn, make_split("evaluation", n_clips=6))
    conn.close()
    conn = sqlite3.connect(path)  # a fresh reader, as a user would open it
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "scores_by_clip" in names
    per_clip = " ".join(r[3] for r in conn.execute(
        "EXPLAIN QUERY PLAN SELECT caption, score FROM scores WHERE split_id = ? AND clip = ?", (2, 1)))
    per_caption = " ".join(r[3] for r in conn.execute(
        "EXPLAIN QUERY PLAN SELECT clip, score FROM scores WHERE split_id = ? AND caption = ?", (2, 1)))
    assert "USING INDEX scores_by_clip (split_id=? AND clip=?)" in per_clip
    assert "USING PRIMARY KEY (split_id=? AND caption=?)" in per_caption
    s = make_split("evaluation", n_clips=6)
    assert [v for _, v in scores_db.clip_scores(conn, "evaluation", 2)] == pytest.approx(s.scores[:, 2].tolist())
    assert [v for _, v in scores_db.caption_scores(conn, "evaluation", 5)] == pytest.approx(s.scores[5].tolist())
    conn.close()


def test_reuse_is_keyed_on_what_decides_the_scores(db):
    path, conn = db
    scores_db.write_split(conn, make_split())
    conn.close()
    # another run name (renamed or copied folder), config hash (training.epochs, demo sizes)
    # or epoch label: the same checkpoint file and inputs give the same scores
    harmless = dict(META, run="run-b", config_sha1="c2", checkpoint="last", checkpoint_epoch="9")
    conn = scores_db.open_for_write(path, harmless)
    assert scores_db.stored_splits(conn) == ["evaluation"]
    assert scores_db.read_meta(conn, path)["run"] == "run-b"  # provenance follows the writer
    conn.close()
    scores_db.open_for_read(path, harmless).close()
    for key, why in [("checkpoint_sha1", "another checkpoint"),
                     ("embeddings_sha1", "other caption embeddings"), ("eval_amp", "another eval.amp"),
                     ("schema_version", "an older version")]:
        with pytest.raises(UserError, match=f"computed from {why}.*remove it or pass --overwrite"):
            scores_db.open_for_write(path, dict(META, **{key: "x"}))
        with pytest.raises(UserError, match=f"does not belong.*{why}"):
            scores_db.open_for_read(path, dict(META, **{key: "x"}))


def test_a_split_scored_from_other_inputs_is_refused_when_read(db):
    path, conn = db
    ident = json.dumps({"captions": "c", "logmels": "l", "skipped": None}, sort_keys=True)
    scores_db.write_split(conn, make_split("evaluation"), identity=ident)
    scores_db.write_split(conn, make_split("validation"))  # no identity recorded
    conn.close()
    key = scores_db.SPLIT_KEY + "evaluation"
    scores_db.open_for_read(path, dict(META, **{key: ident})).close()
    other = json.dumps({"captions": "c", "logmels": "L2", "skipped": None}, sort_keys=True)
    with pytest.raises(UserError, match="computed from other logmels for split 'evaluation'"):
        scores_db.open_for_read(path, dict(META, **{key: other}))
    # adding to the db is fine: the split is rewritten whole, with its new identity
    conn = scores_db.open_for_write(path, dict(META, **{key: other}))
    scores_db.write_split(conn, make_split("evaluation", seed=5), identity=other)
    conn.close()
    scores_db.open_for_read(path, dict(META, **{key: other})).close()


def test_overwrite_keeps_the_old_db_until_the_new_one_is_complete(db):
    path, conn = db
    scores_db.write_split(conn, make_split(seed=1))
    conn.close()
    before = path.read_bytes()
    other = dict(META, checkpoint_sha1="k2")
    with pytest.raises(KeyboardInterrupt):
        with scores_db.writing(path, other, overwrite=True) as new:
            scores_db.write_split(new, make_split("validation", seed=2))
            raise KeyboardInterrupt  # killed while scoring the next split
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.db"]  # no temporaries
    with scores_db.writing(path, other, overwrite=True) as new:
        scores_db.write_split(new, make_split("validation", seed=2))
    conn = scores_db.open_for_read(path, other)
    assert scores_db.stored_splits(conn) == ["validation"]
    conn.close()
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.db"]


def test_a_killed_overwrites_temporary_db_is_removed_by_the_next_write(db):
    """kill -9 leaves the half-built db of --overwrite (up to a scores.db in size) and its
    journal; the next writer, holding the run's lock, removes them."""
    path, conn = db
    scores_db.write_split(conn, make_split(seed=1))
    conn.close()
    stale = path.with_name(".scores.db.0badf00d.tmp")
    stale.write_bytes(b"half a db")
    Path(f"{stale}-journal").write_bytes(b"its journal")
    with scores_db.writing(path, dict(META, checkpoint_sha1="k2"), overwrite=True) as new:
        scores_db.write_split(new, make_split("validation", seed=2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.db"]


def test_a_stale_journal_of_the_old_db_is_not_replayed_into_the_new_one(db):
    path, conn = db
    scores_db.write_split(conn, make_split(seed=1))
    conn.close()
    journal = path.with_name("scores.db-journal")
    journal.write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" + bytes(504))  # a hot journal's header
    with scores_db.writing(path, dict(META, checkpoint_sha1="k2"), overwrite=True) as new:
        scores_db.write_split(new, make_split("validation", seed=2))
    assert not journal.exists()
    conn = scores_db.open_for_read(path, dict(META, checkpoint_sha1="k2"))
    assert scores_db.stored_splits(conn) == ["validation"]
    conn.close()


def test_a_full_disk_is_an_oserror_naming_the_db(tmp_path, monkeypatch):
    """SQLite says SQLITE_FULL ("database or disk is full"); the one-line handler needs ENOSPC.
    max_page_count makes SQLite meet a genuinely full file."""
    tune = scores_db._tune_for_writing

    def tiny(conn):
        tune(conn)
        conn.execute("PRAGMA max_page_count=6")
    monkeypatch.setattr(scores_db, "_tune_for_writing", tiny)
    path = tmp_path / "scores.db"
    with pytest.raises(OSError) as e:
        with scores_db.writing(path, META) as conn:
            scores_db.write_split(conn, make_split("evaluation", n_clips=300, per_clip=5))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)


SIZE_LIMITED = """
import resource, signal, sys
from tests.test_scores_db import META, make_split
from utils import scores_db
from utils.errors import UserError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG) instead
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
try:
    with scores_db.writing(sys.argv[1], META) as conn:
        scores_db.write_split(conn, make_split("evaluation", n_clips=300, per_clip=5))
except UserError as e:
    print(e)
"""


def test_a_quota_or_file_size_limit_is_one_line_not_a_disk_failure(tmp_path):
    """SQLite reports every failed write but a full disk as SQLITE_IOERR: a quota or a
    `ulimit -f` came out as a traceback saying "Input/output error" (a failing disk?)."""
    import subprocess
    import sys

    path = tmp_path / "scores.db"
    proc = subprocess.run([sys.executable, "-c", SIZE_LIMITED, str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith(f"{path}: could not write the scores (disk I/O error: a disk "
                                  "quota, a file-size limit"), proc.stdout + proc.stderr


def damage_scores_table(path) -> None:
    """Junk over the root page of `scores` (as a bad sector would leave): the file header and
    `meta` stay readable, so the damage is met only when a split's scores are read or replaced."""
    conn = sqlite3.connect(path)
    root = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'scores'").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xab" * page_size)


FIX = "postprocessing/01_xmodal_scores.py --overwrite"  # the one command that replaces a db


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "scores.db"
    path.write_text("not a database at all")
    with pytest.raises(UserError, match="not a scores database"):
        scores_db.open_for_write(path, META)
    with pytest.raises(UserError) as e:
        scores_db.open_for_read(path, META)
    assert str(path) in str(e.value) and FIX in str(e.value)


def test_a_db_damaged_in_the_middle_is_a_user_error_and_overwrite_replaces_it(db):
    path, conn = db
    scores_db.write_split(conn, make_split("validation", n_clips=40, per_clip=5, seed=1))
    scores_db.write_split(conn, make_split("evaluation", n_clips=40, per_clip=5, seed=2))
    conn.close()
    damage_scores_table(path)
    conn = scores_db.open_for_read(path, META)  # header and meta are intact
    with pytest.raises(UserError, match="damaged") as e:
        scores_db.read_split(conn, "evaluation", path)
    assert str(path) in str(e.value) and FIX in str(e.value)
    conn.close()
    before = path.read_bytes()
    with pytest.raises(UserError, match="damaged") as e:  # before any split is encoded
        scores_db.open_for_write(path, META)
    assert str(path) in str(e.value) and FIX in str(e.value)
    assert path.read_bytes() == before
    new = make_split("evaluation", seed=3)
    with scores_db.writing(path, META, overwrite=True) as conn:
        scores_db.write_split(conn, new)
    conn = scores_db.open_for_read(path, META)
    np.testing.assert_array_equal(scores_db.read_matrix(conn, "evaluation"), new.scores)
    conn.close()


def test_damage_deep_in_the_file_is_found_when_opened_for_writing(db):
    """A bad page among the score rows (not a root page) would only be met when the split
    holding it is replaced, after that split was encoded: opening for writing checks every page."""
    path, conn = db
    scores_db.write_split(conn, make_split("validation", n_clips=200, per_clip=5, seed=1))
    conn.close()
    n_pages = path.stat().st_size // scores_db.PAGE_SIZE
    with open(path, "r+b") as f:
        f.seek((n_pages // 2) * scores_db.PAGE_SIZE)
        f.write(b"\xab" * scores_db.PAGE_SIZE)
    scores_db.close(scores_db.open_for_read(path, META))  # the header and meta still read
    with pytest.raises(UserError, match="damaged") as e:
        scores_db.open_for_write(path, META)
    assert str(path) in str(e.value) and FIX in str(e.value)


def test_lost_score_rows_are_damage_not_a_crash(db):
    path, conn = db
    scores_db.write_split(conn, make_split())
    conn.execute("DELETE FROM scores WHERE caption = 1")
    with pytest.raises(UserError, match="damaged") as e:
        scores_db.read_split(conn, "evaluation", path)
    assert str(path) in str(e.value) and FIX in str(e.value)


def test_empty_split_and_missing_split(db):
    path, conn = db
    with pytest.raises(UserError, match="split 'evaluation': 0 captions and 0 clips"):
        scores_db.write_split(conn, scores_db.ScoredSplit("evaluation", [], [], [], [],
                                                          np.zeros(0, np.int64), np.zeros((0, 0), np.float32)))
    with pytest.raises(UserError, match="split 'development' was not scored"):
        scores_db.read_split(conn, "development")


def test_non_finite_scores_refused(db):
    path, conn = db
    s = make_split()
    s.scores[1, 2] = np.nan
    with pytest.raises(UserError, match="non-finite"):
        scores_db.write_split(conn, s)


def test_wide_split_uses_several_statements(db, monkeypatch):
    path, conn = db
    monkeypatch.setattr(scores_db, "MAX_ROW_BLOCK", 3)  # 7 clips -> blocks of 3, 3, 1
    s = make_split(n_clips=7, per_clip=2)
    scores_db.write_split(conn, s)
    np.testing.assert_array_equal(scores_db.read_matrix(conn, "evaluation"), s.scores)


def test_t2a_ranks_table(db):
    path, conn = db
    s = make_split(captions=NASTY)
    scores_db.write_split(conn, s)
    ranks = rank_of_first_relevant(s.scores, s.relevance())
    scores_db.write_t2a_ranks(conn, "evaluation", ranks)
    scores_db.write_t2a_ranks(conn, "evaluation", ranks)  # rerun replaces
    rows = conn.execute("SELECT caption, tid, fname, rank FROM t2a_ranks ORDER BY caption").fetchall()
    assert [r[3] for r in rows] == ranks.tolist()
    assert [r[2] for r in rows] == [s.fnames[c] for c in s.caption_clip]
    named = conn.execute("SELECT raw_text FROM t2a_ranks_named ORDER BY caption").fetchall()
    assert [r[0] for r in named] == s.captions


def test_top_k_agrees_with_rank_rule_under_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(40, 25)).astype(np.float32)  # many ties
    top = evaluation.top_k_indices(scores, 10)
    ref = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(top, ref)
    rel = np.zeros_like(scores, dtype=bool)
    rel[np.arange(40), rng.integers(0, 25, 40)] = True
    ranks = rank_of_first_relevant(scores, rel)
    full = np.argsort(-scores, axis=1, kind="stable")
    for q in range(40):
        assert full[q, ranks[q] - 1] == np.flatnonzero(rel[q])[0]
    assert evaluation.top_k_indices(scores[:, :4], 10).shape == (40, 4)


def test_config_hash_ignores_eval_and_wandb():
    cfg = {"seed": 0, "paths": {"dataset_dir": "d", "output_dir": "o"}, "eval": {"splits": ["a"]},
           "wandb": {"mode": "auto"}}
    same = {"seed": 0, "paths": {"dataset_dir": "d", "output_dir": "elsewhere"},
            "eval": {"splits": ["b"]}, "wandb": {"mode": "disabled"}}
    assert scores_db.config_sha1(cfg) == scores_db.config_sha1(same)
    assert scores_db.config_sha1(cfg) != scores_db.config_sha1(dict(cfg, seed=1))


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_named_scores_db_is_reported_as_such(tmp_path, overwrite):
    (tmp_path / "scores.db").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        with scores_db.writing(tmp_path / "scores.db", META, overwrite=overwrite):
            pass
    assert e.value.filename == str(tmp_path / "scores.db")
    assert (tmp_path / "scores.db").is_dir()


@pytest.mark.parametrize("message, expected", [
    ("database disk image is malformed", UserError), ("file is not a database", UserError),
    ("database or disk is full", OSError), ("attempt to write a readonly database", OSError),
    ("database is locked", sqlite3.OperationalError)])
def test_errors_without_a_result_code_are_told_apart_by_message(tmp_path, message, expected):
    """Python 3.10's sqlite3 errors carry no result code (`sqlite_errorcode` came in 3.11)."""
    error = sqlite3.OperationalError(message)
    assert not hasattr(error, "sqlite_errorcode")
    with pytest.raises(expected) as caught:
        with scores_db._sqlite_errors(tmp_path / "scores.db"):
            raise error
    if expected is not sqlite3.OperationalError:
        assert str(tmp_path / "scores.db") in str(caught.value)
