"""What the tests that run scripts share: running one in-process, and the one-line error check."""
from __future__ import annotations

import contextlib
import io
import runpy
import subprocess
import sys
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


def error_line(proc: subprocess.CompletedProcess) -> str:
    """A user error: exit 2, exactly one `error:` line on stderr, no traceback; returns the line."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]
