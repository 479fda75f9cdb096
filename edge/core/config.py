"""The gateway's configuration file (TOML) read into frozen, typed objects.

Owns: reading `edge.toml` against its schema (`edge.core.schema`, rendered as
docs/reference/configuration.md), resolving paths relative to the file,
loading the edge's own certificates and keys and checking that each key
matches its certificate, and cross-references between sections (a
listener's pool must exist, names are unique). The parts live in
`edge.core.identity` ([identity]), `edge.core.topology` ([[listeners]],
[[pools]]) and `edge.core.toml_tables` (the typed getters); their public
names are re-exported here.

Must never: start anything, open sockets or import trio, load the partner
policies themselves (that is `edge.core.policies`; here we only check the folder
exists), or put key material in a message or a repr. Every problem is
reported as "FILE: KEY: problem"; all problems found are collected before
`ConfigError` is raised, so an operator fixes them in one pass.
"""

from __future__ import annotations

import math
import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge.core import schema
from edge.core.domains import normalize_domain
from edge.core.identity import (
    IDENTITY_KEYS,
    Identity,
    IdentityReader,
    PrivateKey,
    key_file_warnings,
)
from edge.core.readiness import ReadyRequires
from edge.core.toml_tables import is_ip_address, parse_address, shown
from edge.core.topology import (
    LISTENER_KEYS,
    MEMBER_KEYS,
    POOL_KEYS,
    Balance,
    Listener,
    Member,
    Pool,
    TopologyReader,
)

# Identity and listener/pool parsing live in edge.core.identity and
# edge.core.topology (issue 14); their public names stay importable from here.
__all__ = [
    "Balance",
    "Config",
    "ConfigError",
    "Dns",
    "Identity",
    "Limits",
    "Listener",
    "Member",
    "MetricsSettings",
    "PolicySettings",
    "Pool",
    "PrivateKey",
    "ReadyRequires",
    "RevocationSettings",
    "SipSettings",
    "bind_error",
    "default_config_path",
    "is_ip_address",
    "key_file_warnings",
    "load_config",
    "parse_address",
]


