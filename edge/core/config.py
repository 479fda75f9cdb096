"""The gateway's configuration file (TOML) read into frozen, typed objects.

Owns: reading `edge.toml` against its schema (`edge.core.schema`, rendered as
docs/reference/configuration.md), resolving paths relative to the file,
loading the edge's own certificates and keys and checking that each key
matches its certificate, and cross-references between sections (a
listener's pool must exist, names are unique).

Must never: start anything, open sockets or import trio, load the partner
policies themselves (that is `edge.core.policies`; here we only check the folder
exists), or put key material in a message or a repr. Every problem is
reported as "FILE: KEY: problem"; all problems found are collected before
`ConfigError` is raised, so an operator fixes them in one pass.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge.core import schema
from edge.core.domains import normalize_domain
from edge.core.pem import load_certificates, load_private_key
from edge.core.readiness import ReadyRequires

__all__ = [
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

# Key types a TLS server or client certificate can use with pyOpenSSL.
PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")


class ConfigError(Exception):
    """The configuration cannot be used; `problems` are "FILE: KEY: problem" lines."""

    def __init__(self, problems: tuple[str, ...]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, kw_only=True)
class Identity:
    """The edge's own certificates: public (shown to partners), internal (to the pool)."""

    # With `<side>_pkcs12`, `<side>_cert` and `<side>_key` are both that file.
    public_cert: Path
    public_key: Path
    internal_cert: Path
    internal_key: Path
    internal_roots: tuple[Path, ...]
    public_chain: tuple[x509.Certificate, ...]  # leaf first
    public_private_key: PrivateKey = field(repr=False, compare=False)
    internal_chain: tuple[x509.Certificate, ...]  # leaf first
    internal_private_key: PrivateKey = field(repr=False, compare=False)
    # CAs that issue pool members' certificates.
    internal_root_certs: tuple[x509.Certificate, ...]
    # Files holding key passphrases (watched for changes like the keys; the
    # passphrases themselves are not kept).
    passphrase_files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Listener:
    """Where partners (mtls) or clients (tls) connect, and which pool they reach;
    or (outbound) where pool members connect to reach partners."""

    name: str
    host: str  # IPv6 without brackets
    port: int
    mode: Literal["mtls", "tls", "outbound"]
    # Partner policies folder; required for mtls and outbound, None for tls.
    policies: Path | None
    pool: str  # the pool partners reach; "" on an outbound listener (it uses `pools`)
    # Outbound only: the pools whose members' topology hosts may use this listener.
    pools: tuple[str, ...] = ()
    # "stream": opaque bytes; "sip": SIP messages, framed and guarded (docs/architecture.md)
    protocol: Literal["stream", "sip"] = "stream"


@dataclass(frozen=True)
class Member:
    """One internal server: `host` is verified on its certificate and sent as SNI;
    `address` (when set) is only where to dial."""

    host: str
    address: str | None
    port: int
    weight: int = 1  # share of new connections relative to the pool's other members
    max_connections: int | None = None  # None: no per-member limit


Balance = Literal["least_connections", "round_robin"]


@dataclass(frozen=True)
class Pool:
    """A set of internal servers: listed (`members`) or discovered (`dns_srv`)."""

    name: str
    members: tuple[Member, ...]
    dns_srv: str | None = None  # RFC 2782 name; its targets are the members
    balance: Balance = "least_connections"
    health_interval_s: float = 5.0
    unhealthy_after: int = 2  # consecutive failed checks that take a member out
    healthy_after: int = 2  # consecutive good checks that bring it back
    proxy_protocol: Literal["v2"] | None = None


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


def parse_address(text: str, *, allow_any_port: bool = True) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port). Raises ValueError saying why.

    Port 0 (a listening address only) asks the kernel for a free port; the
    bound address is logged in `gateway_started` (tests and `edge demo`).
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port (IPv6 as [::1]:5061)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:5061")
    elif not host:
        raise ValueError(f"{text!r} has an empty host")
    lowest = 0 if allow_any_port else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from {lowest} to 65535")
    return host, int(port_text)


