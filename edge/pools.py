"""Pools: which member gets the next connection, and which members are alive.

Owns the life of the internal pools: their members (listed, or discovered
through DNS SRV), the addresses members are dialled at (A/AAAA), the health
of each member (active checks and what real traffic reveals), the choice of a
member for each partner connection, and the dial itself (TCP, optional PROXY
v2 header, MTLS handshake verified against the internal roots and the
member's topology host).

Must never: let DNS decide trust (a DNS answer only says where to dial; the
member's certificate must still name its topology host, which for SRV is the
target name), relay a partner byte to a member whose handshake did not verify,
or run an unbounded loop (every wait is a TTL or an interval, every lookup
and dial has a deadline, every retry is counted).

General theory of operation
===========================

Two layers, as in the rest of the gateway. The *decisions* are pure and live
in ``edge.core.balance`` (the health machine ``observe``, the balancer
``choose``/``advance`` and ``refresh_delay``; the theory of the balancer is
there); the DNS queries themselves are ``edge.dnslookup``. This module is the
shell: ``PoolSet`` holds the mutable per-member state and does the I/O on
trio: one task per pool refreshes DNS when the shortest TTL expires (keeping
the last good answer on failure, logging ``dns_error`` and counting
``edge_dns_failures_total``), one task per pool checks every member each
``health_interval_s`` with a full MTLS handshake (and a PROXY v2 LOCAL header
when the pool speaks PROXY), and ``connect`` dials members one after another
until one verifies, at most ``MAX_ATTEMPTS`` per partner connection. Every
dial reads the current snapshot (``handshake_timeout_s``, ``[dns]``, the
``ServerTrust`` that decides on the member's chain). When no member in
rotation is left, ``connect`` still tries the members that are out of
rotation (a check may be a few seconds stale; refusing a partner while a
member works is worse than one failed dial), so ``no_upstream`` means every
member was tried in this very connection and failed.

Counting: a member's ``active`` count is taken before the dial (so two
concurrent connections cannot both squeeze under ``max_connections``) and
given back by the ``Lease`` the caller holds for the life of the relay.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from cryptography import x509
from OpenSSL import SSL
from prometheus_client import CollectorRegistry, Counter

from edge.core.balance import Candidate, Health, advance, choose, observe, refresh_delay
from edge.core.config import Pool, is_ip_address
from edge.core.proxy_protocol import (
    ProxyInfo,
    authorized_identity,
    encode_local,
    encode_v2,
    host_name_or_none,
)
from edge.core.reasons import Reason
from edge.core.snapshot import Snapshot
from edge.core.trust import Verdict
from edge.dnslookup import DnsLookups, LookupFailed
from edge.logs import EventLog
from edge.metrics import Metrics
from edge.tls import HostnameMismatchError, TLSError, TLSStream

__all__ = [
    "MAX_ATTEMPTS",
    "Lease",
    "PoolSet",
    "UpstreamUnavailable",
    "proxy_info",
]

# Most members one partner connection may try before it is refused.
MAX_ATTEMPTS = 8
# After a failed lookup: first retry, doubling up to the longest.
_RETRY_MIN_S = 1.0
_RETRY_MAX_S = 30.0
# Longest a health check spends closing its connection politely.
_CHECK_CLOSE_S = 1.0


class UpstreamUnavailable(Exception):
    """No member could be used; ``reason`` is no_upstream or upstream_untrusted."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _DialFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(eq=False)
class _Member:
    host: str  # verified on the certificate, sent as SNI, the metrics label
    port: int
    dial: str  # what to resolve or dial: the configured address, else host
    weight: int
    priority: int = 0
    max_connections: int | None = None
    addresses: tuple[str, ...] = ()
    health: Health = field(default_factory=Health)
    active: int = 0
    passes: float = 0.0
    present: bool = True  # still in the pool (False once DNS dropped it)

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)

    def candidate(self) -> Candidate:
        return Candidate(
            key=self.key,
            weight=self.weight,
            active=self.active,
            up=self.health.up,
            routable=bool(self.addresses),
            priority=self.priority,
            max_connections=self.max_connections,
            passes=self.passes,
        )


