"""The configuration schema as data: every `edge.toml` and `policy.toml` key.

Owns: the list of tables and keys an operator may write, with each key's type,
default, allowed values, whether a running gateway applies a change live or
needs a restart, and a one-line meaning. The loader (`edge.core.config`) takes
its known-key tuples from here, so a key cannot be accepted without being
described, and `python -m edge.docs` renders the configuration reference and
the commented example file from the same data.

Must never: validate a file itself (that is `edge.core.config` and
`edge.core.policies`), import anything outside the standard library, or hold a
default that disagrees with the loader's (tests/test_docs.py compares them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "EDGE_TOML",
    "KEYS",
    "POLICY_TOML",
    "TABLES",
    "Apply",
    "ConfigFile",
    "Key",
    "Table",
    "key_names",
    "keys_of",
    "table",
    "top_tables",
]

EDGE_TOML: Final = "edge.toml"
POLICY_TOML: Final = "policy.toml"

# "live": a running gateway applies a change at its next reload (poll or SIGHUP);
# "restart": the reload reports the change in `config_reloaded.needs_restart`
# (or ignores it) and the old value stays until the process restarts.
Apply = Literal["live", "restart"]
ConfigFile = Literal["edge.toml", "policy.toml"]


@dataclass(frozen=True)
class Table:
    """One TOML table (or array of tables, or inline-table list) of a file."""

    file: ConfigFile
    name: str  # dotted path; "" is the top level of policy.toml
    header: str  # how it is written: "[limits]", "[[pools]]", "members = [{...}]"
    required: bool
    apply: Apply
    meaning: str


@dataclass(frozen=True)
class Key:
    """One key: `default` None with `required` False means "absent" has a meaning
    given by `default_text`; `example` is what the generated example file shows
    for a key that has no default."""

    file: ConfigFile
    table: str
    name: str
    type: Literal[
        "string", "integer", "number", "boolean", "path", "list of paths", "list of strings",
        "address", "list of tables", "PEM text",
    ]  # fmt: skip
    meaning: str
    apply: Apply
    required: bool = False
    default: object = None
    default_text: str = ""
    allowed: str = ""
    example: object = None
    only_in: str = ""  # e.g. "single-file partners"


def _t(
    file: ConfigFile, name: str, header: str, required: bool, apply: Apply, meaning: str
) -> Table:
    return Table(file, name, header, required, apply, meaning)


TABLES: tuple[Table, ...] = (
    _t(EDGE_TOML, "identity", "[identity]", True, "live",
       "The edge's own certificates: the public one shown to partners, the internal one "
       "shown to pool members, and the CAs that issue pool members' certificates."),
    _t(EDGE_TOML, "listeners", "[[listeners]]", True, "restart",
       "Where partners (mtls) or clients (tls) connect, and which pool they reach. "
       "At least one."),
    _t(EDGE_TOML, "pools", "[[pools]]", True, "restart",
       "A set of internal servers, listed (`members`) or discovered (`dns_srv`). At least one."),
    _t(EDGE_TOML, "pools.members", "members = [{ ... }]", False, "restart",
       "One internal server of a pool, as an inline table in the pool's `members` list."),
    _t(EDGE_TOML, "metrics", "[metrics]", False, "restart",
       "The HTTP endpoint serving /metrics, /healthz and /readyz. Absent: no endpoint."),
    _t(EDGE_TOML, "limits", "[limits]", False, "live",
       "Every bound the gateway enforces; over a limit a connection is refused at once "
       "with `over_limit` (nothing is queued)."),
    _t(EDGE_TOML, "policies", "[policies]", False, "live",
       "How the running gateway notices changes to partner folders, this file and the "
       "identity files."),
    _t(EDGE_TOML, "dns", "[dns]", False, "restart",
       "Where the edge sends its DNS queries for pool members and SRV discovery."),
    _t(EDGE_TOML, "revocation", "[revocation]", False, "live",
       "Fetching partners' CRLs from the distribution points named in their certificates."),
    _t(EDGE_TOML, "sip", "[sip]", False, "restart",
       "Bounds and our own domains for listeners with protocol = \"sip\"."),
    _t(EDGE_TOML, "tls", "[tls]", False, "restart",
       "The TLS profile of every listener and every connection the edge makes."),
    _t(POLICY_TOML, "", "policy.toml", False, "live",
       "A partner's settings, in `PARTNER/policy.toml` or at the top of a single-file "
       "partner `PARTNER.toml`. Every key is optional."),
)  # fmt: skip

_E: ConfigFile = EDGE_TOML
_P: ConfigFile = POLICY_TOML

KEYS: tuple[Key, ...] = (
    # --- [identity] (the loader relies on this order: the four files, then the roots)
    Key(_E, "identity", "public_cert", "path", apply="live",
        default_text="required unless public_pkcs12 is given",
        example="certs/edge-public.pem",
        allowed="PEM (several certificates) or DER (one); leaf first, then its issuers",
        meaning="Certificate chain shown to partners (the public, externally trusted "
        "certificate); new handshakes use a new file."),
    Key(_E, "identity", "public_key", "path", apply="live",
        default_text="required with public_cert",
        example="certs/edge-public.key",
        allowed="unencrypted PKCS#8/traditional PEM or DER; must match public_cert",
        meaning="Private key of public_cert; a key that does not match keeps the old pair."),
    Key(_E, "identity", "internal_cert", "path", apply="live",
        default_text="required unless internal_pkcs12 is given",
        example="certs/edge-internal.pem",
        allowed="PEM or DER; leaf first, then its issuers",
        meaning="Certificate chain shown to pool members (issued by the enterprise CA)."),
    Key(_E, "identity", "internal_key", "path", apply="live",
        default_text="required with internal_cert",
        example="certs/edge-internal.key",
        allowed="unencrypted PEM or DER; must match internal_cert",
        meaning="Private key of internal_cert."),
    Key(_E, "identity", "public_key_passphrase_file", "path", apply="live",
        default_text="the key is not encrypted",
        allowed="a file readable only by the edge; its content (one line) is the passphrase",
        meaning="Passphrase of an encrypted public_key; never logged."),
    Key(_E, "identity", "public_pkcs12", "path", apply="live",
        default_text="use public_cert + public_key",
        allowed="a PKCS#12 file (.pfx/.p12) holding the key, the leaf and its issuers; "
        "not together with public_cert/public_key",
        meaning="The public identity (shown to partners) as Windows and Lync admins export it."),
    Key(_E, "identity", "public_pkcs12_passphrase_file", "path", apply="live",
        default_text="the PKCS#12 file has no passphrase",
        allowed="a file readable only by the edge; its content (one line) is the passphrase",
        meaning="Passphrase of public_pkcs12; never logged."),
    Key(_E, "identity", "internal_key_passphrase_file", "path", apply="live",
        default_text="the key is not encrypted",
        allowed="a file readable only by the edge; its content (one line) is the passphrase",
        meaning="Passphrase of an encrypted internal_key; never logged."),
    Key(_E, "identity", "internal_pkcs12", "path", apply="live",
        default_text="use internal_cert + internal_key",
        allowed="a PKCS#12 file (.pfx/.p12) holding the key, the leaf and its issuers; "
        "not together with internal_cert/internal_key",
        meaning="The internal identity (shown to pool members) as Windows and Lync admins "
        "export it."),
    Key(_E, "identity", "internal_pkcs12_passphrase_file", "path", apply="live",
        default_text="the PKCS#12 file has no passphrase",
        allowed="a file readable only by the edge; its content (one line) is the passphrase",
        meaning="Passphrase of internal_pkcs12; never logged."),
    Key(_E, "identity", "internal_roots", "list of paths", required=True, apply="live",
        example=["certs/enterprise-root.pem"],
        allowed="at least one file of CA certificates (a single string is accepted)",
        meaning="CAs that issue pool members' certificates; a member must chain to one and "
        "name its topology host."),
    # --- [[listeners]]
    Key(_E, "listeners", "name", "string", required=True, apply="restart",
        example="federation", allowed="unique among listeners",
        meaning="The listener's name, used in logs and the `listener` metrics label."),
    Key(_E, "listeners", "address", "address", required=True, apply="restart",
        example="0.0.0.0:5061",
        allowed='"host:port" or "[v6]:port"; port 0 lets the kernel pick (logged in '
        "gateway_started)",
        meaning="Where to listen; unique among listeners."),
    Key(_E, "listeners", "mode", "string", default="mtls", apply="restart",
        allowed='"mtls", "tls", "outbound"',
        meaning="mtls: partners must present a certificate trusted through their own folder; "
        "tls: server authentication only; outbound: pool members connect here (MTLS with "
        "internal_cert) to reach a partner named by the SNI they send."),
    Key(_E, "listeners", "policies", "path", apply="restart", example="federation_policies",
        default_text="required for mtls; not allowed for tls",
        allowed="an existing folder (one partner per sub-folder or ID.toml file)",
        meaning="The partner policies folder; its content is reloaded live, the key itself "
        "needs a restart."),
    Key(_E, "listeners", "pool", "string", required=True, apply="restart", example="frontend",
        allowed="the name of a [[pools]] entry",
        meaning="Default pool for this listener's connections (a partner's policy.toml may "
        "name another)."),
    Key(_E, "listeners", "pools", "list of strings", apply="restart",
        default_text="required for outbound; not allowed otherwise",
        allowed="names of [[pools]] entries",
        meaning="Outbound listeners: the pools whose listed members (their topology `host` on "
        "the member's certificate) may use this listener; anyone else is `not_in_topology`."),
    Key(_E, "listeners", "protocol", "string", default="stream", apply="restart",
        allowed='"stream", "sip" (sip: mtls or outbound listeners only)',
        meaning="stream relays opaque bytes; sip frames every SIP message and lets a partner "
        "speak only for its own domains (a forged From or P-Asserted-Identity is answered "
        "403 by the edge and never reaches the pool)."),
    # --- [[pools]]
    Key(_E, "pools", "name", "string", required=True, apply="restart", example="frontend",
        allowed="unique among pools",
        meaning="The pool's name, used by listeners, policy.toml and the `pool` metrics label."),
    Key(_E, "pools", "members", "list of tables", apply="restart",
        example=[{"host": "fe1.corp.example", "address": "10.0.0.11", "port": 5061}],
        default_text="required unless dns_srv is set",
        allowed="at least one member table; not together with dns_srv",
        meaning="The pool's servers (see members below)."),
    Key(_E, "pools", "dns_srv", "string", apply="restart",
        default_text="none (use members)", allowed="an RFC 2782 SRV name",
        example="_sipinternaltls._tcp.corp.example",
        meaning="Discover the members from this SRV record (targets, ports, priorities, "
        "weights), re-queried when its TTL runs out."),
    Key(_E, "pools", "balance", "string", default="least_connections", apply="restart",
        allowed='"least_connections", "round_robin"',
        meaning="How a member is chosen: weighted least connections, or weighted round robin."),
    Key(_E, "pools", "health_interval_s", "number", default=5.0, apply="restart",
        allowed="0.1 to 3600",
        meaning="Seconds between active health checks (TCP connect plus full MTLS handshake) "
        "of every member."),
    Key(_E, "pools", "unhealthy_after", "integer", default=2, apply="restart",
        allowed="1 to 100",
        meaning="Consecutive failures (checks or real connections) that take a member out of "
        "rotation."),
    Key(_E, "pools", "healthy_after", "integer", default=2, apply="restart",
        allowed="1 to 100",
        meaning="Consecutive successes that bring a member back into rotation."),
    Key(_E, "pools", "proxy_protocol", "string", apply="restart",
        default_text="none", allowed='"v2"', example="v2",
        meaning="Send a PROXY protocol v2 header (partner address, SNI, partner id) before the "
        "TLS handshake to each member."),
    # --- members = [{ ... }]
    Key(_E, "pools.members", "host", "string", required=True, apply="restart",
        example="fe1.corp.example", allowed="a host name or IP address",
        meaning="The member's topology name: verified on its certificate and sent as SNI."),
    Key(_E, "pools.members", "address", "string", apply="restart",
        default_text="resolve host", allowed="an IP address or host name (no port)",
        meaning="Where to dial; a name is resolved (A/AAAA). Trust never depends on it."),
    Key(_E, "pools.members", "port", "integer", required=True, apply="restart", example=5061,
        allowed="1 to 65535", meaning="The member's TLS port."),
    Key(_E, "pools.members", "weight", "integer", default=1, apply="restart",
        allowed="1 to 1000",
        meaning="The member's share of new connections relative to the pool's other members."),
    Key(_E, "pools.members", "max_connections", "integer", apply="restart",
        default_text="no limit", allowed="1 to 10000000",
        meaning="Most relayed connections to this member at once; a full member is skipped."),
    # --- [metrics]
    Key(_E, "metrics", "address", "address", required=True, apply="restart",
        example="127.0.0.1:9464",
        allowed='"host:port" or "[v6]:port"; port 0 lets the kernel pick',
        meaning="Where /metrics, /healthz and /readyz are served (required when [metrics] is "
        "present)."),
    Key(_E, "metrics", "ready_requires", "string", default="any_pool", apply="restart",
        allowed='"any_pool", "all_pools"',
        meaning="/readyz answers 200 while the gateway serves and at least one pool (any_pool) "
        "or every pool (all_pools) has a member up."),
    # --- [limits] (the loader reads the numbers, then the integers, in this order)
    Key(_E, "limits", "handshake_timeout_s", "number", default=10.0, apply="live",
        allowed="> 0",
        meaning="Accept to authorized (TLS handshake plus verdict), else `handshake_timeout`; "
        "also bounds each upstream connect and handshake."),
    Key(_E, "limits", "idle_timeout_s", "number", default=1800.0, apply="live", allowed="> 0",
        meaning="A relayed connection with no byte either way for this long is closed."),
    Key(_E, "limits", "drain_timeout_s", "number", default=30.0, apply="live", allowed="> 0",
        meaning="On SIGTERM/SIGINT: stop accepting, let connections finish for this long, "
        "then close them."),
    Key(_E, "limits", "new_connections_per_source_per_s", "number", default=100.0,
        apply="live", allowed="> 0",
        meaning="Token-bucket refill rate of new connections per source (client IP, IPv6 /64)."),
    Key(_E, "limits", "max_connections", "integer", default=10000, apply="live",
        allowed=">= 1",
        meaning="All open connections, handshaking ones included; more are refused at accept."),
    Key(_E, "limits", "max_connections_per_partner", "integer", default=1000, apply="live",
        allowed=">= 1",
        meaning="Relayed connections per authorized partner (policy.toml max_connections can "
        "lower it)."),
    Key(_E, "limits", "max_connections_per_source", "integer", default=1000, apply="live",
        allowed=">= 1",
        meaning="Open connections per client IP (per /64 for IPv6), counted from accept."),
    Key(_E, "limits", "max_handshakes_in_progress", "integer", default=2000, apply="live",
        allowed=">= 1",
        meaning="Connections accepted but not yet authorized; more are refused at once."),
    Key(_E, "limits", "max_outbound_connections_per_partner", "integer", default=1000,
        apply="live", allowed=">= 1",
        meaning="Outbound connections (dialling or relaying) to one partner; `over_limit` "
        "beyond."),
    Key(_E, "limits", "new_connections_per_source_burst", "integer", default=200,
        apply="live", allowed=">= 1",
        meaning="Token-bucket size of new connections per source; an empty bucket refuses."),
    # --- [policies]
    Key(_E, "policies", "poll_interval_s", "number", default=2.0, apply="live", allowed="> 0",
        meaning="How often partner folders, edge.toml and the identity files are compared with "
        "what was loaded; SIGHUP reloads at once."),
    # --- [dns]
    Key(_E, "dns", "nameservers", "list of strings", default=[], apply="restart",
        default_text="the system's (/etc/resolv.conf)",
        allowed='"ip:port" strings, IPv6 as "[v6]:port"',
        meaning="DNS servers for every pool lookup (UDP, TCP on truncation)."),
    # --- [revocation]
    Key(_E, "revocation", "fetch", "boolean", default=False, apply="live",
        meaning="Fetch the http:// CRL distribution points of partners' certificates in the "
        "background; off: only CRLs dropped into partner folders count."),
    Key(_E, "revocation", "cache_dir", "path", default="crl-cache", apply="live",
        allowed="a writable folder (relative to edge.toml)",
        meaning="Fetched CRLs are kept here, one folder per partner, and reloaded after a "
        "restart."),
    Key(_E, "revocation", "refresh_interval_s", "number", default=3600.0, apply="live",
        allowed="> 0",
        meaning="Refetch at least this often, and before each CRL's next update."),
    Key(_E, "revocation", "timeout_s", "number", default=10.0, apply="live", allowed="> 0",
        meaning="One fetch's total deadline, from name resolution to the last byte."),
    Key(_E, "revocation", "allow_private_networks", "boolean", default=False, apply="live",
        meaning="Allow CRL fetches to private, loopback and link-local addresses (checked "
        "after resolution). Off: a partner CA cannot make the edge fetch internal URLs."),
    Key(_E, "revocation", "min_rebuild_interval_s", "number", default=30.0, apply="live",
        allowed="> 0",
        meaning="Fetched CRLs rebuild the verifiers and re-check live connections at most once "
        "per interval, and no CRL is refetched sooner."),
    # --- [sip]
    Key(_E, "sip", "max_message_bytes", "integer", default=65535, apply="restart",
        allowed="1024 to 16777216",
        meaning="Largest SIP message (head and body); larger is answered 413/513 and the "
        "connection closed (`sip_too_large`)."),
    Key(_E, "sip", "max_headers", "integer", default=200, apply="restart",
        allowed="10 to 10000",
        meaning="Most header lines in one SIP message; more is answered 513 (`sip_too_large`)."),
    Key(_E, "sip", "domains", "list of strings", default=[], apply="restart",
        default_text="none (required when an outbound listener has protocol = \"sip\")",
        allowed="domain names of at least two labels",
        meaning="Our own SIP domains: requests from the pool through an outbound SIP listener "
        "must come From (and P-Asserted-Identity) inside them."),
    # --- [tls]
    Key(_E, "tls", "profile", "string", default="intermediate", apply="restart",
        allowed='"intermediate", "modern"',
        meaning="Mozilla's server-side TLS profile: intermediate allows TLS 1.2 (ECDHE with "
        "AEAD suites) and 1.3; modern is TLS 1.3 only."),
    # --- policy.toml (and single-file partners)
    Key(_P, "", "domains", "list of strings", apply="live",
        default_text="[folder name] (when it is a domain)",
        allowed="domain names of at least two labels, no wildcards",
        meaning="Names the partner's certificates may carry: each name or anything under it."),
    Key(_P, "", "enabled", "boolean", default=True, apply="live",
        meaning="false refuses the partner with `partner_disabled` and closes its live "
        "connections."),
    Key(_P, "", "pool", "string", apply="live", default_text="the listener's pool",
        allowed="the name of a [[pools]] entry",
        meaning="The pool this partner's connections are relayed to."),
    Key(_P, "", "max_connections", "integer", apply="live",
        default_text="[limits] max_connections_per_partner", allowed=">= 1",
        meaning="Concurrent relayed connections of this partner; `over_limit` beyond."),
    Key(_P, "", "revocation", "string", default="crl-if-present", apply="live",
        allowed='"crl-if-present", "require-crl", "off"',
        meaning="How the partner's CRLs are used: check when present (a stale one fails "
        "closed), require a current one for every issuer, or never."),
    Key(_P, "", "edge", "string", apply="live", default_text="DNS SRV "
        "_sipfederationtls._tcp.<domain>", allowed='"host:port" (a host name or IP)',
        meaning="Outbound: where the partner's edge is dialled (like Lync's ProxyFqdn); the "
        "partner's server certificate must name this host."),
    Key(_P, "", "roots", "PEM text", apply="live", only_in="single-file partners (ID.toml)",
        default_text="required in ID.toml",
        meaning="The partner's CA certificates, PEM, as a multi-line string."),
    Key(_P, "", "crls", "PEM text", apply="live", only_in="single-file partners (ID.toml)",
        default_text="none", meaning="The partner's CRLs, PEM, as a multi-line string."),
)  # fmt: skip


def table(name: str, file: ConfigFile = EDGE_TOML) -> Table:
    """The table called `name` of `file`; KeyError if there is none."""
    for t in TABLES:
        if t.file == file and t.name == name:
            return t
    raise KeyError(f"{file}: no table {name!r}")


def keys_of(table_name: str, file: ConfigFile = EDGE_TOML) -> tuple[Key, ...]:
    """The keys of one table, in schema order."""
    return tuple(k for k in KEYS if k.file == file and k.table == table_name)


def key_names(
    table_name: str, file: ConfigFile = EDGE_TOML, *, type: str | None = None
) -> tuple[str, ...]:
    """Key names of one table (optionally only those of one type), in schema order."""
    return tuple(k.name for k in keys_of(table_name, file) if type is None or k.type == type)


def top_tables() -> tuple[str, ...]:
    """The top-level tables of edge.toml, in schema order."""
    return tuple(t.name for t in TABLES if t.file == EDGE_TOML and "." not in t.name)
