"""utils.cli: `--set` parsing, `--print-config` on every script, file-system errors as one line,
and Ctrl-C advice that works when followed."""
from __future__ import annotations

import errno
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import (drop_a_signal, error_line, run_in_process, run_python,
                               signal_after_first_checkpoint)
from tests.test_training import script_env
from tests.tiny_data import REPO, make_tiny_features, tiny_config
from utils import cli, errors, io_utils
from utils.config import load_config, save_config
from utils.errors import USER_ERRNOS, UserError, os_error_message, raise_if_stopped
from utils.tracking import read_jsonl


def _query_parser() -> cli.Parser:
    parser = cli.make_parser("test")
    parser.add_argument("query")
    parser.add_argument("--top-k", type=int, default=10)
    return parser


# --------------------------------------------------------------------------- --set

@pytest.mark.parametrize("argv,overrides,query", [
    (["--set", "eval.top_k=5", "a dog barks"], ["eval.top_k=5"], "a dog barks"),         # #10.7
    (["--set", "a=1", "b=2", "rain"], ["a=1", "b=2"], "rain"),                            # README form
    (["--set", "a=1", "--set", "b=2", "rain"], ["a=1", "b=2"], "rain"),                   # accumulates
    (["rain", "--set", "a=1", "b=2"], ["a=1", "b=2"], "rain"),
    (["--set=a=1", "rain"], ["a=1"], "rain"),
    (["--set", "a=1", "x = y"], ["a=1"], "x = y"),                                        # not key=value
    (["--set", "a=1", "--top-k", "3", "rain"], ["a=1"], "rain"),
    (["--set", "download.panns_files.Cnn14_mAP=0.431.pth=abc", "rain"],
     ["download.panns_files.Cnn14_mAP=0.431.pth=abc"], "rain"),
    (["--set", "a=1", "--", "--not-an-option"], ["a=1"], "--not-an-option"),
])
def test_set_takes_only_key_value_tokens(argv, overrides, query):
    args = _query_parser().parse_args(argv)
    assert args.overrides == overrides and args.query == query


def test_query_after_set_through_parse(tmp_path):
    conf = tiny_config(tmp_path)
    args, cfg = cli.parse(_query_parser(), ["--conf", str(conf), "--set", "eval.top_k=5", "training.lr=1e-3",
                                            "a dog barks"])
    assert args.query == "a dog barks" and cfg["eval"]["top_k"] == 5 and cfg["training"]["lr"] == 0.001


def test_set_without_assignment_is_a_config_error(tmp_path):
    with pytest.raises(UserError, match="'oops' is not of the form dotted.key=value"):
        cli.parse(cli.make_parser("test"), ["--conf", str(tiny_config(tmp_path)), "--set", "oops"])


# --------------------------------------------------------------------------- --print-config

SCRIPTS = ["preprocessing/00_download_clotho.py", "preprocessing/00_make_demo_dataset.py",
           "preprocessing/01_clotho_dataset.py", "preprocessing/02_audio_logmel.py",
           "preprocessing/03_sbert_embeddings.py", "preprocessing/04_cnn14_transfer.py", "main.py",
           "benchmarks/reference_scores.py"]
RUN_SCRIPTS = ["postprocessing/01_xmodal_scores.py", "postprocessing/02_xmodal_retrieval.py",
               "postprocessing/03_dcase_submission.py", "postprocessing/query.py"]
OVERRIDES = ["--set", "training.epochs=3", "training.amp=off", "eval.top_k=3"]


