"""Assertions shared by the tests that run scripts."""
import subprocess


def error_line(proc: subprocess.CompletedProcess) -> str:
    """A user error: exit 2, exactly one `error:` line on stderr, no traceback; returns the line."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]
