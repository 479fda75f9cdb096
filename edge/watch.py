"""Fingerprints of the files the gateway loaded, to notice that they changed.

Owns one question: "is what is on disk now different from what was loaded?".
A fingerprint is the sorted list of (path, size, mtime, SHA-256 of content) of
every regular file under the watched folders plus the single watched files;
two fingerprints are equal exactly when nothing relevant changed. Content
hashes catch an edit that keeps size and mtime (a restored backup, a copy
with preserved times); names catch additions and removals.

Kubernetes mounts ConfigMaps and Secrets as ``name -> ..data/name`` symlinks
and swaps ``..data`` atomically: directories whose name starts with "." are
not descended into, and symlinks are followed, so each file is read once, by
its visible name, through whatever ``..data`` points at right now.

Must never follow a symlink loop forever (depth is bounded), hold a file open,
or raise on a file that vanished between listing and reading (a half-finished
copy is simply a different fingerprint; the next poll sees the final state).
This module does blocking file I/O: the gateway calls it in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["Fingerprint", "fingerprint"]

# Partner folders are one level deep; leave room for a projected-volume layout.
_MAX_DEPTH = 4
# A policies folder holds certificates and CRLs; anything bigger is not ours.
_MAX_HASHED_BYTES = 64 * 1024 * 1024

Fingerprint = tuple[tuple[str, int, int, str], ...]


def _entry(path: Path) -> tuple[str, int, int, str] | None:
    try:
        st = path.stat()
        if st.st_size > _MAX_HASHED_BYTES:
            digest = "too-large"
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as exc:
        # Unreadable now: make it part of the fingerprint so that becoming
        # readable again counts as a change.
        return (str(path), -1, -1, f"error:{exc.errno}")
    return (str(path), st.st_size, st.st_mtime_ns, digest)


def _walk(folder: Path, depth: int = 0) -> Iterable[Path]:
    if depth > _MAX_DEPTH:
        return
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        if name.startswith("."):
            continue  # hidden files and Kubernetes' ..data / ..2026_... entries
        path = folder / name
        if path.is_dir():
            yield from _walk(path, depth + 1)
        elif path.is_file():
            yield path


def fingerprint(folders: Iterable[Path] = (), files: Iterable[Path] = ()) -> Fingerprint:
    """The fingerprint of every file under ``folders`` and of each of ``files``."""
    entries: list[tuple[str, int, int, str]] = []
    for folder in folders:
        for path in _walk(folder):
            entry = _entry(path)
            if entry is not None:
                entries.append(entry)
    for path in files:
        entry = _entry(path)
        entries.append(entry if entry is not None else (str(path), -1, -1, "missing"))
    return tuple(sorted(entries))