def _run_script(monkeypatch, capsys, script: str, *args) -> subprocess.CompletedProcess:
    """A script's __main__ in this process (as a user runs it, through utils.cli.run)."""
    return run_in_process(monkeypatch, script, *args, cwd=None)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory in which nothing exists but a config (and, for run scripts, a run)."""
    conf = tiny_config(tmp_path)  # paths: tmp_path/data, .../pretrained, .../outputs (absent)
    monkeypatch.chdir(tmp_path)
    return tmp_path, conf


@pytest.mark.parametrize("script", SCRIPTS)
def test_print_config_prints_the_resolved_config_and_does_nothing(workdir, monkeypatch, capsys, script):
    tmp_path, conf = workdir
    before = _tree(tmp_path)
    proc = _run_script(monkeypatch, capsys, script, "--conf", conf, "--print-config", *OVERRIDES)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == load_config(conf, OVERRIDES[1:])
    assert _tree(tmp_path) == before  # nothing created or touched


@pytest.mark.parametrize("script", RUN_SCRIPTS + ["main.py --resume"])
def test_print_config_of_a_script_on_a_run_prints_the_run_config(workdir, monkeypatch, capsys, script):
    tmp_path, conf = workdir
    run = tmp_path / "outputs" / "r1"
    run.mkdir(parents=True)
    save_config(load_config(conf, ["seed=11", "experiment=trained"]), run)  # differs from --conf
    before = _tree(tmp_path)
    script, *extra = script.split()
    extra = ["--resume", run] if extra else ["--run", run]
    proc = _run_script(monkeypatch, capsys, script, "--conf", conf, *extra, "--print-config", *OVERRIDES)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed == load_config(run / "config.yaml", OVERRIDES[1:])
    assert printed["seed"] == 11 and printed["training"]["epochs"] == 3 and printed["training"]["amp"] == "off"
    assert _tree(tmp_path) == before


def test_print_config_checks_the_values_first(workdir, monkeypatch, capsys):
    tmp_path, conf = workdir
    proc = _run_script(monkeypatch, capsys, "main.py", "--conf", conf, "--print-config", "--set", "training.epochs=0")
    assert "config key 'training.epochs' must be > 0, got 0" in error_line(proc)


def test_bad_value_stops_main_before_the_run_folder_exists(tmp_path, monkeypatch, capsys):
    """#10.3: out-of-range values fail before any work, not deep in torch after the folder."""
    make_tiny_features(tmp_path / "data")
    conf = tiny_config(tmp_path)
    for override in ("criterion.temperature=0", "text_encoder.out_dim=0", "training.epochs=null",
                     "audio_encoder.channels=[8, 16]"):
        proc = _run_script(monkeypatch, capsys, "main.py", "--conf", conf, "--set", override)
        assert override.split("=")[0] in error_line(proc)
        assert not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------- OSError -> one line

@pytest.mark.parametrize("code,needle", [
    (errno.ENOSPC, "no space left on device writing `/x/f.h5`"),
    (errno.EDQUOT, "disk quota exceeded writing `/x/f.h5`"),
    (errno.EROFS, "`/x/f.h5` is not writable (read-only file system)"),
    (errno.EACCES, "`/x/f.h5`: permission denied"),
    (errno.EPERM, "`/x/f.h5`: operation not permitted"),
    (errno.ENOTDIR, "`/x/f.h5`: a path component is a regular file, not a folder"),
    (errno.EISDIR, "`/x/f.h5` is a folder where a file is expected"),
    (errno.ENAMETOOLONG, "`/x/f.h5`: file name too long"),
    (errno.EFBIG, "`/x/f.h5` grew past a file-size limit (the process's `ulimit -f`"),
])
def test_each_errno_gets_its_line(code, needle):
    assert needle in os_error_message(OSError(code, os.strerror(code), "/x/f.h5"))
    # h5py: errno and name only in the text
    h5 = OSError(f"Unable to synchronously create file (unable to open file: name = '/x/f.h5', "
                 f"errno = {code}, error message = '{os.strerror(code)}')")
    assert needle in os_error_message(h5)


PRINTS_A_LOT = """
import utils.cli
def main():
    for _ in range(100_000):
        print("a line of results, as query.py --json prints them")
utils.cli.run(main)
"""


def test_output_piped_into_head_ends_quietly():
    """`query.py --json | head`: the reader closes the pipe; no BrokenPipeError traceback."""
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(PRINTS_A_LOT)} | head -1",
                          shell=True, cwd=REPO, capture_output=True, text=True, timeout=60,
                          executable="/bin/bash")
    assert proc.stdout == "a line of results, as query.py --json prints them\n"
    assert proc.stderr == ""


def test_a_write_error_without_a_path_still_says_what_happened():
    assert os_error_message(OSError(errno.ENOSPC, "No space left on device")).startswith(
        "no space left on device writing a file —")


def test_other_os_errors_are_bugs_and_keep_their_traceback(capsys):
    assert os_error_message(OSError(errno.EBADF, "Bad file descriptor")) is None
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: os.close(10**6))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback (most recent call last)" in err
    assert "OSError: [Errno 9] Bad file descriptor" in err and "error:" not in err
    # with how to resume, where the script said so (main.py, once training has started)
    def training():
        cli.set_interrupt_advice("resume with: python main.py --resume outputs/r")
        raise ValueError("a bug")
    with pytest.raises(SystemExit):
        cli.run(training)
    err = capsys.readouterr().err
    assert "ValueError: a bug" in err
    # in-process (a notebook, the tests): the host's own worker processes are left alone
    import multiprocessing
    host = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    host.start()
    try:
        with pytest.raises(SystemExit):
            cli.run(lambda: 1 / 0)
        assert host.is_alive()
    finally:
        host.kill()
        host.join()
    capsys.readouterr()
    assert err.strip().splitlines()[-1] == ("error: stopped by the unexpected error above; "
                                           "resume with: python main.py --resume outputs/r")


