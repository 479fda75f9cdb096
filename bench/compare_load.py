"""Load clients for bench/compare.py: stdlib ``ssl`` partners, run in their own processes.

Owns the partner side of every comparison: full MTLS handshakes with the
partner's certificate, 1 KiB echoes, one long full-duplex stream, busy
connections, idle connections. Each function runs in a process forked by
compare.py, so the relay's CPU (read from /proc) never includes the client's,
and the clients' own CPU is reported separately to show they are not the
bottleneck.

The clients use the stdlib ``ssl`` module (Debian's OpenSSL 3.0, the C code
releases the GIL around every TLS call) and plain sockets with ``selectors``:
the cheapest Python client, and the same client for every relay, so every
relay negotiates the same thing (TLS 1.3, X25519, ECDSA P-256).

Every loop is bounded in count and in time; every address is 127.0.0.1.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

HOST = "127.0.0.1"
ECHO = 1024
MiB = 1024 * 1024
_IO_TIMEOUT = 10.0


@dataclass(frozen=True)
class Partner:
    """What a partner needs to connect: its chain and key, the edge's CA, the edge's name."""

    chain_file: str
    key_file: str
    edge_ca_file: str
    edge_name: str

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(self.edge_ca_file)
        ctx.load_cert_chain(self.chain_file, self.key_file)
        return ctx


_cpu = time.process_time  # this process, every thread


def _connect(ctx: ssl.SSLContext, partner: Partner, port: int) -> ssl.SSLSocket:
    sock = socket.create_connection((HOST, port), timeout=_IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return ctx.wrap_socket(sock, server_hostname=partner.edge_name)
    except BaseException:
        sock.close()
        raise


def _echo(ss: ssl.SSLSocket, payload: bytes, buf: bytearray) -> None:
    ss.sendall(payload)
    got = 0
    view = memoryview(buf)
    while got < len(payload):
        n = ss.recv_into(view[got:], len(payload) - got)
        if n == 0:
            raise ConnectionError("relay closed during the echo")
        got += n


def _close_gracefully(ss: ssl.SSLSocket) -> None:
    """Send close_notify and wait (bounded by the socket timeout) for the relay's."""
    try:
        ss.unwrap().close()
    except (OSError, ssl.SSLError, ValueError):
        ss.close()


# ----------------------------------------------------------------------
# (a) connections: handshake, 1 KiB echo, close


def connections(
    partner: Partner, port: int, count: int, threads: int, budget_s: float, pipe: Connection
) -> None:
    """``count`` connections over ``threads`` threads; report ok/failed, wall and CPU."""
    ctx = partner.context()
    payload = b"p" * ECHO
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "failed": 0}
    errors: list[str] = []
    pipe.send("ready")
    pipe.recv()  # go
    deadline = time.monotonic() + budget_s

    def worker() -> None:
        buf = bytearray(ECHO)
        while time.monotonic() < deadline:
            with lock:
                if state["next"] >= count:
                    return
                state["next"] += 1
            try:
                ss = _connect(ctx, partner, port)
                _echo(ss, payload, buf)
                _close_gracefully(ss)
                ok = True
            except (OSError, ssl.SSLError, ConnectionError) as exc:
                ok = False
                if len(errors) < 3:
                    errors.append(f"{type(exc).__name__}: {exc}")
            with lock:
                state["ok" if ok else "failed"] += 1

    c0, t0 = _cpu(), time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    pipe.send(
        {
            "ok": state["ok"],
            "failed": state["failed"],
            "wall": time.monotonic() - t0,
            "cpu": _cpu() - c0,
            "errors": errors,
        }
    )


# ----------------------------------------------------------------------
# (b) one long connection, full duplex


