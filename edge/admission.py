"""One connection, from accept to exactly one log event: admission, then the relay.

Owns the life of one partner (or client) connection:

1. refuse at once (``over_limit``) when the gateway, the handshake slots or
   the source's share (``edge.core.limits.SourceLimits``) are full;
2. TLS handshake inside one ``handshake_timeout_s`` cancel scope. On an mtls
   listener the core (``PartnerTrust.verify_client``, the folder's verifier
   in the listener's context) decides inside the handshake, so a refused
   partner gets the alert that says why; ``TLSStream.handshake_verdict`` is
   THE verdict (never a second verification), and a completed handshake
   without an accepted verdict is refused. No application byte is read before
   the verdict; then the partner's own connection limit;
3. a verified stream to a member of the partner's pool (``edge.pools``, whose
   dial takes ``ServerTrust``'s decision); if a reload swapped the folder's
   verifier meanwhile (during the handshake or the dial), the chain is
   re-checked against the new one before the first relayed byte
   (``trust_withdrawn``); only then is the partner read;
4. the relay (``edge.relay``), registered as live so a reload can withdraw it,
   and ended at ``Verdict.not_after`` (the earliest expiry on the verified
   path, root included: ``trust_withdrawn``, reason ``expired``);
5. one ``connection_closed`` or ``connection_rejected`` event, with the
   handshake metric and the clipped subject and detail.

Every decision reads the ``Current`` value handed in at that moment (the
snapshot and its TLS contexts), so a reload applies to the next connection.

Must never: read an application byte before the verdict, log a payload byte
or key material, copy a peer-controlled string into a log line unclipped,
let one connection's bug end the gateway (an exception costs that connection
only, logged as ``internal_error``), or decide trust itself.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from edge.core.config import Limits, Listener
from edge.core.limits import SourceLimits
from edge.core.reasons import Reason
from edge.core.snapshot import FolderTrust, Snapshot
from edge.core.trust import PartnerTrust, Verdict
from edge.crlfetch import CrlFetcher
from edge.current import Current
from edge.logs import EventLog
from edge.metrics import UNKNOWN_PARTNER, Metrics
from edge.pools import PoolSet, UpstreamUnavailable, proxy_info
from edge.probes import closed_before_sending
from edge.relay import RelayControl, relay
from edge.shared_certs import clip as _clip
from edge.shared_certs import leaf_labels, share_chain, share_verdict
from edge.sip_listener import RelayFunction, SipPeer, sip_relay_for
from edge.tls import TLSError, TLSStream, TLSTruncatedError

__all__ = [
    "Admission",
    "Conn",
    "LiveConnection",
    "partner_label",
    "peer_of",
    "source_ip",
    "source_limits",
    "where",
]

# Log fields an unauthenticated peer can fill are clipped: a stranger's 80 kB
# subject must not become a 240 kB log line per handshake.
_MAX_SUBJECT = 512
_MAX_DETAIL = 2048
# Longest a relayed connection spends closing both of its streams.
_CLOSE_BUDGET_S = 2.0
# OpenSSL's reason (its error queue entry, not a message) when a required
# client certificate was not sent: SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE.
_NO_PEER_CERT = "peer did not return a certificate"


@dataclass(slots=True)  # one per connection: no instance dict
class Conn:
    """What the final log line of one connection says."""

    listener: str
    peer: str
    started: float
    partner: str | None = None
    leaf_subject: str | None = None
    fingerprint_sha256: str | None = None
    tls_version: str | None = None
    member: str | None = None
    bytes_from_partner: int = 0
    bytes_to_partner: int = 0
    end: str | None = None
    detail: str = ""
    reported: bool = False  # its one final event has been logged
    # The chain the partner sent, kept to re-authorize the live connection
    # against every new snapshot (edge.reload).
    chain: tuple[x509.Certificate, ...] = ()
    withdrawn_reason: str | None = None
    # The verifier that judged the handshake (the listener context's), and its
    # verdict: a reload that replaced the verifier means a re-check before relaying.
    judge: PartnerTrust | None = None
    verdict: Verdict | None = None
    withdrawn: tuple[str, str] | None = None  # (reason, detail): trust lost before relaying


@dataclass(slots=True)
class LiveConnection:
    """A relayed connection that a policy change may have to close."""

    listener: Listener
    conn: Conn
    control: RelayControl

    def withdraw(self, reason: str, detail: str) -> None:
        if self.conn.end is None and self.control.end is None:
            self.conn.withdrawn_reason = reason
        self.control.stop("trust_withdrawn", detail)


class _Probe(Exception):
    """The peer closed before sending a byte: a TCP health check (edge.probes)."""


class _Rejected(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def partner_label(snapshot: Snapshot, listener: Listener, partner: str | None) -> str:
    """The ``partner`` metrics label: a configured partner id, else ``unknown``."""
    trust = snapshot.folder_of(listener)
    if partner is None or trust is None or partner not in trust.policies.partners:
        return UNKNOWN_PARTNER
    return partner


class Admission:
    """Serves accepted connections; counts them for the limits and the drain."""

    def __init__(
        self,
        current: Callable[[], Current],
        pools: PoolSet,
        metrics: Metrics,
        log: EventLog,
        *,
        crl_fetcher: CrlFetcher | None = None,
        shutting_down: Callable[[], bool] = lambda: False,
        on_live: Callable[[tuple[x509.Certificate, ...]], None] = lambda _chain: None,
        others_active: Callable[[], int] = lambda: 0,
    ) -> None:
        self._current = current
        self._others_active = others_active  # outbound connections: one max_connections
        self._pools = pools
        self._metrics = metrics
        self._log = log
        self._crl_fetcher = crl_fetcher
        self._shutting_down = shutting_down
        self._on_live = on_live
        self.active_total = 0
        self._active_by_partner: Counter[str] = Counter()
        self.idle = trio.Event()  # set while no connection is open (the drain waits on it)
        self.idle.set()
        self._handshakes_in_progress = 0
        limits = current().snapshot.config.limits
        self._sources_for = limits
        self._sources = source_limits(limits)
        # Relayed connections, for re-authorization after a reload (edge.reload).
        self.live: dict[int, LiveConnection] = {}

    async def handle(self, listener: Listener, tcp: trio.SocketStream) -> None:
        """Serve one accepted connection to its end (never raises but Cancelled)."""
        conn = Conn(listener=listener.name, peer=peer_of(tcp), started=trio.current_time())
        self.active_total += 1
        if self.idle.is_set():
            self.idle = trio.Event()
        try:
            await self._serve(listener, tcp, conn)
        except Exception as exc:
            # A bug must cost one connection, never the gateway (an exception
            # escaping here would cancel every connection through the nursery).
            error = f"{type(exc).__name__}: {exc}"
            if not conn.reported:
                self._reject(listener, conn, Reason.INTERNAL_ERROR, error)
            self._log.event(
                "internal_error",
                listener=listener.name,
                peer=conn.peer,
                error=error,
                where=where(exc),
            )
            await trio.aclose_forcefully(tcp)
        finally:
            self.active_total -= 1
            if self.active_total == 0:
                self.idle.set()

    def _reject(self, listener: Listener, conn: Conn, reason: Reason, detail: str) -> None:
        conn.reported = True
        label = partner_label(self._current().snapshot, listener, conn.partner)
        self._metrics.handshakes.labels(listener.name, label, reason.value, "inbound").inc()
        fields: dict[str, Any] = {
            "listener": listener.name,
            "peer": conn.peer,
            "reason": reason.value,
            "detail": _clip(detail, _MAX_DETAIL),
        }
        if conn.partner is not None:
            fields["partner"] = conn.partner
        if conn.leaf_subject is not None:
            fields["leaf_subject"] = conn.leaf_subject
            fields["fingerprint_sha256"] = conn.fingerprint_sha256
        self._log.event("connection_rejected", **fields)

    def _sources_table(self, limits: Limits) -> SourceLimits:
        if limits != self._sources_for:
            # A new table for new connections; live ones release into the
            # table that admitted them, which goes when they have ended.
            self._sources_for, self._sources = limits, source_limits(limits)
        return self._sources

    async def _serve(self, listener: Listener, tcp: trio.SocketStream, conn: Conn) -> None:
        limits = self._current().snapshot.config.limits
        refusal: str | None = None
        if self.active_total + self._others_active() > limits.max_connections:
            refusal = f"max_connections={limits.max_connections} reached"
        # Refuse before spending a handshake wherever the limit is already known.
        elif self._handshakes_in_progress >= limits.max_handshakes_in_progress:
            refusal = f"max_handshakes_in_progress={limits.max_handshakes_in_progress} reached"
        if refusal is not None:
            self._reject(listener, conn, Reason.OVER_LIMIT, refusal)
            await trio.aclose_forcefully(tcp)
            return
        source = source_ip(tcp)
        sources = self._sources_table(limits)  # release into the table that admitted it
        refusal = sources.admit(source, trio.current_time())
        if refusal is not None:
            self._reject(listener, conn, Reason.OVER_LIMIT, refusal)
            await trio.aclose_forcefully(tcp)
            return
        try:
            await self._serve_admitted_source(listener, tcp, conn)
        finally:
            sources.release(source)

    async def _serve_admitted_source(
        self, listener: Listener, tcp: trio.SocketStream, conn: Conn
    ) -> None:
        current = self._current()
        tls = TLSStream(tcp, current.server_contexts[listener.name], server_side=True)
        conn.judge = _verifier(current.snapshot.folder_of(listener))  # the context's verifier
        try:
            self._handshakes_in_progress += 1
            try:
                partner, pool_name = await self._admit(listener, tls, conn)
            finally:
                # Released before anything is logged: whoever reads the verdict
                # may count on the slot being free again.
                self._handshakes_in_progress -= 1
            origin = proxy_info(tcp, tls, partner, conn.tls_version, conn.chain, conn.verdict)
        except _Probe:
            self._metrics.tcp_probes.labels(listener.name).inc()
            await trio.aclose_forcefully(tls.transport_stream)
            return
        except _Rejected as rej:
            self._reject(listener, conn, rej.reason, rej.detail)
            # No close_notify: a refusal is not a graceful end of stream.
            await trio.aclose_forcefully(tls.transport_stream)
            return
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled: the drain deadline
                self._reject(
                    listener, conn, Reason.SHUTTING_DOWN, "gateway shut down during handshake"
                )
                await trio.aclose_forcefully(tls.transport_stream)
            raise
        label = partner_label(self._current().snapshot, listener, partner)
        self._active_by_partner[label] += 1
        try:
            try:
                upstream, member = await self._pools.connect(pool_name, origin)
            except UpstreamUnavailable as exc:
                self._reject(listener, conn, exc.reason, exc.detail)
                await trio.aclose_forcefully(tls.transport_stream)
                return
            except BaseException as exc:
                if not isinstance(exc, Exception):  # cancelled: the drain deadline
                    self._reject(
                        listener,
                        conn,
                        Reason.SHUTTING_DOWN,
                        "gateway shut down while connecting upstream",
                    )
                    await trio.aclose_forcefully(tls.transport_stream)
                raise
            conn.member = member.host
            self._metrics.handshakes.labels(listener.name, label, "ok", "inbound").inc()
            conn.withdrawn = withdrawal_after_reload(self._current().snapshot, listener, conn)
            with member:  # the member's active count, for balancing and max_connections
                await self._relay_and_report(listener, label, conn, tls, upstream)
        finally:
            self._active_by_partner[label] -= 1

    async def _admit(
        self, listener: Listener, tls: TLSStream, conn: Conn
    ) -> tuple[str | None, str]:
        """Handshake and authorize within the handshake timeout.

        Returns (partner id or None for a "tls" listener, pool name).
        """
        limits = self._current().snapshot.config.limits
        t0 = trio.current_time()
        timeout = limits.handshake_timeout_s if limits.handshake_timeout_s > 0 else math.inf
        failure: _Rejected | None = None
        with trio.move_on_after(timeout) as scope:
            if await closed_before_sending(tls.transport_stream):
                raise _Probe  # a load balancer's TCP check: counted, never logged
            try:
                await _handshake(tls)
            except _Rejected as rej:
                failure = rej
            else:
                conn.tls_version = tls.version
                if listener.mode != "mtls":
                    self._metrics.handshake_duration.labels(listener.name).observe(
                        trio.current_time() - t0
                    )
                    return None, listener.pool
                try:
                    conn.chain = tuple(tls.peer_chain)
                except ValueError as exc:  # DER that OpenSSL took but cryptography will not
                    raise _Rejected(Reason.INVALID_CHAIN, f"unparsable certificate: {exc}") from exc
        if scope.cancelled_caught:
            raise _Rejected(
                Reason.HANDSHAKE_TIMEOUT,
                f"handshake not finished within handshake_timeout_s={limits.handshake_timeout_s:g}",
            )
        # THE verdict, reached inside the handshake (edge.tls): never verify twice.
        verdict = _take_verdict(tls, conn) if listener.mode == "mtls" else None
        if verdict is not None and self._crl_fetcher is not None:
            # Learn where this partner's CRLs live (a crl_unavailable refusal
            # too: the next attempt succeeds once the CRL has been fetched).
            self._crl_fetcher.note_verdict(verdict)
        if failure is None or verdict is not None:  # authorized, or refused by the verdict
            self._metrics.handshake_duration.labels(listener.name).observe(trio.current_time() - t0)
        trust = self._current().snapshot.folder_of(listener)  # goes with this verdict
        verdict = _admitted(verdict, failure, trust, conn)
        assert verdict.partner is not None and trust is not None
        policy = trust.policies.partners[verdict.partner]
        limit = limits.max_connections_per_partner
        if policy.max_connections is not None:
            limit = min(limit, policy.max_connections)
        if self._active_by_partner[verdict.partner] >= limit:
            raise _Rejected(
                Reason.OVER_LIMIT,
                f"partner {verdict.partner} is at its limit of {limit} connections",
            )
        return verdict.partner, policy.pool or listener.pool

    async def _relay_and_report(
        self, listener: Listener, label: str, conn: Conn, partner: TLSStream, upstream: TLSStream
    ) -> None:
        m = self._metrics
        active = m.connections_active.labels(listener.name, label, "inbound")
        active.inc()
        relay_start = trio.current_time()
        from_partner = m.bytes.labels(listener.name, label, "from_partner")
        to_partner = m.bytes.labels(listener.name, label, "to_partner")

        def count_from_partner(n: int) -> None:
            from_partner.inc(n)
            conn.bytes_from_partner += n

        def count_to_partner(n: int) -> None:
            to_partner.inc(n)
            conn.bytes_to_partner += n

        control = RelayControl()
        key = id(conn)
        try:
            if conn.chain:
                live = self.live[key] = LiveConnection(listener, conn, control)
                self._on_live(_verified_path(conn))  # closed when its first cert expires
                if conn.withdrawn is not None:  # ends the relay before its first byte
                    live.withdraw(*conn.withdrawn)
            run_relay: RelayFunction = relay
            if listener.protocol == "sip":
                who = SipPeer(conn.partner, label, conn.peer)
                run_relay = sip_relay_for(self._current, m, self._log, listener, who)
            outcome = await run_relay(
                partner,
                upstream,
                idle_timeout_s=self._current().snapshot.config.limits.idle_timeout_s,
                names=("partner", "pool"),
                on_bytes_from_a=count_from_partner,
                on_bytes_from_b=count_to_partner,
                control=control,
            )
            conn.end, conn.detail = outcome.end, outcome.detail
        except BaseException:
            # Cancellation arrives wrapped in exception groups from nurseries,
            # so the shutdown flag, not the exception type, says what happened.
            conn.end = conn.end or ("shutdown" if self._shutting_down() else "cancelled")
            raise
        finally:
            self.live.pop(key, None)
            active.dec()
            # Shielded and bounded: a drain-deadline cancellation still sends
            # close_notify both ways (at most _CLOSE_BUDGET_S) and, above all,
            # still reaches the log line below.
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_BUDGET_S):
                await _close_both(partner, upstream)
            m.connection_duration.labels(listener.name, label, "inbound").observe(
                trio.current_time() - relay_start
            )
            self._report_closed(listener, label, conn)

    def _report_closed(self, listener: Listener, label: str, conn: Conn) -> None:
        fields: dict[str, Any] = {
            "listener": listener.name,
            "partner": conn.partner if conn.partner is not None else label,
            "peer": conn.peer,
            "leaf_subject": conn.leaf_subject,
            "fingerprint_sha256": conn.fingerprint_sha256,
            "tls_version": conn.tls_version,
            "member": conn.member,
            "bytes_from_partner": conn.bytes_from_partner,
            "bytes_to_partner": conn.bytes_to_partner,
            "duration_s": round(trio.current_time() - conn.started, 3),
            "end": conn.end or "closed",
        }
        if conn.withdrawn_reason is not None:
            fields["reason"] = conn.withdrawn_reason
        if conn.detail:
            fields["detail"] = _clip(conn.detail, _MAX_DETAIL)
        conn.reported = True
        self._log.event("connection_closed", **fields)


def _take_verdict(tls: TLSStream, conn: Conn) -> Verdict | None:
    """The verdict reached inside ``tls``'s handshake, written down on ``conn``."""
    verdict = tls.handshake_verdict
    if verdict is not None and verdict.accepted:  # held while live: one copy per certificate
        conn.chain, verdict = share_chain(conn.chain), share_verdict(verdict)
        tls.share_verdict(verdict)
    if verdict is not None:
        conn.verdict, conn.partner = verdict, verdict.partner
        leaf = conn.chain[0] if conn.chain else (verdict.chain[0] if verdict.chain else None)
        if leaf is not None:
            labels = leaf_labels(leaf, _MAX_SUBJECT, shared=verdict.accepted)
            conn.leaf_subject, conn.fingerprint_sha256 = labels
    return verdict


