"""A run folder through the scripts: one process at a time, no half-made folders, scores.db reuse
and --overwrite, output locations that fail with one line."""
from __future__ import annotations

import errno
import os
import shutil
import sqlite3

import h5py
import numpy as np
import pytest

from tests.cli_helpers import error_line
from tests.test_postprocessing import RETRIEVAL, SCORES, make_run, run_script
from tests.test_training import main_in_process, train_in_process
from tests.tiny_data import REPO, make_tiny_features, tiny_config
from utils import evaluation, scores_db, train_utils
from utils.errors import UserError
from utils.runs import checkpoint_path, latest_run_dir, lock_run, resolve_run_dir
from utils.tracking import read_jsonl

SUBMISSION = "postprocessing/03_dcase_submission.py"


@pytest.fixture
def scripts(tmp_path, monkeypatch, capsys):
    """A tiny run with a best checkpoint, and a caller for the numbered scripts (in-process)."""
    conf, run_dir = make_run(tmp_path)

    def call(script, *args):
        return run_script(script, "--conf", conf, *args, monkeypatch=monkeypatch, capsys=capsys)
    return conf, run_dir, call


@pytest.fixture
def tiny(tmp_path):
    make_tiny_features(tmp_path / "data")
    return tmp_path


def db_splits(path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT split FROM splits ORDER BY split_id")]
    finally:
        conn.close()


# --------------------------------------------------------------------------- one process per run

def test_a_read_only_run_folder_gets_advice_that_can_be_followed(scripts, tmp_path, monkeypatch):
    """No config key moves a run: the advice is to copy it (faked: root ignores file modes)."""
    import errno

    from utils import runs

    conf, run_dir, call = scripts

    def read_only(path, what):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(runs, "exclusive", read_only)
    line = error_line(call(SCORES, "--run", run_dir))
    assert f"{run_dir}: the run folder is not writable (read-only file system); copy it" in line
    assert "--run DEST" in line
    monkeypatch.undo()
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert call(SCORES, "--run", copy).returncode == 0  # the advice works


def test_resume_takes_a_runs_name_as_run_sh_passes_it(tiny, monkeypatch, capsys):
    """./run.sh --stage 5 --run my_run passes the name on: main.py --resume finds it in
    paths.output_dir, as the postprocessing steps do."""
    conf = tiny_config(tiny, {"training": {"epochs": 1}})
    train_in_process(conf, "named")
    proc = main_in_process(monkeypatch, capsys, "--conf", conf, "--resume", "named",
                           "--set", "training.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming after epoch 1: {tiny / 'outputs' / 'named'}" in proc.stdout


def test_resume_from_another_directory_finds_the_runs_relative_paths(tiny, monkeypatch):
    """A job script resuming from elsewhere: the run's relative paths.* resolve against the
    directory it was trained from (provenance.json), and config.yaml keeps them as given."""
    import yaml

    from tests.cli_helpers import run_in_process
    from tests.test_training import one_thread
    from utils.config import load_config

    cfg = yaml.safe_load(tiny_config(tiny, {"training": {"epochs": 1}}).read_text())
    cfg["paths"].update(dataset_dir="data", output_dir="outputs", pretrained_dir="pretrained")
    (tiny / "rel.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tiny / "elsewhere"
    elsewhere.mkdir()
    with one_thread():
        proc = run_in_process(monkeypatch, "main.py", "--conf", tiny / "rel.yaml", "--name", "r", cwd=tiny)
        assert proc.returncode == 0, proc.stderr
        run = tiny / "outputs" / "r"
        proc = run_in_process(monkeypatch, "main.py", "--resume", run, "--set", "training.epochs=2",
                              cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert "resuming after epoch 1" in proc.stdout
    saved = load_config(run / "config.yaml")
    assert saved["paths"]["dataset_dir"] == "data" and saved["training"]["epochs"] == 2
    assert not any(elsewhere.iterdir())


def test_a_second_resume_is_refused_naming_the_holder(tiny, monkeypatch, capsys):
    conf = tiny_config(tiny, {"training": {"epochs": 1}})
    run = train_in_process(conf, "r").run_dir
    jsonl = (run / "metrics.jsonl").read_text()
    with lock_run(run):  # what a first `main.py --resume` holds while it trains
        line = error_line(main_in_process(monkeypatch, capsys, "--resume", run,
                                          "--set", "training.epochs=2"))
    assert f"run {run} is in use by pid {os.getpid()} on host" in line
    assert "wait for it to finish or stop it" in line
    assert (run / "metrics.jsonl").read_text() == jsonl  # nothing written by the refused one
    # once the first one is gone, the same command works
    proc = main_in_process(monkeypatch, capsys, "--resume", run, "--set", "training.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("script", [SCORES, RETRIEVAL, SUBMISSION])
def test_postprocessing_on_a_run_in_use_is_refused(scripts, tmp_path, script):
    conf, run_dir, call = scripts
    assert call(SCORES, "--run", run_dir).returncode == 0
    before = sorted(p.name for p in run_dir.iterdir())
    args = ["--audio-dir", tmp_path, "--captions", tmp_path / "c.csv"] if script == SUBMISSION else []
    if script == SUBMISSION:
        from tests.wav_fixtures import write_wav
        for i in range(10):
            write_wav(tmp_path / f"c{i}.wav", seconds=0.2, sr=16000, seed=i)
        (tmp_path / "c.csv").write_text("caption\na dog\n")
    with lock_run(run_dir):
        line = error_line(call(script, "--run", run_dir, *args))
    assert f"run {run_dir} is in use by pid {os.getpid()}" in line
    assert sorted(p.name for p in run_dir.iterdir()) == before


# --------------------------------------------------------------------------- half-made run folders

def test_a_run_failing_before_its_first_checkpoint_leaves_no_folder(tiny, monkeypatch, capsys):
    """audio_encoder.init: prior with no weights fails inside training, after the folder was
    made: the folder goes, so the same --name works once the cause is fixed."""
    conf = tiny_config(tiny, {"audio_encoder": {"init": "prior"}, "training": {"epochs": 1}})
    line = error_line(main_in_process(monkeypatch, capsys, "--conf", conf, "--name", "mine"))
    assert "pretrained" in line or "CNN14" in line
    assert not (tiny / "outputs" / "mine").exists()
    proc = main_in_process(monkeypatch, capsys, "--conf", conf, "--name", "mine",
                           "--set", "audio_encoder.init=random")
    assert proc.returncode == 0, proc.stderr
    assert checkpoint_path(tiny / "outputs" / "mine", "last").is_file()


def test_a_run_failing_after_a_checkpoint_is_kept(tiny, monkeypatch, capsys):
    conf = tiny_config(tiny, {"training": {"epochs": 3}})
    validate, calls = train_utils.validate, []

    def fail_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise UserError("validation failed")
        return validate(*args, **kwargs)
    monkeypatch.setattr(train_utils, "validate", fail_in_epoch_2)
    error_line(main_in_process(monkeypatch, capsys, "--conf", conf, "--name", "kept"))
    assert checkpoint_path(tiny / "outputs" / "kept", "last").is_file()


def test_run_may_be_named_by_its_name_in_output_dir(scripts, tmp_path, monkeypatch):
    """`--run my_run` (as main.py --name gave it, and as run.sh passes it on) from any
    directory; a name that is neither a folder here nor a run there is one line naming both."""
    conf, run_dir, call = scripts
    monkeypatch.chdir(tmp_path)
    cfg = {"paths": {"output_dir": str(run_dir.parent)}}
    assert resolve_run_dir(run_dir.name, cfg) == run_dir.parent / run_dir.name
    with pytest.raises(UserError, match=f"no_such: not a run directory .* nor is {run_dir.parent / 'no_such'}"):
        resolve_run_dir("no_such", cfg)
    with pytest.raises(UserError, match="not a run directory") as e:
        resolve_run_dir("sub/no_such", cfg)
    assert "nor is" not in str(e.value)  # a path is only looked for where it says
    proc = call(SCORES, "--run", run_dir.name)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "scores.db").is_file()


def test_postprocessing_works_on_a_run_from_any_directory(tmp_path, monkeypatch):
    """`--run DIR` from elsewhere: no conf.yaml is needed there, and the run's relative paths
    are found against the directory it was trained from (provenance.json), as query.py does."""
    from tests.cli_helpers import run_in_process
    from tests.test_postprocessing import make_run
    from utils import provenance
    from utils.config import load_config, save_config

    _, run_dir = make_run(tmp_path)
    cfg = load_config(run_dir / "config.yaml")
    cfg["paths"].update(dataset_dir="data", output_dir="outputs", pretrained_dir="pretrained")
    save_config(cfg, run_dir)
    monkeypatch.chdir(tmp_path)
    provenance.record_invocation(run_dir, "cpu")  # trained from tmp_path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "conf.yaml").write_text("model: another project's\n")  # not ours: never read
    for script in (SCORES, "postprocessing/02_xmodal_retrieval.py"):
        proc = run_in_process(monkeypatch, script, "--run", run_dir, cwd=elsewhere)
        assert proc.returncode == 0, proc.stderr
    assert (run_dir / "metrics.json").is_file() and sorted(elsewhere.iterdir()) == [elsewhere / "conf.yaml"]
    typo = run_dir.parent / "tiny-rum"
    line = error_line(run_in_process(monkeypatch, SCORES, "--run", typo, cwd=elsewhere))
    assert f"{typo}: not a run directory" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, what in (((), "the newest run"), (("--run", "tiny-run"), "the run named tiny-run")):
        line = error_line(run_in_process(monkeypatch, SCORES, *args, cwd=empty))
        assert f"conf.yaml: config file not found, to look for {what} in its paths.output_dir" in line
        assert "pass --run DIR (a run folder), or --conf PATH" in line
    entries = provenance.read_provenance(run_dir)
    assert [e["action"] for e in entries] == ["new", "scores", "metrics"]
    assert entries[-1]["conf"] is None  # no conf.yaml there: none was read


def test_newest_run_default_skips_folders_without_a_checkpoint(scripts, tmp_path):
    conf, run_dir, call = scripts
    half = tmp_path / "outputs" / "zzz-newer-but-empty"
    half.mkdir()
    shutil.copy(run_dir / "config.yaml", half / "config.yaml")
    os.utime(half / "config.yaml", (2e9, 2e9))  # clearly the newest
    assert latest_run_dir(tmp_path / "outputs") == run_dir
    # the newest run is the one trained last, whatever touched another's config.yaml
    older = tmp_path / "outputs" / "aaa-trained-before"
    older.mkdir()
    shutil.copy(run_dir / "config.yaml", older / "config.yaml")
    shutil.copytree(run_dir / "checkpoints", older / "checkpoints")
    for p in (older / "checkpoints").iterdir():
        os.utime(p, (1e9, 1e9))
    os.utime(older / "config.yaml", (2.1e9, 2.1e9))
    assert latest_run_dir(tmp_path / "outputs") == run_dir
    os.utime(next((older / "checkpoints").iterdir()), (2.2e9, 2.2e9))  # a --resume trained it on
    assert latest_run_dir(tmp_path / "outputs") == older
    shutil.rmtree(older)
    proc = call(SCORES)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "scores.db").is_file() and not (half / "scores.db").exists()


def test_no_trained_run_at_all(tmp_path):
    (tmp_path / "outputs" / "x").mkdir(parents=True)
    (tmp_path / "outputs" / "x" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(UserError, match="no trained run in .*--run DIR"):
        resolve_run_dir(None, {"paths": {"output_dir": str(tmp_path / "outputs")}})


def test_runs_one_folder_deeper_are_pointed_to_with_the_conf_that_names_them(tmp_path, monkeypatch):
    """After `make demo` the runs are in outputs/demo; a README command pasted without
    `--conf conf_demo.yaml` looks in conf.yaml's outputs and must say where they are."""
    run = tmp_path / "outputs" / "demo" / "demo-1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "checkpoints" / "best.pt").write_bytes(b"x")
    (tmp_path / "my_demo.yaml").write_text("base: conf.yaml\npaths:\n  output_dir: outputs/demo\n")
    shutil.copy(REPO / "conf.yaml", tmp_path / "conf.yaml")
    (tmp_path / "sweep.yaml").write_text("method: grid\n")  # not a config of ours: passed over
    monkeypatch.chdir(tmp_path)
    cfg = {"paths": {"output_dir": "outputs"}}
    with pytest.raises(UserError) as e:
        resolve_run_dir(None, cfg)
    assert str(e.value) == ("no trained run in 'outputs' (paths.output_dir): runs are in outputs/demo: "
                            "pass --conf my_demo.yaml (its paths.output_dir), or --run outputs/demo/<run>")
    with pytest.raises(UserError) as e:
        resolve_run_dir("demo-1", cfg)
    assert str(e.value) == ("demo-1: no such run in outputs (paths.output_dir of --conf); runs are in "
                            "outputs/demo: pass --conf my_demo.yaml (its paths.output_dir), or "
                            "--run outputs/demo/demo-1")
    with pytest.raises(UserError, match="nor is outputs/demo-2 .*pass a directory made by main.py"):
        resolve_run_dir("demo-2", cfg)


# --------------------------------------------------------------------------- scores.db reuse

def test_scores_db_survives_harmless_changes_and_a_renamed_or_copied_run(scripts, tmp_path):
    conf, run_dir, call = scripts
    assert call(SCORES, "--run", run_dir).returncode == 0
    moved = tmp_path / "outputs" / "renamed"
    run_dir.rename(moved)
    copied = tmp_path / "elsewhere" / "copy"
    shutil.copytree(moved, copied)
    harmless = ["--set", "training.epochs=7", "demo.sizes.development=3"]
    for script, run, args in [(SCORES, moved, harmless), (RETRIEVAL, moved, harmless),
                              (RETRIEVAL, copied, [])]:
        proc = call(script, "--run", run, *args)
        assert proc.returncode == 0, proc.stderr
    assert db_splits(copied / "scores.db") == ["validation", "evaluation"]


def test_scores_of_changed_features_are_refused_and_the_advice_works(scripts, tmp_path):
    conf, run_dir, call = scripts
    assert call(SCORES, "--run", run_dir).returncode == 0
    with h5py.File(tmp_path / "data" / "evaluation_audio_logmels.hdf5", "a") as h5:
        name = sorted(h5)[0]
        h5[name][...] = h5[name][...] + 1.0  # step 02 rerun on a replaced wav
    line = error_line(call(RETRIEVAL, "--run", run_dir))
    assert "computed from other logmels for split 'evaluation'" in line
    assert "rerun postprocessing/01_xmodal_scores.py" in line
    assert call(SCORES, "--run", run_dir).returncode == 0  # no --overwrite needed: same model
    assert call(RETRIEVAL, "--run", run_dir).returncode == 0


def test_another_checkpoint_is_refused_until_overwrite(scripts, tmp_path):
    conf, run_dir, call = scripts
    assert call(SCORES, "--run", run_dir).returncode == 0
    _, other = make_run(tmp_path, name="other", features=False, seed=1)
    shutil.copy(run_dir / "scores.db", other / "scores.db")
    line = error_line(call(SCORES, "--run", other))
    assert "computed from another checkpoint" in line and "pass --overwrite" in line
    assert call(SCORES, "--run", other, "--overwrite").returncode == 0
    assert call(RETRIEVAL, "--run", other).returncode == 0


def test_interrupted_overwrite_keeps_the_old_scores_db(scripts, monkeypatch):
    conf, run_dir, call = scripts
    assert call(SCORES, "--run", run_dir).returncode == 0
    db = run_dir / "scores.db"
    before = db.read_bytes()
    scored, calls = evaluation.scored_split, []

    def killed_on_the_second_split(emb):
        calls.append(emb.split)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return scored(emb)
    monkeypatch.setattr(evaluation, "scored_split", killed_on_the_second_split)
    proc = call(SCORES, "--run", run_dir, "--overwrite")
    assert proc.returncode == 130
    assert db.read_bytes() == before  # the old db, complete, untouched
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(evaluation, "scored_split", scored)
    assert call(SCORES, "--run", run_dir, "--overwrite").returncode == 0
    assert db_splits(db) == ["validation", "evaluation"]


# --------------------------------------------------------------------------- output locations

def test_output_dir_under_a_regular_file_is_one_line(tiny, monkeypatch, capsys):
    (tiny / "blocker").write_text("a file")
    for where in ("blocker", "blocker/outputs"):
        conf = tiny_config(tiny, {"paths": {"output_dir": str(tiny / where)}})
        line = error_line(main_in_process(monkeypatch, capsys, "--conf", conf))
        assert str(tiny / "blocker") in line and "not a folder" in line
    assert (tiny / "blocker").read_text() == "a file"


def test_full_disk_when_a_run_starts_leaves_nothing_and_says_so(tiny, monkeypatch, capsys):
    conf = tiny_config(tiny)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", no_space)
    line = error_line(main_in_process(monkeypatch, capsys, "--conf", conf, "--name", "full"))
    assert "no space left" in line and str(tiny / "outputs" / "full" / "config.yaml") in line
    assert not (tiny / "outputs" / "full").exists()


def test_full_disk_while_writing_metrics_names_the_file(scripts, monkeypatch):
    conf, run_dir, call = scripts
    assert call(SCORES, "--run", run_dir).returncode == 0

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", no_space)
    line = error_line(call(RETRIEVAL, "--run", run_dir))
    assert "no space left" in line and str(run_dir) in line and ".tmp" not in line


def test_full_disk_while_writing_scores_db_names_it(scripts, monkeypatch):
    conf, run_dir, call = scripts
    tune = scores_db._tune_for_writing

    def full(conn):
        tune(conn)
        conn.execute("PRAGMA max_page_count=4")
    monkeypatch.setattr(scores_db, "_tune_for_writing", full)
    line = error_line(call(SCORES, "--run", run_dir))
    assert "no space left" in line and str(run_dir / "scores.db") in line


def test_missing_output_location_is_created(scripts, tmp_path):
    """A missing folder is not an error: it is made (what 'missing' means for an output)."""
    conf, run_dir, call = scripts
    assert call(SCORES, "--run", run_dir).returncode == 0
    np.testing.assert_equal(db_splits(run_dir / "scores.db"), ["validation", "evaluation"])


def test_read_only_output_location_is_one_line(tiny, monkeypatch, capsys):
    """EROFS when the run folder is made (chmod cannot simulate it for root: os.mkdir is)."""
    conf = tiny_config(tiny)
    real_mkdir = os.mkdir
    outputs = str(tiny / "outputs")

    def read_only(path, *args, **kwargs):
        if str(path).startswith(outputs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", read_only)
    line = error_line(main_in_process(monkeypatch, capsys, "--conf", conf))
    assert outputs in line and "not writable" in line


def test_read_only_scores_db_is_one_line(scripts, monkeypatch):
    """SQLite's own 'attempt to write a readonly database' becomes the OSError of a read-only
    file naming scores.db (query_only makes SQLite meet a read-only database, even as root)."""
    conf, run_dir, call = scripts
    assert call(SCORES, "--run", run_dir).returncode == 0
    connect = scores_db._connect

    def read_only(path):
        conn = connect(path)
        conn.execute("PRAGMA query_only=ON")
        return conn
    monkeypatch.setattr(scores_db, "_connect", read_only)
    line = error_line(call(RETRIEVAL, "--run", run_dir))  # 02 stores the t2a ranks in the db
    assert str(run_dir / "scores.db") in line
    assert "not writable" in line or "permission denied" in line


@pytest.mark.parametrize("name", ["a/b", "../escape", "/tmp/abs", "..", ".", ""])
def test_a_run_name_is_one_folder_name(tiny, monkeypatch, capsys, name):
    conf = tiny_config(tiny)
    line = error_line(main_in_process(monkeypatch, capsys, "--conf", conf, "--name", name))
    assert "a run name is one folder name" in line
    assert not (tiny / "outputs").exists() or list((tiny / "outputs").iterdir()) == []


def test_a_checkpoint_that_is_not_ours_or_does_not_fit_names_the_cause(scripts):
    conf, run_dir, call = scripts
    best = checkpoint_path(run_dir, "best")
    good = best.read_bytes()
    channels = "audio_encoder.channels=[8,8,8,16,16,16]"
    line = error_line(call(SCORES, "--run", run_dir, "--set", channels))
    assert f"{best}: does not fit the model of {run_dir / 'config.yaml'} with --set {channels}" in line
    assert "has shape [" in line and ", expected [" in line  # which tensor, not torch's header only
    import torch

    torch.save({"model": 5}, best)  # a dict, but no state dict in it
    line = error_line(call(SCORES, "--run", run_dir))
    assert f"{best}: not a checkpoint of this project (no 'model' state dict)" in line
    best.write_bytes(good)
    assert call(SCORES, "--run", run_dir).returncode == 0


def test_run_file_names_the_new_run_for_the_job_script(tiny, monkeypatch, capsys):
    """run.sh (or any job script) learns which run its stage 5 made: with two jobs training into
    one output_dir, 'the newest run' that stages 6-7 took was the other job's."""
    conf = tiny_config(tiny, {"training": {"epochs": 1}})
    run_file = tiny / "run.txt"
    proc = main_in_process(monkeypatch, capsys, "--conf", conf, "--run-file", run_file)
    assert proc.returncode == 0, proc.stderr
    (made,) = [p for p in (tiny / "outputs").iterdir() if p.is_dir()]
    assert run_file.read_text() == f"{made.resolve()}\n"
