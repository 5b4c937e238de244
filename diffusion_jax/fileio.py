"""Writes that never leave a half-written file: the data goes to a temporary file beside the target, which then
replaces it in one os.replace (atomic on POSIX), so an interrupted run leaves the old file or the new one."""
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
