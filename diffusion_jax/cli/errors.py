"""The CLI's one error path: an exception that is the user's to fix (a config value, a file, a flag, the machine: a
read-only or full disk, a missing package, a workdir in use) becomes one line that names it and exit 2; anything
else is a bug and keeps its traceback. `--debug` (anywhere on the command line) shows the traceback of every error.

    line = user_error(exc)        # None: not a user error
"""
from __future__ import annotations

import errno

from diffusion_jax.fileio import WorkdirLocked

_DISK = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_FREE = "free some space and run the same command again (what was saved before is kept)"
_WRITABLE = "make it writable or choose another folder"
_FIX = {errno.ENOSPC: _FREE, errno.EDQUOT: _FREE, errno.EROFS: "choose a writable folder", errno.EACCES: _WRITABLE,
        errno.EPERM: _WRITABLE}


def _chain(exc: BaseException):
    """exc, then its causes / contexts (a disk error inside orbax or a tensorboard writer is wrapped)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _disk_error(exc: BaseException) -> str | None:
    for e in _chain(exc):
        code = getattr(e, "errno", None)
        if isinstance(e, OSError) and code in _DISK:
            where = e.filename or "a file"
            return f"{_DISK[code]} writing or reading {where}: {_FIX[code]}"
        text = str(e)
        if "No space left on device" in text or "RESOURCE_EXHAUSTED: Disk" in text:
            return f"no space left on the device ({text.splitlines()[0][:200]}): {_FREE}"
    return None


def user_error(exc: BaseException) -> str | None:
    """The one line for an exception the user can fix, or None for one that is a bug."""
    disk = _disk_error(exc)
    if disk is not None:
        return disk
    if isinstance(exc, ModuleNotFoundError):
        return (f"the optional package {exc.name!r} is not installed: pip install {exc.name} (or run "
                "scripts/setup.sh)")
    if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                        WorkdirLocked)):
        text = str(exc)
        return text if text else type(exc).__name__
    return None
