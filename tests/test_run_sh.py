"""run.sh: argument checks and what each stage is given, with a stub PYTHON that records calls."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.tiny_data import REPO

SCRIPTS = ["preprocessing/00_download_clotho.py", "preprocessing/01_clotho_dataset.py",
           "preprocessing/02_audio_logmel.py", "preprocessing/03_sbert_embeddings.py",
           "preprocessing/04_cnn14_transfer.py", "main.py", "postprocessing/01_xmodal_scores.py",
           "postprocessing/02_xmodal_retrieval.py"]
NEW_RUN = "/runs/demo-20260101-120000"  # what the stub's main.py reports through --run-file


@pytest.fixture
def run_sh(tmp_path):
    """Call ./run.sh with PYTHON = a stub that appends its arguments (one call per line, tab
    separated) to a log; returns (completed process, [argument lists])."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    # main.py's --run-file gets the folder of the run it made: NEW_RUN
    stub.write_text('#!/bin/sh\nprev=\nfor a in "$@"; do printf "%s\\t" "$a"; '
                    '[ "$prev" = --run-file ] && echo "$NEW_RUN" > "$a"; prev=$a; done >> "$LOG"\n'
                    'echo >> "$LOG"\n')
    stub.chmod(0o755)

    def call(*args, cwd=REPO, **env):
        log.write_text("")
        proc = subprocess.run(["bash", str(REPO / "run.sh"), *args], capture_output=True, text=True,
                              env=dict(os.environ, PYTHON=str(stub), LOG=str(log), NEW_RUN=NEW_RUN, **env),
                              timeout=30,
                              cwd=cwd)
        calls = [line.rstrip("\t").split("\t") for line in log.read_text().splitlines()]
        return proc, calls
    return call


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.sh: "), proc.stderr
    assert "unbound variable" not in proc.stderr and "syntax error" not in proc.stderr
    return lines[0]


def test_all_stages_in_order_with_conf_and_overrides(run_sh):
    proc, calls = run_sh("--conf", "conf_demo.yaml", "--set", "training.lr=1e-3", "wandb.mode=off")
    assert proc.returncode == 0, proc.stderr
    assert [c[0] for c in calls] == SCRIPTS
    common = ["--conf", "conf_demo.yaml", "--set", "training.lr=1e-3", "wandb.mode=off"]
    for c in calls[:5]:
        assert c[1:] == common
    # the new run's folder comes back through --run-file, and stages 6-7 evaluate that run, not
    # the newest one in output_dir (another job's, training beside this one)
    assert calls[5][1:-1] == [*common, "--run-file"]
    # stage 6 replaces the scores of the checkpoint that training has just replaced
    assert calls[6][1:] == [*common, "--run", NEW_RUN, "--overwrite"]
    assert calls[7][1:] == [*common, "--run", NEW_RUN]
    assert not os.path.exists(calls[5][-1])  # the file is removed when run.sh ends


def test_a_temp_folder_that_is_gone_does_not_stop_run_sh(run_sh, tmp_path):
    """TMPDIR set to a folder that does not exist (or is not writable): mktemp failed and
    run.sh stopped before its first stage."""
    proc, calls = run_sh("--stage", "5", TMPDIR=str(tmp_path / "gone"))
    assert proc.returncode == 0, proc.stderr
    assert calls[0][-1].startswith("/tmp/run.sh.run.")  # --run-file's file, in /tmp instead
    assert calls[1][calls[1].index("--run") + 1] == NEW_RUN  # stages 6-7 evaluate that run


def test_stage_5_with_run_resumes_that_run_and_evaluates_it(run_sh):
    proc, calls = run_sh("--stage", "5", "--run", "outputs/r1")
    assert proc.returncode == 0, proc.stderr
    assert calls == [["main.py", "--conf", "conf.yaml", "--resume", "outputs/r1"],
                     ["postprocessing/01_xmodal_scores.py", "--conf", "conf.yaml", "--run", "outputs/r1",
                      "--overwrite"],
                     ["postprocessing/02_xmodal_retrieval.py", "--conf", "conf.yaml", "--run", "outputs/r1"]]


