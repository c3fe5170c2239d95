"""Atomic writes and safe reads: an interrupted step never leaves a file that looks complete."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import pickle
import secrets
import shutil
import time
from pathlib import Path
from typing import IO, Iterator

from utils.errors import UserError


def ensure_dir(directory: str | Path) -> Path:
    """`mkdir -p directory`. A regular file in the way makes mkdir say EEXIST ("File exists"),
    which reads as if all were well; report it as what it is: ENOTDIR, naming that path."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                 e.filename or str(directory)) from None
    return directory


def _new_temp(path: Path) -> Path:
    """Create an empty, unique `.{name}.XXXXXXXX.tmp` beside `path`.

    Not tempfile.mkstemp: that creates mode 0600 whatever the umask, so every output would be
    private to its owner. os.open with 0o666 lets the kernel apply the umask, exactly as a plain
    open() of a new file does (0644 under umask 022, 0600 under 077, 0664 under 002).
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        except OSError as e:  # read-only, no permission, ...: name the file asked for
            e.filename = str(path)
            raise
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _name_target(e: OSError, path: Path, tmp: Path) -> None:
    """Report an OSError under the file the user asked for, not our temporary name: a write's
    ENOSPC carries no file name at all, a rename's names the temporary."""
    if e.filename is None or str(e.filename) == str(tmp):
        e.filename = str(path)
        e.filename2 = None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file ends with the mode a plain open() would give under the process umask. OSErrors
    (no space, read-only, not a directory, ...) propagate as they are, naming `path`.
    """
    path = Path(path)
    ensure_dir(path.parent)
    tmp = _new_temp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _name_target(e, path, tmp)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in `directory` survive a power cut: the new name lives in the directory's
    own data, which fsync of the file does not write. File systems that cannot fsync a directory
    (some network mounts: EINVAL, EBADF, EISDIR, ENOTSUP) keep the rename in their cache instead;
    that loses at most this newest name on a crash, never leaves half a file."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def atomic_link(src: str | Path, dst: str | Path) -> Path:
    """Give the finished file `src` a second name `dst`, atomically: a hard link, so the data is
    not written twice (a later atomic replace of `src` leaves `dst` as it was). Where the file
    system has no hard links (some network and FUSE mounts), `dst` gets a copy instead."""
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        tmp.unlink()  # link() wants a free name; the random one stays ours
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            shutil.copyfile(src, tmp)
    return dst


def remove_stale_temps(directory: str | Path, name: str = "", min_age_s: float = 0) -> list[Path]:
    """Delete the temporary files `atomic_path` left in `directory` (for target `name`, or all)
    when a process was killed mid-write. Call only when nothing else writes there, or give
    `min_age_s`: only temporaries untouched for that long go (a write under way keeps its file's
    modification time recent), for folders written without a lock, such as a run's caches."""
    directory = Path(directory)
    stale = sorted(directory.glob(f".{name}*.tmp")) if directory.is_dir() else []
    now = time.time()
    removed = []
    for path in stale:
        try:
            if min_age_s and now - path.stat().st_mtime < min_age_s:
                continue
            path.unlink()
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
        removed.append(path)
    return removed


ABANDONED_TEMP_S = 3600  # a cache write takes seconds; a temporary this old lost its writer


@contextlib.contextmanager
def atomic_cache_path(path: str | Path) -> Iterator[Path]:
    """atomic_path for a cache written without a lock (query.py, a notebook's Retriever): the
    temporaries that killed writers left for this file long ago are removed first, so they do
    not pile up beside it."""
    path = Path(path)
    remove_stale_temps(path.parent, path.name, min_age_s=ABANDONED_TEMP_S)
    with atomic_path(path) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def save_pickle(obj, path: str | Path) -> None:
    with atomic_open(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only builtin containers, strings, numbers and numpy arrays: no arbitrary code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "float32"), ("numpy", "float64"), ("numpy", "int64"), ("numpy", "int32"),
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
        ("builtins", "frozenset"), ("builtins", "str"), ("builtins", "int"), ("builtins", "float"),
        ("builtins", "bytes"), ("builtins", "bool"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def load_pickle(path: str | Path):
    """Read a pickle written by this project without executing anything else it might contain."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(io.BufferedReader(f)).load()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: not a valid pickle of plain data ({e})") from None


def file_digest(path: str | Path, algorithm: str = "md5", chunk: int = 1 << 22) -> str:
    """Hex digest of a file, read in chunks (archives and checkpoints are large)."""
    with open(path, "rb") as f:
        return stream_digest(f, algorithm, chunk)


_SHA1_OF_VERSION: dict[tuple[int, int, int, int], str] = {}  # (dev, inode, size, mtime_ns) -> sha1


def file_sha1(path: str | Path) -> str:
    """sha1 of a file, computed once per version of it in this process (checkpoints are ~1 GB,
    the Clotho caption embeddings 77 MB, and both are checked on every load). Every write here
    is an atomic rename, a new inode; the version is read off the open file, so a file replaced
    meanwhile is never cached under another version's digest."""
    with open(path, "rb") as f:
        version = _version(os.fstat(f.fileno()))
        if version in _SHA1_OF_VERSION:
            return _SHA1_OF_VERSION[version]
        digest = stream_digest(f, "sha1")
        if _version(os.fstat(f.fileno())) == version:  # not rewritten in place meanwhile
            if len(_SHA1_OF_VERSION) >= 16:
                _SHA1_OF_VERSION.pop(next(iter(_SHA1_OF_VERSION)))
            _SHA1_OF_VERSION[version] = digest
    return digest


def _version(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def stream_digest(f, algorithm: str = "md5", chunk: int = 1 << 22) -> str:
    """Hex digest of what is left to read from an open binary file."""
    h = hashlib.new(algorithm)
    for block in iter(lambda: f.read(chunk), b""):
        h.update(block)
    return h.hexdigest()


def md5sum(path: str | Path) -> str:
    return file_digest(path, "md5")