class ConfigError(Exception):
    """The configuration cannot be used; `problems` are "FILE: KEY: problem" lines."""

    def __init__(self, problems: tuple[str, ...]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Dns:
    """`[dns]`: where the edge sends its queries; empty: the system's resolv.conf."""

    nameservers: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class MetricsSettings:
    """`[metrics]`: where the Prometheus endpoint listens."""

    host: str
    port: int
    # /readyz: "any_pool" (default) is ready while at least one pool has a member
    # up; "all_pools" only while every pool has (edge.core.readiness decides).
    ready_requires: ReadyRequires = "any_pool"


@dataclass(frozen=True)
class Limits:
    """`[limits]`: every bound the gateway enforces (docs/configuration.md, "Limits")."""

    handshake_timeout_s: float = 10  # accept -> handshake -> authorization
    idle_timeout_s: float = 1800  # no byte either way
    max_connections: int = 10000  # all connections, handshaking ones included
    max_connections_per_partner: int = 1000  # policy.toml max_connections can lower it
    drain_timeout_s: float = 30  # SIGTERM: stop accepting, wait this long, close
    max_connections_per_source: int = 1000  # per client IP (IPv6: per /64)
    max_handshakes_in_progress: int = 2000  # accepted, not yet authorized
    new_connections_per_source_per_s: float = 100  # token bucket refill rate
    new_connections_per_source_burst: int = 200  # token bucket size
    # Outbound listeners: live connections from the pool to one partner.
    max_outbound_connections_per_partner: int = 1000


@dataclass(frozen=True)
class RevocationSettings:
    """`[revocation]`: fetching CRLs from the certificates' distribution points."""

    fetch: bool = False  # off: only the CRLs dropped into partner folders count
    cache_dir: Path | None = None  # fetched CRLs survive a restart here (default: ./crl-cache)
    refresh_interval_s: float = 3600.0  # refetch at least this often (and before next update)
    timeout_s: float = 10.0  # one HTTP fetch, resolution to last byte: a total deadline
    # Distribution points on private, loopback, link-local (etc.) addresses are refused:
    # a partner's certificate must not make the edge probe our internal network.
    allow_private_networks: bool = False
    # At most one verifier rebuild and live re-check for fetched CRLs per this interval
    # (and no refetch sooner): a CRL with a 2 s lifetime cannot make the edge churn.
    min_rebuild_interval_s: float = 30.0


@dataclass(frozen=True)
class PolicySettings:
    """`[policies]`: how the running gateway notices changes (live reload)."""

    # How often the policies folders and the identity files are compared with
    # what was loaded (names, sizes, mtimes, content hashes). SIGHUP reloads at once.
    poll_interval_s: float = 2.0


@dataclass(frozen=True)
class SipSettings:
    """`[sip]`: bounds of `protocol = "sip"` listeners and our own SIP domains."""

    max_message_bytes: int = 65535  # head and body of one message
    max_headers: int = 200  # header fields in one message
    domains: tuple[str, ...] = ()  # normalized; what the pool may send From (outbound SIP)


@dataclass(frozen=True)
class TlsSettings:
    """`[tls]`: Mozilla's server-side TLS profile for every listener and dial."""

    # "intermediate": TLS 1.2 (ECDHE + AEAD suites) and 1.3; "modern": TLS 1.3 only.
    profile: Literal["intermediate", "modern"] = "intermediate"


@dataclass(frozen=True)
class Config:
    path: Path
    identity: Identity
    listeners: tuple[Listener, ...]
    pools: Mapping[str, Pool]  # read-only
    metrics: MetricsSettings | None
    limits: Limits
    policies: PolicySettings = PolicySettings()
    dns: Dns = Dns()
    revocation: RevocationSettings = RevocationSettings()
    # Not errors, but worth a person's look (a private key readable by others):
    # `edge check` prints them; `edge run` logs each as `config_warning`.
    warnings: tuple[str, ...] = ()
    sip: SipSettings = SipSettings()
    tls: TlsSettings = TlsSettings()


def default_config_path() -> Path:
    """`$EDGE_CONFIG`, else `./edge.toml`."""
    env = os.environ.get("EDGE_CONFIG")
    return Path(env) if env else Path("edge.toml")


# Known keys come from the schema, so a key cannot be accepted without being
# documented (edge/core/schema.py; `python -m edge.docs` renders the reference).
_TOP_KEYS = schema.top_tables()
# Every section's known keys, here too (tests compare them with the schema).
_IDENTITY_KEYS = IDENTITY_KEYS
_LISTENER_KEYS = LISTENER_KEYS
_POOL_KEYS = POOL_KEYS
_MEMBER_KEYS = MEMBER_KEYS
_DNS_KEYS = schema.key_names("dns")
_POLICY_SETTINGS_KEYS = schema.key_names("policies")
_REVOCATION_KEYS = schema.key_names("revocation")
_SIP_KEYS = schema.key_names("sip")
_TLS_KEYS = schema.key_names("tls")
_METRICS_KEYS = schema.key_names("metrics")
_FLOAT_LIMITS = schema.key_names("limits", type="number")
_INT_LIMITS = schema.key_names("limits", type="integer")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_error(host: str, port: int, what: str, exc: OSError) -> str:
    """The message for a failed bind: the address, what it is for, and the OS's reason.

    ``what``: ``listener NAME`` or ``metrics``. E.g. "cannot listen on
    0.0.0.0:5061 (listener federation): Address already in use".
    """
    return f"cannot listen on {_host_port(host, port)} ({what}): {exc.strerror or exc}"


class _Loader(IdentityReader, TopologyReader):
    """The whole file: the identity and topology readers plus the other sections."""

    def dns(self, data: Mapping[str, Any]) -> Dns:
        table = self.table(data, "dns", required=False)
        if table is None:
            return Dns()
        self.unknown_keys(table, _DNS_KEYS, "dns.")
        raw = table.get("nameservers")
        if raw is None:
            return Dns()
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            self.problem(
                "dns.nameservers", f'must be a list of "ip:port" strings, not {shown(raw)}'
            )
            return Dns()
        servers: list[tuple[str, int]] = []
        for text in raw:
            try:
                host, port = parse_address(text, allow_any_port=False)
            except ValueError as exc:
                detail = str(exc) if ":" in text else f"{text!r} is not ip:port (e.g. 10.0.0.2:53)"
                self.problem("dns.nameservers", detail)
                continue
            if not is_ip_address(host):
                self.problem(
                    "dns.nameservers", f"{text!r}: a name server is an IP address, not a name"
                )
                continue
            servers.append((host, port))
        return Dns(tuple(servers))

    def metrics(self, data: Mapping[str, Any]) -> MetricsSettings | None:
        table = self.table(data, "metrics", required=False)
        if table is None:
            return None
        self.unknown_keys(table, _METRICS_KEYS, "metrics.")
        address = self.address(table, "metrics.")
        requires = table.get("ready_requires", "any_pool")
        if requires not in ("all_pools", "any_pool"):
            self.problem(
                "metrics.ready_requires",
                f'must be "any_pool" or "all_pools", not {shown(requires)}',
            )
            requires = "any_pool"
        if address is None:
            return None
        return MetricsSettings(
            *address, ready_requires="all_pools" if requires == "all_pools" else "any_pool"
        )

    def limits(self, data: Mapping[str, Any]) -> Limits:
        table = self.table(data, "limits", required=False)
        defaults = Limits()
        if table is None:
            return defaults
        self.unknown_keys(table, _FLOAT_LIMITS + _INT_LIMITS, "limits.")
        values: dict[str, Any] = {}
        for key in _FLOAT_LIMITS:
            if key in table:
                value = table[key]
                # inf would disable the bound, nan compares false with everything.
                if (
                    isinstance(value, int | float)
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                    and value > 0
                ):
                    values[key] = float(value)
                else:
                    self.problem(
                        f"limits.{key}", f"must be a number > 0 and finite, not {shown(value)}"
                    )
        for key in _INT_LIMITS:
            if key in table:
                value = table[key]
                if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                    values[key] = value
                else:
                    self.problem(f"limits.{key}", f"must be an integer >= 1, not {shown(value)}")
        return Limits(**values)

    def policy_settings(self, data: Mapping[str, Any]) -> PolicySettings:
        table = self.table(data, "policies", required=False)
        if table is None:
            return PolicySettings()
        self.unknown_keys(table, _POLICY_SETTINGS_KEYS, "policies.")
        value = table.get("poll_interval_s", PolicySettings.poll_interval_s)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return PolicySettings(poll_interval_s=float(value))
        self.problem("policies.poll_interval_s", f"must be a number > 0, not {shown(value)}")
        return PolicySettings()

    def revocation_settings(self, data: Mapping[str, Any]) -> RevocationSettings:
        table = self.table(data, "revocation", required=False)
        defaults = RevocationSettings(cache_dir=self.base / "crl-cache")
        if table is None:
            return defaults
        self.unknown_keys(table, _REVOCATION_KEYS, "revocation.")
        flags: dict[str, bool] = {}
        for key in ("fetch", "allow_private_networks"):
            flag = table.get(key, False)
            if isinstance(flag, bool):
                flags[key] = flag
            else:
                self.problem(f"revocation.{key}", f"must be true or false, not {shown(flag)}")
        cache_dir = defaults.cache_dir
        raw = table.get("cache_dir")
        if raw is not None:
            if isinstance(raw, str) and raw:
                cache_dir = self.base / raw
            else:
                self.problem("revocation.cache_dir", f"must be a folder path, not {shown(raw)}")
        numbers: dict[str, float] = {}
        for key in ("refresh_interval_s", "timeout_s", "min_rebuild_interval_s"):
            if key in table:
                value = table[key]
                if (
                    isinstance(value, int | float)
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                    and value > 0
                ):
                    numbers[key] = float(value)
                else:
                    self.problem(f"revocation.{key}", f"must be a number > 0, not {shown(value)}")
        return RevocationSettings(
            fetch=flags.get("fetch", False),
            cache_dir=cache_dir,
            refresh_interval_s=numbers.get("refresh_interval_s", defaults.refresh_interval_s),
            timeout_s=numbers.get("timeout_s", defaults.timeout_s),
            allow_private_networks=flags.get("allow_private_networks", False),
            min_rebuild_interval_s=numbers.get(
                "min_rebuild_interval_s", defaults.min_rebuild_interval_s
            ),
        )

    def sip_settings(self, data: Mapping[str, Any]) -> SipSettings:
        table = self.table(data, "sip", required=False) or {}
        self.unknown_keys(table, _SIP_KEYS, "sip.")
        size = self.bounded_int(table, "max_message_bytes", "sip.", 65535, 1024, 16 * 1024 * 1024)
        headers = self.bounded_int(table, "max_headers", "sip.", 200, 10, 10000)
        domains: list[str] = []
        raw = table.get("domains", [])
        if not isinstance(raw, list) or not all(isinstance(d, str) for d in raw):
            self.problem("sip.domains", f"must be a list of domain names, not {shown(raw)}")
            raw = []
        for item in raw:
            try:
                domains.append(normalize_domain(item))
            except ValueError as exc:
                self.problem("sip.domains", str(exc))
        if self.sip_outbound and not table.get("domains"):
            self.problem(
                "sip.domains",
                f"missing or empty: outbound SIP listener {', '.join(self.sip_outbound)} checks "
                'that the pool speaks only for our domains; add domains = ["contoso.com"]',
            )
        return SipSettings(size, headers, tuple(dict.fromkeys(domains)))

    def tls_settings(self, data: Mapping[str, Any]) -> TlsSettings:
        table = self.table(data, "tls", required=False)
        if table is None:
            return TlsSettings()
        self.unknown_keys(table, _TLS_KEYS, "tls.")
        profile = table.get("profile", "intermediate")
        if profile == "intermediate" or profile == "modern":
            return TlsSettings(profile=profile)
        self.problem("tls.profile", f'must be "intermediate" or "modern", not {shown(profile)}')
        return TlsSettings()

    def load(self) -> Config:
        try:
            with self.path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError((f"{self.path}: configuration file does not exist",)) from None
        except OSError as exc:
            raise ConfigError((f"{self.path}: cannot read: {exc.strerror or exc}",)) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError((f"{self.path}: not valid TOML: {exc}",)) from None
        self.unknown_keys(data, _TOP_KEYS, "")
        identity = self.identity(data)
        pools = self.pools(data)
        listeners = self.listeners(data, set(pools))
        metrics = self.metrics(data)
        limits = self.limits(data)
        policy_settings = self.policy_settings(data)
        dns = self.dns(data)
        revocation = self.revocation_settings(data)
        if identity is not None:
            self.outbound_identity(identity, listeners)
        sip = self.sip_settings(data)
        tls = self.tls_settings(data)
        if self.problems or identity is None:
            if not self.problems:  # defensive: never start on a half-built identity
                self.problem("identity", "could not be loaded")
            raise ConfigError(tuple(self.problems))
        return Config(
            path=self.path,
            identity=identity,
            listeners=listeners,
            pools=types.MappingProxyType(pools),
            metrics=metrics,
            limits=limits,
            policies=policy_settings,
            dns=dns,
            revocation=revocation,
            warnings=tuple(key_file_warnings(identity)),
            sip=sip,
            tls=tls,
        )


def load_config(path: Path) -> Config:
    """Load and validate `path`; raise ConfigError listing every problem found."""
    return _Loader(path).load()
