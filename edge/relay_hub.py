"""The relay's data path for TLS on both sides: one task moves every connection's records.

Owns relaying between two ``TLSStream``s in direct mode (OpenSSL reading and
writing the sockets itself, ``TLSStream.go_direct``): one hub per trio run, a
system task that waits on its own epoll set holding every relayed socket, and
on each wake-up moves the records of every ready connection with plain calls
(``SSL_read`` into ``SSL_write``), no trio wait per record; and one
housekeeping task for the relays' idle timeouts and byte counts. A relay's own
task only parks until the hub ends the relay (both sides closed, an error,
its idle timeout) or it is cancelled (``RelayControl.stop``, the drain
deadline).

Theory. Per small record, the memory-BIO pumps spent most of their Python in
trio's wait machinery (two ``wait_readable`` per message and direction, each a
park, an ``epoll_ctl`` and a reschedule), the stream's retry loop and the BIO
copies; OpenSSL's own work was a small part. Here one ``epoll_wait`` (through
one ``wait_readable`` on the hub's epoll descriptor) serves every connection
ready at that moment, and a record costs an ``SSL_read`` and an ``SSL_write``,
called through pyOpenSSL's binding on one shared buffer (no allocation, no
exception per record):

* Each direction (a -> b, b -> a) either reads its source or writes what it
  read to its destination; it holds at most one record (16 KiB) of plaintext
  (plus, once, what ``go_direct`` had decrypted), so a slow side slows the
  other through TCP back-pressure, as before.
* A direction that cannot go on waits for one thing: its source readable, its
  destination writable, or (TLS 1.3 KeyUpdate answer, a shutdown) the other
  readiness OpenSSL asked for. A socket's epoll interest is what its two
  directions wait for; it is changed only when that changes (back-pressure),
  so a steady relay costs no ``epoll_ctl``. A socket nobody waits for is out
  of the set (a hung-up socket would otherwise wake the hub forever).
* After a small record with nothing left in OpenSSL's buffer, the direction
  waits for its socket again instead of reading once more: the set is
  level-triggered, so more data wakes it, and a message costs no failed read.
* A direction moves at most ``_BUDGET`` records per turn; one that still has
  work is run again after the hub yields to every other task.
* Hot waits: after serving a wake-up, while no other task is runnable, the hub
  waits on its set again itself (``_HOT_WAITS`` times, at most ``_HOT_WAIT_S``
  each and ``_HOT_S`` in all) instead of going round trio's loop for each
  record. Other tasks' I/O waits for it at most ``_HOT_S``. A hot wait that
  finds nothing (sparse traffic, connections coming and going) costs CPU, so
  the next ``_COLD_WAKES`` wake-ups skip them.
* End of stream: the source's close_notify makes the hub send ours to the
  destination (half-close) and that direction ends; the relay ends when both
  did, or at the first error or truncation, naming the side, as the pumps do.
* Byte counts reach the relay's callbacks per batch: whenever the hub goes
  back to waiting in trio (within about ``_HOT_S`` of the traffic pausing),
  every ``_REPORT_BYTES``, at the end, and at most ``_REPORT_S`` late under
  sustained load.
* The hub never raises: a failure inside one relay ends that relay with
  ``<a>_error`` and the hub goes on; a failing byte counter loses counts,
  never bytes.

Must never: keep or look at payload bytes beyond the record in flight per
direction, touch a socket after its relay ended (the relay's task takes it out
of the set before returning, and a stream closed during the relay takes
itself out first, through its close hook), or decide who may talk to whom.
"""

from __future__ import annotations

import contextlib
import math
import select
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio
from OpenSSL import SSL

from edge.tls import TLSTruncatedError

if TYPE_CHECKING:
    from edge.tls import TLSStream


class Control(Protocol):
    """What the hub needs of ``edge.relay.RelayControl``."""

    end: str | None
    detail: str

    def attach(self, scope: trio.CancelScope | None) -> None: ...


try:  # the calls OpenSSL makes per record, without pyOpenSSL's wrappers
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _SSL_read: Callable[[Any, Any, int], int] = _lib.SSL_read
    _SSL_write: Callable[[Any, Any, int], int] = _lib.SSL_write
    _SSL_get_error: Callable[[Any, int], int] = _lib.SSL_get_error
    _SSL_pending: Callable[[Any], int] = _lib.SSL_pending
    _WANT_READ: int = _lib.SSL_ERROR_WANT_READ
    _WANT_WRITE: int = _lib.SSL_ERROR_WANT_WRITE
    _ZERO_RETURN: int = _lib.SSL_ERROR_ZERO_RETURN
    # One record read lands here and is written from here, with no await in
    # between: shared by every relay of the process.
    _SCRATCH: Any = _ffi.new("char[]", 16 * 1024)
    AVAILABLE = True
