"""relay_sip against a plain byte relay: CPU per SIP message on the same load (issue 18).

Everything runs in this one process over real loopback TCP (127.0.0.1) with
mutual TLS on both legs (partner -> edge, edge -> pool; ECDSA P-256 from
edge.pki). The load: the partner sends N SIP MESSAGE requests and the pool N
200 responses, concurrently, one message per TLS record (one `send_all`
each), which is how SIP endpoints write.

Four modes per round, alternated so machine noise hits all alike:
- direct: partner and pool talk with no relay (the cost of the two endpoints);
- plain: a byte relay in between (receive_some -> send_all, both ways), the
  yardstick issue 18 set;
- sip: `edge.sip_relay.relay_sip` in between (framing and the From guard);
- hub: `edge.relay.relay`, the gateway's plain relay since issue 19 (OpenSSL
  on the sockets, the relay hub's task moving the records; the instrument
  counts the hub's tasks).
CPU is time.process_time for the whole process; the relay's own cost is the
mode's CPU minus the direct mode's, and the ratio sip / plain of those is what
issue 18 bounds (<= 1.3). That difference of two large numbers is noisy on a
shared machine, so the relay's CPU is also measured directly: a trio
instrument sums time.thread_time over every step of the relay's own tasks
(its pumps, TLS included), which other processes' load barely moves.

    python bench/sip_relay.py                 # ~20-40 s
    python bench/sip_relay.py --messages 2000 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import trio

from edge.pki import CA
from edge.relay import relay
from edge.sip_relay import relay_sip
from edge.tls import TLSStream, client_context, server_context

DOMAINS = ("fabrikam.com",)


def message(i: int, response: bool) -> bytes:
    start = "SIP/2.0 200 OK" if response else "MESSAGE sip:bob@contoso.com SIP/2.0"
    body = b"" if response else b"Hello from fabrikam, message number %08d" % i
    lines = [
        start,
        f"Via: SIP/2.0/TLS edge.fabrikam.com:5061;branch=z9hG4bK-{i:08d}",
        "Via: SIP/2.0/TLS ua.fabrikam.com:5061;branch=z9hG4bK-ua;received=192.0.2.10",
        "Max-Forwards: 69",
        'From: "Alice Example" <sip:alice@fabrikam.com>;tag=1928301774',
        f"To: <sip:bob@contoso.com>{';tag=a6c85cf' if response else ''}",
        f"Call-ID: a84b4c76e66710-{i:08d}@ua.fabrikam.com",
        "CSeq: 314159 MESSAGE",
        "User-Agent: bench/1.0",
        "Content-Type: text/plain",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Pki:
    def __init__(self) -> None:
        root = CA.root("Bench Root")
        issuing = root.intermediate("Bench Issuing CA", path_length=0)
        server = issuing.issue(dns=["localhost"])
        client = issuing.issue(dns=["client.bench.example"])
        self.server_ctx = server_context(
            list(server.chain), server.key, require_client_cert=True, client_ca_names=[root.cert]
        )
        self.client_ctx = client_context([root.cert], list(client.chain), client.key)

    async def pair(self) -> tuple[TLSStream, TLSStream]:
        """(server, client) over loopback TCP, MTLS handshake done."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        client_tcp = await trio.open_tcp_stream("127.0.0.1", port)
        server_tcp = await listeners[0].accept()
        for listener in listeners:
            await listener.aclose()
        server = TLSStream(server_tcp, self.server_ctx, server_side=True)
        client = TLSStream(
            client_tcp, self.client_ctx, server_side=False, server_hostname="localhost"
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        return server, client


async def plain_relay(a: TLSStream, b: TLSStream) -> None:
    async def pump(src: TLSStream, dst: TLSStream) -> None:
        while data := await src.receive_some(64 * 1024):
            await dst.send_all(data)
        await dst.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, b, a)
        await pump(a, b)


class RelayMeter(trio.abc.Instrument):
    """CPU (thread time) spent in the relay's tasks: the task started as
    `relay_task` and every task it spawns."""

    def __init__(self) -> None:
        self.tasks: set[trio.lowlevel.Task] = set()
        self.cpu = 0.0
        self._t0 = 0.0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        parent = task.parent_nursery.parent_task if task.parent_nursery else None
        if task.name.endswith("relay_task") or parent in self.tasks:
            self.tasks.add(task)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.tasks.discard(task)

    def _counted(self, task: trio.lowlevel.Task) -> bool:
        # edge.relay's direct path moves the records in the relay hub's
        # system tasks, which serve every relay of the run.
        return task in self.tasks or task.name.startswith("edge relay hub")

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._counted(task):
            self._t0 = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._counted(task):
            self.cpu += time.thread_time() - self._t0


