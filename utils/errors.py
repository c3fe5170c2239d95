"""User errors: the one exception type for a user's mistake, and the file-system errors a user
meets (full disk, read-only location, no permission, a file where a folder should be), both
printed by utils.cli.run as one line with exit status 2, never a traceback. And Terminated: how
a SIGTERM stops a script."""
from __future__ import annotations

import errno
import re
from typing import NoReturn


class UserError(Exception):
    """Unusable input or config. The message names the file/row/key and what is wrong."""


# errno -> what happened to `{path}`, and what to do. Any other OSError is a bug: a traceback.
_OS_MESSAGES = {
    errno.ENOSPC: "no space left on device writing `{path}` — free space there (or point the "
                  "config at another disk) and rerun",
    errno.EDQUOT: "disk quota exceeded writing `{path}` — free space in your quota (or point "
                  "the config at another disk) and rerun",
    errno.EROFS: "`{path}` is not writable (read-only file system) — point the config at a "
                 "writable location",
    errno.EACCES: "`{path}`: permission denied — check the permissions of it and of its "
                  "folders (ls -ld), or point the config elsewhere",
    errno.EPERM: "`{path}`: operation not permitted — check its owner and permissions (ls -ld)",
    errno.ENOTDIR: "`{path}`: a path component is a regular file, not a folder — move that "
                   "file away or point the config at another path",
    errno.EISDIR: "`{path}` is a folder where a file is expected — move it away or point the "
                  "config at another path",
    errno.ENAMETOOLONG: "`{path}`: file name too long — choose a shorter path",
    errno.EFBIG: "`{path}` grew past a file-size limit (the process's `ulimit -f`, or the file "
                 "system's largest file) — raise the limit or point the config at another disk, "
                 "and rerun",
}
USER_ERRNOS = frozenset(_OS_MESSAGES)

# h5py and a few libraries put the file name and errno only in the message text
_NAME_IN_TEXT = re.compile(r"name = '([^']*)'")
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)")


def os_error_errno(e: BaseException) -> int | None:
    """The errno of `e`, also where only its message carries it (h5py: `errno = 28`, in an
    OSError, or in the RuntimeError of a failed object copy or close)."""
    code = getattr(e, "errno", None)
    if code is not None:
        return code
    found = _ERRNO_IN_TEXT.search(str(e))
    return int(found.group(1)) if found else None


def os_error_message(e: OSError) -> str | None:
    """One line for an OSError a user causes or meets (ENOSPC, EDQUOT, EROFS, EACCES, EPERM,
    ENOTDIR, EISDIR, ENAMETOOLONG, EFBIG) naming the path; None for any other (a bug)."""
    template = _OS_MESSAGES.get(os_error_errno(e))
    if template is None:
        return None
    path = e.filename
    if path is None:
        found = _NAME_IN_TEXT.search(str(e))
        path = found.group(1) if found else None
    if path is None:  # e.g. a write() of an already open file: say what we know
        return template.format(path="a file").replace("`a file`", "a file")
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    return template.format(path=path)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's time limit or pre-emption, `kill`), stopped as Ctrl-C stops a
    script (utils.cli.run): a checkpoint under way is finished, and the script says how to
    continue."""


# A stop signal's exception, once raised: Python drops an exception raised inside a weakref
# callback or a __del__ ("Exception ignored in ..."), so a Ctrl-C that lands there would leave
# a run going to its end (seen: a training run that finished its epochs after Ctrl-C).
_stop: type[KeyboardInterrupt] | None = None


def stop(kind: type[KeyboardInterrupt]) -> NoReturn:
    """Raise `kind` (KeyboardInterrupt, Terminated) for a signal, and keep it for raise_if_stopped."""
    global _stop
    _stop = kind
    raise kind


def raise_if_stopped() -> None:
    """Raise again a Ctrl-C or SIGTERM received earlier (see `stop`); loops call it between steps."""
    if _stop is not None:
        raise _stop


def stopped() -> type[KeyboardInterrupt] | None:
    """The Ctrl-C (KeyboardInterrupt) or SIGTERM (Terminated) received since utils.cli.run
    started the script, if any."""
    return _stop


def forget_stop() -> None:
    """utils.cli.run, at a script's start and end: a stop belongs to the script it stopped."""
    global _stop
    _stop = None
