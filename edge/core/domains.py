"""Domain names as partners and our own SIP configuration write them.

Owns: the one normalization of a configured domain (lowercase, no trailing
dot, IDNA A-labels, no wildcard, at least two labels), used by partner
folders, `[sip] domains` and everything that compares names against them.

Must never: import anything but the standard library, or accept a name it
cannot explain (every refusal is a ValueError saying why, for the operator).
"""

from __future__ import annotations

import re

__all__ = ["normalize_domain"]

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def normalize_domain(raw: str) -> str:
    """Lowercase, no trailing dot, IDNA A-labels. Raises ValueError saying why."""
    name = raw.strip().rstrip(".").lower()
    if not name:
        raise ValueError(f"domain {raw!r} is empty")
    if name.startswith("*."):
        raise ValueError(
            f"domain {raw!r} has a wildcard: write {name[2:]!r}, which already covers "
            "every name under it"
        )
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"domain {raw!r} is not a valid internationalized name") from exc
    labels = name.split(".")
    if any(not _LABEL.match(label) for label in labels):
        raise ValueError(f"domain {raw!r} is not a valid DNS name")
    if len(labels) < 2:
        # A one-label domain ("com") would let a partner vouch for a whole TLD.
        raise ValueError(f"domain {raw!r} has a single label; write the partner's own domain")
    return name
