"""Where the edge listens and whom it reaches: `[[listeners]]` and `[[pools]]`.

Owns `Listener`, `Member`, `Pool` and `TopologyReader`, which reads the
listeners (addresses, modes, policies folders, protocols; an outbound
listener's pools and the identity it needs) and the pools (listed members or
DNS SRV, balancing, health checks, PROXY protocol) with every cross-reference
between them checked. `edge.core.config` re-exports all of it.

Must never: open a socket or resolve a name (addresses are only parsed), or
accept a value the schema (`edge.core.schema`) does not document.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge.core import schema
from edge.core.identity import Identity
from edge.core.toml_tables import HOSTNAME, TableReader, is_host, parse_address, shown

__all__ = [
    "LISTENER_KEYS",
    "MEMBER_KEYS",
    "POOL_KEYS",
    "Balance",
    "Listener",
    "Member",
    "Pool",
    "TopologyReader",
]

LISTENER_KEYS = schema.key_names("listeners")
POOL_KEYS = schema.key_names("pools")
MEMBER_KEYS = schema.key_names("pools.members")
# Bounds that keep a typo from becoming an outage or a busy loop.
_MAX_WEIGHT = 1000
_MIN_HEALTH_INTERVAL_S = 0.1
_MAX_HEALTH_THRESHOLD = 100


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


class TopologyReader(TableReader):
    """Reads `[[listeners]]` and `[[pools]]` (a part of the configuration loader)."""

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
            self.unknown_keys(table, LISTENER_KEYS, where)
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
                    f"{where}mode", f'must be "mtls", "tls" or "outbound", not {shown(mode)}'
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

    def listener_protocol(
        self, table: Mapping[str, Any], where: str
    ) -> Literal["stream", "sip"] | None:
        protocol = table.get("protocol", "stream")
        if protocol not in ("stream", "sip"):
            self.problem(f"{where}protocol", f'must be "stream" or "sip", not {shown(protocol)}')
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
                f"{where}pools", f"must be a non-empty list of pool names, not {shown(raw)}"
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
            self.unknown_keys(table, POOL_KEYS, where)
            dns_srv = self.string(table, "dns_srv", where, required=False)
            if dns_srv is not None and not HOSTNAME.match(dns_srv):
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
                    f"{shown(members_raw)}",
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
                    f'must be "least_connections" or "round_robin", not {shown(balance)}',
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
                    f"not {shown(interval)}",
                )
                interval = 5.0
            thresholds: dict[str, int] = {}
            for key in ("unhealthy_after", "healthy_after"):
                thresholds[key] = self.bounded_int(table, key, where, 2, 1, _MAX_HEALTH_THRESHOLD)
            proxy = table.get("proxy_protocol")
            if proxy is not None and proxy != "v2":
                self.problem(
                    f"{where}proxy_protocol",
                    f'the only version is "v2" (or leave the key out), not {shown(proxy)}',
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

    def member(self, table: Mapping[str, Any], where: str) -> Member | None:
        self.unknown_keys(table, MEMBER_KEYS, where)
        host = self.string(table, "host", where)
        if host is not None and not is_host(host):
            self.problem(f"{where}host", f"{host!r} is not a host name or IP address")
            host = None
        address = self.string(table, "address", where, required=False)
        if address is not None and not is_host(address):
            self.problem(
                f"{where}address",
                f"{address!r} is not an IP address or host name (the port goes in 'port')",
            )
            address = None
        port = table.get("port")
        if port is None:
            self.problem(f"{where}port", "missing (required)")
        elif not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            self.problem(f"{where}port", f"must be an integer from 1 to 65535, not {shown(port)}")
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
