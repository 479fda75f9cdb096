"""The partner policy model: what one partner folder and one policies folder load into.

Owns the frozen values `edge.core.policies` builds and everything downstream
reads (`PartnerPolicy`, `PolicyProblem`, `PolicySnapshot`, `Revocation`) and
the names of the files a partner folder holds. `edge.core.policies` re-exports
all of it; import from there.

Must never: read a file, decide trust, or be mutated after construction.
"""

from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

__all__ = [
    "CRL_SUFFIXES",
    "KEY_PROBLEM",
    "POLICY_FILE",
    "RESERVED_PARTNER_IDS",
    "ROOT_SUFFIXES",
    "SINGLE_FILE_SUFFIX",
    "PartnerPolicy",
    "PolicyFolderError",
    "PolicyProblem",
    "PolicySnapshot",
    "Revocation",
]

ROOT_SUFFIXES = frozenset({".pem", ".crt", ".cer"})
CRL_SUFFIXES = frozenset({".crl"})
POLICY_FILE = "policy.toml"
# "unknown" is the metrics label for connections that matched no partner; a partner
# with that id would make two different things indistinguishable on dashboards.
RESERVED_PARTNER_IDS = frozenset({"unknown"})
SINGLE_FILE_SUFFIX = ".toml"
KEY_PROBLEM = "a private key does not belong in a partner folder: remove it"


class Revocation(enum.StrEnum):
    """How a partner's CRLs are applied to its chains."""

    # Check a CRL when the folder has one for the issuer; a stale one fails closed.
    CRL_IF_PRESENT = "crl-if-present"
    # Every issuer in the path must have a current CRL in the folder.
    REQUIRE_CRL = "require-crl"
    # Never consult CRLs for this partner.
    OFF = "off"


class PolicyFolderError(Exception):
    """The policies folder itself is missing or unreadable (nothing can load)."""


@dataclass(frozen=True)
class PartnerPolicy:
    """One partner, as loaded from `FOLDER/<id>/`."""

    id: str  # the folder name; also the `partner` metrics label
    folder: Path
    domains: tuple[str, ...]  # lowercase A-labels, no trailing dot
    enabled: bool
    pool: str | None  # None: the listener's pool
    max_connections: int | None  # None: only the global per-partner limit applies
    revocation: Revocation
    roots: tuple[x509.Certificate, ...]  # trust anchors for this partner alone
    root_files: tuple[Path, ...]  # file each root came from, same order as `roots`
    crls: tuple[x509.CertificateRevocationList, ...]
    crl_files: tuple[Path, ...]  # same order as `crls`
    # Outbound: the partner's edge as (host, port), like Lync's ProxyFqdn; None: DNS SRV.
    edge: tuple[str, int] | None = None


@dataclass(frozen=True)
class PolicyProblem:
    """Something the operator must fix, naming the file."""

    partner: str  # partner id, or "" for the policies folder itself
    path: Path
    message: str
    fatal: bool = True  # True: the partner is broken; False: a warning

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class PolicySnapshot:
    """Every partner of one policies folder at one moment; never mutated."""

    folder: Path
    partners: Mapping[str, PartnerPolicy]  # loaded partners, enabled or not (read-only)
    problems: tuple[PolicyProblem, ...]
    broken: frozenset[str]  # partners with a fatal problem (may still be in `partners`)
    loaded_at: _dt.datetime = field(default_factory=lambda: _dt.datetime.now(_dt.UTC))
    # Ignored entries (backup copies, hidden names): said, but not problems.
    notices: tuple[PolicyProblem, ...] = ()

    def new_notices(self, previous: PolicySnapshot | None) -> tuple[PolicyProblem, ...]:
        """Notices not already in ``previous``: log these, so each is said once."""
        seen = set(previous.notices) if previous is not None else set()
        return tuple(n for n in self.notices if n not in seen)

    def state_counts(self) -> dict[str, int]:
        """Partner counts by state, for the `edge_partners` gauge."""
        counts = {"enabled": 0, "disabled": 0, "broken": len(self.broken)}
        for pid, policy in self.partners.items():
            if pid not in self.broken:
                counts["enabled" if policy.enabled else "disabled"] += 1
        return counts

    def partner_states(self) -> dict[str, str]:
        """Each partner id of this folder -> `enabled`, `disabled` or `broken`."""
        states = {
            pid: "enabled" if policy.enabled else "disabled"
            for pid, policy in self.partners.items()
        }
        states.update(dict.fromkeys(self.broken, "broken"))
        return states

    def problems_of(self, partner: str) -> tuple[PolicyProblem, ...]:
        """The problems reported for one partner."""
        return tuple(p for p in self.problems if p.partner == partner)