# Known keys come from the schema, so a key cannot be accepted without being
# documented (edge/core/schema.py; `python -m edge.docs` renders the reference).
_TOP_KEYS = schema.top_tables()
_IDENTITY_KEYS = schema.key_names("identity")
_LISTENER_KEYS = schema.key_names("listeners")
_POOL_KEYS = schema.key_names("pools")
_MEMBER_KEYS = schema.key_names("pools.members")
_DNS_KEYS = schema.key_names("dns")
_POLICY_SETTINGS_KEYS = schema.key_names("policies")
_REVOCATION_KEYS = schema.key_names("revocation")
_SIP_KEYS = schema.key_names("sip")
_TLS_KEYS = schema.key_names("tls")
# Bounds that keep a typo from becoming an outage or a busy loop.
_MAX_WEIGHT = 1000
_MIN_HEALTH_INTERVAL_S = 0.1
_MAX_HEALTH_THRESHOLD = 100
_METRICS_KEYS = schema.key_names("metrics")
_FLOAT_LIMITS = schema.key_names("limits", type="number")
_INT_LIMITS = schema.key_names("limits", type="integer")


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent
        self.problems: list[str] = []
        self.sip_outbound: list[str] = []  # outbound SIP listeners: [sip] domains required

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")

    # --- typed getters -------------------------------------------------------------

    def unknown_keys(self, table: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in known:
                self.problem(f"{where}{key}", f"unknown key (expected one of: {', '.join(known)})")

    def string(
        self, table: Mapping[str, Any], key: str, where: str, *, required: bool = True
    ) -> str | None:
        if key not in table:
            if required:
                self.problem(f"{where}{key}", "missing (required)")
            return None
        value = table[key]
        if not isinstance(value, str) or not value:
            self.problem(f"{where}{key}", f"must be a non-empty string, not {_shown(value)}")
            return None
        return value

    def table(self, data: Mapping[str, Any], key: str, *, required: bool) -> dict[str, Any] | None:
        if key not in data:
            if required:
                self.problem(f"[{key}]", "missing table (required)")
            return None
        value = data[key]
        if not isinstance(value, dict):
            self.problem(key, f"must be a table ([{key}]), not {_shown(value)}")
            return None
        return value

    def array_of_tables(self, data: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
        if key not in data:
            self.problem(f"[[{key}]]", "missing (at least one entry is required)")
            return []
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(key, f"must be an array of tables ([[{key}]]), not {_shown(value)}")
            return []
        if not value:
            self.problem(f"[[{key}]]", "at least one entry is required")
        return value

    def file(self, key: str, raw: str) -> tuple[Path, bytes | None]:
        path = self.base / raw
        try:
            return path, path.read_bytes()
        except FileNotFoundError:
            self.problem(key, f"{path}: file does not exist")
        except IsADirectoryError:
            self.problem(key, f"{path}: is a folder, expected a file")
        except OSError as exc:
            self.problem(key, f"{path}: cannot read: {exc.strerror or exc}")
        return path, None

    # --- identity ------------------------------------------------------------------

    def certificates(self, key: str, path: Path, data: bytes) -> tuple[x509.Certificate, ...]:
        try:
            certs = load_certificates(data)
        except ValueError:
            self.problem(key, f"{path}: no readable certificate (expected PEM or DER)")
            return ()
        return certs

    def chain(self, key: str, raw: str) -> tuple[Path, tuple[x509.Certificate, ...]]:
        path, data = self.file(key, raw)
        if data is None:
            return path, ()
        certs = self.certificates(key, path, data)
        for index, (cert, issuer) in enumerate(itertools.pairwise(certs)):
            if cert.issuer != issuer.subject:
                self.problem(
                    key,
                    f"{path}: certificate #{index + 2} ({issuer.subject.rfc4514_string()}) "
                    f"did not issue certificate #{index + 1} (issuer "
                    f"{cert.issuer.rfc4514_string()}); list the leaf first, then its issuers",
                )
                break
        return path, certs

    def passphrase(self, table: Mapping[str, Any], key: str) -> bytes | None:
        """The passphrase in the file named by ``identity.<key>`` (None: key not set).

        One trailing newline is dropped (``echo secret > file`` writes one). The
        passphrase itself never goes into a message.
        """
        raw = self.string(table, key, "identity.", required=False)
        if raw is None:
            return None
        _, data = self.file(f"identity.{key}", raw)
        if data is None:
            return None
        if data.endswith(b"\r\n"):
            return data[:-2]
        return data[:-1] if data.endswith(b"\n") else data

    def checked_key(
        self, key: str, path: Path, loaded: object, cert_key: str, leaf: x509.Certificate | None
    ) -> PrivateKey | None:
        if not isinstance(
            loaded,
            rsa.RSAPrivateKey
            | ec.EllipticCurvePrivateKey
            | ed25519.Ed25519PrivateKey
            | ed448.Ed448PrivateKey,
        ):
            self.problem(key, f"{path}: unsupported key type {type(loaded).__name__}")
            return None
        if leaf is not None and loaded.public_key() != leaf.public_key():
            self.problem(
                key,
                f"{path}: does not match the certificate in {cert_key} "
                f"({leaf.subject.rfc4514_string()})",
            )
            return None
        return loaded

    def private_key(
        self,
        key: str,
        raw: str,
        cert_key: str,
        chain: tuple[x509.Certificate, ...],
        passphrase: bytes | None = None,
    ) -> tuple[Path, PrivateKey | None]:
        path, data = self.file(key, raw)
        if data is None:
            return path, None
        # Parser messages are not echoed: never risk quoting key bytes to an operator.
        try:
            try:
                loaded: object = load_private_key(data, passphrase)
            except TypeError:
                if passphrase is None:
                    self.problem(
                        key,
                        f"{path}: the key is encrypted; name its passphrase file in "
                        f"{key}_passphrase_file (or give an unencrypted PKCS#8 key)",
                    )
                    return path, None
                loaded = load_private_key(data)  # a passphrase for a plain key: harmless
        except (ValueError, UnsupportedAlgorithm):
            if passphrase is not None:
                self.problem(
                    key,
                    f"{path}: cannot decrypt the key: wrong passphrase in "
                    f"{key}_passphrase_file, or not a private key",
                )
            else:
                self.problem(key, f"{path}: no readable private key (expected PEM or DER)")
            return path, None
        return path, self.checked_key(key, path, loaded, cert_key, chain[0] if chain else None)

    def pkcs12(
        self, key: str, raw: str, passphrase: bytes | None
    ) -> tuple[Path, tuple[x509.Certificate, ...], PrivateKey | None]:
        """Certificate, its chain and its key from one PKCS#12 (.pfx/.p12) file."""
        path, data = self.file(key, raw)
        if data is None:
            return path, (), None
        try:
            loaded, cert, extra = pkcs12.load_key_and_certificates(data, passphrase)
        except (ValueError, UnsupportedAlgorithm, TypeError):
            how = f"wrong passphrase in {key}_passphrase_file" if passphrase else "no passphrase"
            self.problem(key, f"{path}: cannot read the PKCS#12 file ({how}, or not PKCS#12)")
            return path, (), None
        if cert is None or loaded is None:
            missing = "certificate" if cert is None else "private key"
            self.problem(key, f"{path}: the PKCS#12 file holds no {missing}")
            return path, (), None
        # The file's other certificates come in any order: keep those that
        # chain from the leaf, leaf first, as a PEM chain file would list them.
        chain = [cert]
        rest = list(extra)
        while rest and chain[-1].issuer != chain[-1].subject:
            issuer = next((c for c in rest if c.subject == chain[-1].issuer), None)
            if issuer is None:
                break
            chain.append(issuer)
            rest.remove(issuer)
        return path, tuple(chain), self.checked_key(key, path, loaded, key, cert)

    def key_pair(
        self, table: Mapping[str, Any], side: str
    ) -> tuple[Path, Path, tuple[x509.Certificate, ...], PrivateKey | None]:
        """One side's (``public``/``internal``) certificate chain and key, from
        ``<side>_cert`` + ``<side>_key`` or from ``<side>_pkcs12``."""
        p12_key = f"{side}_pkcs12"
        if p12_key in table:
            for other in (f"{side}_cert", f"{side}_key", f"{side}_key_passphrase_file"):
                if other in table:
                    self.problem(
                        f"identity.{other}",
                        f"give either {side}_cert and {side}_key, or {p12_key}, not both",
                    )
            raw = self.string(table, p12_key, "identity.")
            secret = self.passphrase(table, f"{p12_key}_passphrase_file")
            if raw is None:
                return Path(), Path(), (), None
            path, chain, loaded = self.pkcs12(f"identity.{p12_key}", raw, secret)
            return path, path, chain, loaded
        if f"{p12_key}_passphrase_file" in table:
            self.problem(f"identity.{p12_key}_passphrase_file", f"only used with {p12_key}")
        cert_raw = self.string(table, f"{side}_cert", "identity.")
        key_raw = self.string(table, f"{side}_key", "identity.")
        secret = self.passphrase(table, f"{side}_key_passphrase_file")
        cert_path, chain = (
            self.chain(f"identity.{side}_cert", cert_raw) if cert_raw else (Path(), ())
        )
        key_path, loaded = (
            self.private_key(
                f"identity.{side}_key", key_raw, f"identity.{side}_cert", chain, secret
            )
            if key_raw
            else (Path(), None)
        )
        return cert_path, key_path, chain, loaded

    def identity(self, data: Mapping[str, Any]) -> Identity | None:
        table = self.table(data, "identity", required=True)
        if table is None:
            return None
        self.unknown_keys(table, _IDENTITY_KEYS, "identity.")
        public_cert, public_key_path, public_chain, public_key = self.key_pair(table, "public")
        internal_cert, internal_key_path, internal_chain, internal_key = self.key_pair(
            table, "internal"
        )
        root_paths, roots = self.internal_roots(table)
        if (
            not public_chain
            or public_key is None
            or not internal_chain
            or internal_key is None
            or not roots
        ):
            return None
        secrets = tuple(
            self.base / str(table[k])
            for k in _IDENTITY_KEYS
            if k.endswith("passphrase_file")
            if isinstance(table.get(k), str)
        )
        return Identity(
            public_cert=public_cert,
            public_key=public_key_path,
            internal_cert=internal_cert,
            internal_key=internal_key_path,
            internal_roots=root_paths,
            public_chain=public_chain,
            public_private_key=public_key,
            internal_chain=internal_chain,
            internal_private_key=internal_key,
            internal_root_certs=roots,
            passphrase_files=secrets,
        )

    def internal_roots(
        self, table: Mapping[str, Any]
    ) -> tuple[tuple[Path, ...], tuple[x509.Certificate, ...]]:
        key = "identity.internal_roots"
        if "internal_roots" not in table:
            self.problem(key, "missing (required): the CA files that issue pool members' certs")
            return (), ()
        value = table["internal_roots"]
        if isinstance(value, str):
            value = [value]  # a single file is an obvious intent; accept it
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problem(key, f"must be a list of file names, not {_shown(value)}")
            return (), ()
        if not value:
            self.problem(key, "must name at least one CA file")
            return (), ()
        paths: list[Path] = []
        roots: list[x509.Certificate] = []
        for raw in value:
            path, data = self.file(key, raw)
            paths.append(path)
            if data is None:
                continue
            for cert in self.certificates(key, path, data):
                try:
                    is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
                except x509.ExtensionNotFound:
                    is_ca = False
                if not is_ca:
                    self.problem(
                        key,
                        f"{path}: {cert.subject.rfc4514_string()} is not a CA certificate",
                    )
                    continue
                roots.append(cert)
        return tuple(paths), tuple(roots)

    # --- listeners, pools, metrics, limits ----------------------------------------

    def address(self, table: Mapping[str, Any], where: str) -> tuple[str, int] | None:
        text = self.string(table, "address", where)
        if text is None:
            return None
        try:
            return parse_address(text)
        except ValueError as exc:
            self.problem(f"{where}address", str(exc))
            return None

    def listeners(self, data: Mapping[str, Any], pool_names: set[str]) -> tuple[Listener, ...]:
        result: list[Listener] = []
        seen_names: set[str] = set()
        seen_addresses: dict[tuple[str, int], str] = {}
        for index, table in enumerate(self.array_of_tables(data, "listeners")):
            where = f"listeners[{index}]."
            name = self.string(table, "name", where)
            if name is not None:
                if name in seen_names:
                    self.problem(f"{where}name", f"duplicate listener name {name!r}")
                seen_names.add(name)
                where = f"listeners[{index}] ({name})."
            self.unknown_keys(table, _LISTENER_KEYS, where)
            address = self.address(table, where)
            if address is not None:
                if address in seen_addresses:
                    self.problem(
                        f"{where}address",
                        f"same address as listener {seen_addresses[address]!r}",
                    )
                seen_addresses[address] = name or f"#{index}"
            mode = table.get("mode", "mtls")
            if mode not in ("mtls", "tls", "outbound"):
                self.problem(
                    f"{where}mode", f'must be "mtls", "tls" or "outbound", not {_shown(mode)}'
                )
                mode = None
            pools: tuple[str, ...] = ()
            pool: str | None = ""
            if mode == "outbound":
                pools = self.outbound_pools(table, where, pool_names)
            else:
                if "pools" in table:
                    self.problem(
                        f"{where}pools",
                        'only outbound listeners take pools = [...]; use pool = "NAME"',
                    )
                pool = self.string(table, "pool", where)
            if pool and pool not in pool_names:
                known = ", ".join(sorted(pool_names)) or "none defined"
                self.problem(f"{where}pool", f"no pool named {pool!r} ([[pools]]: {known})")
            policies: Path | None = None
            if mode in ("mtls", "outbound"):
                raw = self.string(table, "policies", where)
                if raw is None and "policies" not in table:
                    pass  # "missing (required)" already reported
                elif raw is not None:
                    policies = self.base / raw
                    if not policies.is_dir():
                        what = "does not exist" if not policies.exists() else "is not a folder"
                        self.problem(f"{where}policies", f"{policies}: policies folder {what}")
            elif mode == "tls" and "policies" in table:
                self.problem(
                    f"{where}policies",
                    'only mtls listeners use partner policies; remove it or set mode = "mtls"',
                )
            protocol = self.listener_protocol(table, where)
            if (
                name
                and address
                and mode
                and (pool or pools)
                and pool is not None
                and protocol
                and (mode == "tls" or policies)
            ):
                result.append(
                    Listener(
                        name=name,
                        host=address[0],
                        port=address[1],
                        mode="mtls" if mode == "mtls" else "tls" if mode == "tls" else "outbound",
                        policies=policies,
                        pool=pool,
                        pools=pools,
                        protocol=protocol,
                    )
                )
        return tuple(result)

    def outbound_pools(
        self, table: Mapping[str, Any], where: str, pool_names: set[str]
    ) -> tuple[str, ...]:
        """An outbound listener's `pools`: who may use it (their members' hosts)."""
        if "pool" in table:
            self.problem(
                f"{where}pool",
                "an outbound listener names who may use it with pools = [...], not pool",
            )
        raw = table.get("pools")
        if raw is None:
            self.problem(f"{where}pools", 'missing (required for mode = "outbound")')
            return ()
        if not isinstance(raw, list) or not raw or not all(isinstance(v, str) and v for v in raw):
            self.problem(
                f"{where}pools", f"must be a non-empty list of pool names, not {_shown(raw)}"
            )
            return ()
        known = ", ".join(sorted(pool_names)) or "none defined"
        for name in raw:
            if name not in pool_names:
                self.problem(f"{where}pools", f"no pool named {name!r} ([[pools]]: {known})")
        return tuple(dict.fromkeys(raw)) if all(n in pool_names for n in raw) else ()

    def outbound_identity(self, identity: Identity, listeners: tuple[Listener, ...]) -> None:
        """With an outbound listener the edge is a TLS server to the pool (internal_cert
        must allow serverAuth) and a TLS client to partners (public_cert: clientAuth)."""
        if not any(listener.mode == "outbound" for listener in listeners):
            return
        for key, chain, path, oid, label, why in (
            (
                "identity.internal_cert",
                identity.internal_chain,
                identity.internal_cert,
                ExtendedKeyUsageOID.SERVER_AUTH,
                "serverAuth",
                "pool members connect to the edge's outbound listener",
            ),
            (
                "identity.public_cert",
                identity.public_chain,
                identity.public_cert,
                ExtendedKeyUsageOID.CLIENT_AUTH,
                "clientAuth",
                "the edge connects to partners' edges with it",
            ),
        ):
            try:
                eku = chain[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                continue  # no EKU: any purpose (RFC 5280 4.2.1.12)
            except ValueError as exc:
                self.problem(key, f"{path}: malformed extensions: {exc}")
                continue
            if oid not in eku:
                self.problem(
                    key,
                    f"{path}: extended key usage does not include {label}, which an outbound "
                    f"listener needs ({why}); reissue it with {label} or without the extension",
                )

    def pools(self, data: Mapping[str, Any]) -> dict[str, Pool]:
        result: dict[str, Pool] = {}
        for index, table in enumerate(self.array_of_tables(data, "pools")):
            where = f"pools[{index}]."
            name = self.string(table, "name", where)
            if name is not None:
                if name in result:
                    self.problem(f"{where}name", f"duplicate pool name {name!r}")
                where = f"pools[{index}] ({name})."
            self.unknown_keys(table, _POOL_KEYS, where)
            dns_srv = self.string(table, "dns_srv", where, required=False)
            if dns_srv is not None and not _HOSTNAME.match(dns_srv):
                self.problem(
                    f"{where}dns_srv",
                    f"{dns_srv!r} is not a DNS name (e.g. _sipinternaltls._tcp.corp.example)",
                )
            members_raw = table.get("members")
            members: list[Member] = []
            if members_raw is None:
                if "dns_srv" not in table:
                    self.problem(f"{where}members", "missing (required unless dns_srv is set)")
                    continue
            elif "dns_srv" in table:
                self.problem(
                    f"{where}members",
                    "give either members or dns_srv, not both (SRV targets are the members)",
                )
            elif not isinstance(members_raw, list) or not all(
                isinstance(m, dict) for m in members_raw
            ):
                self.problem(
                    f"{where}members",
                    f"must be a list of {{ host = ..., port = ... }} tables, not "
                    f"{_shown(members_raw)}",
                )
                continue
            else:
                if not members_raw:
                    self.problem(f"{where}members", "must list at least one member")
                for m_index, member in enumerate(members_raw):
                    parsed = self.member(member, f"{where}members[{m_index}].")
                    if parsed is not None:
                        members.append(parsed)
            balance = table.get("balance", "least_connections")
            if balance not in ("least_connections", "round_robin"):
                self.problem(
                    f"{where}balance",
                    f'must be "least_connections" or "round_robin", not {_shown(balance)}',
                )
                balance = "least_connections"
            interval = table.get("health_interval_s", 5.0)
            if (
                not isinstance(interval, int | float)
                or isinstance(interval, bool)
                or not _MIN_HEALTH_INTERVAL_S <= interval <= 3600
            ):
                self.problem(
                    f"{where}health_interval_s",
                    f"must be a number of seconds from {_MIN_HEALTH_INTERVAL_S:g} to 3600, "
                    f"not {_shown(interval)}",
                )
                interval = 5.0
            thresholds: dict[str, int] = {}
            for key in ("unhealthy_after", "healthy_after"):
                thresholds[key] = self.bounded_int(table, key, where, 2, 1, _MAX_HEALTH_THRESHOLD)
            proxy = table.get("proxy_protocol")
            if proxy is not None and proxy != "v2":
                self.problem(
                    f"{where}proxy_protocol",
                    f'the only version is "v2" (or leave the key out), not {_shown(proxy)}',
                )
                proxy = None
            if name is not None and name not in result:
                result[name] = Pool(
                    name,
                    tuple(members),
                    dns_srv=dns_srv.rstrip(".") if dns_srv else None,
                    balance="round_robin" if balance == "round_robin" else "least_connections",
                    health_interval_s=float(interval),
                    unhealthy_after=thresholds["unhealthy_after"],
                    healthy_after=thresholds["healthy_after"],
                    proxy_protocol="v2" if proxy == "v2" else None,
                )
        return result

    def bounded_int(
        self, table: Mapping[str, Any], key: str, where: str, default: int, low: int, high: int
    ) -> int:
        value = table.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        self.problem(
            f"{where}{key}", f"must be an integer from {low} to {high}, not {_shown(value)}"
        )
        return default

    def member(self, table: Mapping[str, Any], where: str) -> Member | None:
        self.unknown_keys(table, _MEMBER_KEYS, where)
        host = self.string(table, "host", where)
        if host is not None and not _is_host(host):
            self.problem(f"{where}host", f"{host!r} is not a host name or IP address")
            host = None
        address = self.string(table, "address", where, required=False)
        if address is not None and not _is_host(address):
            self.problem(
                f"{where}address",
                f"{address!r} is not an IP address or host name (the port goes in 'port')",
            )
            address = None
        port = table.get("port")
        if port is None:
            self.problem(f"{where}port", "missing (required)")
        elif not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            self.problem(f"{where}port", f"must be an integer from 1 to 65535, not {_shown(port)}")
            port = None
        weight = self.bounded_int(table, "weight", where, 1, 1, _MAX_WEIGHT)
        max_connections: int | None = None
        if "max_connections" in table:
            max_connections = self.bounded_int(table, "max_connections", where, 1, 1, 10_000_000)
        if host is None or port is None or ("address" in table and address is None):
            return None
        return Member(
            host=host.rstrip("."),
            address=address,
            port=port,
            weight=weight,
            max_connections=max_connections,
        )

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
                "dns.nameservers", f'must be a list of "ip:port" strings, not {_shown(raw)}'
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
                f'must be "any_pool" or "all_pools", not {_shown(requires)}',
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
                        f"limits.{key}", f"must be a number > 0 and finite, not {_shown(value)}"
                    )
        for key in _INT_LIMITS:
            if key in table:
                value = table[key]
                if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                    values[key] = value
                else:
                    self.problem(f"limits.{key}", f"must be an integer >= 1, not {_shown(value)}")
        return Limits(**values)

    def policy_settings(self, data: Mapping[str, Any]) -> PolicySettings:
        table = self.table(data, "policies", required=False)
        if table is None:
            return PolicySettings()
        self.unknown_keys(table, _POLICY_SETTINGS_KEYS, "policies.")
        value = table.get("poll_interval_s", PolicySettings.poll_interval_s)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return PolicySettings(poll_interval_s=float(value))
        self.problem("policies.poll_interval_s", f"must be a number > 0, not {_shown(value)}")
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
                self.problem(f"revocation.{key}", f"must be true or false, not {_shown(flag)}")
        cache_dir = defaults.cache_dir
        raw = table.get("cache_dir")
        if raw is not None:
            if isinstance(raw, str) and raw:
                cache_dir = self.base / raw
            else:
                self.problem("revocation.cache_dir", f"must be a folder path, not {_shown(raw)}")
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
                    self.problem(f"revocation.{key}", f"must be a number > 0, not {_shown(value)}")
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

    # --- SIP listeners (docs/architecture.md, "SIP listeners") ------------------------

    def listener_protocol(
        self, table: Mapping[str, Any], where: str
    ) -> Literal["stream", "sip"] | None:
        protocol = table.get("protocol", "stream")
        if protocol not in ("stream", "sip"):
            self.problem(f"{where}protocol", f'must be "stream" or "sip", not {_shown(protocol)}')
            return None
        mode = table.get("mode", "mtls")
        if protocol == "sip" and mode == "tls":
            self.problem(
                f"{where}protocol",
                '"sip" checks each request against the partner\'s domains, so it needs '
                'mode = "mtls" (or "outbound"); a "tls" listener has no partner',
            )
            return None
        if protocol == "sip" and mode == "outbound":
            self.sip_outbound.append(where.rstrip("."))
        return "sip" if protocol == "sip" else "stream"

    def sip_settings(self, data: Mapping[str, Any]) -> SipSettings:
        table = self.table(data, "sip", required=False) or {}
        self.unknown_keys(table, _SIP_KEYS, "sip.")
        size = self.bounded_int(table, "max_message_bytes", "sip.", 65535, 1024, 16 * 1024 * 1024)
        headers = self.bounded_int(table, "max_headers", "sip.", 200, 10, 10000)
        domains: list[str] = []
        raw = table.get("domains", [])
        if not isinstance(raw, list) or not all(isinstance(d, str) for d in raw):
            self.problem("sip.domains", f"must be a list of domain names, not {_shown(raw)}")
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
        self.problem("tls.profile", f'must be "intermediate" or "modern", not {_shown(profile)}')
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


def _shown(value: object) -> str:
    """A short description of a wrong value for an error message."""
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text}" if len(text) <= 40 else kind


def is_ip_address(text: str) -> bool:
    """An IPv4 or IPv6 literal (without brackets or port)? The one IP check."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_error(host: str, port: int, what: str, exc: OSError) -> str:
    """The message for a failed bind: the address, what it is for, and the OS's reason.

    ``what``: ``listener NAME`` or ``metrics``. E.g. "cannot listen on
    0.0.0.0:5061 (listener federation): Address already in use".
    """
    return f"cannot listen on {_host_port(host, port)} ({what}): {exc.strerror or exc}"


def key_file_warnings(identity: Identity | None) -> list[str]:
    """Private key (and passphrase) files that other users can read, or a group write."""
    if identity is None:
        return []
    files = dict.fromkeys([identity.public_key, identity.internal_key, *identity.passphrase_files])
    out = []
    for path in files:
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            continue  # already reported when it was read
        # Group read is allowed (a Kubernetes fsGroup, a dedicated group);
        # anyone else reading, or a group writing, is not.
        if mode & 0o027:
            out.append(
                f"{path}: private key file is open to other users (mode {mode:04o}); "
                "run chmod 600 (or 640 with a group only the edge is in)"
            )
    return out


def _is_host(text: str) -> bool:
    return is_ip_address(text) or bool(_HOSTNAME.match(text))


def load_config(path: Path) -> Config:
    """Load and validate `path`; raise ConfigError listing every problem found."""
    return _Loader(path).load()
