"""Writes that never leave a half-written file: the data goes to a temporary file beside the target, which then
replaces it in one os.replace (atomic on POSIX), so an interrupted run leaves the old file or the new one. And the
workdir lock (`WorkdirLock`): one writing command per workdir."""
from __future__ import annotations

import json
import os
import tempfile


def atomic_write(path: str, write, *, binary: bool = True) -> str:
    """Call write(file object) on a temporary file in path's directory, then os.replace it onto `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json(path: str, obj, indent: int = 2) -> str:
    """`obj` as JSON (non-JSON values via str), written atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent, default=str) + "\n"), binary=False)


def read_json(path: str):
    """The parsed file, or None when it is absent or not valid JSON (e.g. from an older, interrupted writer)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


LOCK_FILE = ".lock"


class WorkdirLocked(RuntimeError):
    """Another live process holds the workdir (its PID, host and command are in the message)."""


class WorkdirLock:
    """An exclusive lock on a workdir for a command that writes there: WORKDIR/.lock is held with fcntl.flock (the
    kernel drops it when the process dies, however it dies) and names the holder ({"pid", "host", "command"}); a
    clean release empties it.

        with WorkdirLock(workdir, "train"):
            ...

    A second holder gets WorkdirLocked naming the first's PID, host and command. A lock file left by a process that
    no longer runs (kill -9) is taken over with a warning naming it. Re-entrant within a process (a nested `with` on
    the same workdir is a no-op), so library calls that lock can call each other. On a file system without flock
    the lock is advisory only."""

    _held: dict[str, int] = {}   # realpath -> nesting depth, this process

    def __init__(self, workdir: str, command: str):
        self.path = os.path.join(os.path.realpath(workdir), LOCK_FILE)
        self.command = command
        self._fd = None

    def __enter__(self):
        import fcntl
        import socket
        import warnings

        if self._held.get(self.path):
            self._held[self.path] += 1
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirLocked(f"workdir {os.path.dirname(self.path)!r} is in use by PID {holder.get('pid', '?')} on "
                                f"{holder.get('host', '?')} ({holder.get('command', '?')}): wait for it to finish or "
                                "stop it, then run again") from None
        previous = _read_holder(fd)
        host = socket.gethostname()
        if previous.get("pid"):   # a holder that ended without releasing (killed): its lock is free now
            warnings.warn(f"took over the lock of workdir {os.path.dirname(self.path)!r} left by PID "
                          f"{previous['pid']} on {previous.get('host', '?')} ({previous.get('command', '?')}), which "
                          "ended without releasing it", RuntimeWarning, stacklevel=2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host, "command": self.command}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self._held[self.path] = 1
        return self

    def __exit__(self, *exc):
        depth = self._held.get(self.path, 0) - 1
        if depth > 0:
            self._held[self.path] = depth
            return False
        self._held.pop(self.path, None)
        if self._fd is not None:
            os.ftruncate(self._fd, 0)   # a clean release leaves an empty file: nothing to take over
            os.close(self._fd)          # closing drops the flock
            self._fd = None
        return False


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode()) if data else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}