def _one_line_from_run(capsys, main) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    _, err = capsys.readouterr()
    return error_line(subprocess.CompletedProcess([], e.value.code, "", err))


def test_path_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "run" / "config.yaml"
    line = _one_line_from_run(capsys, lambda: save_config({"a": 1}, target.parent))
    assert f"`{tmp_path / 'file' / 'run'}`: a path component is a regular file, not a folder" in line


def test_permission_denied(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root: chmod does not stop writes, so simulate the kernel
            real_open = os.open

            def refusing_open(path, *args, **kwargs):
                if str(path).startswith(str(locked)):
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return real_open(path, *args, **kwargs)
            monkeypatch.setattr(os, "open", refusing_open)
        line = _one_line_from_run(capsys, lambda: save_config({"a": 1}, locked))
    finally:
        locked.chmod(0o700)
    assert f"`{locked / 'config.yaml'}`: permission denied" in line


@pytest.mark.parametrize("code,needle", [(errno.ENOSPC, "no space left on device writing `{}`"),
                                         (errno.EROFS, "`{}` is not writable (read-only file system)")])
def test_full_or_read_only_disk_during_a_write(tmp_path, capsys, monkeypatch, code, needle):
    """ENOSPC/EROFS cannot be made for real in a test: a write fails as the kernel would fail it."""
    real_open = open

    class FailingFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(code, os.strerror(code))  # a write() error names no file

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(io_utils, "open", lambda *a, **k: FailingFile(real_open(*a, **k)), raising=False)
    line = _one_line_from_run(capsys, lambda: save_config({"a": 1}, tmp_path))
    assert needle.format(tmp_path / "config.yaml") in line
    assert list(tmp_path.iterdir()) == []  # no half-written file, no temporary left


def test_a_script_meets_a_file_where_its_folder_should_be(tmp_path, monkeypatch, capsys):
    """End to end: a numbered script, a real ENOTDIR, one line and exit 2 via utils.cli.run."""
    (tmp_path / "file").write_text("x")
    monkeypatch.chdir(tmp_path)
    proc = _run_script(monkeypatch, capsys, "preprocessing/00_make_demo_dataset.py", "--conf",
                       REPO / "conf_demo.yaml", "--set", f"paths.dataset_dir={tmp_path / 'file' / 'demo'}")
    assert f"`{tmp_path / 'file' / 'demo'}`: a path component is a regular file" in error_line(proc)


@pytest.mark.parametrize("script", ["preprocessing/00_make_demo_dataset.py",
                                    "preprocessing/00_download_clotho.py"])
def test_a_dataset_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys, script):
    (tmp_path / "README.md").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    proc = _run_script(monkeypatch, capsys, script, "--conf", REPO / "conf_demo.yaml", "--set",
                       f"paths.dataset_dir={tmp_path / 'README.md'}", "download.timeout_s=1",
                       "download.clotho_url=http://127.0.0.1:9/", "download.panns_url=http://127.0.0.1:9/")
    line = error_line(proc)
    assert f"`{tmp_path / 'README.md'}`: a path component is a regular file, not a folder" in line
    assert (tmp_path / "README.md").read_text() == "not a folder"


@pytest.mark.parametrize("exception", [UserError("boom"), KeyboardInterrupt()])
def test_an_open_progress_bar_does_not_swallow_the_message(capsys, exception):
    from tqdm import tqdm

    def main():
        for i in tqdm(range(10), desc="epoch 2"):  # left open: the exception leaves the loop
            if i == 3:
                raise exception
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.run(main)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] in ("error: boom", f"interrupted: {cli.DEFAULT_INTERRUPT_ADVICE}"), lines


def test_user_errnos_are_the_documented_ones():
    assert {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENOTDIR, errno.EDQUOT} <= USER_ERRNOS
    assert errno.ENOENT not in USER_ERRNOS and errno.EBADF not in USER_ERRNOS


# --------------------------------------------------------------------------- Ctrl-C

def _interrupted(capsys, main) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    return e.value.code, capsys.readouterr().err


def _raise_interrupt():
    raise KeyboardInterrupt


