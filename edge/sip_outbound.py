"""Outbound SIP routing on trio: one pool connection fanned out to one connection per partner.

Owns the shell of an outbound `protocol = "sip"` listener (docs/architecture.md,
"Outbound SIP routing"): for one accepted member TLS stream, authorize the
member (`edge.outbound.admit_member`, as the stream case), then run one
`edge.core.sip_route.SipRouter` for the connection: feed it every read from
the member and from each partner connection, and perform the actions it
returns, in order: dial a partner (`edge.outbound.dial_partner`: static
`edge` or DNS SRV, the partner's roots, CRLs, serverAuth and host name),
write bytes to the member or to one partner, close a partner connection or
the whole fan-out, report each message. Partner connections are registered
in the listener's `Outbound` live registry, so `Outbound.update` after a
reload closes a removed, disabled or no longer trusted partner's connection
at once; the router then answers later requests to it with 503.

Must never: decide routing, trust or SIP answers itself (the core does),
rewrite or reorder a relayed byte (each connection has exactly one writer
task fed in the order the router decided), send a pool byte to a partner
before its certificate was accepted, buffer without bound (each writer holds
at most `edge.sip_partner._OUTLET_BYTES` before its producer waits), log anything itself (the
caller's callbacks do, with the core's sanitized strings), or leave a partner
connection open once the pool connection ended.

Theory: every router call is synchronous and so is `_perform` (it only
enqueues bytes, starts tasks, cancels scopes and calls callbacks), so each
event's actions take effect atomically and in the router's order whichever
task received the event. The awaits are elsewhere: the readers, one writer
task per connection, the dials (at most `MAX_CONCURRENT_DIALS` at once per
pool connection) and backpressure (a reader waits while a writer it fed holds
too much).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from edge.core.config import SipSettings
from edge.core.policies import PolicySnapshot
from edge.core.reasons import Reason
from edge.core.sip_route import (
    Action,
    ClosePartner,
    ClosePool,
    OpenPartner,
    Report,
    SendToPartner,
    SendToPool,
    SipRouter,
)
from edge.outbound import Outbound, OutboundRejected, _LiveOutbound, admit_member
from edge.sip_partner import Outlet, PartnerConn, SipPartnerClosed, clip, dial_conn
from edge.tls import TLSStream, TLSTruncatedError

__all__ = [
    "MAX_CONCURRENT_DIALS",
    "SipOutboundClosed",
    "SipPartnerClosed",
    "serve_outbound_sip",
]

# Dials in flight at once for one pool connection (each is bounded in time too).
MAX_CONCURRENT_DIALS = 4
RECEIVE_SIZE = 64 * 1024
# The most spent flushing the pool's last answers, and closing a stream.
_CLOSE_TIMEOUT_S = 2.0
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass
class SipOutboundClosed:
    """The pool connection ended (its own `connection_closed` event).

    `end`: `pool_closed`, `pool_error`, `pool_truncated`, `idle_timeout`, or
    the reason code of unframeable pool input (`sip_malformed`,
    `sip_too_large`). Byte counts are the pool side's; `partners` the partner
    connections it opened (dials that succeeded), by partner id.
    """

    listener: str
    peer: str
    member: str
    end: str
    duration_s: float
    bytes_from_pool: int
    bytes_to_pool: int
    bytes_from_partners: int
    bytes_to_partners: int
    partners: dict[str, int] = field(default_factory=dict)
    detail: str = ""

    def log_fields(self) -> dict[str, Any]:
        """`connection_closed` fields; bytes summed over its partner connections."""
        fields: dict[str, Any] = {
            "listener": self.listener,
            "direction": "outbound",
            "peer": self.peer,
            "member": self.member,
            "bytes_from_partner": self.bytes_from_partners,
            "bytes_to_partner": self.bytes_to_partners,
            "duration_s": round(self.duration_s, 3),
            "end": self.end,
        }
        if self.detail:
            fields["detail"] = clip(self.detail)
        return fields


def _enabled(snapshot: PolicySnapshot) -> dict[str, tuple[str, ...]]:
    return {pid: p.domains for pid, p in snapshot.partners.items() if p.enabled}


class _FanOut:
    """One pool connection: its router, its writer, its partner connections."""

    def __init__(
        self,
        member_stream: TLSStream,
        outbound: Outbound,
        member: str,
        *,
        sip: SipSettings,
        idle_timeout_s: float,
        peer: str,
        on_report: Callable[[Report], None] | None,
        on_partner_closed: Callable[[SipPartnerClosed], None] | None,
        on_partner_rejected: Callable[[OutboundRejected], None] | None,
    ) -> None:
        self.stream = member_stream
        self.outbound = outbound
        self.member = member
        self.peer = peer
        self.listener = outbound.listener.name
        self.on_report = on_report
        self.on_partner_closed = on_partner_closed
        self.on_partner_rejected = on_partner_rejected
        self.idle_timeout_s = idle_timeout_s
        self.watch_idle = idle_timeout_s > 0 and not math.isinf(idle_timeout_s)
        self.snapshot = outbound.snapshot
        self.router = SipRouter(
            our_domains=sip.domains,
            partners=_enabled(self.snapshot),
            max_message_bytes=sip.max_message_bytes,
            max_headers=sip.max_headers,
        )
        self.pool_out = Outlet()
        self.conns: dict[str, PartnerConn] = {}  # the router's current connections
        self.dials = trio.CapacityLimiter(MAX_CONCURRENT_DIALS)
        self.nursery: trio.Nursery | None = None
        self.reader_scope = trio.CancelScope()
        self.ending = False
        self.end = ""
        self.detail = ""
        self.received = 0
        self.partners_opened: dict[str, int] = {}
        self.partner_bytes = [0, 0]  # from partners, to partners (ended connections)
        self.started = trio.current_time()

    # --- the router's actions -------------------------------------------------------------

    def stop(self, end: str, detail: str = "") -> None:
        if not self.end:
            self.end, self.detail = end, detail
        self.reader_scope.cancel()

    def perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendToPool):
                self.pool_out.put(action.data)
            elif isinstance(action, SendToPartner):
                conn = self.conns.get(action.partner)
                if conn is not None:
                    conn.outlet.put(action.data)
            elif isinstance(action, Report):
                if self.on_report is not None:
                    self.on_report(action)
            elif isinstance(action, OpenPartner):
                self.open(action.partner, action.host)
            elif isinstance(action, ClosePartner):
                conn = self.conns.pop(action.partner, None)
                if conn is None:
                    continue
                conn.close_for(action.reason, pool_closing=self.router.closed)
            elif isinstance(action, ClosePool):
                self.ending = True
                self.stop(action.reason, f"from the pool: {action.detail}")

    def sync(self) -> None:
        """Apply a reload the Outbound saw: new partner list, withdrawn connections."""
        snapshot = self.outbound.snapshot
        if snapshot is not self.snapshot:
            self.snapshot = snapshot
            self.router.set_partners(_enabled(snapshot))
        for pid, conn in list(self.conns.items()):
            if conn.live.withdrawn is not None:
                self.perform(self.router.trust_withdrawn(pid, str(conn.live.withdrawn[0])))

    def open(self, partner: str, host: str) -> None:
        assert self.nursery is not None
        live = _LiveOutbound(partner, "", trio.CancelScope())
        conn = self.conns[partner] = PartnerConn(partner, host, live)
        # Registered now, so a reload before the task starts still withdraws it.
        self.outbound._register(live)
        self.nursery.start_soon(self.partner_task, conn)

    def current(self, conn: PartnerConn) -> bool:
        return not self.ending and self.conns.get(conn.partner) is conn

    # --- one partner connection ------------------------------------------------------------

    def failed(self, conn: PartnerConn, reason: str, detail: str) -> None:
        if self.current(conn):
            del self.conns[conn.partner]
            self.sync()
            self.perform(self.router.partner_failed(conn.partner, reason, clip(detail)))

    async def dial(self, conn: PartnerConn) -> bool:
        """Dial and verify; on failure tell the router (503 to the waiters)."""
        rejection = await dial_conn(conn, self.outbound, self.dials)
        if rejection is None:
            return True
        rejection.member = self.member
        if self.on_partner_rejected is not None:
            self.on_partner_rejected(rejection)
        self.failed(conn, str(rejection.reason), rejection.detail)
        return False

    async def partner_task(self, conn: PartnerConn) -> None:
        opened = False
        try:
            with conn.scope:
                if not await self.dial(conn):
                    return
                assert conn.stream is not None
                opened = True
                conn.opened_at = trio.current_time()
                self.partners_opened[conn.partner] = self.partners_opened.get(conn.partner, 0) + 1
                if self.current(conn):
                    self.sync()
                    self.perform(self.router.partner_opened(conn.partner))
                await self.partner_io(conn, conn.stream)
        finally:
            self.outbound._unregister(conn.live)
            if conn.live.withdrawn is not None and not conn.end:
                conn.end, conn.reason = "trust_withdrawn", str(conn.live.withdrawn[0])
                conn.detail = conn.live.withdrawn[1]
            if self.current(conn):
                # Withdrawn by a reload: the router learns it with the new partner list
                # (sync), so a removed partner's later requests get 503, not 404.
                self.sync()
            if self.current(conn):
                # Ended by itself while the router still counts on it.
                del self.conns[conn.partner]
                if opened:
                    self.perform(self.router.partner_closed(conn.partner))
                else:
                    self.perform(
                        self.router.partner_failed(
                            conn.partner, str(Reason.PARTNER_UNREACHABLE), "dial cancelled"
                        )
                    )
            conn.outlet.close()
            if conn.stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
                    await conn.stream.aclose()
            if opened:
                self.partner_bytes[0] += conn.received
                self.partner_bytes[1] += conn.outlet.sent
                if self.on_partner_closed is not None:
                    self.on_partner_closed(conn.closed_event(self.listener, self.peer, self.member))

    async def partner_io(self, conn: PartnerConn, stream: TLSStream) -> None:
        with trio.CancelScope() as idle:
            conn.idle = idle
            self.touch(idle)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.write, stream, lambda: self.touch(idle), _STREAM_ERRORS)
                await self.partner_reader(conn, stream)
                nursery.cancel_scope.cancel()
        if idle.cancelled_caught and not conn.end:
            conn.end = "idle_timeout"
            conn.detail = f"no byte either way for idle_timeout_s={self.idle_timeout_s:g}"

    async def partner_reader(self, conn: PartnerConn, stream: TLSStream) -> None:
        while True:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except TLSTruncatedError:
                conn.end = conn.end or "partner_truncated"
                conn.detail = conn.detail or "the partner closed TCP without close_notify"
                return
            except _STREAM_ERRORS as exc:
                conn.end, conn.detail = conn.end or "partner_error", conn.detail or str(exc)
                return
            if not data:
                conn.end = conn.end or "partner_closed"
                return
            conn.received += len(data)
            if conn.idle is not None:
                self.touch(conn.idle)
            if not self.current(conn):
                continue  # the router let it go; its end is on the way
            self.sync()
            self.perform(self.router.partner_data(conn.partner, data))
            await self.pool_out.room()
            await conn.outlet.room()

    # --- the pool connection ---------------------------------------------------------------

    def touch(self, scope: trio.CancelScope) -> None:
        """Push an idle deadline forward (only when `slack` stale: few heap updates)."""
        if not self.watch_idle:
            return
        slack = self.idle_timeout_s / 64
        deadline = trio.current_time() + self.idle_timeout_s + slack
        if deadline - scope.deadline > slack:
            scope.deadline = deadline

    async def pool_writer(self) -> None:
        try:
            await self.pool_out.pump(self.stream, lambda: self.touch(self.reader_scope))
        except TLSTruncatedError as exc:
            self.stop("pool_truncated", str(exc))
        except _STREAM_ERRORS as exc:
            self.stop("pool_error", str(exc))

    async def pool_reader(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except TLSTruncatedError:
                self.stop("pool_truncated", "the pool member closed TCP without close_notify")
                return
            except _STREAM_ERRORS as exc:
                self.stop("pool_error", str(exc))
                return
            if not data:
                self.stop("pool_closed")
                return
            self.received += len(data)
            self.touch(self.reader_scope)
            self.sync()
            self.perform(self.router.pool_data(data))
            if self.ending:
                return
            await self.pool_out.room()
            for conn in list(self.conns.values()):
                await conn.outlet.room()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            writer_done = trio.Event()

            async def writer() -> None:
                try:
                    await self.pool_writer()
                finally:
                    writer_done.set()

            nursery.start_soon(writer)
            with self.reader_scope:
                self.touch(self.reader_scope)
                await self.pool_reader()
            if self.reader_scope.cancelled_caught and not self.end:
                self.end = "idle_timeout"
                self.detail = f"no byte either way for idle_timeout_s={self.idle_timeout_s:g}"
            # Every partner connection this pool connection owns closes with it.
            self.perform(self.router.pool_closed())
            self.ending = True
            for conn in list(self.conns.values()):
                conn.stop("pool_closed")
            self.conns.clear()
            # The pool's last answers (a 400 before ClosePool) still go out.
            self.pool_out.close()
            with trio.move_on_after(_CLOSE_TIMEOUT_S):
                await writer_done.wait()
            nursery.cancel_scope.cancel()

    def result(self) -> SipOutboundClosed:
        return SipOutboundClosed(
            listener=self.listener,
            peer=self.peer,
            member=self.member,
            end=self.end or "closed",
            duration_s=trio.current_time() - self.started,
            bytes_from_pool=self.received,
            bytes_to_pool=self.pool_out.sent,
            bytes_from_partners=self.partner_bytes[0],
            bytes_to_partners=self.partner_bytes[1],
            partners=dict(self.partners_opened),
            detail=self.detail,
        )


async def serve_outbound_sip(
    member_stream: TLSStream,
    outbound: Outbound,
    *,
    sip: SipSettings,
    idle_timeout_s: float,
    peer: str = "",
    on_report: Callable[[Report], None] | None = None,
    on_partner_closed: Callable[[SipPartnerClosed], None] | None = None,
    on_partner_rejected: Callable[[OutboundRejected], None] | None = None,
) -> SipOutboundClosed:
    """Serve one accepted member connection on an outbound SIP listener, to its end.

    `member_stream`: the server-side TLS stream on `outbound_server_context`
    (handshake run here under `handshake_timeout_s` if the caller did not).
    `sip`: the `[sip]` settings (`domains` guards the pool's requests).
    `idle_timeout_s`: the pool connection, and each partner connection, ends
    after that long without a byte either way.

    Callbacks (synchronous, called from the connection's tasks):
    `on_report(Report)` once per SIP message routed or answered by the edge
    (`edge_sip_messages_total`; `sip_rejected` when `report.rejected`);
    `on_partner_closed(SipPartnerClosed)` once per partner connection that
    was opened and ended (`connection_closed`, `direction = "outbound"`);
    `on_partner_rejected(OutboundRejected)` once per failed dial
    (`partner_unreachable`, `partner_untrusted`, `over_limit`...; the
    waiting requests got 503 through `on_report`).

    Returns a `SipOutboundClosed` once the pool connection ended; raises
    `OutboundRejected` when the member is refused before any SIP byte. The
    member stream and every partner stream are closed on return either way.
    """
    try:
        verdict = await admit_member(member_stream, outbound)
        assert verdict.host is not None
        fan = _FanOut(
            member_stream,
            outbound,
            verdict.host,
            sip=sip,
            idle_timeout_s=idle_timeout_s,
            peer=peer,
            on_report=on_report,
            on_partner_closed=on_partner_closed,
            on_partner_rejected=on_partner_rejected,
        )
        await fan.run()
        return fan.result()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
            await member_stream.aclose()