def test_resume_and_name_are_passed_to_main(run_sh):
    proc, calls = run_sh("--stage", "5", "--stop-stage", "5", "--resume", "outputs/r1")
    assert proc.returncode == 0, proc.stderr
    assert calls == [["main.py", "--conf", "conf.yaml", "--resume", "outputs/r1"]]
    proc, calls = run_sh("--stage", "5", "--name", "my_run", "--set", "training.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == ["main.py", "--conf", "conf.yaml", "--set", "training.epochs=2", "--name", "my_run"]
    # evaluation: my_run by its name (paths.output_dir/my_run), not whichever run is newest
    assert [c[0] for c in calls[1:]] == SCRIPTS[6:]
    assert calls[1][-3:] == ["--run", "my_run", "--overwrite"] and calls[2][-2:] == ["--run", "my_run"]


def test_resume_alone_also_names_the_run_to_evaluate(run_sh):
    proc, calls = run_sh("--stage", "6", "--resume", "outputs/r1")
    assert proc.returncode == 0, proc.stderr
    assert [c[-2:] for c in calls] == [["--run", "outputs/r1"]] * 2


def test_run_without_stage_5_only_goes_to_evaluation(run_sh):
    proc, calls = run_sh("--stage", "6", "--stop-stage", "6", "--run", "outputs/r1")
    assert proc.returncode == 0, proc.stderr
    assert calls == [["postprocessing/01_xmodal_scores.py", "--conf", "conf.yaml", "--run", "outputs/r1"]]


@pytest.mark.parametrize("args, needle", [
    (["--stage", "abc"], "--stage 'abc' is not a stage number (0-7)"),
    (["--stage", "8"], "--stage '8' is not a stage number (0-7)"),
    (["--stop-stage", "1.5"], "--stop-stage '1.5' is not a stage number (0-7)"),
    (["--stage"], "--stage needs a value"),
    (["--stop-stage"], "--stop-stage needs a value"),
    (["--stage", "--stop-stage", "3"], "--stage needs a value"),
    (["--conf"], "--conf needs a value"),
    (["--run"], "--run needs a value"),
    (["--resume"], "--resume needs a value"),
    (["--name"], "--name needs a value"),
    (["--stage", "6", "--stop-stage", "5"], "--stage 6 is after --stop-stage 5"),
    (["--resume", "a", "--name", "b"], "give one of them"),
    (["--run", "a", "--resume", "b"], "name different runs"),
    (["--stage", "5", "--run", "a", "--name", "b"], "give one of them"),
    (["--stage", "6", "--name", "b"], "do not include 5"),
    (["--bogus"], "unknown argument '--bogus'"),
    (["--set"], "--set needs KEY=VALUE pairs"),
    (["--set", "--stage", "6"], "--set needs KEY=VALUE pairs"),
    (["stray"], "unknown argument 'stray'"),
])
def test_bad_arguments_are_one_line_and_run_nothing(run_sh, args, needle):
    proc, calls = run_sh(*args)
    assert needle in one_line_error(proc)
    assert calls == []


def test_help(run_sh):
    proc, calls = run_sh("--help")
    assert proc.returncode == 0 and "--resume DIR" in proc.stdout and calls == []
    assert "set -euo" not in proc.stdout and "cd " not in proc.stdout  # the comment block only
    assert not any(line.startswith("#") for line in proc.stdout.splitlines())


def test_paths_given_from_another_directory_are_read_from_there(run_sh, tmp_path):
    """run.sh works from the repository root; --conf/--run/--resume relative to where it was
    called still name the caller's files."""
    elsewhere = tmp_path / "work"
    (elsewhere / "runs" / "r1").mkdir(parents=True)
    (elsewhere / "my.yaml").write_text("base: conf.yaml\n")
    proc, calls = run_sh("--stage", "6", "--conf", "my.yaml", "--run", "runs/r1", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == ["postprocessing/01_xmodal_scores.py", "--conf", str(elsewhere / "my.yaml"),
                        "--run", str(elsewhere / "runs" / "r1")]
    # what is not there is passed on as given: the root's conf.yaml, a run's name
    proc, calls = run_sh("--stage", "7", "--run", "my_run", cwd=elsewhere)
    assert calls[0][1:] == ["--conf", "conf.yaml", "--run", "my_run"]


@pytest.mark.parametrize("venv", [True, False])
def test_without_python_set_it_takes_the_projects_venv(tmp_path, venv):
    """`./run.sh` works without activating .venv (a bare `python` may lack torch)."""
    (tmp_path / "run.sh").write_text((REPO / "run.sh").read_text())
    bin_dir = tmp_path / (".venv/bin" if venv else "path")
    bin_dir.mkdir(parents=True)
    stub = bin_dir / "python"
    stub.write_text(f'#!/bin/sh\necho "{stub}" >> "$LOG"\n')
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(LOG=str(log), PATH=f"{tmp_path / 'path'}{os.pathsep}{env['PATH']}")
    proc = subprocess.run(["bash", str(tmp_path / "run.sh"), "--stage", "1", "--stop-stage", "1"],
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [str(stub)]