def stream(partner: Partner, port: int, mib: int, budget_s: float, pipe: Connection) -> None:
    """Send ``mib`` MiB and read the echo back at the same time, on one connection."""
    ctx = partner.context()
    ss = _connect(ctx, partner, port)
    _echo(ss, b"w" * ECHO, bytearray(ECHO))  # relay path established
    ss.setblocking(False)
    total = mib * MiB
    chunk = 64 * 1024
    payload = memoryview(b"s" * chunk)
    buf = bytearray(256 * 1024)
    sel = selectors.DefaultSelector()
    sel.register(ss, selectors.EVENT_READ | selectors.EVENT_WRITE)
    writing = True
    sent = received = 0
    pipe.send("ready")
    pipe.recv()
    c0, t0 = _cpu(), time.monotonic()
    deadline = t0 + budget_s
    error = ""
    try:
        while received < total:
            if time.monotonic() > deadline:
                error = f"budget of {budget_s:g}s exceeded at {received} bytes"
                break
            sel.select(1.0)
            if writing:
                try:
                    while sent < total:
                        n = ss.send(payload[: min(chunk, total - sent)])
                        sent += n
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
                if sent >= total:
                    writing = False
                    sel.modify(ss, selectors.EVENT_READ)
            try:
                while True:
                    n = ss.recv_into(buf)
                    if n == 0:
                        raise ConnectionError("relay closed the stream")
                    received += n
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
    except (OSError, ssl.SSLError, ConnectionError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    wall, cpu = time.monotonic() - t0, _cpu() - c0
    sel.close()
    ss.settimeout(_IO_TIMEOUT)
    _close_gracefully(ss)
    pipe.send({"bytes": sent + received, "wall": wall, "cpu": cpu, "error": error})


# ----------------------------------------------------------------------
# (c) latency under load: busy connections and one probe


def busy(partner: Partner, port: int, count: int, budget_s: float, pipe: Connection) -> None:
    """``count`` connections each echoing 1 KiB back to back, until told to stop."""
    ctx = partner.context()
    payload = b"b" * ECHO
    socks = []
    for _ in range(count):
        ss = _connect(ctx, partner, port)
        ss.setblocking(False)
        socks.append(ss)
    sel = selectors.DefaultSelector()
    pending: dict[int, int] = {}
    for i, ss in enumerate(socks):
        sel.register(ss, selectors.EVENT_READ, i)
    buf = bytearray(64 * 1024)
    echoes = 0
    error = ""
    pipe.send("ready")
    pipe.recv()
    for i, ss in enumerate(socks):
        ss.send(payload)
        pending[i] = ECHO
    c0, t0 = _cpu(), time.monotonic()
    deadline = t0 + budget_s
    try:
        while time.monotonic() < deadline and not pipe.poll():
            for key, _ in sel.select(0.2):
                i = key.data
                ss = socks[i]
                try:
                    while True:
                        n = ss.recv_into(buf)
                        if n == 0:
                            raise ConnectionError("relay closed a busy connection")
                        pending[i] -= n
                except ssl.SSLWantReadError:
                    pass
                if pending[i] <= 0:
                    echoes += 1
                    ss.send(payload)  # 1 KiB always fits in an empty socket buffer
                    pending[i] = ECHO
    except (OSError, ssl.SSLError, ConnectionError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    wall, cpu = time.monotonic() - t0, _cpu() - c0
    sel.close()
    for ss in socks:
        ss.close()
    pipe.send({"echoes": echoes, "wall": wall, "cpu": cpu, "error": error})


def probe(partner: Partner, port: int, seconds: float, max_samples: int, pipe: Connection) -> None:
    """1 KiB echoes back to back on one persistent connection; round-trip percentiles."""
    ctx = partner.context()
    ss = _connect(ctx, partner, port)
    payload = b"q" * ECHO
    buf = bytearray(ECHO)
    _echo(ss, payload, buf)
    pipe.send("ready")
    pipe.recv()
    samples: list[float] = []
    error = ""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end and len(samples) < max_samples:
            t = time.perf_counter()
            _echo(ss, payload, buf)
            samples.append(time.perf_counter() - t)
    except (OSError, ssl.SSLError, ConnectionError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    _close_gracefully(ss)
    result: dict[str, Any] = {"samples": len(samples), "error": error}
    if len(samples) >= 20:
        q = statistics.quantiles(samples, n=100, method="inclusive")
        result.update(p50=statistics.median(samples), p99=q[98])
    pipe.send(result)


# ----------------------------------------------------------------------
# (f) paced small messages: a fixed rate spread over many connections


def paced(
    partner: Partner,
    port: int,
    count: int,
    rate: float,
    seconds: float,
    offset: float,
    pipe: Connection,
) -> None:
    """``rate`` 1 KiB messages per second over ``count`` connections for ``seconds``.

    Open loop, as SIP signalling is: message k leaves at ``t0 + (k + offset) /
    rate`` on connection ``k % count`` whatever the relay does (a connection
    whose previous echo is still out pipelines the next message), and its
    latency is the time from that scheduled departure to the last byte of its
    echo, so a late sender counts against the relay too (coordinated omission
    avoided). ``offset`` (0..1) interleaves several load processes.
    """
    ctx = partner.context()
    payload = b"f" * ECHO
    socks = []
    for _ in range(count):
        ss = _connect(ctx, partner, port)
        _echo(ss, payload, bytearray(ECHO))  # relay path established
        ss.setblocking(False)
        socks.append(ss)
    sel = selectors.DefaultSelector()
    for i, ss in enumerate(socks):
        sel.register(ss, selectors.EVENT_READ, i)
    out: list[deque[float]] = [deque() for _ in socks]  # scheduled departures in flight
    got = [0] * count  # bytes of the oldest echo in flight received so far
    buf = bytearray(64 * 1024)
    latencies: list[float] = []
    sent = 0
    total = int(rate * seconds)
    error = ""
    pipe.send("ready")
    pipe.recv()
    c0, t0 = _cpu(), time.perf_counter()
    hard_end = t0 + seconds + 10.0  # the last echoes get 10 s, then the run ends
    try:
        while time.perf_counter() < hard_end:
            now = time.perf_counter()
            while sent < total and t0 + (sent + offset) / rate <= now:
                i = sent % count
                due = t0 + (sent + offset) / rate
                try:
                    n = socks[i].send(payload)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    n = 0
                if n != ECHO:
                    raise ConnectionError("a paced send did not fit in the socket buffer")
                out[i].append(due)
                sent += 1
            if sent >= total and not any(out):
                break
            wait = 0.05 if sent >= total else max(0.0, t0 + (sent + offset) / rate - now)
            for key, _ in sel.select(min(wait, 0.05)):
                i = key.data
                try:
                    while True:
                        n = socks[i].recv_into(buf)
                        if n == 0:
                            raise ConnectionError("relay closed a paced connection")
                        got[i] += n
                except ssl.SSLWantReadError:
                    pass
                done = time.perf_counter()
                while got[i] >= ECHO and out[i]:
                    got[i] -= ECHO
                    latencies.append(done - out[i].popleft())
    except (OSError, ssl.SSLError, ConnectionError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    sel.close()
    for ss in socks:
        ss.close()
    lost = sum(len(q) for q in out)
    if lost and not error:
        error = f"{lost} echoes never came back"
    pipe.send({"sent": sent, "latencies": latencies, "wall": wall, "cpu": cpu, "error": error})


# ----------------------------------------------------------------------
# (d) idle connections


def idle(
    partner: Partner, port: int, count: int, threads: int, budget_s: float, pipe: Connection
) -> None:
    """Open ``count`` relayed connections (handshake + one echo), hold them idle."""
    ctx = partner.context()
    payload = b"i" * ECHO
    held: list[ssl.SSLSocket] = []
    lock = threading.Lock()
    failed = [0]
    deadline = time.monotonic() + budget_s
    per_thread = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]

    def worker(n: int) -> None:
        buf = bytearray(ECHO)
        for _ in range(n):
            if time.monotonic() > deadline:
                return
            try:
                ss = _connect(ctx, partner, port)
                _echo(ss, payload, buf)
            except (OSError, ssl.SSLError, ConnectionError):
                with lock:
                    failed[0] += 1
                continue
            with lock:
                held.append(ss)

    pipe.send("ready")
    pipe.recv()
    pool = [threading.Thread(target=worker, args=(n,)) for n in per_thread]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    pipe.send({"held": len(held), "failed": failed[0]})
    if pipe.poll(budget_s):  # release
        pipe.recv()
    for ss in held:
        ss.close()
    pipe.send("closed")