async def run_round(pki: Pki, mode: str, count: int) -> tuple[float, float]:
    requests = [message(i, False) for i in range(count)]
    responses = [message(i, True) for i in range(count)]
    if mode == "direct":
        pool, partner = await pki.pair()
        edges: tuple[TLSStream, TLSStream] | None = None
    else:
        edge_partner, partner = await pki.pair()
        pool, edge_pool = await pki.pair()
        edges = (edge_partner, edge_pool)

    async def send(stream: TLSStream, messages: list[bytes]) -> None:
        for data in messages:
            await stream.send_all(data)

    async def drain(stream: TLSStream, total: int) -> None:
        got = 0
        while got < total:
            chunk = await stream.receive_some(64 * 1024)
            if not chunk:
                raise RuntimeError(f"stream ended after {got} of {total} bytes")
            got += len(chunk)

    async def relay_task(a: TLSStream, b: TLSStream) -> None:
        if mode == "plain":
            await plain_relay(a, b)
        elif mode == "hub":
            await relay(a, b, idle_timeout_s=0)
        else:
            await relay_sip(a, b, partner_domains=DOMAINS)

    meter = RelayMeter()
    trio.lowlevel.add_instrument(meter)
    start = time.process_time()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            if edges is not None:
                nursery.start_soon(relay_task, *edges)
            async with trio.open_nursery() as load:
                load.start_soon(send, partner, requests)
                load.start_soon(send, pool, responses)
                load.start_soon(drain, pool, sum(map(len, requests)))
                load.start_soon(drain, partner, sum(map(len, responses)))
            cpu = time.process_time() - start
            relay_cpu = meter.cpu
            nursery.cancel_scope.cancel()
    trio.lowlevel.remove_instrument(meter)
    for stream in (partner, pool, *(edges or ())):
        await stream.aclose()
    # microseconds per message (both directions): the process, the relay alone
    return cpu / (2 * count) * 1e6, relay_cpu / (2 * count) * 1e6


async def main(args: argparse.Namespace) -> int:
    pki = Pki()
    results: dict[str, list[float]] = {"direct": [], "plain": [], "sip": [], "hub": []}
    measured: dict[str, list[float]] = {"plain": [], "sip": [], "hub": []}
    for _ in range(args.rounds):
        for mode in results:
            total, relay_only = await run_round(pki, mode, args.messages)
            results[mode].append(total)
            if mode in measured:
                measured[mode].append(relay_only)
    med = {mode: statistics.median(values) for mode, values in results.items()}
    print(f"{args.messages} messages each way per round, {args.rounds} rounds, median CPU:")
    for mode, value in med.items():
        print(f"  {mode:6} {value:7.1f} us/message (process, both endpoints included)")
    plain = med["plain"] - med["direct"]
    sip = med["sip"] - med["direct"]
    print(f"  relay only: plain {plain:.1f} us/message, sip {sip:.1f} us/message")
    print(f"  sip / plain relay CPU: {sip / plain:.2f}x (issue 18 bound: <= 1.3x)")
    task_plain = statistics.median(measured["plain"])
    task_sip = statistics.median(measured["sip"])
    print(
        f"  relay tasks measured: plain {task_plain:.1f} us/message, sip {task_sip:.1f} "
        f"us/message: {task_sip / task_plain:.2f}x"
    )
    hub = med["hub"] - med["direct"]
    task_hub = statistics.median(measured["hub"])
    print(
        f"  edge.relay (the relay hub, the gateway's plain relay since issue 19): "
        f"{hub:.1f} us/message relay only, {task_hub:.1f} measured; "
        f"sip / hub {sip / hub:.2f}x relay only, {task_sip / task_hub:.2f}x measured"
    )
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000, help="per direction per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not (1 <= args.messages <= 1_000_000 and 1 <= args.rounds <= 50):
        parser.error("--messages 1..1000000, --rounds 1..50")
    return args


if __name__ == "__main__":
    sys.exit(trio.run(main, parse_args(sys.argv[1:])))