class Lease:
    """One relayed connection's hold on a member's ``active`` count."""

    def __init__(self, member: _Member) -> None:
        self._member: _Member | None = member
        self.host = member.host
        self.port = member.port

    def release(self) -> None:
        if self._member is not None:
            self._member.active -= 1
            self._member = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(eq=False)
class _PoolState:
    pool: Pool
    members: dict[tuple[str, int], _Member] = field(default_factory=dict)

    def needs_dns(self) -> bool:
        return self.pool.dns_srv is not None or any(
            not is_ip_address(m.dial) for m in self.members.values()
        )

    def lowest_pass(self) -> float:
        return min((m.passes for m in self.members.values()), default=0.0)


_dns_failure_counters: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = (
    weakref.WeakKeyDictionary()
)


def _dns_failures(registry: CollectorRegistry) -> Counter:
    counter = _dns_failure_counters.get(registry)
    if counter is None:
        counter = Counter(
            "edge_dns_failures_total",
            "Failed DNS lookups for pool discovery (the last good answer is kept)",
            ["pool"],
            registry=registry,
        )
        _dns_failure_counters[registry] = counter
    return counter


class PoolSet:
    """Every pool of one configuration, alive: run ``run`` in a nursery."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        client_context: Callable[[], SSL.Context],
        metrics: Metrics,
        log: EventLog,
    ) -> None:
        # The gateway's current snapshot, read at each use (never a copy taken
        # here): a reloaded handshake_timeout_s or [dns] applies to the next dial.
        self._snapshot = snapshot
        self._client_context = client_context
        self._metrics = metrics
        self._log = log
        self._dns_failures = _dns_failures(metrics.registry)
        self._dns = DnsLookups(lambda: snapshot().config.dns)
        self._pools: dict[str, _PoolState] = {}
        # The pools themselves are bound at start ([[pools]] changes need a restart).
        for pool in snapshot().config.pools.values():
            state = _PoolState(pool)
            for m in pool.members:
                dial = m.address or m.host
                member = _Member(
                    host=m.host,
                    port=m.port,
                    dial=dial,
                    weight=m.weight,
                    max_connections=m.max_connections,
                    addresses=(dial,) if is_ip_address(dial) else (),
                )
                state.members[member.key] = member
                self._export(state, member)
            self._pools[pool.name] = state

    # ------------------------------------------------------------------
    # What the gateway asks

    def readiness(self) -> tuple[bool, str]:
        """Ready when every pool has a member in rotation with an address."""
        for name, up in self.pools_up().items():
            if not up:
                return False, f"pool {name} has no member up"
        return True, "ready"

    def pools_up(self) -> dict[str, bool]:
        """Pool name -> whether a member is in rotation with an address (/readyz)."""
        return {
            name: any(m.health.up and m.addresses for m in state.members.values())
            for name, state in self._pools.items()
        }

    def members(self, pool: str) -> dict[tuple[str, int], dict[str, Any]]:
        """A read-only view of a pool's members (tests, diagnostics)."""
        return {
            key: {
                "up": m.health.up,
                "active": m.active,
                "addresses": m.addresses,
                "weight": m.weight,
                "priority": m.priority,
            }
            for key, m in self._pools[pool].members.items()
        }

    async def connect(self, pool_name: str, info: ProxyInfo | None) -> tuple[TLSStream, Lease]:
        """A verified MTLS stream to one member of ``pool_name``, and its lease.

        ``info`` is what the PROXY v2 header tells the member (pools with
        ``proxy_protocol = "v2"``). Raises ``UpstreamUnavailable``.
        """
        state = self._pools[pool_name]
        pool = state.pool
        tried: list[Hashable] = []
        failures: list[str] = []
        untrusted = False
        for _ in range(MAX_ATTEMPTS):
            candidates = [m.candidate() for m in state.members.values()]
            chosen = choose(candidates, pool.balance, tried) or choose(
                candidates, pool.balance, tried, down=True
            )
            if chosen is None:
                break
            member = state.members[chosen.key]  # type: ignore[index]
            tried.append(chosen.key)
            member.passes = advance(chosen)
            member.active += 1
            t0 = trio.current_time()
            try:
                stream = await self._dial(pool, member, info, traffic=True)
            except _DialFailed as exc:
                member.active -= 1
                untrusted = untrusted or exc.reason == Reason.UPSTREAM_UNTRUSTED.value
                failures.append(f"{member.host}: {exc.reason}: {exc.detail}")
                self._metrics.upstream_errors.labels(pool.name, member.host, exc.reason).inc()
                self._log.event(
                    "upstream_error",
                    pool=pool.name,
                    member=member.host,
                    reason=exc.reason,
                    detail=exc.detail,
                )
                self._observe(state, member, False, exc.reason, exc.detail)
                continue
            except BaseException:
                member.active -= 1
                raise
            self._metrics.upstream_connect_duration.labels(pool.name).observe(
                trio.current_time() - t0
            )
            self._observe(state, member, True)
            return stream, Lease(member)
        code = Reason.UPSTREAM_UNTRUSTED if untrusted else Reason.NO_UPSTREAM
        if failures:
            summary = "; ".join(failures)
        elif not state.members:
            summary = "no members (DNS has not named any yet)"
        elif not any(m.addresses for m in state.members.values()):
            summary = "no member address resolved yet"
        else:
            summary = "every member is at its max_connections"
        raise UpstreamUnavailable(code, f"no member of pool {pool.name} could be used: {summary}")

    # ------------------------------------------------------------------
    # Background work

    async def run(self) -> None:
        """Health checks and DNS refreshes for every pool, until cancelled."""
        async with trio.open_nursery() as nursery:
            for state in self._pools.values():
                if state.needs_dns():
                    nursery.start_soon(self._discover, state)
                nursery.start_soon(self._health_loop, state)

    async def _health_loop(self, state: _PoolState) -> None:
        # The first round comes one interval after start: members start in
        # rotation, and real traffic (passive checks) already catches a dead one.
        interval = state.pool.health_interval_s
        await trio.sleep(interval)
        while True:
            started = trio.current_time()
            async with trio.open_nursery() as checks:
                for member in list(state.members.values()):
                    if member.addresses:
                        checks.start_soon(self._check, state, member)
            await trio.sleep_until(started + interval)

    async def _check(self, state: _PoolState, member: _Member) -> None:
        try:
            stream = await self._dial(state.pool, member, None, traffic=False)
        except _DialFailed as exc:
            if member.present:
                self._observe(state, member, False, exc.reason, exc.detail)
            return
        with trio.move_on_after(_CHECK_CLOSE_S):
            await stream.aclose()
        if member.present:
            self._observe(state, member, True)

    def _observe(
        self, state: _PoolState, member: _Member, ok: bool, reason: str = "", detail: str = ""
    ) -> None:
        pool = state.pool
        before = member.health
        member.health = observe(
            before, ok, unhealthy_after=pool.unhealthy_after, healthy_after=pool.healthy_after
        )
        if before.up and not member.health.up:
            self._log.event(
                "pool_member_down", pool=pool.name, member=member.host, reason=reason, detail=detail
            )
        elif member.health.up and not before.up:
            # Back in rotation at the rotation's pace, not flooded to catch up.
            rotation = [m.passes for m in state.members.values() if m.health.up and m is not member]
            member.passes = max(member.passes, min(rotation, default=member.passes))
            self._log.event("pool_member_up", pool=pool.name, member=member.host)
        self._export(state, member)

    def _export(self, state: _PoolState, member: _Member) -> None:
        up = member.health.up and bool(member.addresses)
        # Two SRV records may name one target on two ports: the label is the
        # host, so it is up when any of its entries is.
        if not up:
            up = any(
                m.health.up and m.addresses
                for m in state.members.values()
                if m.host == member.host and m is not member
            )
        self._metrics.pool_member_up.labels(state.pool.name, member.host).set(1 if up else 0)

    # ------------------------------------------------------------------
    # Dialling

    async def _dial(
        self, pool: Pool, member: _Member, info: ProxyInfo | None, *, traffic: bool
    ) -> TLSStream:
        return await _dial(self._snapshot(), self._client_context(), pool, member, info, traffic)

    # ------------------------------------------------------------------
    # DNS

    async def _discover(self, state: _PoolState) -> None:
        """Refresh the pool's DNS answers when the shortest TTL runs out."""
        retry = _RETRY_MIN_S
        while True:
            ttls, failed = await self._refresh(state)
            if failed:
                delay = min(retry, refresh_delay(ttls))
                retry = min(retry * 2, _RETRY_MAX_S)
            else:
                delay = refresh_delay(ttls)
                retry = _RETRY_MIN_S
            await trio.sleep(delay)

    def _dns_error(self, pool: str, name: str, detail: str) -> None:
        self._dns_failures.labels(pool).inc()
        self._log.event("dns_error", pool=pool, name=name, detail=detail)

    async def _refresh(self, state: _PoolState) -> tuple[list[float], bool]:
        """One round of lookups; (TTLs seen, whether any lookup failed)."""
        pool = state.pool
        ttls: list[float] = []
        failed = False
        if pool.dns_srv is not None:
            try:
                records, ttl = await self._dns.srv(pool.dns_srv)
            except LookupFailed as exc:
                self._dns_error(pool.name, pool.dns_srv, str(exc))
                failed = True
            else:
                ttls.append(ttl)
                self._apply_srv(state, records)
        for member in list(state.members.values()):
            if is_ip_address(member.dial):
                continue
            try:
                addresses, ttl = await self._dns.addresses(member.dial)
            except LookupFailed as exc:
                # The last good answer stays: a DNS outage must not empty a pool.
                self._dns_error(pool.name, member.dial, str(exc))
                failed = True
                continue
            ttls.append(ttl)
            if addresses != member.addresses:
                member.addresses = addresses
                self._export(state, member)
        return ttls, failed

    def _apply_srv(self, state: _PoolState, records: list[tuple[int, int, int, str]]) -> None:
        seen: set[tuple[str, int]] = set()
        joined = state.lowest_pass()
        for priority, weight, port, target in records:
            key = (target, port)
            if key in seen:
                continue
            seen.add(key)
            member = state.members.get(key)
            if member is None:
                member = _Member(host=target, port=port, dial=target, weight=weight)
                member.passes = joined
                state.members[key] = member
                self._log.event("pool_member_added", pool=state.pool.name, member=target, port=port)
            member.priority, member.weight = priority, weight
        for key in [k for k in state.members if k not in seen]:
            gone = state.members.pop(key)
            gone.present = False
            self._log.event(
                "pool_member_removed", pool=state.pool.name, member=gone.host, port=gone.port
            )
            if not any(m.host == gone.host for m in state.members.values()):
                with contextlib.suppress(KeyError):
                    self._metrics.pool_member_up.remove(state.pool.name, gone.host)


