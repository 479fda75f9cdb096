"""Certificates shared between live connections: one object per distinct certificate.

Owns ``share_chain`` and ``share_verdict``: they swap the certificates of an
accepted partner chain (and of its verdict's verified path) for one canonical
``cryptography`` object per DER. A partner with a thousand live connections
then holds one parsed leaf, intermediate and anchor, with the names and
extensions that ``cryptography`` parsed and cached on them, instead of a
thousand copies of each: about 15 KiB per idle relayed connection (issue 19;
``bench/idle_memory.py`` measures it).

Why it is safe: a certificate is immutable and compares (and hashes) by its
DER, so the object handed back equals the one given. Only chains a verifier
accepted come here, so an unauthenticated peer cannot fill the table, and the
table is bounded: when it is full the older half goes (live connections keep
the objects they hold; a later connection just gets a fresh canonical copy).

Must never: decide anything about trust, hand back a certificate that differs
from the one asked for, or hold more than ``MAX_SHARED`` certificates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from itertools import islice

from cryptography import x509

from edge.core.trust import Verdict

__all__ = ["MAX_SHARED", "share_chain", "share_verdict", "shared_count"]

# Most certificates remembered: leaves, intermediates and anchors of the
# partners with live connections (a federation has tens to hundreds); each
# entry is one parsed certificate, a few KiB.
MAX_SHARED = 1024

_SHARED: dict[x509.Certificate, x509.Certificate] = {}


def _share(cert: x509.Certificate) -> x509.Certificate:
    found = _SHARED.get(cert)
    if found is not None:
        return found
    if len(_SHARED) >= MAX_SHARED:
        for old in list(islice(_SHARED, MAX_SHARED // 2)):
            del _SHARED[old]
    _SHARED[cert] = cert
    return cert


def share_chain(chain: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """``chain`` with each certificate replaced by its shared, equal copy."""
    return tuple(_share(cert) for cert in chain)


def share_verdict(verdict: Verdict) -> Verdict:
    """``verdict`` whose verified path holds the shared certificates (itself if
    it already does or has no path)."""
    if not verdict.chain:
        return verdict
    chain = share_chain(verdict.chain)
    if all(a is b for a, b in zip(chain, verdict.chain, strict=True)):
        return verdict
    return dataclasses.replace(verdict, chain=chain)


def shared_count() -> int:
    """How many certificates are shared now (tests, diagnostics)."""
    return len(_SHARED)
