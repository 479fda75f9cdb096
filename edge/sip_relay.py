"""Relaying SIP between a partner stream and a pool stream, message by message.

Owns: the two pumps of a `protocol = "sip"` connection (docs/architecture.md, "SIP
listeners"): each frames what its side sends with `edge.core.sip.SipFramer`,
checks the requests of a guarded side with `check_request`, answers the ones
that fail on the stream they came from (RFC 3261 section 8.2.6, built by the
core) and relays everything else as the exact bytes received.

Must never: rewrite a relayed message, send a rejected request on, answer an
ACK, hold more than `max_message_bytes` of an unfinished message, or put
peer text anywhere but through `safe_text` (the callbacks receive it already
sanitized). It does not close the streams (the caller owns them and closes
both after `relay_sip` returns) and knows nothing of metrics or logs: the
caller passes callbacks.

Theory: one task per direction, as in the plain relay. A pump may write to
both streams (relay to the other side, answer its own side), and the other
pump writes to them too, so each stream has one send lock; a whole batch or
one whole answer is sent under it, so answers never land inside a relayed
message. Messages that arrived in one read are sent with one `send_all` (one
TLS record when they fit); when every byte of the read was relayed, the read
buffer itself is sent, without a join.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

import trio

from edge.core.reasons import Reason
from edge.core.sip import (
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_MESSAGE_BYTES,
    FramingError,
    Head,
    KeepAlive,
    Message,
    SipFramer,
    build_response,
    check_request,
    safe_text,
)
from edge.relay import RelayControl, go_direct_both
from edge.tls import TLSTruncatedError

__all__ = ["SipMessageResult", "SipRejection", "SipRelayEnd", "relay_sip"]

Direction = Literal["inbound", "outbound"]  # inbound: partner -> pool; outbound: pool -> partner
RECEIVE_SIZE = 64 * 1024
_STATUS_FOR = {
    Reason.SIP_DOMAIN_MISMATCH: 403,
    Reason.SIP_MALFORMED: 400,
}
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(frozen=True, slots=True)
class SipMessageResult:
    """One SIP message seen by the relay (keep-alives are not reported).

    `result` is "relayed" or a reason code (`sip_domain_mismatch`,
    `sip_malformed`, `sip_too_large`): the `result` label of
    `edge_sip_messages_total`.
    """

    direction: Direction
    result: str
    method: str  # sanitized; "" for a response or an unreadable start line


@dataclass(frozen=True, slots=True)
class SipRejection:
    """A request (or unframeable input) the edge refused: the `sip_rejected` log fields.

    Every string is sanitized with `safe_text` already. `answered` is the
    status code the edge sent back, or None (ACK, or no response could be built).
    """

    direction: Direction
    reason: str
    method: str
    call_id: str
    offending_domain: str
    answered: int | None
    detail: str = ""


@dataclass(slots=True)
class SipRelayEnd:
    """How the relay ended; the caller then closes both streams.

    `end`: `partner_closed` / `pool_closed` (clean EOF from that side, after the
    other side also ended or errored), `partner_error` / `pool_error`,
    `partner_truncated` / `pool_truncated` (TCP closed without close_notify),
    `idle_timeout`, a reason code: `sip_malformed` / `sip_too_large`, or the
    `end` a `RelayControl.stop` gave (`trust_withdrawn`).
    """

    end: str = ""
    detail: str = ""
    bytes_from_partner: int = 0  # relayed to the pool
    bytes_to_partner: int = 0  # relayed to the partner (the edge's answers not included)
    first_eof: str | None = None


def _describe(head: Head | None) -> tuple[str, str]:
    if head is None:
        return "", ""
    return safe_text(head.method or "", 32), safe_text(head.headers.get("call-id") or "")


async def relay_sip(
    partner: trio.abc.Stream,
    pool: trio.abc.Stream,
    *,
    partner_domains: Collection[str] | None,
    pool_domains: Collection[str] | None = None,
    idle_timeout_s: float = math.inf,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_headers: int = DEFAULT_MAX_HEADERS,
    on_message: Callable[[SipMessageResult], None] | None = None,
    on_rejected: Callable[[SipRejection], None] | None = None,
    on_relayed: Callable[[Direction, int], None] | None = None,
    receive_size: int = RECEIVE_SIZE,
    on_bytes_from_partner: Callable[[int], None] | None = None,
    on_bytes_to_partner: Callable[[int], None] | None = None,
    control: RelayControl | None = None,
) -> SipRelayEnd:
    """Relay SIP both ways until both sides end, one fails, or the idle timeout.

    `partner_domains`: the domains the partner may speak for (inbound listener:
    the partner's policy domains); its requests outside them are answered by
    the edge and never reach the pool. `pool_domains`: the same for requests
    from the pool (outbound: `[sip] domains`). None leaves that side unguarded
    (still framed and bounded). Domains must be normalized (lowercase, no
    trailing dot), as `PartnerPolicy.domains` are. `on_bytes_*`: called with
    each relayed batch's size (the edge's own answers are not counted).
    `on_message` gets every message's result; with `on_relayed`, relayed
    messages are counted instead, once per read: `on_relayed(direction, n)`
    (a metric then costs one call per read, not one per message), and
    `on_message` gets only the refused ones.
    `control.stop(end, detail)` ends the relay from outside (a partner whose
    trust a reload withdrew) with that `end`.
    """
    state = SipRelayEnd()
    watch_idle = idle_timeout_s > 0 and not math.isinf(idle_timeout_s)
    # As in the plain relay: the deadline is moved only when `slack` stale,
    # so a busy stream does not touch trio's deadline heap per read.
    slack = idle_timeout_s / 64 if watch_idle else 0.0
    locks = {"partner": trio.Lock(), "pool": trio.Lock()}
    streams = {"partner": partner, "pool": pool}
    # Plaintext each side's stream had already decrypted when it moved onto its
    # socket (TLSStream.go_direct: OpenSSL reads and writes the socket itself,
    # no memory-BIO copies per read): framed before anything read later.
    first, failed = await go_direct_both(partner, pool, ("partner", "pool"))
    if failed is not None:
        state.end, state.detail = failed.end, failed.detail
        return state
    early = {"partner": first[0], "pool": first[1]}
    del first

    def finish(end: str, detail: str = "") -> None:
        if not state.end:
            state.end, state.detail = end, detail

    async def send(name: str, data: bytes | bytearray, scope: trio.CancelScope) -> bool:
        try:
            # `async with` ends with a checkpoint even when the lock is free:
            # measured, that scheduler pass lets more records arrive before
            # the next read, so more messages share one read and one send
            # (bench/README.md); taking a free lock without it cost more.
            async with locks[name]:
                await streams[name].send_all(data)
        except TLSTruncatedError as exc:
            finish(f"{name}_truncated", str(exc))
        except _STREAM_ERRORS as exc:
            finish(f"{name}_error", str(exc))
        else:
            return True
        scope.cancel()
        return False

    # One SipMessageResult per (direction, result, method), shared (it is
    # frozen): no allocation and no sanitizing per relayed message. Bounded,
    # as methods come from the peer.
    results: dict[tuple[str, str, str | None], SipMessageResult] = {}
    per_message = on_message is not None and on_relayed is None

    def report(direction: Direction, result: str, head: Head | None) -> None:
        if on_message is None:
            return
        key = (direction, result, head.method if head is not None else None)
        found = results.get(key)
        if found is None:
            found = SipMessageResult(direction, result, safe_text(key[2] or "", 32))
            if len(results) < 256:
                results[key] = found
        on_message(found)

    def reject(
        direction: Direction,
        reason: Reason,
        head: Head | None,
        offending: str,
        answered: int | None,
        detail: str = "",
    ) -> None:
        report(direction, reason.value, head)
        if on_rejected is not None:
            method, call_id = _describe(head)
            on_rejected(
                SipRejection(
                    direction, reason.value, method, call_id, safe_text(offending), answered, detail
                )
            )

    async def pump(src_name: str, scope: trio.CancelScope) -> None:
        dst_name = "pool" if src_name == "partner" else "partner"
        direction: Direction = "inbound" if src_name == "partner" else "outbound"
        domains = partner_domains if src_name == "partner" else pool_domains
        src = streams[src_name]
        framer = SipFramer(max_message_bytes=max_message_bytes, max_headers=max_headers)
        data: bytes | bytearray
        while True:
            try:
                data, early[src_name] = early[src_name], b""
                if not data:
                    data = await src.receive_some(receive_size)
            except TLSTruncatedError:
                finish(f"{src_name}_truncated", f"{src_name} closed TCP without close_notify")
                scope.cancel()
                return
            except _STREAM_ERRORS as exc:
                finish(f"{src_name}_error", str(exc))
                scope.cancel()
                return
            if not data:
                if state.first_eof is None:
                    state.first_eof = src_name
                if framer.buffered:
                    # An unfinished message is never relayed in part.
                    state.detail = state.detail or (
                        f"{src_name} ended inside a message ({framer.buffered} bytes dropped)"
                    )
                dst = streams[dst_name]
                if isinstance(dst, trio.abc.HalfCloseableStream):
                    try:
                        async with locks[dst_name]:
                            await dst.send_eof()
                    except _STREAM_ERRORS as exc:
                        finish(f"{dst_name}_error", str(exc))
                        scope.cancel()
                else:
                    scope.cancel()  # no half-close: one side ending ends the relay
                return
            fresh = framer.buffered == 0
            framer.feed(data)
            batch: list[bytes] = []
            whole = fresh  # every byte of `data` relayed, in order, so far
            failed: FramingError | None = None
            relayed = 0
            for event in framer.events():
                if isinstance(event, Message):
                    verdict = (
                        check_request(event, domains)
                        if domains is not None and event.head.method is not None
                        else None
                    )
                    if verdict is None:
                        batch.append(event.raw)
                        relayed += 1
                        if per_message:
                            report(direction, "relayed", event.head)
                        continue
                    whole = False
                    if relayed and on_relayed is not None:
                        on_relayed(direction, relayed)  # counted before sent, as below
                    relayed = 0
                    if batch and not await send(dst_name, b"".join(batch), scope):
                        return
                    batch = []
                    reason, offending = verdict
                    answer = build_response(event, _STATUS_FOR[reason], reason.value)
                    if answer is not None and not await send(src_name, answer, scope):
                        return
                    status = _STATUS_FOR[reason] if answer is not None else None
                    reject(direction, reason, event.head, offending, status)
                elif isinstance(event, KeepAlive):
                    batch.append(event.raw)
                else:
                    failed = event
            if relayed and on_relayed is not None:
                on_relayed(direction, relayed)
            if batch:
                payload = (
                    data if whole and not framer.buffered and failed is None else b"".join(batch)
                )
                if not await send(dst_name, payload, scope):
                    return
                n = len(payload)
                if src_name == "partner":
                    state.bytes_from_partner += n
                    if on_bytes_from_partner is not None:
                        on_bytes_from_partner(n)
                else:
                    state.bytes_to_partner += n
                    if on_bytes_to_partner is not None:
                        on_bytes_to_partner(n)
            if failed is not None:
                answer = (
                    build_response(failed.head, failed.status_code, failed.reason.value)
                    if failed.head is not None
                    else None
                )
                if answer is not None:
                    await send(src_name, answer, scope)
                reject(
                    direction,
                    failed.reason,
                    failed.head,
                    "",
                    failed.status_code if answer is not None else None,
                    failed.detail,
                )
                finish(failed.reason.value, f"from {src_name}: {failed.detail}")
                scope.cancel()
                return
            if watch_idle:
                deadline = trio.current_time() + idle_timeout_s + slack
                if deadline - scope.deadline > slack:
                    scope.deadline = deadline

    with trio.CancelScope() as scope:
        if control is not None:
            control.attach(scope)
        if watch_idle:
            scope.deadline = trio.current_time() + idle_timeout_s + slack
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, "pool", scope)
                await pump("partner", scope)
        finally:
            if control is not None:
                control.attach(None)
    if control is not None and control.end is not None and not state.end:
        # Ended on purpose from outside (trust withdrawn), not by either side.
        state.end, state.detail = control.end, control.detail
    if scope.cancelled_caught and not state.end:
        finish("idle_timeout", f"no byte either way for idle_timeout_s={idle_timeout_s:g}")
    if not state.end:
        state.end = f"{state.first_eof}_closed" if state.first_eof else "closed"
    return state
