"""What the tests that run scripts share: running one in-process, and the one-line error check."""
from __future__ import annotations

import contextlib
import io
import os
import runpy
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_in_process(monkeypatch, script: str, *args, cwd: Path | None = REPO) -> subprocess.CompletedProcess:
    """A script's __main__ in this process, as a user runs it (through utils.cli.run), without an
    interpreter's start-up: its exit status and what it printed. `cwd`: the working directory to
    run it from (None: stay where the test is)."""
    argv = [script, *map(str, args)]
    monkeypatch.setattr(sys, "argv", argv)
    if cwd is not None:
        monkeypatch.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        except SystemExit as e:
            code = 0 if e.code is None else e.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_python(code: str) -> subprocess.CompletedProcess:
    """`python -c code` from the repository root, in a process of its own: its exit and output."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """A user error: exit 2, exactly one `error:` line on stderr, no traceback; returns the line."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def signal_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, sig: int,
                                  group: bool = False) -> str:
    """Send `sig` to a main.py process once `run_dir` has its first checkpoint (`group`: to its
    whole process group, workers included, as a terminal or a cluster does; the process must
    have been started with start_new_session=True); its stderr."""
    last = run_dir / "checkpoints" / "last.pt"
    started = time.time()
    try:
        while not last.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.time() - started < 120, "no checkpoint after 120 s"
            time.sleep(0.05)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        return proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()


class _Referent:
    pass


def drop_a_signal(sig: int = signal.SIGINT) -> None:
    """What a CI run hit: the signal lands while Python runs a weakref callback (a
    WeakValueDictionary's), where the exception it raises is dropped ("Exception ignored in")."""
    referent = _Referent()
    ref = weakref.ref(referent, lambda r: signal.raise_signal(sig))
    del referent  # the callback runs here
    assert ref() is None
