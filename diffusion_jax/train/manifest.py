"""Checkpoint integrity: a manifest of the SHA-256 of every file of a saved checkpoint, checked before it is restored,
so that a changed byte anywhere (a bit flip on disk, a partial copy, a hand edit) is caught instead of restoring
silently wrong arrays.

    write_manifest(step_dir)            # after the save is complete (train.checkpoint.Checkpointer does it)
    problems = verify(step_dir)         # [] when every file matches; else one line per file that does not
    rows = check_workdir(workdir)       # each checkpoint "ok" | "unverified" (no manifest) | "corrupt" | ...

WORKDIR/checkpoints/<step>/manifest.json = {"algorithm": "sha256", "files": {relative path: hex digest}}, written
atomically once orbax has finalised the step; a checkpoint without one (older runs) is restored unverified.
"""
from __future__ import annotations

import hashlib
import json
import os

from diffusion_jax.fileio import write_json

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        out += [os.path.relpath(os.path.join(root, f), step_dir) for f in sorted(files) if f != MANIFEST]
    return out


def write_manifest(step_dir: str) -> str:
    """Hash every file under a finished checkpoint directory into its manifest.json (atomically)."""
    return write_json(os.path.join(step_dir, MANIFEST),
                      {"algorithm": "sha256", "files": {f: file_digest(os.path.join(step_dir, f))
                                                        for f in _files(step_dir)}})


def has_manifest(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> list[str]:
    """[] when every file in the manifest is there with its hash (or there is no manifest: `has_manifest`); else
    one line per missing, changed or unreadable file, naming it."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path}: unreadable manifest ({type(e).__name__})"]
    problems = []
    for rel, digest in files.items():
        full = os.path.join(step_dir, rel)
        try:
            if file_digest(full) != digest:
                problems.append(f"{full}: content changed since it was saved (SHA-256 mismatch)")
        except FileNotFoundError:
            problems.append(f"{full}: missing")
        except OSError as e:
            problems.append(f"{full}: unreadable ({e.strerror})")
    return problems


def check_workdir(workdir: str) -> list[dict]:
    """One row per checkpoint of WORKDIR, newest first: {"step", "path", "status", "problems"}; also the
    checkpoints training moved aside (status "moved aside") and saves cut short (status "incomplete")."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{workdir!r} has no checkpoints/ folder: is it a diffusion-jax workdir?")
    rows = []
    for name in sorted(os.listdir(folder), key=lambda n: (not n.isdigit(), -int(n) if n.isdigit() else 0, n)):
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            continue
        if name.isdigit():
            problems = verify(path)
            state = "corrupt" if problems else ("ok" if has_manifest(path) else "unverified")
            rows.append({"step": int(name), "path": path, "status": state, "problems": problems})
        elif "tmp" in name:
            rows.append({"step": None, "path": path, "status": "incomplete", "problems": ["a save cut short: never "
                                                                                          "restored"]})
    aside = os.path.join(workdir, "checkpoints-corrupt")
    for name in sorted(os.listdir(aside)) if os.path.isdir(aside) else []:
        rows.append({"step": None, "path": os.path.join(aside, name), "status": "moved aside",
                     "problems": ["could not be restored; training moved it here"]})
    return rows
