"""The verdict of a certificate check: accepted (for which partner) or rejected (why).

Owns: `Verdict`, the one answer every verifier returns (`edge.core.trust` for
partners connecting in, `edge.core.server_trust` for servers we connect to),
its `edge verify` and JSON renderings, and `MAX_CHAIN_LENGTH`, the bound on
what a peer may send.

Must never: decide anything (the verifiers do), do I/O, import trio, sockets or
any shell module, or put key material in a detail string.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from edge.core.reasons import Reason

# Leaf plus intermediates a peer may send (real federation chains have 2 to 4).
MAX_CHAIN_LENGTH = 8


@dataclass(frozen=True)
class Verdict:
    """The answer for one chain: accepted (for which partner) or rejected (why)."""

    accepted: bool
    reason: Reason | None  # None exactly when accepted
    detail: str  # for operators: which certificate, what is wrong; never key material
    partner: str | None = None  # the identified partner (client purpose), else None
    # Accepted: the verified path, leaf first, ending with the trust anchor. Rejected
    # after the chain itself verified: that path too (for logs); otherwise empty.
    chain: tuple[x509.Certificate, ...] = field(default=(), repr=False)
    # Accepted (client purpose): the leaf name that put it inside the partner's
    # domains (a DNS SAN, the domain of a `sip:` URI SAN, or the CN of a SAN-less
    # leaf), normalized. This, never the raw CN, is the identity passed on.
    name: str | None = None

    @property
    def not_after(self) -> _dt.datetime | None:
        """The earliest notAfter over the verified path, trust anchor included: when
        this verdict stops being true by itself (a live connection admitted under it
        must be closed then). None when no path verified."""
        if not self.chain:
            return None
        return min(c.not_valid_after_utc for c in self.chain)

    @property
    def line(self) -> str:
        """The one-line `edge verify` output."""
        if self.accepted:
            return f"accepted partner={self.partner}" if self.partner else "accepted"
        return f"rejected reason={self.reason}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for `edge verify --json` and structured logs."""
        return {
            "result": "accepted" if self.accepted else "rejected",
            "accepted": self.accepted,
            "reason": None if self.reason is None else str(self.reason),
            "partner": self.partner,
            "detail": self.detail,
            "chain": [
                {
                    "subject": c.subject.rfc4514_string(),
                    "issuer": c.issuer.rfc4514_string(),
                    "not_after": c.not_valid_after_utc.isoformat(),
                    "sha256": c.fingerprint(hashes.SHA256()).hex(),
                }
                for c in self.chain
            ],
        }


def _accept(detail: str, partner: str | None, chain: tuple[x509.Certificate, ...]) -> Verdict:
    return Verdict(True, None, detail, partner, chain)


def _reject(
    reason: Reason,
    detail: str,
    partner: str | None = None,
    chain: tuple[x509.Certificate, ...] = (),
) -> Verdict:
    return Verdict(False, reason, detail, partner, chain)
