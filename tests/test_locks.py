"""utils.locks.exclusive: one holder at a time, a named refusal, no stale lock after kill -9."""
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from utils.errors import UserError
from utils.locks import exclusive, read_holder

HOLDER = textwrap.dedent("""
    import sys, time
    from utils.locks import exclusive
    with exclusive(sys.argv[1], "thing"):
        print("held", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def holder(tmp_path, repo):
    """A separate process holding the lock on tmp_path/x.lock until killed."""
    lock = tmp_path / "x.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), "--some-arg"], cwd=repo,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc, lock
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_second_process_is_refused_with_the_holder_named(holder):
    proc, lock = holder
    with pytest.raises(UserError) as e:
        with exclusive(lock, "run outputs/x"):
            pytest.fail("the lock was granted twice")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("run outputs/x is in use by pid %d on host %s" % (proc.pid, socket.gethostname()))
    assert "--some-arg" in msg  # the holder's command line
    assert f"kill {proc.pid}" in msg
    assert str(lock) in msg


def test_the_advice_works_kill_releases_the_lock(holder):
    """kill -9 of the holder: the kernel drops the flock; the file left behind is no obstacle."""
    proc, lock = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock.exists()
    with exclusive(lock, "thing"):
        record = read_holder(lock)
        assert record["pid"] == os.getpid()
        assert record["host"] == socket.gethostname()
        assert "since" in record and "command" in record


def test_released_and_removed_after_the_block_and_after_an_exception(tmp_path):
    lock = tmp_path / "sub" / "y.lock"  # parent folders are created
    with pytest.raises(RuntimeError):
        with exclusive(lock, "thing"):
            assert lock.exists()
            raise RuntimeError("boom")
    assert not lock.exists()  # nothing left in the folder it guards
    with exclusive(lock, "thing"):
        pass
    assert not lock.exists()


def test_a_lock_file_removed_under_a_late_opener_is_not_trusted(tmp_path, monkeypatch):
    """A process that opened the file just before its holder removed it must not lock that
    dead file while a third process locks the new one: it notices and locks the live file."""
    import utils.locks as locks

    lock = tmp_path / "z.lock"
    real_flock, swapped = locks.fcntl.flock, []

    def flock_after_a_swap(fd, op):
        if not swapped:  # between our open() and flock(): the holder finishes, another starts
            swapped.append(1)
            os.unlink(lock)
            lock.write_text("")
        return real_flock(fd, op)
    monkeypatch.setattr(locks.fcntl, "flock", flock_after_a_swap)
    with exclusive(lock, "thing"):
        assert read_holder(lock)["pid"] == os.getpid()  # the record is in the live file


def test_same_process_second_descriptor_is_refused(tmp_path):
    lock = tmp_path / "z.lock"
    with exclusive(lock, "step 02 on data"):
        with pytest.raises(UserError, match=r"^step 02 on data is in use by pid %d " % os.getpid()):
            with exclusive(lock, "step 02 on data"):
                pass


def test_lock_file_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with exclusive(tmp_path / "m.lock", "thing"):
            assert (tmp_path / "m.lock").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


FORKING_HOLDER = textwrap.dedent("""
    import multiprocessing, os, signal, sys, time
    from utils.locks import exclusive

    def worker(lock):  # a DataLoader worker: forked while the lock is held, outlives a kill -9
        with exclusive(lock, "a child's own lock"):  # it may lock files of its own
            pass
        time.sleep(60)

    with exclusive(sys.argv[1], "thing"):
        child = multiprocessing.get_context("fork").Process(target=worker, args=(sys.argv[2],))
        child.start()
        print(child.pid, flush=True)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_forked_workers_do_not_keep_a_killed_holders_lock(tmp_path, repo):
    """After kill -9 of the holder, its orphaned worker processes (inherited descriptors) do
    not hold the lock: the next process gets it at once, not once they notice and exit."""
    lock = tmp_path / "x.lock"
    proc = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(lock), str(tmp_path / "own.lock")],
                            cwd=repo, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        assert proc.wait(timeout=30) == -signal.SIGKILL
        os.kill(child, 0)  # the orphaned worker is still alive
        with exclusive(lock, "thing"):
            assert read_holder(lock)["pid"] == os.getpid()
        assert not (tmp_path / "own.lock").exists()  # the child's own lock worked as usual
    finally:
        os.kill(child, signal.SIGKILL)
