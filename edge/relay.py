"""The relay: bytes both ways between two streams until the exchange ends.

Owns moving bytes between two already-admitted streams (a partner and a pool
member today; the SIP and outbound listeners plug in here too): one bounded
chunk in flight per direction, so a slow side slows the other through TCP
back-pressure instead of growing memory; end of stream propagated as
half-close; the idle timeout; and naming how the exchange ended.

Must never: look at, log or keep a payload byte (it only counts them), decide
who may talk to whom (admission did, before the relay started), or close the
streams (the caller does, so it can bound and shield the close and still log).

Interface::

    outcome = await relay(a, b, idle_timeout_s=..., names=("partner", "pool"),
                          on_bytes_from_a=..., on_bytes_from_b=..., control=...)

Two ``TLSStream``s over sockets (every relayed partner connection) are handed
to ``edge.relay_hub``: OpenSSL on the sockets and one task moving every
relay's records (``TLSStream.go_direct``); the pumps below serve any other
pair of streams, and a pair that cannot switch. Both end the same ways.

``outcome.end`` is one of ``<name>_closed`` (that side ended first and the
other followed), ``closed``, ``<name>_truncated`` (TCP closed without
close_notify), ``<name>_error``, ``idle_timeout``, or whatever ``end`` a
``RelayControl.stop`` gave (``trust_withdrawn``). Cancellation from outside
(the drain deadline) propagates as trio's ``Cancelled``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from edge import relay_hub
from edge.tls import TLSStream, TLSTruncatedError

__all__ = ["RELAY_CHUNK", "RelayControl", "RelayOutcome", "go_direct_both", "relay"]

# One chunk in flight per direction: the relay's memory bound.
RELAY_CHUNK = 128 * 1024
# The pumps take TLSStream's eager calls (no schedule point when the bytes are
# already there); one explicit schedule point after this many chunks in a row
# keeps a pump that always finds data from starving the other connections.
_YIELD_EVERY = 16
# Transport failures of either stream: the relay ends, naming the side.
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# Two TLSStreams on sockets relay in direct mode, through edge.relay_hub (False:
# always the pumps below; for tests of the pumps and for comparisons).
DIRECT = True


@dataclass(frozen=True)
class RelayOutcome:
    """How one relay ended."""

    end: str
    detail: str = ""


class RelayControl:
    """Ends a running relay from outside (a withdrawn partner), saying why.

    Safe to call before the relay started (it then ends at once) or after it
    ended (no effect).
    """

    def __init__(self) -> None:
        self.end: str | None = None
        self.detail = ""
        self._scope: trio.CancelScope | None = None

    def stop(self, end: str, detail: str = "") -> None:
        if self.end is None:
            self.end, self.detail = end, detail
        if self._scope is not None:
            self._scope.cancel()

    def attach(self, scope: trio.CancelScope | None) -> None:
        """Let ``stop`` cancel ``scope`` (None detaches): for relays other than
        ``relay`` (edge.sip_relay). A stop that came first cancels it at once."""
        self._scope = scope
        if scope is not None and self.end is not None:
            scope.cancel()


def _ignore(_n: int) -> None:
    pass


async def go_direct_both(
    a: trio.abc.Stream, b: trio.abc.Stream, names: tuple[str, str]
) -> tuple[list[bytes], RelayOutcome | None]:
    """Move two ``TLSStream``s onto their sockets (``TLSStream.go_direct``)
    when both can; any other pair is left as it is. Returns the plaintext each
    had already decrypted ([a's, b's], to be relayed first) and, when sending
    what OpenSSL had queued failed, how the relay ends (``<name>_error``)."""
    first = [b"", b""]
    if (
        isinstance(a, TLSStream)
        and isinstance(b, TLSStream)
        and a.can_go_direct()
        and b.can_go_direct()
    ):
        for i, side in enumerate((a, b)):
            try:
                first[i] = await side.go_direct()
            except _GONE as exc:
                return first, RelayOutcome(f"{names[i]}_error", str(exc))
    return first, None


async def relay(
    a: trio.abc.HalfCloseableStream,
    b: trio.abc.HalfCloseableStream,
    *,
    idle_timeout_s: float,
    names: tuple[str, str] = ("a", "b"),
    on_bytes_from_a: Callable[[int], None] = _ignore,
    on_bytes_from_b: Callable[[int], None] = _ignore,
    control: RelayControl | None = None,
) -> RelayOutcome:
    """Relay until both directions ended, an error, ``idle_timeout_s`` without a
    byte either way (0 or inf: never), or ``control.stop``."""
    control = control if control is not None else RelayControl()
    # Plaintext go_direct had already decrypted, per side (a, b): sent first.
    first = [b"", b""]
    if DIRECT and relay_hub.AVAILABLE:
        first, failed = await go_direct_both(a, b, names)
        if failed is not None:
            return failed
        if isinstance(a, TLSStream) and isinstance(b, TLSStream) and a.direct and b.direct:
            end, detail = await relay_hub.relay_direct(
                a,
                b,
                first.pop(0),  # a's, then b's: popped, so that no frame
                first.pop(0),  # here keeps them for the relay's life
                idle_timeout_s=idle_timeout_s,
                names=names,
                on_bytes_from_a=on_bytes_from_a,
                on_bytes_from_b=on_bytes_from_b,
                control=control,
            )
            return RelayOutcome(end, detail)
        # One of them could not switch (its buffered bytes ended with a
        # close_notify or an error): the pumps, sending those bytes first.
    watch_idle = idle_timeout_s > 0 and not math.isinf(idle_timeout_s)
    # The idle timeout is the relay scope's deadline, pushed forward by the
    # pumps (no watchdog task per connection). It is moved only once it is
    # `slack` stale, so a busy stream does not touch trio's deadline heap per
    # record; the relay ends between idle and idle + slack after its last byte.
    slack = idle_timeout_s / 64 if watch_idle else 0.0
    first_eof: list[str] = []

    def finish(end: str, detail: str = "") -> None:
        control.stop(end, detail)

    async def pump(
        src: trio.abc.HalfCloseableStream,
        dst: trio.abc.HalfCloseableStream,
        src_name: str,
        dst_name: str,
        count: Callable[[int], None],
        scope: trio.CancelScope,
        which: int,
    ) -> None:
        receive = src.relay_receive if isinstance(src, TLSStream) else src.receive_some
        send = dst.relay_send if isinstance(dst, TLSStream) else dst.send_all
        # An idle side is waited for here, one frame deep (TLSStream.relay_idle_fd).
        idle_fd = src.relay_idle_fd if isinstance(src, TLSStream) else None
        chunks = 0
        # Bytes go_direct had already decrypted go first, as if just received.
        early, first[which] = first[which], b""
        data: bytes | bytearray
        while True:
            # The eager calls below have no schedule point when bytes are
            # already there, so a cancelled scope (control.stop before or
            # during the relay, the idle deadline) must be looked at here:
            # otherwise a withdrawn partner's buffered bytes would still go.
            if scope.cancel_called:
                return
            chunks += 1
            if chunks >= _YIELD_EVERY:
                chunks = 0
                await trio.lowlevel.checkpoint()
            try:
                if early:
                    data, early = early, b""
                else:
                    if idle_fd is not None:
                        fd = idle_fd()
                        if fd >= 0:
                            await trio.lowlevel.wait_readable(fd)
                    data = await receive(RELAY_CHUNK)
            except TLSTruncatedError:
                finish(f"{src_name}_truncated", f"{src_name} closed TCP without close_notify")
                return
            except _GONE as exc:
                finish(f"{src_name}_error", str(exc))
                return
            if not data:
                first_eof.append(src_name)
                try:
                    await dst.send_eof()
                except _GONE as exc:
                    finish(f"{dst_name}_error", str(exc))
                return
            try:
                await send(data)
            except _GONE as exc:
                finish(f"{dst_name}_error", str(exc))
                return
            count(len(data))
            # Not kept while waiting for the next chunk (an idle connection
            # would hold its last chunk in each direction).
            del data
            if watch_idle:
                deadline = trio.current_time() + idle_timeout_s + slack
                if deadline - scope.deadline > slack:
                    scope.deadline = deadline

    a_name, b_name = names
    # One scope for the whole relay, the pumps' nursery's own (no second scope
    # per connection): an error in either pump, control.stop and the idle
    # deadline all cancel it. One pump runs in this task.
    async with trio.open_nursery() as pumps:
        scope = pumps.cancel_scope
        control._scope = scope
        if control.end is not None:
            scope.cancel()
        if watch_idle:
            scope.deadline = trio.current_time() + idle_timeout_s + slack
        pumps.start_soon(pump, b, a, b_name, a_name, on_bytes_from_b, scope, 1)
        await pump(a, b, a_name, b_name, on_bytes_from_a, scope, 0)
    control._scope = None
    if control.end is not None:  # whoever ended it on purpose said why
        return RelayOutcome(control.end, control.detail)
    if scope.cancelled_caught:
        return RelayOutcome(
            "idle_timeout", f"no byte either way for idle_timeout_s={idle_timeout_s:g}"
        )
    return RelayOutcome(f"{first_eof[0]}_closed" if first_eof else "closed")