def test_default_interrupt_advice(capsys):
    code, err = _interrupted(capsys, _raise_interrupt)
    assert code == 130 and "interrupted: work already finished is kept; rerun the same command" in err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_python_dropped_stops_the_script_at_its_next_step(capsys, sig, code):
    steps = []

    def main():
        drop_a_signal(sig)
        steps.append(1)
        raise_if_stopped()  # what a loop runs between steps
        steps.append(2)

    got, err = _interrupted(capsys, main)
    assert (got, steps) == (code, [1])
    assert "Exception ignored" not in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith("interrupted:" if code == 130 else "terminated (SIGTERM):")
    # the next script run in this process starts clean
    cli.run(raise_if_stopped)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.fixture
def dropped_ctrl_c():
    """A Ctrl-C recorded by utils.cli's handler, as if Python had dropped its exception."""
    with pytest.raises(KeyboardInterrupt):
        errors.stop(KeyboardInterrupt)
    yield
    errors.forget_stop()


def test_the_query_loops_stop_at_a_dropped_ctrl_c(dropped_ctrl_c):
    """query.py and Retriever: reading a folder's wavs, encoding their log-mels."""
    from types import SimpleNamespace

    import numpy as np

    from utils import evaluation

    with pytest.raises(KeyboardInterrupt):
        evaluation.file_logmels([Path("a.wav"), Path("b.wav")], {}, progress=False)
    model = SimpleNamespace(eval=lambda: None, embed_dim=4, audio_branch=None)
    with pytest.raises(KeyboardInterrupt):
        evaluation.encode_logmels(model, [np.zeros((10, 64), np.float32)] * 2, 2, "cpu", progress=False)


def test_what_a_stop_left_half_made_goes_quietly_before_the_exit():
    """A SIGTERM while a DataLoader iterator started its workers left it half-made; kept by the
    exit's context until interpreter shutdown, its __del__ printed "Exception ignored ...
    no attribute '_shutdown'" after the stop's line (1 of ~30 stops)."""
    code = ("from utils import cli, errors\n"
            "class HalfMade:\n"
            "    def __del__(self):\n"
            "        raise AttributeError(\"'HalfMade' object has no attribute '_shutdown'\")\n"
            "def main():\n"
            "    half = HalfMade()\n"
            "    errors.stop(errors.Terminated)\n"
            "cli.run(main)\n")
    proc = run_python(code)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"terminated (SIGTERM): {cli.DEFAULT_INTERRUPT_ADVICE}"]


def _training(exception: BaseException):
    """main.py's shape: the run folder is known, then training is cut short."""
    def main():
        cli.advise_resume(Path("outputs/my run"))
        raise exception
    return main


def test_resume_advice_names_the_command(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["main.py", "--conf", "my conf.yaml"])
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    code, err = _interrupted(capsys, _training(KeyboardInterrupt()))
    assert code == 130 and "resume with: python main.py --resume 'outputs/my run'" in err
    line = _one_line_from_run(capsys, _training(OSError(errno.ENOSPC, "No space left", "outputs/my run/x")))
    assert line.endswith("resume with: python main.py --resume 'outputs/my run'")
    # the next script run in this process starts from the default advice again
    assert "rerun the same command" in _interrupted(capsys, _raise_interrupt)[1]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert cli.script_command("--resume", "r") == "torchrun --nproc_per_node=4 main.py --resume r"
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert "main.py --resume r" in cli.script_command("--resume", "r")


def test_ctrl_c_during_training_prints_a_resume_command_that_works(tmp_path):
    """#12.4: Ctrl-C after epoch 1; the printed command finishes the run exactly once per epoch."""
    # 60 steps an epoch: epoch 1's checkpoint is written in the background, and may appear only
    # as epoch 2 ends; epoch 3 must then still be long enough for the Ctrl-C to land in it
    make_tiny_features(tmp_path / "data", n_clips=(96, 6, 6))
    conf = tiny_config(tmp_path, {"training": {"epochs": 2, "max_frames": 80}})
    run = tmp_path / "outputs" / "ctrlc"
    proc = subprocess.Popen([sys.executable, "main.py", "--conf", str(conf), "--name", "ctrlc",
                             "--set", "training.epochs=3"],  # an override the resume must keep
                            cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err = signal_after_first_checkpoint(proc, run, signal.SIGINT)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    advice = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert len(advice) == 1, err
    command = re.search(r"resume with: (.*)$", advice[0]).group(1)
    assert command == f"python main.py --resume {shlex.quote(str(run))}"
    argv = shlex.split(command)
    resumed = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=script_env(),
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout and "trained 3/3 epochs" in resumed.stdout
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]


