"""One partner connection of an outbound SIP fan-out, on trio: its writer, dial and end.

Owns: the per-partner side of `edge.sip_outbound` (one pool connection fanned
out to one TLS connection per partner): `Outlet`, the single writer task's
queue of one connection (pool or partner) with its backpressure bound;
`PartnerConn`, what the fan-out knows of one partner connection (its live
registration, stream, counters, and why it ended); `dial_conn`, the checks and
the dial of one partner connection (enabled, per-partner limit, discovery,
verification, re-verification when a reload landed mid-dial); and the
`SipPartnerClosed` event it ends with.

Must never: decide routing, trust or SIP answers (the core does); rewrite or
reorder a byte put in an `Outlet`; hold more than `_OUTLET_BYTES` in one
outlet before its producer waits; log anything itself; raise a dial failure
(it is returned as an `OutboundRejected` for the fan-out to report).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from edge.core.policies import PartnerPolicy
from edge.core.reasons import Reason
from edge.outbound import (
    Outbound,
    OutboundClosed,
    OutboundRejected,
    _LiveOutbound,
    dial_partner,
)
from edge.tls import TLSStream, TLSTruncatedError

__all__ = ["Outlet", "PartnerConn", "SipPartnerClosed", "clip", "dial_conn", "domain_for"]

# Bytes one writer may hold before whoever feeds it waits (backpressure).
_OUTLET_BYTES = 1024 * 1024
# Most bytes joined into one write (several messages, one TLS record or a few).
_WRITE_CHUNK = 64 * 1024
_MAX_DETAIL = 600


def clip(text: str) -> str:
    """Printable, at most `_MAX_DETAIL` characters: safe for a log field."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


@dataclass
class SipPartnerClosed(OutboundClosed):
    """One partner connection of a fan-out ended (a `connection_closed` event).

    `end`: `partner_closed` (clean EOF), `partner_error`, `partner_truncated`,
    `pool_closed` (the pool connection ended first), `idle_timeout`,
    `trust_withdrawn` (with `reason`), a SIP reason code the partner's input
    earned (`sip_malformed`, `sip_too_large`), or `cancelled`.
    """

    bytes_from_partner: int = 0
    bytes_to_partner: int = 0

    def log_fields(self) -> dict[str, Any]:
        """The fields of any outbound `connection_closed`, plus this connection's bytes."""
        fields = super().log_fields()
        fields["bytes_from_partner"] = self.bytes_from_partner
        fields["bytes_to_partner"] = self.bytes_to_partner
        if self.detail:
            fields["detail"] = clip(self.detail)
        return fields


class Outlet:
    """The one writer of one connection: bytes in the order they were put."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[bytes](math.inf)
        self.pending = 0
        self.sent = 0
        self.dead = False
        self._lot = trio.lowlevel.ParkingLot()

    def put(self, data: bytes) -> None:
        if self.dead or not data:
            return
        try:
            self._send.send_nowait(data)
        except trio.ClosedResourceError:
            return
        self.pending += len(data)

    def close(self) -> None:
        """No more puts; the writer ends once it wrote what it holds."""
        self._send.close()

    async def room(self) -> None:
        while self.pending > _OUTLET_BYTES and not self.dead:
            await self._lot.park()

    async def pump(self, stream: trio.abc.SendStream, progress: Callable[[], None]) -> None:
        """Write until closed and drained; raises the stream's error (then dead)."""
        try:
            async for first in self._receive:
                parts = [first]
                size = len(first)
                while size < _WRITE_CHUNK:
                    try:
                        more = self._receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    parts.append(more)
                    size += len(more)
                await stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))
                self.pending -= size
                self.sent += size
                self._lot.unpark_all()
                progress()
        finally:
            self.dead = True
            self._lot.unpark_all()