except (ImportError, AttributeError):  # pragma: no cover - another pyOpenSSL
    AVAILABLE = False

__all__ = ["AVAILABLE", "relay_direct"]

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_GONE = select.EPOLLERR | select.EPOLLHUP
# Records one direction moves per turn before the other connections' turn.
_BUDGET = 16
# One SSL_read: one record's plaintext at most.
_READ_SIZE = 16 * 1024
# Readiness events taken per epoll_wait.
_MAX_EVENTS = 512
# Byte counts reach the relay's callbacks (the metrics) at the latest this
# long after the bytes moved, or once this many bytes are owed.
_REPORT_S = 1.0
_REPORT_BYTES = 256 * 1024
# The shortest housekeeping tick (idle timeouts are checked every idle_s / 8).
_MIN_TICK_S = 0.05
# Hot waits: after serving a wake-up, up to this many more epoll waits of at
# most _HOT_WAIT_S each and _HOT_S in all, in the hub, while no other task is
# runnable (the most any other task's I/O waits for the hub). Measured with
# compare.py (f): 2 ms or 4 ms in all saved no more CPU than 1 ms.
_HOT_WAITS = 16
_HOT_WAIT_S = 0.0005
_HOT_S = 0.001
# Wake-ups without hot waits after one that found nothing.
_COLD_WAKES = 8

_READING, _SHUTTING, _DONE = 0, 1, 2


class _Direction:
    """src -> dst of one relay."""

    __slots__ = (
        "count",
        "dst",
        "dst_conn",
        "dst_fd",
        "dst_name",
        "dst_ssl",
        "first_read",
        "owed",
        "pair",
        "pending",
        "src",
        "src_conn",
        "src_fd",
        "src_name",
        "src_ssl",
        "state",
        "wait_fd",
        "wait_mask",
    )

    def __init__(
        self,
        pair: _Pair,
        src: TLSStream,
        dst: TLSStream,
        names: tuple[str, str],
        count: Callable[[int], None],
        pending: bytes,
    ) -> None:
        self.pair = pair
        self.src, self.dst = src, dst
        self.src_conn, src_sock = src.direct_io()
        self.dst_conn, dst_sock = dst.direct_io()
        self.src_ssl = self.src_conn._ssl
        self.dst_ssl = self.dst_conn._ssl
        self.src_fd, self.dst_fd = src_sock.fileno(), dst_sock.fileno()
        self.src_name, self.dst_name = names
        self.count = count
        self.owed = 0  # bytes moved and not yet given to count
        self.pending: bytes | memoryview | None = pending or None
        self.first_read = True
        self.state = _READING
        self.wait_fd = -1  # -1: waits for nothing (running, queued or done)
        self.wait_mask = 0

    def closed(self) -> None:
        """The source stream is being closed under the relay (its aclose hook)."""
        self.pair.hub.finish(self.pair, f"{self.src_name}_error", "closed during the relay")


class _Pair:
    """One relay: its two directions, their sockets and how it ended."""

    __slots__ = (
        "a_fd",
        "a_mask",
        "ab",
        "b_fd",
        "b_mask",
        "ba",
        "detail",
        "end",
        "first_eof",
        "hub",
        "idle_s",
        "last",
        "task",
    )

    def __init__(
        self,
        hub: _Hub,
        a: TLSStream,
        b: TLSStream,
        names: tuple[str, str],
        counts: tuple[Callable[[int], None], Callable[[int], None]],
        first: tuple[bytes, bytes],
        idle_s: float,
    ) -> None:
        self.hub = hub
        a_name, b_name = names
        self.ab = _Direction(self, a, b, (a_name, b_name), counts[0], first[0])
        self.ba = _Direction(self, b, a, (b_name, a_name), counts[1], first[1])
        self.a_fd, self.b_fd = self.ab.src_fd, self.ba.src_fd
        self.a_mask = self.b_mask = 0
        self.end: str | None = None
        self.detail = ""
        self.first_eof: str | None = None
        self.idle_s = idle_s  # 0: no idle timeout
        self.last = trio.current_time()
        # The relay's task while it waits for the end (see relay_direct).
        self.task: trio.lowlevel.Task | None = None

    async def ended(self) -> None:
        """Wait until the hub finished this relay (no Event per relay)."""
        if self.end is not None:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