def _admitted(
    verdict: Verdict | None, failure: _Rejected | None, trust: FolderTrust | None, conn: Conn
) -> Verdict:
    """The accepted verdict an mtls connection relays under, or ``_Rejected``."""
    if failure is not None:
        # Refused inside the handshake: the verdict says why (the partner got
        # the matching alert); any other failure stays what OpenSSL said.
        if verdict is not None and not verdict.accepted and verdict.reason is not None:
            raise _Rejected(verdict.reason, verdict.detail)
        raise failure
    if trust is None or conn.judge is None:  # fail closed: an mtls listener without its folder
        raise _Rejected(Reason.INTERNAL_ERROR, "no policies loaded for this listener")
    if verdict is None:  # fail closed: a completed handshake never relays without one
        raise _Rejected(Reason.INTERNAL_ERROR, "handshake completed without a verdict")
    if not verdict.accepted:
        assert verdict.reason is not None
        raise _Rejected(verdict.reason, verdict.detail)
    withdrawn = _withdrawal(trust, conn)  # a reload during the handshake
    if withdrawn is not None:
        raise _Rejected(Reason(withdrawn[0]), withdrawn[1])
    assert conn.verdict is not None
    return conn.verdict


def _verifier(trust: FolderTrust | None) -> PartnerTrust | None:
    return trust.verifier if trust is not None else None