@dataclass(eq=False)
class PartnerConn:
    partner: str
    host: str  # the Request-URI host that opened it
    live: _LiveOutbound
    outlet: Outlet = field(default_factory=Outlet)
    stream: TLSStream | None = None
    edge: str = ""
    opened_at: float = 0.0
    received: int = 0
    end: str = ""
    detail: str = ""
    reason: str | None = None
    idle: trio.CancelScope | None = None

    @property
    def scope(self) -> trio.CancelScope:
        return self.live.scope

    def stop(self, end: str, detail: str = "", reason: str | None = None) -> None:
        if not self.end:
            self.end, self.detail, self.reason = end, detail, reason
        self.scope.cancel()

    def close_for(self, reason: str, *, pool_closing: bool) -> None:
        """Stop on the router's `ClosePartner(reason)`, naming why it ended."""
        if reason == "pool_closed" or pool_closing:
            self.stop("pool_closed", "" if reason == "pool_closed" else reason)
        elif self.live.withdrawn is not None:
            self.stop("trust_withdrawn", self.live.withdrawn[1], reason)
        else:  # the partner's own input could not be framed (sip_malformed...)
            self.stop(reason, "unframeable input from the partner")

    async def write(
        self,
        stream: TLSStream,
        progress: Callable[[], None],
        errors: tuple[type[BaseException], ...],
    ) -> None:
        """The connection's one writer: stop (never raise) on the stream's error."""
        try:
            await self.outlet.pump(stream, progress)
        except TLSTruncatedError as exc:
            self.stop("partner_truncated", str(exc))
        except errors as exc:
            self.stop("partner_error", str(exc))

    def closed_event(self, listener: str, peer: str, member: str) -> SipPartnerClosed:
        return SipPartnerClosed(
            listener=listener,
            peer=peer,
            member=member,
            partner=self.partner,
            partner_edge=self.edge,
            end=self.end or "cancelled",
            duration_s=trio.current_time() - self.opened_at,
            bytes_from_partner=self.received,
            bytes_to_partner=self.outlet.sent,
            reason=self.reason,
            detail=self.detail,
        )


def domain_for(policy: PartnerPolicy, host: str) -> str:
    """The partner domain whose SRV name finds its edge for `host` (longest match)."""
    inside = [d for d in policy.domains if host == d or host.endswith("." + d)]
    if inside:
        return max(inside, key=len)
    return policy.domains[0] if policy.domains else host


async def dial_conn(
    conn: PartnerConn, outbound: Outbound, dials: trio.CapacityLimiter
) -> OutboundRejected | None:
    """Check, dial and verify `conn`'s partner; None when its stream is ready."""
    pid = conn.partner
    policy = outbound.snapshot.partners.get(pid)
    limit = outbound.config.limits.max_outbound_connections_per_partner
    rejection: OutboundRejected | None = None
    if policy is None or not policy.enabled:
        rejection = OutboundRejected(
            Reason.PARTNER_DISABLED if policy is not None else Reason.UNKNOWN_DESTINATION,
            f"partner {pid} is not enabled",
            partner=pid,
        )
    elif outbound.live_count(pid) > limit:  # this connection is counted already
        rejection = OutboundRejected(
            Reason.OVER_LIMIT,
            f"partner {pid} has {limit} outbound connections "
            "(max_outbound_connections_per_partner)",
            partner=pid,
        )
    else:
        trust = outbound.trust
        try:
            async with dials:
                assert outbound.discovery is not None
                stream, edge = await dial_partner(
                    policy,
                    domain_for(policy, conn.host),
                    identity=outbound.config.identity,
                    trust=trust,
                    discovery=outbound.discovery,
                    handshake_timeout_s=outbound.config.limits.handshake_timeout_s,
                    context=outbound.context_for(policy),
                    rng=outbound.rng,
                    log=outbound.log,
                )
        except OutboundRejected as exc:
            rejection = exc
        else:
            conn.stream, conn.edge = stream, edge.label
            conn.live.host = edge.host
            conn.live.chain = tuple(stream.peer_chain)
            if outbound.trust is not trust:
                # A reload landed while we dialled: judge the edge by the new policy.
                verdict = outbound.trust.verify(pid, conn.live.chain, edge.host)
                if not verdict.accepted:
                    rejection = OutboundRejected(
                        Reason.PARTNER_UNTRUSTED,
                        f"{verdict.reason}: {verdict.detail} (policy reloaded while dialling)",
                        partner=pid,
                        partner_edge=edge.label,
                    )
    return rejection