def test_an_eval_key_of_conf_that_the_run_does_not_use_is_noted(workdir, capsys):
    """Postprocessing uses the run's config.yaml; an edited eval.splits in --conf (as conf.yaml's
    comment invites) would otherwise be ignored unseen."""
    tmp_path, conf = workdir
    run = tmp_path / "outputs" / "r1"
    run.mkdir(parents=True)
    save_config(load_config(conf, ["eval.top_k=3"]), run)
    parser = cli.make_parser("x")
    cli.add_run_argument(parser)
    _, _, _, conf_cfg = cli.parse_run(parser, ["--conf", str(conf), "--run", "r1"])
    assert conf_cfg["eval"]["top_k"] == 10
    err = capsys.readouterr().err
    assert f"note: eval.top_k is 10 from {conf} but 3 in the run's config.yaml, which is used; " \
           "--set eval.top_k=10 uses yours" in err
    assert err.count("note:") == 1
    cli.parse_run(parser, ["--conf", str(conf), "--run", "r1", "--set", "eval.top_k=3"])
    assert "note:" not in capsys.readouterr().err


def test_the_set_that_an_eval_note_advises_works_pasted_into_a_shell(workdir, capsys):
    """A list's value holds a space (`[validation, evaluation]`): unquoted, the shell would
    split the advised --set in two (02: "unrecognized arguments"; query.py: "not valid YAML")."""
    tmp_path, conf = workdir
    run = tmp_path / "outputs" / "r1"
    run.mkdir(parents=True)
    save_config(load_config(conf, ["eval.splits=[validation]", "eval.amp=bf16"]), run)
    parser = cli.make_parser("x")
    cli.add_run_argument(parser)
    cli.parse_run(parser, ["--conf", str(conf), "--run", "r1"])
    err = capsys.readouterr().err
    advised = re.findall(r"; (--set .*) uses yours$", err, re.M)
    assert len(advised) == 2 and "--set eval.amp=off" in advised  # a string as --set takes it
    words = [w for a in advised for w in shlex.split(a)]  # what the shell passes on
    _, _, _, conf_cfg = cli.parse_run(parser, ["--conf", str(conf), "--run", "r1", *words])
    assert load_config(run / "config.yaml", words[1::2])["eval"] == conf_cfg["eval"]
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("argv0,tty,expected", [
    ("main.py", False, 30.0),                              # a job's log file
    ("postprocessing/query.py", True, 0.1),                # a terminal: tqdm's own default
    ("/venv/lib/ipykernel_launcher.py", False, 0.1),       # a notebook importing utils
])
def test_progress_bars_redraw_rarely_into_a_log_file(argv0, tty, expected):
    """A redirected job log got every redraw of every bar (megabytes over a Clotho training)."""
    code = ("import io, sys\n"
            f"sys.argv = [{str(REPO / argv0)!r}]\n"  # an absolute argv0 stays itself
            f"if {tty}: sys.stderr.isatty = lambda: True\n"
            "import utils\n"
            "from tqdm import tqdm\n"
            "bar = tqdm(range(1), file=io.StringIO())\n"
            "print(bar.mininterval, bar.maxinterval)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    mininterval, maxinterval = map(float, out.stdout.split())
    assert mininterval == expected
    # tqdm's monitor redraws a bar idle for maxinterval with its stale count ("598/1400
    # [00:30<…]", then "598/1400 [00:50<…]": a stall that was not): never between two redraws
    assert maxinterval > mininterval


def test_every_script_imports_utils_before_what_imports_tqdm():
    """tqdm reads TQDM_MININTERVAL once, at its import, and `import torch` imports it
    (torch.hub): postprocessing 01 imported torch first, so its bar over every scored pair
    still redrew at every step into a job's log."""
    import ast

    allowed = set(sys.stdlib_module_names) | {"__future__", "numpy"}  # neither imports tqdm
    for script in [REPO / "main.py", *REPO.glob("preprocessing/*.py"), *REPO.glob("postprocessing/*.py")]:
        before = []
        for node in ast.parse(script.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                tops = {name.split(".")[0] for name in names}
                if tops & {"utils", "models"}:
                    break
                before += sorted(tops - allowed)
        assert before == [], f"{script.relative_to(REPO)} imports {before} before utils"


def test_resume_advice_stays_when_last_pt_cannot_be_looked_at(tmp_path, monkeypatch):
    """The advice reads last.pt's epoch when said; a stat that fails (EACCES, EIO: not those
    Path.is_file hides) fell back to 'rerun the same command', which starts a new run."""
    monkeypatch.setattr(cli, "_interrupt_advice", cli.DEFAULT_INTERRUPT_ADVICE)  # put back after
    cli.advise_resume(tmp_path)
    is_file = Path.is_file

    def failing(path):
        if path.name == "last.pt":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", failing)
    assert cli.interrupt_advice().startswith(f"finished epochs are kept in {tmp_path}; resume with: ")