def _error(conn: SSL.Connection, result: int) -> SSL.Error:
    """pyOpenSSL's exception for a failed call (it reads OpenSSL's error queue)."""
    try:
        conn._raise_ssl_error(conn._ssl, result)
    except SSL.Error as exc:
        return exc
    return SSL.Error("call failed with no error")


class _Hub:
    """The epoll set and the task that serves it, one per trio run."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._by_fd: dict[int, _Pair] = {}
        self._again: list[_Direction] = []
        self._owing: set[_Direction] = set()
        # Relays with an idle timeout, checked every _tick by _housekeeping.
        self._timed: set[_Pair] = set()
        self._tick = _REPORT_S
        self._wake = trio.Event()  # _housekeeping has work again
        trio.lowlevel.spawn_system_task(self._serve, name="edge relay hub")
        trio.lowlevel.spawn_system_task(self._housekeeping, name="edge relay hub timers")

    # -- relays come and go (called from the relays' own tasks)

    def add(self, pair: _Pair) -> None:
        self._by_fd[pair.a_fd] = pair
        self._by_fd[pair.b_fd] = pair
        for d in (pair.ab, pair.ba):
            d.src.direct_close_hook(d.closed)
        if pair.idle_s:
            self._tick = min(self._tick, max(_MIN_TICK_S, pair.idle_s / 8))
            self._nudge()
            self._timed.add(pair)
        now = trio.current_time()
        for d in (pair.ab, pair.ba):
            if pair.end is None:
                self._turn(pair, d, now)  # never raises, as in the hub's task

    def _nudge(self) -> None:
        if not self._timed and not self._owing:
            self._wake.set()

    def remove(self, pair: _Pair) -> None:
        """Take the relay's sockets out of the set and pay what it owes
        (idempotent)."""
        for d in (pair.ab, pair.ba):
            d.state = _DONE
            d.wait_fd = -1
            d.src.direct_close_hook(None)
            self._pay(d)
        if pair.a_mask or pair.b_mask:
            self._rearm(pair)
        for fd in (pair.a_fd, pair.b_fd):
            if self._by_fd.get(fd) is pair:
                del self._by_fd[fd]
        self._timed.discard(pair)

    # -- the task

    async def _serve(self) -> None:
        epoll = self._epoll
        statistics = trio.lowlevel.current_statistics
        perf_counter = time.perf_counter
        cold = 0  # wake-ups left without hot waits
        try:
            while True:
                if self._again:
                    await trio.lowlevel.checkpoint()
                    again, self._again = self._again, []
                    now = trio.current_time()
                    for d in again:
                        if d.state != _DONE and d.pair.end is None:
                            self._turn(d.pair, d, now)
                else:
                    if self._owing:
                        # Going idle: the counters are exact whenever the hub
                        # waits in trio (a scrape a moment after a message
                        # sees it).
                        self._pay_all()
                    await trio.lowlevel.wait_readable(epoll.fileno())
                events = epoll.poll(0, _MAX_EVENTS)
                if not events:
                    continue
                # trio's clock, read once per wake-up (idle deadlines only
                # need it to a few milliseconds).
                offset = trio.current_time() - perf_counter()
                self._dispatch(events, offset + perf_counter())
                if self._again:
                    continue
                # Hot waits (see the module docstring): while no other task
                # is runnable, wait for the relays' sockets a little longer
                # here rather than going round trio's loop for every record.
                # Nothing else runs meanwhile, so what trio said stays true
                # but for the time that passes.
                # Only while they pay: after a hot wait that found nothing
                # (sparse traffic, connections coming and going), the next
                # _COLD_WAKES wake-ups go straight back to trio.
                if cold:
                    cold -= 1
                    continue
                stats = statistics()
                if stats.tasks_runnable or stats.run_sync_soon_queue_size:
                    continue
                until = perf_counter() + min(_HOT_S, stats.seconds_to_next_deadline)
                for hot in range(_HOT_WAITS):
                    left = until - perf_counter()
                    if left <= 0:
                        break
                    events = epoll.poll(min(left, _HOT_WAIT_S), _MAX_EVENTS)
                    if not events:
                        if not hot:
                            cold = _COLD_WAKES
                        break
                    self._dispatch(events, offset + perf_counter())
                    if self._again:
                        break
        finally:
            epoll.close()

    def _dispatch(self, events: list[tuple[int, int]], now: float) -> None:
        by_fd = self._by_fd
        for fd, mask in events:
            pair = by_fd.get(fd)
            if pair is None or pair.end is not None:
                continue
            d = pair.ab
            if d.wait_fd == fd and mask & (d.wait_mask | _GONE):
                self._turn(pair, d, now)
                if pair.end is not None:
                    continue
            d = pair.ba
            if d.wait_fd == fd and mask & (d.wait_mask | _GONE):
                self._turn(pair, d, now)

    async def _housekeeping(self) -> None:
        """Every _tick while there is work: pay what the relays owe their
        counters (at most _REPORT_S late under load) and end the relays idle
        for their idle timeout (between idle_s and idle_s + _tick after their
        last byte). One task for all relays: no timer per relay or per wake."""
        while True:
            if not self._timed and not self._owing:
                await self._wake.wait()
                self._wake = trio.Event()
            await trio.sleep(self._tick)
            self._pay_all()
            now = trio.current_time()
            for pair in [p for p in self._timed if now - p.last >= p.idle_s]:
                self.finish(
                    pair, "idle_timeout", f"no byte either way for idle_timeout_s={pair.idle_s:g}"
                )

    def _pay_all(self) -> None:
        for d in list(self._owing):
            self._pay(d)

    def _turn(self, pair: _Pair, d: _Direction, now: float) -> None:
        """Run one direction and re-arm its relay, never raising."""
        try:
            waited = d.wait_fd, d.wait_mask
            self._step(d, now)
            # Steady state (it read, wrote, and waits to read again): the
            # epoll interest is already right.
            if pair.end is None and (d.wait_fd, d.wait_mask) != waited:
                self._rearm(pair)
        except Exception as exc:  # a bug must end one relay, not the hub
            pair.ab.src.direct_failed(SSL.Error())
            pair.ab.dst.direct_failed(SSL.Error())
            self.finish(pair, f"{pair.ab.src_name}_error", f"relay failed: {type(exc).__name__}")

    def _step(self, d: _Direction, now: float) -> None:
        """Move records src -> dst until it must wait, ends, or used its budget."""
        moved = 0
        src_ssl, dst_ssl = d.src_ssl, d.dst_ssl
        d.wait_fd = -1
        try:
            for _ in range(_BUDGET):
                if d.state == _SHUTTING:
                    if self._shutdown(d):
                        self._ended(d)
                    return
                pending = d.pending
                if pending is not None:
                    # What a full socket left over: written again as is (the
                    # contexts accept a moved buffer, not a different one).
                    n = _SSL_write(dst_ssl, _ffi.from_buffer(pending), len(pending))
                    if n <= 0:
                        self._write_failed(d, n)
                        return
                    moved += n
                    d.pending = pending[n:] if n < len(pending) else None
                    continue
                got = _SSL_read(src_ssl, _SCRATCH, _READ_SIZE)
                if got <= 0:
                    error = _SSL_get_error(src_ssl, got)
                    if error == _WANT_READ:
                        d.wait_fd, d.wait_mask = d.src_fd, _IN
                    elif error == _WANT_WRITE:
                        d.wait_fd, d.wait_mask = d.src_fd, _OUT
                    elif error == _ZERO_RETURN:
                        self._eof(d)
                    else:
                        self._failed(d, d.src, d.src_name, _error(d.src_conn, got))
                    return
                if d.first_read:
                    d.first_read = False
                    d.src.direct_first_read()
                n = _SSL_write(dst_ssl, _SCRATCH, got)
                if n <= 0:
                    d.pending = _ffi.buffer(_SCRATCH, got)[:]
                    self._write_failed(d, n)
                    return
                moved += n
                if n < got:  # pragma: no cover - one record is written whole
                    d.pending = _ffi.buffer(_SCRATCH + n, got - n)[:]
                    continue
                if got < _READ_SIZE and not _SSL_pending(src_ssl):
                    # A small record and nothing buffered: the socket is
                    # most likely empty now, and epoll (level-triggered) says
                    # so if not. Asking would cost a read that fails, per
                    # message.
                    d.wait_fd, d.wait_mask = d.src_fd, _IN
                    return
            # Budget used up with work left: again after every other task.
            self._again.append(d)
        finally:
            if moved:
                d.pair.last = now
                owed = d.owed
                if not owed:  # not (or no longer) among the owing
                    self._nudge()
                    self._owing.add(d)
                d.owed = owed + moved
                if d.owed >= _REPORT_BYTES:
                    self._pay(d)

    def _write_failed(self, d: _Direction, result: int) -> None:
        error = _SSL_get_error(d.dst_ssl, result)
        if error == _WANT_WRITE:
            d.wait_fd, d.wait_mask = d.dst_fd, _OUT
        elif error == _WANT_READ:
            d.wait_fd, d.wait_mask = d.dst_fd, _IN
        else:
            d.pending = None
            self._failed(d, d.dst, d.dst_name, _error(d.dst_conn, result))

    def _eof(self, d: _Direction) -> None:
        """src sent close_notify: pass ours on to dst (half-close)."""
        d.src.direct_eof(sent=False)
        pair = d.pair
        if pair.first_eof is None:
            pair.first_eof = d.src_name
        d.state = _SHUTTING
        d.dst.direct_eof(sent=True)
        if self._shutdown(d):
            self._ended(d)

    def _shutdown(self, d: _Direction) -> bool:
        """Send close_notify to dst; False when it must wait (or failed)."""
        try:
            d.dst_conn.shutdown()
        except SSL.WantWriteError:
            d.wait_fd, d.wait_mask = d.dst_fd, _OUT
            return False
        except SSL.WantReadError:
            d.wait_fd, d.wait_mask = d.dst_fd, _IN
            return False
        except SSL.Error as exc:
            self._failed(d, d.dst, d.dst_name, exc)
            return False
        return True

    def _ended(self, d: _Direction) -> None:
        d.state = _DONE
        pair = d.pair
        if pair.ab.state == _DONE and pair.ba.state == _DONE:
            self.finish(pair, f"{pair.first_eof}_closed")

    def _failed(self, d: _Direction, stream: TLSStream, name: str, exc: SSL.Error) -> None:
        error = stream.direct_failed(exc)
        if isinstance(error, TLSTruncatedError):
            self.finish(d.pair, f"{name}_truncated", f"{name} closed TCP without close_notify")
        else:
            self.finish(d.pair, f"{name}_error", str(error))

    def finish(self, pair: _Pair, end: str, detail: str = "") -> None:
        if pair.end is None:
            pair.end, pair.detail = end, detail
        self.remove(pair)
        task, pair.task = pair.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _pay(self, d: _Direction) -> None:
        owed, d.owed = d.owed, 0
        self._owing.discard(d)
        if owed:
            with contextlib.suppress(Exception):  # a metric must not end the hub
                d.count(owed)

    def _rearm(self, pair: _Pair) -> None:
        """Make each socket's epoll interest what its directions wait for."""
        a_mask = b_mask = 0
        for d in (pair.ab, pair.ba):
            if d.wait_fd == pair.a_fd:
                a_mask |= d.wait_mask
            elif d.wait_fd == pair.b_fd:
                b_mask |= d.wait_mask
        if a_mask != pair.a_mask:
            self._set(pair.a_fd, pair.a_mask, a_mask)
            pair.a_mask = a_mask
        if b_mask != pair.b_mask:
            self._set(pair.b_fd, pair.b_mask, b_mask)
            pair.b_mask = b_mask

    def _set(self, fd: int, old: int, new: int) -> None:
        try:
            if not old:
                self._epoll.register(fd, new)
            elif not new:
                self._epoll.unregister(fd)
            else:
                self._epoll.modify(fd, new)
        except (OSError, ValueError):
            # Closed under us (only a bug elsewhere could do it): the relay
            # ends at its next deadline; never the hub.
            pass


