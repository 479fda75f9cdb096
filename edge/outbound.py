"""Outbound federation on trio: a pool member's connection relayed to a partner's edge.

Owns the shell half of docs/architecture.md ("Outbound federation"): for one accepted
member TLS stream on a `mode = "outbound"` listener, authorize the member
(`edge.core.outbound.authorize_member`), take the destination from its SNI,
find and dial the partner's edge (`dial_partner`: static `edge` or DNS SRV,
failover across targets, `public_cert` presented, the partner's server
certificate judged by `PartnerEdgeTrust`), enforce
`max_outbound_connections_per_partner`, hand both streams to the relay the
caller passes in, and keep a registry of live outbound connections so that a
policy reload that removes, disables or no longer trusts a partner closes them
(`Outbound.withdraw`, `Outbound.update`).

Must never: send a member byte to a partner before the partner's certificate
was accepted by the core (nothing is read from the member before then either);
judge a certificate itself (that is `edge.core`); log payload bytes or key
material; run an unbounded loop (targets, addresses and attempts are capped,
every attempt has the handshake deadline).

Interface for the accept loop (the lead wires it; see docs/architecture.md,
"Outbound federation"): build one `Outbound` per outbound listener with the
current policy snapshot, serve accepted TCP connections with a TLS server
stream on `outbound_server_context(identity)`, call `serve_outbound(stream,
outbound, relay, peer=...)`; log `OutboundClosed.log_fields()` as
`connection_closed` or `OutboundRejected.log_fields(...)` as
`connection_rejected`; after each policy reload call `outbound.update(snapshot)`.

Why the client context accepts any chain at the TLS layer: the core's
decision (that partner's roots alone, its CRLs, serverAuth, the dialled name
against SANs only) must be the only one, with its exact reason code in the
`partner_untrusted` detail, exactly as `edge verify --purpose server` would
answer. OpenSSL still checks the server's handshake signature (proof it holds
the certificate's key); the verdict is taken right after the handshake, before
a single application byte is sent either way.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio
from cryptography import x509
from OpenSSL import SSL

from edge.core.config import Config, Identity, Listener
from edge.core.outbound import (
    MemberVerdict,
    PartnerEdgeTrust,
    Refusal,
    authorize_member,
    destination,
    reachable_partners,
)
from edge.core.policies import PartnerPolicy, PolicySnapshot
from edge.core.reasons import Reason
from edge.discovery import Discovery, DiscoveryFailed, Target, partner_targets
from edge.logs import EventLog
from edge.tls import TLSError, TLSStream, client_context, server_context

__all__ = [
    "MAX_DIAL_ATTEMPTS",
    "Outbound",
    "OutboundClosed",
    "OutboundRejected",
    "PartnerEdge",
    "Relay",
    "admit_member",
    "dial_partner",
    "outbound_client_context",
    "outbound_server_context",
    "serve_outbound",
]

# Most (target, address) pairs one outbound connection tries before giving up.
MAX_DIAL_ATTEMPTS = 8
# Operator details are clipped to this many characters.
_MAX_DETAIL = 600

# What the caller relays with: (member stream, partner stream) -> anything (e.g.
# byte counts); it returns when either side ends. Cancellation means withdrawal.
Relay = Callable[[TLSStream, TLSStream], Awaitable[Any]]


def _clip(text: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


@dataclass(frozen=True)
class PartnerEdge:
    """Where an outbound connection went: the partner, the host its certificate
    names, the port and the address dialled."""

    partner: str
    host: str
    port: int
    address: str

    @property
    def label(self) -> str:
        """`partner_edge` in logs: host:port (the address when it differs)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        extra = f" ({self.address})" if self.address != self.host else ""
        return f"{host}:{self.port}{extra}"


