"""A partner's policy settings, sans-I/O: the values of `policy.toml` (or `ID.toml`) checked.

Owns: `PolicySettings` (the settings while a partner loads, with the defaults
docs/partners.md gives), `read_settings` (each known key validated, every
problem reported, the default kept where a value is wrong), `parse_edge` (the
`edge = "host:port"` value) and `is_domain`, the key lists of both layouts.

Must never: read a file (the loader parses the TOML and hands the table
over), stop at the first problem, import anything of the shell, or decide
trust.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edge.core.config import parse_address
from edge.core.domains import normalize_domain
from edge.core.policy_model import Revocation

__all__ = [
    "POLICY_KEYS",
    "SINGLE_FILE_KEYS",
    "PolicySettings",
    "is_domain",
    "parse_edge",
    "read_settings",
]

POLICY_KEYS = ("domains", "enabled", "pool", "max_connections", "revocation", "edge")
# A single-file partner (`ID.toml` at the top of the policies folder) adds these.
SINGLE_FILE_KEYS = ("roots", "crls")


def read_settings(
    raw: Mapping[str, object],
    settings: PolicySettings,
    known: tuple[str, ...],
    pid: str,
    report: Callable[[str], None],
) -> PolicySettings:
    """Validated policy settings from a parsed policy (folder or single file).

    `settings` holds the defaults (and the domain the folder name gives);
    each problem goes to `report` (a fatal problem of the policy file).
    """
    for key in raw:
        if key not in known:
            report(f"{key}: unknown key (known keys: {', '.join(known)})")
    if "domains" in raw:
        value = raw["domains"]
        if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
            report("domains: must be a list of strings")
        elif not value:
            report("domains: must not be empty")
        else:
            domains: list[str] = []
            for d in value:
                try:
                    norm = normalize_domain(d)
                except ValueError as exc:
                    report(f"domains: {exc}")
                    continue
                if norm not in domains:
                    domains.append(norm)
            settings.domains = tuple(domains)
    elif not settings.domains:
        report(f"domains: missing, and the folder name {pid!r} is not a domain name")
    if "enabled" in raw:
        if isinstance(raw["enabled"], bool):
            settings.enabled = raw["enabled"]
        else:
            report("enabled: must be true or false")
    if "pool" in raw:
        pool = raw["pool"]
        if isinstance(pool, str) and pool:
            settings.pool = pool
        else:
            report("pool: must be a non-empty string naming a [[pools]] entry")
    if "max_connections" in raw:
        limit = raw["max_connections"]
        # bool is an int in Python; `max_connections = true` is a mistake, not 1.
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
            settings.max_connections = limit
        else:
            report("max_connections: must be an integer >= 1")
    if "revocation" in raw:
        value = raw["revocation"]
        if isinstance(value, str) and value in _REVOCATION_VALUES:
            settings.revocation = Revocation(value)
        else:
            choices = ", ".join(f'"{r}"' for r in _REVOCATION_VALUES)
            report(f"revocation: must be one of {choices}")
    if "edge" in raw:
        try:
            settings.edge = parse_edge(raw["edge"])
        except ValueError as exc:
            report(f"edge: {exc}")
    return settings


_REVOCATION_VALUES = tuple(r.value for r in Revocation)


@dataclass
class PolicySettings:
    """policy.toml values while loading; defaults as docs/partners.md gives them."""

    domains: tuple[str, ...] = ()
    enabled: bool = True
    pool: str | None = None
    max_connections: int | None = None
    revocation: Revocation = Revocation.CRL_IF_PRESENT
    edge: tuple[str, int] | None = None


def parse_edge(value: object) -> tuple[str, int]:
    """`edge = "sip.fabrikam.com:5061"` (or "[v6]:port") -> (host, port), the host a
    lowercase DNS name or an IP address. Raises ValueError saying why."""
    if not isinstance(value, str) or not value:
        raise ValueError('must be "host:port", e.g. "sip.fabrikam.com:5061"')
    host, port = parse_address(value, allow_any_port=False)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    try:
        return normalize_domain(host), port
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc} (a host name or IP address, then :port)") from None


def is_domain(name: str) -> bool:
    try:
        normalize_domain(name)
    except ValueError:
        return False
    return True
