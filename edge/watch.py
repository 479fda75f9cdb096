"""Fingerprints of the files the gateway loaded, to notice that they changed.

Owns one question: "is what is on disk now different from what was loaded?".
A fingerprint is the sorted list of (path, size, mtime, SHA-256 of content) of
every file under the watched folders plus the single watched files; two
fingerprints are equal exactly when nothing relevant changed. Content hashes
catch an edit that keeps size and mtime (a restored backup, a copy with
preserved times); names catch additions and removals.

A file is re-hashed only when its name, size, mtime (ns), ctime (ns), inode
or device changed since the last fingerprint: a poll of an unchanged 60 MB
CRL reads nothing. ctime is in the key because no ordinary write can keep it:
`cp -p` over a file restores mtime, never ctime.

Kubernetes mounts ConfigMaps and Secrets as ``name -> ..data/name`` symlinks
and swaps ``..data`` atomically: directories whose name starts with "." are
not descended into, and symlinks are followed, so each file is read once, by
its visible name, through whatever ``..data`` points at right now. A symlink
that leads out of a watched folder is not followed (its target is not read,
a linked directory is not walked): it appears as "outside-the-folder", as
`load_policies` refuses it.

Must never block (a FIFO, socket or device is fingerprinted by its name and
type and never opened; files are opened non-blocking), follow a symlink loop
forever (depth is bounded), hold a file open, or raise on a file that
vanished between listing and reading (a half-finished copy is simply a
different fingerprint; the next poll sees the final state).
This module does blocking file I/O: the gateway calls it in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

from edge.core.policies import MAX_POLICY_FILE_BYTES

__all__ = ["Fingerprint", "fingerprint"]

# Partner folders are one level deep; leave room for a projected-volume layout.
_MAX_DEPTH = 4
# The loader refuses anything bigger; hashing it would only cost time.
_MAX_HASHED_BYTES = MAX_POLICY_FILE_BYTES
# Remembered digests; a policies folder holds far fewer files. Cleared when full.
_MAX_CACHED = 50_000
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY

Fingerprint = tuple[tuple[str, int, int, str], ...]
_Key = tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns

_cache: dict[str, tuple[_Key, str]] = {}
_cache_lock = threading.Lock()  # fingerprints may run in several worker threads


def _key(st: os.stat_result) -> _Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _digest(fd: int, size: int) -> str:
    """SHA-256 of the open file ``fd``, reading at most ``size`` bytes."""
    h = hashlib.sha256()
    left = size
    while left > 0:
        chunk = os.read(fd, min(1024 * 1024, left))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _entry(path: Path, root: str | None = None) -> tuple[str, int, int, str] | None:
    name = str(path)
    real = os.path.realpath(path)
    if root is not None and not _inside(real, root):
        return (name, -1, -1, "outside-the-folder")
    try:
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            # Never opened: a FIFO would block. Its arrival still changes the
            # fingerprint, so the reload that reports it happens.
            return (name, -1, -1, "not-a-regular-file")
        if st.st_size > _MAX_HASHED_BYTES:
            return (name, st.st_size, st.st_mtime_ns, "too-large")
        with _cache_lock:
            cached = _cache.get(name)
        if cached is not None and cached[0] == _key(st):
            return (name, st.st_size, st.st_mtime_ns, cached[1])
        fd = os.open(real, _OPEN_FLAGS)
        try:
            st = os.fstat(fd)  # what we hash is what we key it by
            if not stat.S_ISREG(st.st_mode):
                return (name, -1, -1, "not-a-regular-file")
            digest = _digest(fd, min(st.st_size, _MAX_HASHED_BYTES))
        finally:
            os.close(fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        # Unreadable now: make it part of the fingerprint so that becoming
        # readable again counts as a change.
        return (name, -1, -1, f"error:{exc.errno}")
    with _cache_lock:
        if len(_cache) >= _MAX_CACHED:
            _cache.clear()
        _cache[name] = (_key(st), digest)
    return (name, st.st_size, st.st_mtime_ns, digest)


def _walk(folder: Path, root: str, depth: int = 0) -> Iterable[Path]:
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
        if _inside(os.path.realpath(path), root) and path.is_dir():
            yield from _walk(path, root, depth + 1)
        else:
            yield path  # files, and anything odd: `_entry` says what it is


def fingerprint(folders: Iterable[Path] = (), files: Iterable[Path] = ()) -> Fingerprint:
    """The fingerprint of every file under ``folders`` and of each of ``files``."""
    entries: list[tuple[str, int, int, str]] = []
    for folder in folders:
        root = os.path.realpath(folder)
        for path in _walk(folder, root):
            entry = _entry(path, root)
            if entry is not None:
                entries.append(entry)
    for path in files:
        entry = _entry(path)
        entries.append(entry if entry is not None else (str(path), -1, -1, "missing"))
    return tuple(sorted(entries))
