"""One process at a time on a run or a dataset step: an exclusive lock file.

`with exclusive(path, what):` holds `fcntl.flock(LOCK_EX)` on `path` for the block and removes
the file at the end. The kernel drops the lock when the holder's process ends in any way (kill -9
included), so a lock is never stale: after a kill the file stays behind, but nobody holds it and
the next process takes it. While held, the file names its holder (pid, host, command line, start
time) so that a second process can say who is in the way:

    error: run outputs/x is in use by pid 4242 on host gpu1 since 2026-01-05 10:15:02
    (python main.py --resume outputs/x); wait for it to finish or stop it (kill 4242), then rerun

flock works between processes of one machine and on most network file systems that support it;
where a file system refuses locks (ENOLCK, EOPNOTSUPP) the block runs unlocked rather than not
at all, with a warning.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from utils.errors import UserError
from utils.io_utils import ensure_dir

# a holder writes its record right after taking the lock; a reader that finds the file still
# empty retries for this long before reporting an unknown holder
_READ_RETRY_S = 1.0

# Descriptors of the locks this process holds. A forked child (a DataLoader worker, a step-02
# worker) inherits them, and an flock lasts until every copy is closed: after a kill -9 of the
# holder its orphaned workers would keep the run locked until they noticed (seconds, or never
# for a stuck one), and the refusal would name a dead pid. Children close their copies at once.
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)  # the parent's descriptor still holds the lock
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def holder_record() -> dict:
    """Who this process is, as written into a lock file it holds."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def read_holder(path: str | Path) -> dict | None:
    """The record in lock file `path` (None if empty or unreadable)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        record = json.loads(text)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_holder(record: dict | None) -> str:
    if not record:
        return "another process"
    since = str(record.get("since", "?")).replace("T", " ")[:19]
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} since {since} "
            f"({record.get('command', '?')})")


def _busy_error(path: Path, what: str) -> UserError:
    record = None
    deadline = time.monotonic() + _READ_RETRY_S
    while record is None and time.monotonic() < deadline:
        record = read_holder(path)
        if record is None:
            time.sleep(0.05)
    pid = record.get("pid") if record else None
    here = record is not None and record.get("host") == socket.gethostname()
    stop = f"stop it (kill {pid})" if pid and here else "stop it"
    return UserError(f"{what} is in use by {describe_holder(record)}; wait for it to finish or "
                     f"{stop}, then rerun (lock file {path})")


def _open_locked(path: Path, what: str) -> int | None:
    """A descriptor of `path` holding its flock (None where the file system has no locks).

    The holder deletes the file when it is done, so a file we opened may be deleted between our
    open() and our flock(): we would then hold a lock on a name nobody else sees. Locking, then
    checking that `path` is still the very file locked, rules that out (else: try again).
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy_error(path, what) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            print(f"warning: {path}: the file system does not support locks; nothing stops a "
                  f"second process on {what}", file=sys.stderr)
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed it meanwhile: lock the new file


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on `path` (created if missing, removed when released) for the block.

    `what` names the locked thing in the refusal ("run outputs/x", "step 02 on data/clotho").
    A second process, here or through another file descriptor, gets a one-line UserError.
    """
    path = Path(path)
    ensure_dir(path.parent)
    fd = _open_locked(path, what)
    if fd is not None:
        _HELD.add(fd)
    try:
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder_record()) + "\n").encode(), 0)
        yield path
    finally:
        if fd is not None and fd in _HELD:  # not in a forked child, which closed its copy
            _HELD.discard(fd)
            # removed while still held, so nobody can take the lock on a file about to go
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)  # closing the last descriptor releases the flock
