"""Outbound listeners in the running gateway: one pool member's connection, accept to log line.

Owns the accept side of `mode = "outbound"` listeners (docs/architecture.md,
"Outbound federation"): the accept-time limits (gateway-wide
`max_connections`, `max_handshakes_in_progress`, the per-source share and
rate of `edge.core.limits.SourceLimits`), the member's TLS handshake on the
listener's context (`internal_cert`, client certificate from
`internal_roots`; rebuilt when the identity changes), the dispatch by
`listener.protocol` (`handle_outbound`: opaque streams to
`edge.outbound.serve_outbound` with the gateway's relay, SIP to the outbound
SIP driver), exactly one `connection_closed` or `connection_rejected` event
per connection with `direction = "outbound"`, `member` and `partner_edge`,
the connection metrics with `direction="outbound"`, the one `Outbound` state
per listener, and `OutboundListeners.update`, which the reloader calls after
every snapshot swap so that a removed or disabled partner's connections close.

Must never: let an outbound connection reach the inbound admission path (or
an inbound one reach this), send or read a member byte before the partner's
edge was accepted (`edge.outbound` guarantees it; this module only relays
after), decide trust (`edge.core`), log payload bytes or key material, or let
one connection's failure end the gateway (an exception costs that connection,
logged as `internal_error`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from OpenSSL import SSL

from edge.admission import partner_label, peer_of, source_ip, source_limits, where
from edge.core.config import Identity, Limits, Listener
from edge.core.limits import SourceLimits
from edge.core.reasons import Reason
from edge.core.sip_route import Report
from edge.core.snapshot import Snapshot
from edge.current import Current
from edge.logs import EventLog
from edge.metrics import UNKNOWN_PARTNER, Metrics
from edge.outbound import (
    Outbound,
    OutboundRejected,
    outbound_server_context,
    serve_outbound,
)
from edge.relay import relay
from edge.sip_outbound import SipPartnerClosed, serve_outbound_sip
from edge.tls import TLSError, TLSStream, TLSTruncatedError

__all__ = [
    "OutboundListeners",
    "OutboundSession",
    "handle_outbound",
    "report_rejected",
]

DIRECTION = "outbound"
# OpenSSL's reason when a required client certificate was not sent.
_NO_PEER_CERT = "peer did not return a certificate"
_MAX_DETAIL = 2048


def _clip(text: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."


@dataclass
class OutboundSession:
    """One accepted member connection on an outbound listener, handshake done.

    What a protocol driver receives: the member's TLS stream (server side,
    handshake finished, not yet authorized: the driver calls
    `edge.core.outbound.authorize_member` or `serve_outbound`, which does),
    the listener's `Outbound` (discovery, partner verification, live registry
    that `update` withdraws from), and the reporting that keeps logs and
    metrics one shape for every outbound driver.
    """

    listener: Listener
    outbound: Outbound
    stream: TLSStream
    peer: str
    metrics: Metrics
    log: EventLog
    current: Callable[[], Current]
    started: float = field(default_factory=trio.current_time)
    reported: bool = False

    @property
    def limits(self) -> Limits:
        return self.current().snapshot.config.limits

    def label(self, partner: str | None) -> str:
        """The `partner` metrics label: a configured partner id, else `unknown`."""
        return partner_label(self.current().snapshot, self.listener, partner)

    def rejected(self, exc: OutboundRejected) -> None:
        """Log `connection_rejected` and count it (`edge_handshakes_total`)."""
        self.reported = True
        report_rejected(
            self.metrics, self.log, self.listener, self.peer, self.label(exc.partner), exc
        )

    def closed(
        self,
        *,
        member: str,
        partner: str,
        partner_edge: str,
        end: str,
        bytes_from_partner: int,
        bytes_to_partner: int,
        reason: str | None = None,
        detail: str = "",
    ) -> None:
        """Log `connection_closed` for a relayed connection."""
        self.reported = True
        fields: dict[str, Any] = {
            "listener": self.listener.name,
            "direction": DIRECTION,
            "peer": self.peer,
            "member": member,
            "partner": partner,
            "partner_edge": partner_edge,
            "tls_version": _version(self.stream),
            "bytes_from_partner": bytes_from_partner,
            "bytes_to_partner": bytes_to_partner,
            "duration_s": round(trio.current_time() - self.started, 3),
            "end": end,
        }
        if reason is not None:
            fields["reason"] = reason
        if detail:
            fields["detail"] = _clip(detail)
        self.log.event("connection_closed", **fields)


def report_rejected(
    metrics: Metrics,
    log: EventLog,
    listener: Listener,
    peer: str,
    label: str,
    exc: OutboundRejected,
) -> None:
    """The one `connection_rejected` event (and metric) of a refused outbound connection."""
    metrics.handshakes.labels(listener.name, label, str(exc.reason), DIRECTION).inc()
    fields: dict[str, Any] = {
        "listener": listener.name,
        "direction": DIRECTION,
        "peer": peer,
        "reason": str(exc.reason),
        "detail": exc.detail,
    }
    if exc.member is not None:
        fields["member"] = exc.member
    if exc.partner is not None:
        fields["partner"] = exc.partner
    if exc.partner_edge is not None:
        fields["partner_edge"] = exc.partner_edge
    log.event("connection_rejected", **fields)


async def handle_outbound(listener: Listener, session: OutboundSession) -> None:
    """The dispatch by protocol for one member connection, handshake done.

    `protocol = "sip"`: every request is routed by its Request-URI
    (`edge.sip_outbound`), never by SNI. Otherwise: one partner per
    connection, chosen by the SNI (`serve_outbound`), relayed by the gateway's
    relay with the idle timeout and the byte counters.
    """
    if listener.protocol == "sip":
        await _serve_sip(session)
        return
    await _serve_stream(session)


async def _serve_sip(session: OutboundSession) -> None:
    """One pool connection fanned out per request (issue 21); its events and metrics.

    Each SIP message counts in `edge_sip_messages_total` (`to_partner` for the
    pool's requests, `from_partner` for what partners send), each refusal is a
    `sip_rejected` event, each partner connection ends with its own
    `connection_closed` (and each failed dial its `connection_rejected`), and the
    pool connection with one `connection_closed` of its own.
    """
    config = session.current().snapshot.config
    m, name = session.metrics, session.listener.name

    def on_report(r: Report) -> None:
        direction = "to_partner" if r.direction == "outbound" else "from_partner"
        label = session.label(r.partner)
        m.sip_messages.labels(name, label, direction, r.result).inc()
        if r.rejected:
            session.log.event(
                "sip_rejected",
                listener=name,
                peer=session.peer,
                partner=label,
                method=r.method,
                call_id=r.call_id,
                offending_domain=r.offending_domain,
                reason=r.result,
                answered=r.answered,
                detail=r.detail,
            )

    def on_partner_closed(c: SipPartnerClosed) -> None:
        label = session.label(c.partner)
        m.bytes.labels(name, label, "to_partner").inc(c.bytes_to_partner)
        m.bytes.labels(name, label, "from_partner").inc(c.bytes_from_partner)
        session.log.event(
            "connection_closed",
            listener=name,
            direction=DIRECTION,
            peer=session.peer,
            member=c.member,
            partner=c.partner,
            partner_edge=c.partner_edge,
            bytes_from_partner=c.bytes_from_partner,
            bytes_to_partner=c.bytes_to_partner,
            duration_s=round(c.duration_s, 3),
            end=c.end,
            reason=c.reason,
            detail=_clip(c.detail),
        )

    def on_partner_rejected(exc: OutboundRejected) -> None:
        report_rejected(
            m, session.log, session.listener, session.peer, session.label(exc.partner), exc
        )

    try:
        closed = await serve_outbound_sip(
            session.stream,
            session.outbound,
            sip=config.sip,
            idle_timeout_s=config.limits.idle_timeout_s,
            peer=session.peer,
            on_report=on_report,
            on_partner_closed=on_partner_closed,
            on_partner_rejected=on_partner_rejected,
        )
    except OutboundRejected as exc:
        session.rejected(exc)
        return
    session.reported = True
    # The pool connection's own end; its bytes are the sums over its partner
    # connections, so the sum of `bytes_*` lines stays the relayed total.
    session.log.event(
        "connection_closed",
        listener=name,
        direction=DIRECTION,
        peer=session.peer,
        member=closed.member,
        bytes_from_partner=closed.bytes_from_partners,
        bytes_to_partner=closed.bytes_to_partners,
        duration_s=round(closed.duration_s, 3),
        end=closed.end,
        detail=_clip(closed.detail),
    )


async def _serve_stream(session: OutboundSession) -> None:
    """One SNI-routed connection: serve_outbound with the gateway's relay; one event."""
    m = session.metrics
    listener = session.listener.name
    counts = {"from_partner": 0, "to_partner": 0}
    relaying: dict[str, str] = {}
    outcome: dict[str, str] = {}

    def on_relaying(member: str, partner: str, partner_edge: str) -> None:
        relaying.update(member=member, partner=partner, partner_edge=partner_edge)
        m.handshakes.labels(listener, session.label(partner), "ok", DIRECTION).inc()

    async def gateway_relay(member: TLSStream, partner: TLSStream) -> None:
        label = session.label(relaying.get("partner"))
        to_partner = m.bytes.labels(listener, label, "to_partner")
        from_partner = m.bytes.labels(listener, label, "from_partner")

        def count_to_partner(n: int) -> None:
            to_partner.inc(n)
            counts["to_partner"] += n

        def count_from_partner(n: int) -> None:
            from_partner.inc(n)
            counts["from_partner"] += n

        active = m.connections_active.labels(listener, label, DIRECTION)
        active.inc()
        t0 = trio.current_time()
        try:
            result = await relay(
                member,
                partner,
                idle_timeout_s=session.limits.idle_timeout_s,
                names=("pool", "partner"),
                on_bytes_from_a=count_to_partner,
                on_bytes_from_b=count_from_partner,
            )
            outcome.update(end=result.end, detail=result.detail)
        finally:
            active.dec()
            m.connection_duration.labels(listener, label, DIRECTION).observe(
                trio.current_time() - t0
            )

    try:
        closed = await serve_outbound(
            session.stream,
            session.outbound,
            gateway_relay,
            peer=session.peer,
            on_relaying=on_relaying,
        )
    except OutboundRejected as exc:
        session.rejected(exc)
        return
    except BaseException as exc:
        if not isinstance(exc, Exception) and not session.reported:
            # Cancelled: the drain deadline (or the gateway stopping).
            if relaying:
                session.closed(
                    **relaying,
                    end="shutdown",
                    bytes_from_partner=counts["from_partner"],
                    bytes_to_partner=counts["to_partner"],
                )
            else:
                session.rejected(
                    OutboundRejected(
                        Reason.SHUTTING_DOWN, "gateway shut down before the relay started"
                    )
                )
        raise
    end = closed.end if closed.end == "trust_withdrawn" else outcome.get("end", closed.end)
    session.closed(
        member=closed.member,
        partner=closed.partner,
        partner_edge=closed.partner_edge,
        end=end,
        bytes_from_partner=counts["from_partner"],
        bytes_to_partner=counts["to_partner"],
        reason=closed.reason,
        detail=closed.detail or outcome.get("detail", ""),
    )


class OutboundListeners:
    """Every outbound listener of one gateway: their state, limits and reload.

    Give `handle` to the accept loops of `mode = "outbound"` listeners; call
    `update` after every snapshot swap; the drain waits on `idle`.
    """

    def __init__(
        self,
        current: Callable[[], Current],
        metrics: Metrics,
        log: EventLog,
        *,
        others_active: Callable[[], int] = lambda: 0,
    ) -> None:
        self._current = current
        self._metrics = metrics
        self._log = log
        # Inbound connections open now, so max_connections bounds the whole gateway.
        self._others_active = others_active
        self._outbound: dict[str, Outbound] = {}
        self._context: tuple[tuple[Identity, str], SSL.Context] | None = None
        self.active_total = 0
        self.idle = trio.Event()  # set while no outbound connection is open
        self.idle.set()
        self._handshakes_in_progress = 0
        limits = current().snapshot.config.limits
        self._sources_for = limits
        self._sources = source_limits(limits)

    def outbound(self, listener: Listener) -> Outbound | None:
        """The listener's `Outbound`, built from the current snapshot on first use
        (None, failing closed, when its policies folder is not loaded)."""
        ob = self._outbound.get(listener.name)
        if ob is None:
            snapshot = self._current().snapshot
            trust = snapshot.folder_of(listener)
            if trust is None:
                return None
            ob = Outbound(snapshot.config, listener, trust.policies, log=self._log)
            self._outbound[listener.name] = ob
        return ob

    def server_context(self) -> SSL.Context:
        """The outbound listeners' TLS context, rebuilt when the identity changes."""
        config = self._current().snapshot.config
        key = (config.identity, config.tls.profile)
        cached = self._context
        if cached is None or cached[0] != key:
            cached = self._context = (key, outbound_server_context(*key))
        return cached[1]

    def update(self, snapshot: Snapshot) -> int:
        """Apply a new snapshot to every outbound listener; close the outbound
        connections it no longer allows (`trust_withdrawn`). Returns the count."""
        closed = 0
        for name, ob in self._outbound.items():
            listener = next(
                (lst for lst in snapshot.config.listeners if lst.name == name), ob.listener
            )
            trust = snapshot.folder_of(listener)
            if trust is None:  # fail closed: no folder, no partner
                closed += ob.withdraw(())
                continue
            closed += ob.update(trust.policies, snapshot.config)
        return closed

    def _sources_table(self, limits: Limits) -> SourceLimits:
        if limits != self._sources_for:
            self._sources_for, self._sources = limits, source_limits(limits)
        return self._sources

    async def handle(self, listener: Listener, tcp: trio.SocketStream) -> None:
        """Serve one accepted connection of an outbound listener (never raises but
        Cancelled)."""
        self.active_total += 1
        if self.idle.is_set():
            self.idle = trio.Event()
        session: OutboundSession | None = None
        peer = peer_of(tcp)
        try:
            source = source_ip(tcp)
            sources = self._admit(listener, source)
            if isinstance(sources, str):
                self._reject(listener, peer, Reason.OVER_LIMIT, sources)
                await trio.aclose_forcefully(tcp)
                return
            try:  # the source's share covers the whole connection, as inbound
                session = await self._handshake(listener, tcp, peer)
                if session is not None:
                    await handle_outbound(listener, session)
            finally:
                sources.release(source)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if session is None or not session.reported:
                self._reject(listener, peer, Reason.INTERNAL_ERROR, error)
            self._log.event(
                "internal_error", listener=listener.name, peer=peer, error=error, where=where(exc)
            )
            await trio.aclose_forcefully(tcp)
        finally:
            self.active_total -= 1
            if self.active_total == 0:
                self.idle.set()

    def _reject(self, listener: Listener, peer: str, reason: Reason, detail: str) -> None:
        rejection = OutboundRejected(reason, detail)
        report_rejected(self._metrics, self._log, listener, peer, UNKNOWN_PARTNER, rejection)

    def _admit(self, listener: Listener, source: str) -> SourceLimits | str:
        """The accept-time limits: the table that admitted `source`, or why not."""
        limits = self._current().snapshot.config.limits
        total = self.active_total + self._others_active()
        if total > limits.max_connections:
            return f"max_connections={limits.max_connections} reached"
        if self._handshakes_in_progress >= limits.max_handshakes_in_progress:
            return f"max_handshakes_in_progress={limits.max_handshakes_in_progress} reached"
        sources = self._sources_table(limits)  # released into the table that admitted it
        refusal = sources.admit(source, trio.current_time())
        return refusal if refusal is not None else sources

    async def _handshake(
        self, listener: Listener, tcp: trio.SocketStream, peer: str
    ) -> OutboundSession | None:
        """The member's TLS handshake; None when it failed (logged)."""
        limits = self._current().snapshot.config.limits
        ob = self.outbound(listener)
        if ob is None:
            self._reject(listener, peer, Reason.INTERNAL_ERROR, "no policies loaded")
            await trio.aclose_forcefully(tcp)
            return None
        stream = TLSStream(tcp, self.server_context(), server_side=True)
        session = OutboundSession(
            listener, ob, stream, peer, self._metrics, self._log, self._current
        )
        t0 = trio.current_time()
        self._handshakes_in_progress += 1
        failure: tuple[Reason, str] | None = None
        try:
            with trio.move_on_after(limits.handshake_timeout_s) as scope:
                failure = await _member_handshake(stream)
            if scope.cancelled_caught:
                failure = (
                    Reason.HANDSHAKE_TIMEOUT,
                    f"no TLS handshake within handshake_timeout_s={limits.handshake_timeout_s:g}",
                )
        finally:
            self._handshakes_in_progress -= 1
        if failure is not None:
            session.rejected(OutboundRejected(*failure))
            await trio.aclose_forcefully(tcp)
            return None
        self._metrics.handshake_duration.labels(listener.name).observe(trio.current_time() - t0)
        return session


async def _member_handshake(stream: TLSStream) -> tuple[Reason, str] | None:
    """The member's handshake; a failure as (reason code, detail)."""
    try:
        await stream.do_handshake()
    except TLSTruncatedError:
        return Reason.TLS_ERROR, "the member closed the connection during the handshake"
    except TLSError as exc:
        if any(len(e) == 3 and e[2] == _NO_PEER_CERT for e in exc.openssl_errors):
            return Reason.NO_CLIENT_CERT, "the member sent no client certificate"
        return Reason.TLS_ERROR, f"TLS handshake failed: {exc}"
    except (trio.BrokenResourceError, OSError) as exc:
        return Reason.TLS_ERROR, f"connection lost during the handshake: {exc}"
    return None


def _version(stream: TLSStream | None) -> str | None:
    try:
        return stream.version if stream is not None else None
    except Exception:  # not handshaken (never for a relayed connection)
        return None
