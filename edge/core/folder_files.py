"""Reading files out of a policies folder safely: regular files only, bounded, no hang.

Owns the odd-file rules (docs: "What the edge does with odd files"): which
names are ignored (hidden, README, backup-looking), the type check before any
open (a FIFO, socket or device is refused, never opened), the non-blocking
``O_NOFOLLOW`` open, the size cap, symlinks that lead outside the policies
folder, and the world-writable folder warning. `edge.core.partner_folder`
reads every file through `read_regular`.

Must never: block (no open of anything but a regular file, no unbounded
read), follow a link out of the policies folder, or put a raw file-system
name in a message (`printable`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = [
    "MAX_POLICY_FILE_BYTES",
    "SNIFF_BYTES",
    "UTF8_BOM",
    "WORLD_WRITABLE",
    "Refused",
    "file_kind",
    "inside",
    "inspect_entry",
    "is_ignored_name",
    "is_quiet",
    "printable",
    "read_regular",
    "world_writable",
]

# Certificates and CRLs; a large public CA's CRL stays well under this. Anything
# bigger is not ours, and reading it would stall a reload.
MAX_POLICY_FILE_BYTES = 64 * 1024 * 1024
# Unknown files are read only to spot key material; a key is small.
SNIFF_BYTES = 1024 * 1024
UTF8_BOM = b"\xef\xbb\xbf"
# Backup copies editors, cp and package managers leave behind (`cp -r x x.bak`).
_BACKUP_SUFFIXES = (".bak", ".old", ".orig", ".swp", ".swo", ".tmp")


def is_ignored_name(name: str) -> bool:
    """Hidden entries, READMEs and backup-looking names: never loaded.

    Hidden covers editor files (`.#x`, `.x.swp`) and Kubernetes' `..data` links;
    backup-looking is `x~` and `x.bak`, `.old`, `.orig`, `.swp`, `.swo`, `.tmp`
    (files and folders alike: `cp -r fabrikam.com fabrikam.com.bak`).
    """
    lower = name.lower()
    return (
        name.startswith(".")
        or name.upper().startswith("README")
        or name.endswith("~")
        or lower.endswith(_BACKUP_SUFFIXES)
    )


def is_quiet(name: str) -> bool:
    """Ignored without a notice: READMEs and the kubelet's own `..` entries."""
    return name.startswith("..") or name.upper().startswith("README")


class Refused(Exception):
    """A policy file we will not read; the message says why."""


def printable(text: str) -> str:
    """A file-system name fit for a one-line message (no control characters)."""
    return "".join(c if c.isprintable() else "?" for c in text)[:300]


def inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    )
    for test, kind in kinds:
        if test(mode):
            return kind
    return "not a file"


def inspect_entry(path: Path, root: str) -> os.stat_result:
    """The stat of ``path``, refusing a symlink out of ``root``. Opens nothing."""
    real = os.path.realpath(path)
    if not inside(real, root):
        raise Refused(
            f"a symbolic link leading outside the policies folder (to {printable(real)}): "
            "refused; copy what you need into the folder"
        )
    return os.stat(real)


def read_regular(path: Path, root: str, limit: int = MAX_POLICY_FILE_BYTES) -> bytes:
    """The bytes of a regular file inside ``root``, without a UTF-8 BOM.

    Never blocks: the type is checked before opening (a FIFO is never opened),
    the open is non-blocking and does not follow a symlink swapped in since,
    and `fstat` on the open file decides. Raises `Refused` or OSError.
    """
    st = inspect_entry(path, root)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(
            f"not a regular file ({file_kind(st.st_mode)}): refused, never read; remove it"
        )
    real = os.path.realpath(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    fd = os.open(real, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(
                f"not a regular file ({file_kind(st.st_mode)}): refused, never read; remove it"
            )
        if st.st_size > limit:
            raise Refused(f"too large ({st.st_size} bytes, limit {limit}): refused")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:  # bounded even if the file grows while we read
            chunk = os.read(fd, min(1024 * 1024, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise Refused(f"too large (over {limit} bytes): refused")
    finally:
        os.close(fd)
    return b"".join(chunks).removeprefix(UTF8_BOM)


def world_writable(folder: Path) -> bool:
    try:
        return bool(os.stat(folder).st_mode & stat.S_IWOTH)
    except OSError:
        return False


WORLD_WRITABLE = (
    "world-writable: anyone on this host can add or change trust here; "
    "chmod o-w (owned by root or the edge's admin user)"
)