class OutboundRejected(Exception):
    """An outbound connection refused before relaying (`connection_rejected`)."""

    def __init__(
        self,
        reason: Reason,
        detail: str,
        *,
        member: str | None = None,
        partner: str | None = None,
        partner_edge: str | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = _clip(detail)
        self.member = member
        self.partner = partner
        self.partner_edge = partner_edge

    def log_fields(self, listener: str, peer: str) -> dict[str, Any]:
        """Fields of the `connection_rejected` event."""
        return {
            "listener": listener,
            "direction": "outbound",
            "peer": peer,
            "member": self.member,
            "partner": self.partner if self.partner is not None else "unknown",
            "partner_edge": self.partner_edge,
            "reason": str(self.reason),
            "detail": self.detail,
        }


@dataclass
class OutboundClosed:
    """An outbound connection that was relayed and ended (`connection_closed`)."""

    listener: str
    peer: str
    member: str
    partner: str
    partner_edge: str
    end: str  # "closed", or "trust_withdrawn" when a reload closed it
    duration_s: float
    reason: str | None = None  # withdrawn: why
    detail: str = ""
    relay_result: Any = None  # whatever the relay returned (e.g. byte counts)

    def log_fields(self) -> dict[str, Any]:
        """Fields of the `connection_closed` event (add the relay's byte counts)."""
        fields: dict[str, Any] = {
            "listener": self.listener,
            "direction": "outbound",
            "peer": self.peer,
            "member": self.member,
            "partner": self.partner,
            "partner_edge": self.partner_edge,
            "duration_s": round(self.duration_s, 3),
            "end": self.end,
        }
        if self.reason is not None:
            fields["reason"] = self.reason
        if self.detail:
            fields["detail"] = self.detail
        return fields


# --- contexts ---------------------------------------------------------------------------


def outbound_server_context(identity: Identity, profile: str = "intermediate") -> SSL.Context:
    """The outbound listener's context: the edge presents `internal_cert`; OpenSSL
    requires a client certificate chaining to `internal_roots` (a stranger fails
    the handshake); `serve_outbound` then checks the topology. `profile`: `[tls]`."""
    return server_context(
        identity.internal_chain,
        identity.internal_private_key,
        require_client_cert=True,
        client_roots=identity.internal_root_certs,
        profile=profile,
    )


def _core_decides(conn: SSL.Connection, cert: Any, err: int, depth: int, ok: int) -> bool:
    # The partner edge's chain is judged by edge.core.outbound.PartnerEdgeTrust
    # right after the handshake, before any byte (see the module docstring).
    return True


def outbound_client_context(
    identity: Identity, policy: PartnerPolicy, profile: str = "intermediate"
) -> SSL.Context:
    """The client context toward one partner: presents `public_cert`, offers that
    partner's roots only, and leaves the verdict to the core. `profile`: `[tls]`."""
    ctx = client_context(
        policy.roots, identity.public_chain, identity.public_private_key, profile=profile
    )
    ctx.set_verify(SSL.VERIFY_PEER, _core_decides)
    return ctx


# --- the dial -----------------------------------------------------------------------------


async def _connect_one(
    target: Target, address: str, context: SSL.Context, timeout_s: float
) -> TLSStream | str:
    """A handshaken TLS stream to one address, or why not (a short detail)."""
    tcp: trio.SocketStream | None = None
    stream: TLSStream | None = None
    why = f"no TLS handshake within {timeout_s:g}s"
    with trio.move_on_after(timeout_s):
        try:
            tcp = await trio.open_tcp_stream(address, target.port)
            stream = TLSStream(
                tcp, context, server_side=False, server_hostname=target.host, check_hostname=False
            )
            await stream.do_handshake()
            return stream
        except (OSError, trio.BrokenResourceError) as exc:  # TLSError is a BrokenResourceError
            why = _clip(str(exc) or type(exc).__name__)
    if stream is not None:
        await trio.aclose_forcefully(stream)
    elif tcp is not None:
        await trio.aclose_forcefully(tcp)
    return why


async def dial_partner(
    policy: PartnerPolicy,
    domain: str,
    *,
    identity: Identity,
    trust: PartnerEdgeTrust,
    discovery: Discovery,
    handshake_timeout_s: float,
    context: SSL.Context | None = None,
    rng: random.Random | None = None,
    log: EventLog | None = None,
) -> tuple[TLSStream, PartnerEdge]:
    """Connect to `policy`'s partner edge (for a destination inside `domain`) and
    return a stream whose server certificate the core accepted; nothing has
    been sent on it but the handshake.

    Targets in order (static `edge`, else SRV by RFC 2782), each target's
    addresses in order, at most MAX_DIAL_ATTEMPTS, each attempt bounded by
    `handshake_timeout_s`. An edge that answers with a certificate the core
    rejects is not used; the next target is tried (a spoofed target must not
    deny service when a genuine one answers). Raises OutboundRejected:
    `partner_untrusted` (the core's reason and detail) when some edge answered
    but none was accepted, else `partner_unreachable`.
    """
    ctx = context if context is not None else outbound_client_context(identity, policy)
    try:
        targets = await partner_targets(policy, domain, discovery, rng=rng, log=log)
    except DiscoveryFailed as exc:
        raise OutboundRejected(Reason.PARTNER_UNREACHABLE, str(exc), partner=policy.id) from None
    attempts = 0
    failures: list[str] = []
    untrusted: OutboundRejected | None = None
    for target in targets:
        if attempts >= MAX_DIAL_ATTEMPTS:
            break
        try:
            addresses: tuple[str, ...] = (
                (target.host,) if _is_ip(target.host) else await discovery.addresses(target.host)
            )
        except DiscoveryFailed as exc:
            failures.append(f"{target.host}: {exc}")
            continue
        for address in addresses:
            if attempts >= MAX_DIAL_ATTEMPTS:
                break
            attempts += 1
            edge = PartnerEdge(policy.id, target.host, target.port, address)
            result = await _connect_one(target, address, ctx, handshake_timeout_s)
            if isinstance(result, str):
                failures.append(f"{edge.label}: {result}")
                continue
            verdict = trust.verify(policy.id, result.peer_chain, target.host)
            if verdict.accepted:
                return result, edge
            await trio.aclose_forcefully(result)
            detail = f"{verdict.reason}: {verdict.detail} (edge {edge.label})"
            if log is not None:
                log.event(
                    "partner_edge_untrusted",
                    partner=policy.id,
                    partner_edge=edge.label,
                    reason=str(verdict.reason),
                    detail=_clip(verdict.detail),
                )
            if untrusted is None:
                untrusted = OutboundRejected(
                    Reason.PARTNER_UNTRUSTED, detail, partner=policy.id, partner_edge=edge.label
                )
            failures.append(f"{edge.label}: untrusted")
    if untrusted is not None:
        raise untrusted
    raise OutboundRejected(
        Reason.PARTNER_UNREACHABLE,
        "; ".join(failures) or "no target to dial",
        partner=policy.id,
    )


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --- the listener's state: snapshot, registry, limits ----------------------------------------


@dataclass(eq=False)
class _LiveOutbound:
    partner: str
    host: str  # the dialled host the partner's certificate was verified for
    scope: trio.CancelScope
    chain: tuple[x509.Certificate, ...] = ()
    withdrawn: tuple[Reason, str] | None = None


@dataclass(eq=False)
class Outbound:
    """One outbound listener's running state. Build it with the current snapshot;
    call `update` after every policy reload."""

    config: Config
    listener: Listener
    snapshot: PolicySnapshot
    discovery: Discovery | None = None
    log: EventLog | None = None
    rng: random.Random | None = None
    trust: PartnerEdgeTrust = field(init=False)
    _live: dict[str, set[_LiveOutbound]] = field(init=False, default_factory=dict)
    _contexts: dict[str, SSL.Context] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.listener.mode != "outbound":
            raise ValueError(f"listener {self.listener.name} is not an outbound listener")
        if self.discovery is None:
            self.discovery = Discovery(self.config.dns)
        self.trust = PartnerEdgeTrust(self.snapshot)

    def context_for(self, policy: PartnerPolicy) -> SSL.Context:
        """The client context toward a partner, built once per snapshot."""
        ctx = self._contexts.get(policy.id)
        if ctx is None:
            ctx = self._contexts[policy.id] = outbound_client_context(
                self.config.identity, policy, self.config.tls.profile
            )
        return ctx

    def live_count(self, partner: str) -> int:
        """Outbound connections to `partner` now (dialling or relaying)."""
        return len(self._live.get(partner, ()))

    def update(self, snapshot: PolicySnapshot, config: Config | None = None) -> int:
        """Swap in a reloaded snapshot; close what it no longer allows: partners
        removed or disabled, and edges whose certificate the new policy rejects
        (a root removed, a CRL that now lists it). Returns how many were closed.

        `config`: the reloaded configuration, when it changed (identity, limits
        and `[dns]` apply live; the listener keeps its name)."""
        if config is not None and config is not self.config:
            if config.dns != self.config.dns:
                self.discovery = Discovery(config.dns)
            self.listener = next(
                (lst for lst in config.listeners if lst.name == self.listener.name), self.listener
            )
            self.config = config
        self.snapshot = snapshot
        self.trust = PartnerEdgeTrust(snapshot)
        self._contexts = {}
        closed = self.withdraw(reachable_partners(snapshot))
        for entries in list(self._live.values()):
            for live in list(entries):
                if live.withdrawn is not None or not live.chain:
                    continue
                verdict = self.trust.verify(live.partner, live.chain, live.host)
                if not verdict.accepted:
                    self._close(
                        live, Reason.PARTNER_UNTRUSTED, f"{verdict.reason}: {verdict.detail}"
                    )
                    closed += 1
        return closed

    def withdraw(self, partners_still_trusted: Collection[str]) -> int:
        """Close every live (or dialling) outbound connection to a partner not in
        `partners_still_trusted`; they end as `trust_withdrawn`. Returns the count."""
        closed = 0
        for partner, entries in list(self._live.items()):
            if partner in partners_still_trusted:
                continue
            policy = self.snapshot.partners.get(partner)
            if policy is not None and not policy.enabled:
                reason, detail = Reason.PARTNER_DISABLED, f"partner {partner} was disabled"
            else:
                reason = Reason.UNKNOWN_DESTINATION
                detail = f"partner {partner} is no longer in the policies"
            for live in list(entries):
                if live.withdrawn is None:
                    self._close(live, reason, detail)
                    closed += 1
        return closed

    @staticmethod
    def _close(live: _LiveOutbound, reason: Reason, detail: str) -> None:
        live.withdrawn = (reason, detail)
        live.scope.cancel()

    @contextlib.contextmanager
    def registered(self, partner: str) -> Iterator[_LiveOutbound]:
        """Track one connection to `partner` (dialling or relaying) for `update` and
        `withdraw`: run it inside `live.scope`; a withdrawal cancels that scope and
        sets `live.withdrawn` to (reason, detail). Set `live.host` and `live.chain`
        once the partner's edge was accepted, so a reload re-judges it. For other
        drivers (outbound SIP) that keep partner connections of their own."""
        live = _LiveOutbound(partner, "", trio.CancelScope())
        self._register(live)
        try:
            yield live
        finally:
            self._unregister(live)

    def _register(self, live: _LiveOutbound) -> None:
        self._live.setdefault(live.partner, set()).add(live)

    def _unregister(self, live: _LiveOutbound) -> None:
        entries = self._live.get(live.partner)
        if entries is not None:
            entries.discard(live)
            if not entries:
                del self._live[live.partner]


# --- one member connection ---------------------------------------------------------------


async def admit_member(member_stream: TLSStream, outbound: Outbound) -> MemberVerdict:
    """The member's handshake (if the caller did not run it) under
    `handshake_timeout_s`, then `authorize_member` against the listener's pools.

    Returns the accepted verdict (`host` set); raises `OutboundRejected`
    (`tls_error`, `handshake_timeout`, `not_in_topology`...) otherwise. Shared
    by every outbound driver (streams here, SIP in `edge.sip_outbound`).
    """
    limits = outbound.config.limits
    with trio.move_on_after(limits.handshake_timeout_s) as hs_scope:
        try:
            await member_stream.do_handshake()
        except (TLSError, trio.BrokenResourceError) as exc:
            raise OutboundRejected(Reason.TLS_ERROR, str(exc) or "handshake failed") from None
    if hs_scope.cancelled_caught:
        raise OutboundRejected(
            Reason.HANDSHAKE_TIMEOUT,
            f"no TLS handshake within handshake_timeout_s={limits.handshake_timeout_s:g}",
        )
    pools = [outbound.config.pools[name] for name in outbound.listener.pools]
    member = authorize_member(
        member_stream.verified_chain, outbound.config.identity.internal_root_certs, pools
    )
    if not member.accepted or member.host is None:
        assert member.reason is not None
        raise OutboundRejected(member.reason, member.detail)
    return member


async def serve_outbound(
    member_stream: TLSStream,
    outbound: Outbound,
    relay: Relay,
    *,
    peer: str = "",
    on_relaying: Callable[[str, str, str], None] | None = None,
) -> OutboundClosed:
    """Serve one accepted member connection on an outbound listener, to its end.

    `member_stream`: the server-side TLS stream on `outbound_server_context`
    (its handshake is run here under `handshake_timeout_s` if the caller did
    not). Returns an `OutboundClosed` once the relay ended (or a reload
    withdrew the partner); raises `OutboundRejected` when the connection is
    refused before relaying. Both streams are closed on return either way.
    `on_relaying(member, partner, partner_edge)` is called once the partner's
    edge was accepted, right before the relay (so a caller cancelled during
    the relay still knows whom it was serving).
    """
    limits = outbound.config.limits
    listener = outbound.listener
    partner_stream: TLSStream | None = None
    try:
        member = await admit_member(member_stream, outbound)
        assert member.host is not None
        snapshot = outbound.snapshot
        where = destination(member_stream.requested_server_name, snapshot)
        if isinstance(where, Refusal):
            raise OutboundRejected(where.reason, where.detail, member=member.host)
        policy = snapshot.partners[where.partner]
        limit = limits.max_outbound_connections_per_partner
        if outbound.live_count(policy.id) >= limit:
            raise OutboundRejected(
                Reason.OVER_LIMIT,
                f"partner {policy.id} has {limit} outbound connections "
                "(max_outbound_connections_per_partner)",
                member=member.host,
                partner=policy.id,
            )
        started = trio.current_time()
        live = _LiveOutbound(policy.id, "", trio.CancelScope())
        outbound._register(live)
        edge: PartnerEdge | None = None
        relay_result: Any = None
        try:
            with live.scope:
                assert outbound.discovery is not None
                trust = outbound.trust
                partner_stream, edge = await dial_partner(
                    policy,
                    where.domain,
                    identity=outbound.config.identity,
                    trust=trust,
                    discovery=outbound.discovery,
                    handshake_timeout_s=limits.handshake_timeout_s,
                    context=outbound.context_for(policy),
                    rng=outbound.rng,
                    log=outbound.log,
                )
                live.host = edge.host
                live.chain = tuple(partner_stream.peer_chain)
                if outbound.trust is not trust:
                    # A reload landed while we dialled: judge the edge by the new policy
                    # before the first byte (removed partners were already withdrawn).
                    verdict = outbound.trust.verify(policy.id, live.chain, edge.host)
                    if not verdict.accepted:
                        raise OutboundRejected(
                            Reason.PARTNER_UNTRUSTED,
                            f"{verdict.reason}: {verdict.detail} (policy reloaded while dialling)",
                            partner=policy.id,
                            partner_edge=edge.label,
                        )
                if on_relaying is not None:
                    on_relaying(member.host, policy.id, edge.label)
                relay_result = await relay(member_stream, partner_stream)
        except OutboundRejected as exc:
            exc.member = member.host
            raise
        finally:
            outbound._unregister(live)
        if edge is None:
            # Withdrawn while dialling: nothing was relayed; refuse it.
            reason, detail = live.withdrawn or (Reason.PARTNER_UNREACHABLE, "dial cancelled")
            raise OutboundRejected(reason, detail, member=member.host, partner=policy.id)
        closed = OutboundClosed(
            listener=listener.name,
            peer=peer,
            member=member.host,
            partner=policy.id,
            partner_edge=edge.label,
            end="closed",
            duration_s=trio.current_time() - started,
            relay_result=relay_result,
        )
        if live.withdrawn is not None:
            closed.end = "trust_withdrawn"
            closed.reason = str(live.withdrawn[0])
            closed.detail = _clip(live.withdrawn[1])
        return closed
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            if partner_stream is not None:
                await partner_stream.aclose()
            await member_stream.aclose()