_HUB: trio.lowlevel.RunVar[_Hub] = trio.lowlevel.RunVar("edge_relay_hub")


def _hub() -> _Hub:
    try:
        return _HUB.get()
    except LookupError:
        hub = _Hub()
        _HUB.set(hub)
        return hub


async def relay_direct(
    a: TLSStream,
    b: TLSStream,
    first_from_a: bytes,
    first_from_b: bytes,
    *,
    idle_timeout_s: float,
    names: tuple[str, str],
    on_bytes_from_a: Callable[[int], None],
    on_bytes_from_b: Callable[[int], None],
    control: Control,
) -> tuple[str, str]:
    """``edge.relay.relay`` for two streams in direct mode (``go_direct``):
    how it ended, ``(end, detail)``. ``first_from_*`` is the plaintext
    ``go_direct`` returned, sent first."""
    hub = _hub()
    watch_idle = idle_timeout_s > 0 and not math.isinf(idle_timeout_s)
    pair = _Pair(
        hub,
        a,
        b,
        names,
        (on_bytes_from_a, on_bytes_from_b),
        (first_from_a, first_from_b),
        idle_timeout_s if watch_idle else 0.0,
    )
    del first_from_a, first_from_b  # sent or held by the pair, not by this frame
    with trio.CancelScope() as scope:
        control.attach(scope)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            hub.add(pair)
            await pair.ended()
        finally:
            hub.remove(pair)
            control.attach(None)
    if control.end is not None:  # whoever ended it on purpose said why
        return control.end, control.detail
    assert pair.end is not None
    return pair.end, pair.detail
