"""Certificates shared between live connections: one object per distinct certificate.

Owns ``share_chain`` and ``share_verdict``: they swap the certificates of an
accepted partner chain (and of its verdict's verified path) for one canonical
``cryptography`` object per DER, and the chain and verdict themselves for one
equal object; ``leaf_labels`` remembers a shared leaf's log fields. A
partner with a thousand live connections then holds one parsed leaf,
intermediate and anchor, with the names and extensions that ``cryptography``
parsed and cached on them, one chain and one verdict, instead of a thousand
copies of each: about 17 KiB per idle relayed connection (issue 19;
``bench/idle_memory.py`` measures it).

Why it is safe: a certificate is immutable and compares (and hashes) by its
DER (a verdict by all its fields), so the object handed back equals the one
given. Only chains a verifier
accepted come here, so an unauthenticated peer cannot fill the table, and the
table is bounded: when it is full the older half goes (live connections keep
the objects they hold; a later connection just gets a fresh canonical copy).

Must never: decide anything about trust, hand back a certificate that differs
from the one asked for, hold more than ``MAX_SHARED`` objects per table, or
hold a certificate over ``MAX_SHARED_DER`` bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from itertools import islice
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from edge.core.trust import Verdict

__all__ = [
    "MAX_SHARED",
    "MAX_SHARED_DER",
    "clip",
    "leaf_labels",
    "share_chain",
    "share_verdict",
    "shared_count",
]

# Most objects remembered: the certificates of the partners with live
# connections (a federation has tens to hundreds; each one parsed, a few KiB),
# their chains and accepted verdicts.
MAX_SHARED = 1024
# Bigger certificates are never shared (nor chains and verdicts holding one),
# so the tables stay within a few MiB whatever an accepted partner presents;
# real ones are 0.5-2 KiB.
MAX_SHARED_DER = 8192

# Certificates, chains (tuples of shared certificates) and accepted verdicts,
# each by itself: equal objects are interchangeable (all are immutable).
_SHARED: dict[object, object] = {}
# Shared leaf -> (clipped subject, SHA-256 fingerprint): the log fields.
_LABELS: dict[x509.Certificate, tuple[str, str]] = {}

T = TypeVar("T")


def _share(item: T) -> T:
    found = _SHARED.get(item)
    if found is not None:
        return found  # type: ignore[return-value]  # equal, hence of the same type
    _bound(_SHARED)
    _SHARED[item] = item
    return item


def _share_cert(cert: x509.Certificate) -> x509.Certificate:
    found = _SHARED.get(cert)
    if found is not None:
        return found  # type: ignore[return-value]  # equal, hence a certificate
    if len(cert.public_bytes(Encoding.DER)) > MAX_SHARED_DER:
        return cert  # not shared: see MAX_SHARED_DER
    return _share(cert)


def _is_shared(cert: x509.Certificate) -> bool:
    return _SHARED.get(cert) is cert


def _bound(table: dict[Any, Any]) -> None:
    if len(table) >= MAX_SHARED:
        for old in list(islice(table, MAX_SHARED // 2)):
            del table[old]


def share_chain(chain: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """``chain`` with each certificate replaced by its shared, equal copy
    (except certificates over ``MAX_SHARED_DER``)."""
    chain = tuple(_share_cert(cert) for cert in chain)
    return _share(chain) if all(_is_shared(cert) for cert in chain) else chain


def share_verdict(verdict: Verdict) -> Verdict:
    """The shared verdict equal to ``verdict``, whose verified path holds the
    shared certificates. Accepted verdicts only."""
    if verdict.chain:
        chain = share_chain(verdict.chain)
        if not all(_is_shared(cert) for cert in chain):
            return verdict  # holds a certificate too big to share
        if chain is not verdict.chain:
            verdict = dataclasses.replace(verdict, chain=chain)
    return _share(verdict)


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def leaf_labels(leaf: x509.Certificate, max_subject: int, *, shared: bool) -> tuple[str, str]:
    """(subject clipped to ``max_subject``, SHA-256 fingerprint in hex) of a
    leaf, for the log; worked out once per ``shared`` leaf (an accepted one:
    formatting the subject costs more than the lookup)."""
    shared = shared and _is_shared(leaf)
    labels = _LABELS.get(leaf) if shared else None
    if labels is None:
        labels = (
            clip(leaf.subject.rfc4514_string(), max_subject),
            leaf.fingerprint(hashes.SHA256()).hex(),
        )
        if shared:
            _bound(_LABELS)
            _LABELS[leaf] = labels
    return labels


def shared_count() -> int:
    """How many objects are shared now (tests, diagnostics)."""
    return len(_SHARED)