def _verified_path(conn: Conn) -> tuple[x509.Certificate, ...]:
    """The path the verdict verified (root included), else the chain the peer sent."""
    return (conn.verdict.chain if conn.verdict is not None else ()) or conn.chain


def withdrawal_after_reload(
    snapshot: Snapshot, listener: Listener, conn: Conn
) -> tuple[str, str] | None:
    """(reason, detail) if ``snapshot`` (now current) no longer admits ``conn``.

    Issue 15's race: a connection admitted under snapshot N was still dialling
    the pool when N+1 (the partner removed) arrived, then relayed. Called after
    the dial with no await until the relay: the first relayed byte never
    precedes this re-check."""
    return _withdrawal(snapshot.folder_of(listener), conn)


def _withdrawal(trust: FolderTrust | None, conn: Conn) -> tuple[str, str] | None:
    """(reason, detail) if the folder ``trust`` (now current) no longer admits
    ``conn``, whose verdict came from ``conn.judge``; None if it still does (a
    reload that replaced the verifier since the handshake gets its say)."""
    if conn.judge is None:  # a "tls" listener: no partner to re-check
        return None
    if trust is None:
        return Reason.INTERNAL_ERROR.value, "the listener's policies folder is gone"
    if trust.verifier is conn.judge:
        return None
    verdict = trust.verifier.verify_client(conn.chain)
    if not verdict.accepted:
        assert verdict.reason is not None
        return verdict.reason.value, verdict.detail
    if verdict.partner != conn.partner:
        return (
            Reason.PARTNER_CHANGED.value,
            f"the chain now identifies partner {verdict.partner}, not {conn.partner}",
        )
    conn.judge, conn.verdict = trust.verifier, verdict
    return None