async def _dial(
    snapshot: Snapshot,
    context: SSL.Context,
    pool: Pool,
    member: _Member,
    info: ProxyInfo | None,
    traffic: bool,
) -> TLSStream:
    """TCP, PROXY header if the pool wants one, MTLS; raises _DialFailed.

    OpenSSL builds and checks the chain during the handshake, but the
    decision is the core's: ``ServerTrust.verify_server`` (the one
    ``edge verify --purpose server`` runs) on the chain the member
    presented, before the stream is handed out and any byte relayed.
    """
    timeout = snapshot.config.limits.handshake_timeout_s
    if not traffic:
        timeout = min(timeout, max(pool.health_interval_s, 1.0))
    tcp: trio.SocketStream | None = None
    stream: TLSStream | None = None
    try:
        with trio.fail_after(timeout):
            tcp = await _open_tcp(member.addresses, member.port)
            if pool.proxy_protocol == "v2":
                await tcp.send_all(encode_v2(info) if info is not None else encode_local())
            stream = TLSStream(tcp, context, server_side=False, server_hostname=member.host)
            await stream.do_handshake()
        verdict = snapshot.server_trust.verify_server(stream.peer_chain, member.host)
        if verdict.accepted:
            return stream
        failure = _DialFailed(
            Reason.UPSTREAM_UNTRUSTED.value, f"{verdict.reason}: {verdict.detail}"
        )
    except HostnameMismatchError as exc:
        failure = _DialFailed(Reason.UPSTREAM_UNTRUSTED.value, str(exc))
    except TLSError as exc:
        # Classified by the core's decision on what the member sent, not by
        # OpenSSL's message: a chain ServerTrust rejects is untrusted.
        verdict = None
        sent = _sent_chain(stream)
        if sent:
            verdict = snapshot.server_trust.verify_server(sent, member.host)
        if verdict is not None and not verdict.accepted:
            failure = _DialFailed(
                Reason.UPSTREAM_UNTRUSTED.value,
                f"certificate not trusted: {verdict.reason}: {verdict.detail}",
            )
        else:
            failure = _DialFailed("upstream_tls_error", str(exc))
    except trio.TooSlowError:
        failure = _DialFailed("upstream_timeout", f"no connection within {timeout:g}s")
    except (OSError, trio.BrokenResourceError) as exc:
        failure = _DialFailed(
            "connect_failed", str(getattr(exc, "strerror", None) or exc or "refused")
        )
    except BaseException:
        if tcp is not None:
            await trio.aclose_forcefully(tcp)
        raise
    if tcp is not None:
        await trio.aclose_forcefully(tcp)
    raise failure


def proxy_info(
    tcp: trio.SocketStream,
    tls: TLSStream,
    partner: str | None,
    tls_version: str | None,
    chain: Sequence[x509.Certificate],
    verdict: Verdict | None = None,
) -> ProxyInfo:
    """What a PROXY v2 header says about one admitted partner connection.

    ``partner`` is the id the core accepted (None on a "tls" listener, where
    no client certificate is asked for); ``chain`` the certificates the partner
    sent; ``verdict`` the core's accepted verdict. SSL_CN and AUTHORITY come
    from ``authorized_identity``: the name the core authorized (a SAN or `sip:`
    domain, never the raw subject CN, which a partner CA may fill with anything,
    CR/LF/NUL or 65,500 bytes included) and the SNI only if it is a host name.
    """
    try:
        source = tcp.socket.getpeername()
        destination = tcp.socket.getsockname()
    except OSError:
        source = destination = ("", 0)
    cn: str | None = None
    authority = host_name_or_none(tls.requested_server_name)
    if verdict is not None:
        cn, authority = authorized_identity(verdict, tls.requested_server_name)
    verified = bool(chain) and partner is not None and verdict is not None and verdict.accepted
    return ProxyInfo(
        source=(str(source[0]), int(source[1])),
        destination=(str(destination[0]), int(destination[1])),
        sni=authority,
        tls_version=tls_version,
        client_cn=cn if verified else None,
        partner=partner,
        client_cert=bool(chain),
        cert_verified=verified,
    )


async def _open_tcp(addresses: Sequence[str], port: int) -> trio.SocketStream:
    """Connect to the first address that answers (in order); OSError if none."""
    if not addresses:
        raise OSError("no address resolved for this member")
    last: OSError | None = None
    for address in addresses:
        try:
            if not is_ip_address(address):
                return await trio.open_tcp_stream(address, port)
            # A resolved address: one socket and connect, without open_tcp_stream's
            # resolver call and happy-eyeballs nursery (Python work on every dial).
            family = trio.socket.AF_INET6 if ":" in address else trio.socket.AF_INET
            sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
            try:
                await sock.connect((address, port))
            except BaseException:
                sock.close()
                raise
            return trio.SocketStream(sock)
        except OSError as exc:
            last = exc
    assert last is not None
    raise last


def _sent_chain(stream: TLSStream | None) -> list[x509.Certificate]:
    """The certificates a member sent before its handshake failed (may be none)."""
    if stream is None:
        return []
    try:
        return list(stream.connection.get_peer_cert_chain(as_cryptography=True) or [])
    except (SSL.Error, ValueError):
        return []