async def _handshake(tls: TLSStream) -> None:
    """The server handshake; a failure as the reason code it stands for."""
    try:
        await tls.do_handshake()
    except TLSTruncatedError as exc:
        raise _Rejected(
            Reason.TLS_ERROR, "peer closed the connection during the handshake"
        ) from exc
    except TLSError as exc:
        # Classified by OpenSSL's error queue entry, not by the message text.
        if any(len(e) == 3 and e[2] == _NO_PEER_CERT for e in exc.openssl_errors):
            raise _Rejected(
                Reason.NO_CLIENT_CERT, "the partner sent no client certificate"
            ) from exc
        raise _Rejected(Reason.TLS_ERROR, f"TLS handshake failed: {exc}") from exc
    except (trio.BrokenResourceError, OSError) as exc:
        raise _Rejected(Reason.TLS_ERROR, f"connection lost during the handshake: {exc}") from exc


async def _close_both(a: TLSStream, b: TLSStream) -> None:
    # One after the other, not in a nursery of two tasks: each aclose is
    # bounded by its close_timeout (1 s; the caller's _CLOSE_BUDGET_S covers
    # both), closes its transport even when cancelled, and nearly always
    # returns at once because the relay already sent close_notify both ways.
    try:
        await a.aclose()
    finally:
        await b.aclose()


def where(exc: BaseException) -> str:
    """file:line of the innermost frame, for a bug report (no locals, no payload)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    return f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"


def peer_of(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "unknown"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def source_ip(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "unknown"


def source_limits(limits: Limits) -> SourceLimits:
    return SourceLimits(
        max_per_source=limits.max_connections_per_source,
        rate_per_s=limits.new_connections_per_source_per_s,
        burst=limits.new_connections_per_source_burst,
    )
