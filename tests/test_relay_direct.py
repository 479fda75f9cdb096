"""The relay's direct data path (edge.relay_hub): OpenSSL on the sockets, one hub task.

Real TLS over real loopback TCP: a "partner" client and a "pool" server at the
outer ends, the relay between the two inner streams, exactly as the gateway
wires them. Each test checks what the pumps guaranteed before (order, half-close,
back-pressure, errors named by side, idle timeout, stop) and that the relay
really ran in direct mode, so a pyOpenSSL upgrade that loses the private
binding cannot quietly put every relay back on the slow path.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from edge import relay as relay_module
from edge import relay_hub
from edge.pki import CA
from edge.relay import RelayControl, RelayOutcome, relay
from edge.tls import TLSStream, client_context, server_context
from tests.test_tls import VERSIONS, tcp_pair

TIMEOUT = 30


@dataclass
class Wiring:
    """partner <-> a (relay) b <-> pool, all handshakes done."""

    partner: TLSStream
    a: TLSStream
    b: TLSStream
    pool: TLSStream
    counted: dict[str, int] = field(default_factory=lambda: {"a": 0, "b": 0})
    outcome: list[RelayOutcome] = field(default_factory=list)

    async def run(
        self, idle_timeout_s: float = 60, control: RelayControl | None = None
    ) -> RelayOutcome:
        return await relay(
            self.a,
            self.b,
            idle_timeout_s=idle_timeout_s,
            names=("partner", "pool"),
            on_bytes_from_a=lambda n: self.counted.__setitem__("a", self.counted["a"] + n),
            on_bytes_from_b=lambda n: self.counted.__setitem__("b", self.counted["b"] + n),
            control=control,
        )

    async def run_recorded(self, control: RelayControl | None = None) -> None:
        """``run`` in a nursery: its outcome lands in ``outcome``."""
        self.outcome.append(await self.run(control=control))


@asynccontextmanager
async def wired(version: str = "TLSv1.3") -> AsyncIterator[Wiring]:
    ca = CA.root("Hub CA")
    leaf = ca.issue(dns=["hub.test"], eku=["server", "client"])
    sctx = server_context(leaf.chain, leaf.key, require_client_cert=False)
    cctx = client_context([ca.cert])
    cctx.set_max_proto_version(VERSIONS[version])
    a_srv, a_cli = await tcp_pair()
    b_srv, b_cli = await tcp_pair()
    w = Wiring(
        partner=TLSStream(a_cli, cctx, server_side=False, server_hostname="hub.test"),
        a=TLSStream(a_srv, sctx, server_side=True),
        b=TLSStream(b_cli, cctx, server_side=False, server_hostname="hub.test"),
        pool=TLSStream(b_srv, sctx, server_side=True),
    )
    async with trio.open_nursery() as nursery:
        for s in (w.partner, w.a, w.b, w.pool):
            nursery.start_soon(s.do_handshake)
    try:
        yield w
    finally:
        for s in (w.partner, w.a, w.b, w.pool):
            await s.aclose()


async def _read_exactly(stream: TLSStream, n: int) -> bytes:
    got = bytearray()
    for _ in range(100_000):  # bounded: each read returns at least one byte
        if len(got) >= n:
            break
        chunk = await stream.receive_some(min(65536, n - len(got)))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


async def _read_to_eof(stream: TLSStream) -> bytes:
    got = bytearray()
    for _ in range(100_000):
        chunk = await stream.receive_some(65536)
        if not chunk:
            return bytes(got)
        got += chunk
    raise AssertionError("no EOF")


def test_the_direct_path_is_available() -> None:
    """The private names the hub needs exist in the pinned pyOpenSSL."""
    assert relay_hub.AVAILABLE
    assert relay_module.DIRECT


@pytest.mark.parametrize("direct", [True, False], ids=["hub", "pumps"])
async def test_messages_both_ways_then_half_close(
    direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIP-shaped traffic, then the partner closes first and the pool still
    answers; the counters are exact once the relay returned."""
    monkeypatch.setattr(relay_module, "DIRECT", direct)
    sizes = [1, 700, 1500, 16 * 1024, 16 * 1024 + 1, 40_000]
    with trio.fail_after(TIMEOUT):
        async with wired() as w:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.run_recorded)
                for i, size in enumerate(sizes):
                    message = bytes([i]) * size
                    await w.partner.send_all(message)
                    assert await _read_exactly(w.pool, size) == message
                    await w.pool.send_all(message[::-1])
                    assert await _read_exactly(w.partner, size) == message[::-1]
                await w.partner.send_eof()
                assert await _read_to_eof(w.pool) == b""
                await w.pool.send_all(b"still here")
                assert await _read_exactly(w.partner, 10) == b"still here"
                await w.pool.send_eof()
                assert await _read_to_eof(w.partner) == b""
            assert w.a.direct is direct and w.b.direct is direct
    assert w.outcome == [RelayOutcome("partner_closed")]
    assert w.counted == {"a": sum(sizes), "b": sum(sizes) + 10}


async def test_pool_closes_first() -> None:
    with trio.fail_after(TIMEOUT):
        async with wired() as w, trio.open_nursery() as nursery:
            nursery.start_soon(w.run_recorded)
            await w.pool.send_all(b"bye")
            await w.pool.send_eof()
            assert await _read_to_eof(w.partner) == b"bye"
            await w.partner.send_all(b"ack")
            await w.partner.send_eof()
            assert await _read_to_eof(w.pool) == b"ack"
    assert w.outcome == [RelayOutcome("pool_closed")]


async def test_bytes_already_read_with_the_handshake_go_first() -> None:
    """Ciphertext the memory-BIO stream had already read (here: the rest of
    three records after a 1-byte read) is relayed before anything else and in
    order when the stream moves onto its socket."""
    with trio.fail_after(TIMEOUT):
        async with wired() as w:
            first = b"".join(bytes([65 + i]) * 20_000 for i in range(3))
            await w.partner.send_all(first)
            assert await w.a.receive_some(1) == b"A"
            await trio.sleep(0.05)  # the rest is in the socket or in the BIO
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.run)
                assert await _read_exactly(w.pool, len(first) - 1) == first[1:]
                await w.partner.send_all(b"later")
                assert await _read_exactly(w.pool, 5) == b"later"
                assert w.a.direct and w.b.direct
                nursery.cancel_scope.cancel()


async def test_full_duplex_16_mib_with_back_pressure() -> None:
    """16 MiB each way at once while the pool stops reading for a while: the
    partner's sender stalls (TCP back-pressure through the relay, which holds
    one record per direction) and everything arrives intact afterwards."""
    size = 16 * 1024 * 1024
    chunk = 256 * 1024
    with trio.fail_after(TIMEOUT * 2):
        async with wired() as w:
            # Fixed, small socket buffers (no autotuning): what the kernel can
            # hold along the way is well under half the transfer on any host.
            for stream in (w.partner, w.a, w.b, w.pool):
                sock = stream.transport_stream.socket  # type: ignore[attr-defined]
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
            sent_by_partner = 0
            digests: dict[str, str] = {}

            async def send(stream: TLSStream, seed: int, who: str) -> None:
                nonlocal sent_by_partner
                h = hashlib.sha256()
                for i in range(size // chunk):
                    block = struct.pack(">II", seed, i) * (chunk // 8)
                    h.update(block)
                    await stream.send_all(block)
                    if who == "partner":
                        sent_by_partner += len(block)
                digests[f"{who}-sent"] = h.hexdigest()

            async def receive(stream: TLSStream, who: str, pause_s: float) -> None:
                await trio.sleep(pause_s)
                h = hashlib.sha256()
                got = 0
                for _ in range(1_000_000):
                    if got >= size:
                        break
                    data = await stream.receive_some(65536)
                    assert data
                    h.update(data)
                    got += len(data)
                digests[f"{who}-got"] = h.hexdigest()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.run)
                async with trio.open_nursery() as transfer:
                    transfer.start_soon(send, w.partner, 1, "partner")
                    transfer.start_soon(send, w.pool, 2, "pool")
                    transfer.start_soon(receive, w.pool, "pool", 1.0)
                    transfer.start_soon(receive, w.partner, "partner", 0.0)
                    await trio.sleep(0.8)
                    # The pool has not read a byte yet: the partner is held back.
                    assert sent_by_partner < size // 2, sent_by_partner
                nursery.cancel_scope.cancel()
            assert digests["partner-sent"] == digests["pool-got"]
            assert digests["pool-sent"] == digests["partner-got"]


async def test_truncation_and_reset_are_named_by_side() -> None:
    with trio.fail_after(TIMEOUT):
        async with wired() as w:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.run_recorded)
                await w.partner.send_all(b"x")
                assert await _read_exactly(w.pool, 1) == b"x"
                # TCP FIN without close_notify.
                w.partner.transport_stream.socket.shutdown(socket.SHUT_WR)  # type: ignore[attr-defined]
            assert w.outcome == [
                RelayOutcome("partner_truncated", "partner closed TCP without close_notify")
            ]
        async with wired() as w:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.run_recorded)
                await w.pool.send_all(b"y")
                assert await _read_exactly(w.partner, 1) == b"y"
                # An RST: close with SO_LINGER 0.
                sock = w.pool.transport_stream.socket  # type: ignore[attr-defined]
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            assert len(w.outcome) == 1 and w.outcome[0].end in ("pool_error", "pool_truncated")
            if w.outcome[0].end == "pool_error":
                assert "reset" in w.outcome[0].detail.lower()


async def test_stop_and_idle_timeout_end_a_direct_relay() -> None:
    with trio.fail_after(TIMEOUT):
        async with wired() as w:
            control = RelayControl()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.run_recorded, control)
                await w.partner.send_all(b"hello")
                assert await _read_exactly(w.pool, 5) == b"hello"
                control.stop("trust_withdrawn", "partner removed")
            assert w.outcome == [RelayOutcome("trust_withdrawn", "partner removed")]
            assert w.counted["a"] == 5  # paid when the relay ended
        async with wired() as w:
            before = trio.current_time()
            end = await w.run(idle_timeout_s=0.5)
            assert end.end == "idle_timeout"
            assert 0.5 <= trio.current_time() - before < 5


async def test_a_stream_closed_during_the_relay_ends_it() -> None:
    """Someone closing a relayed stream takes it out of the hub first: the
    relay ends naming the side, and the hub serves other relays afterwards."""
    with trio.fail_after(TIMEOUT):
        async with wired() as w:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.run_recorded)
                await w.partner.send_all(b"z")
                assert await _read_exactly(w.pool, 1) == b"z"
                await w.a.aclose()
            assert w.outcome == [RelayOutcome("partner_error", "closed during the relay")]
        async with wired() as w, trio.open_nursery() as nursery:
            nursery.start_soon(w.run)
            await w.partner.send_all(b"next")
            assert await _read_exactly(w.pool, 4) == b"next"
            nursery.cancel_scope.cancel()


async def test_many_relays_share_the_hub() -> None:
    """Forty relays at once, each echoing its own messages: nothing crosses
    between connections."""
    n = 40
    with trio.fail_after(TIMEOUT * 2):
        async with trio.open_nursery() as outer:
            results: list[int] = []

            async def one(i: int) -> None:
                async with wired() as w, trio.open_nursery() as nursery:
                    nursery.start_soon(w.run)
                    for k in range(20):
                        message = f"{i}:{k}:".encode() * (1 + k * 7)
                        await w.partner.send_all(message)
                        echoed = await _read_exactly(w.pool, len(message))
                        assert echoed == message
                        await w.pool.send_all(echoed)
                        assert await _read_exactly(w.partner, len(message)) == message
                    nursery.cancel_scope.cancel()
                results.append(i)

            for i in range(n):
                outer.start_soon(one, i)
    assert sorted(results) == list(range(n))


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_garbage_from_the_partner_ends_only_its_relay(version: str) -> None:
    """Bytes that are not TLS records, injected under the partner's TLS in
    the middle of a direct relay: that relay ends as ``partner_error`` with
    OpenSSL's reason, the pool side is told nothing of it, and another relay
    on the same hub goes on."""
    with trio.fail_after(TIMEOUT):
        async with wired(version) as other, trio.open_nursery() as others:
            others.start_soon(other.run)
            async with wired(version) as w:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(w.run_recorded)
                    await w.partner.send_all(b"fine")
                    assert await _read_exactly(w.pool, 4) == b"fine"
                    assert w.a.direct and w.a.version == version
                    raw = w.partner.transport_stream
                    assert isinstance(raw, trio.SocketStream)
                    await raw.send_all(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
                assert len(w.outcome) == 1 and w.outcome[0].end == "partner_error", w.outcome
                assert w.outcome[0].detail  # OpenSSL's reason, e.g. a bad record MAC
            await other.partner.send_all(b"still relayed")
            assert await _read_exactly(other.pool, 13) == b"still relayed"
            others.cancel_scope.cancel()


async def test_a_failing_byte_counter_loses_counts_not_bytes() -> None:
    """A byte-count callback that raises (a bug, not the network) neither
    ends the relay nor stops the hub: the bytes still cross both ways."""
    with trio.fail_after(TIMEOUT):
        async with wired() as w:
            calls = 0

            def broken(_n: int) -> None:
                nonlocal calls
                calls += 1
                raise RuntimeError("counter bug")

            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    await relay(w.a, w.b, idle_timeout_s=60, on_bytes_from_a=broken)

                nursery.start_soon(run)
                payload = bytes(range(256)) * 2048  # 512 KiB: paid in bursts and when idle
                nursery.start_soon(w.partner.send_all, payload)
                assert await _read_exactly(w.pool, len(payload)) == payload
                await w.pool.send_all(b"reply")
                assert await _read_exactly(w.partner, 5) == b"reply"
                await w.partner.send_all(b"more")
                assert await _read_exactly(w.pool, 4) == b"more"
                nursery.cancel_scope.cancel()
            assert calls >= 2


async def test_buffered_bytes_then_close_notify_take_the_pumps() -> None:
    """When what a stream had already read ends with the peer's close_notify,
    it stays on memory BIOs: the pumps relay those bytes first, then the
    half-close, exactly as the hub would."""
    with trio.fail_after(TIMEOUT):
        async with wired() as w:
            await w.partner.send_all(b"last words" * 3000)
            await w.partner.send_eof()
            assert await w.a.receive_some(1) == b"l"
            await trio.sleep(0.05)  # the rest, and the close_notify, are in
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.run_recorded)
                assert await _read_to_eof(w.pool) == (b"last words" * 3000)[1:]
                await w.pool.send_all(b"ok")
                await w.pool.send_eof()
                assert await _read_to_eof(w.partner) == b"ok"
            assert not w.a.direct
    assert w.outcome == [RelayOutcome("partner_closed")]
    assert w.counted == {"a": 30_000 - 1, "b": 2}


@pytest.mark.parametrize("seed", range(6))
async def test_random_traffic_arrives_intact_and_in_order(seed: int) -> None:
    """Seeded random traffic through the hub: writes of 1 B to 70 KB (across
    record boundaries), both sides at once, random pauses, either side
    closing first. Each side receives exactly what the other sent, in order,
    and the relay names who closed first."""
    import random

    rng = random.Random(seed)
    plans = {
        side: [rng.choice([1, 5, 300, 1400, 16_384, 16_385, 40_000, 70_000]) for _ in range(25)]
        for side in ("partner", "pool")
    }
    first_to_close = rng.choice(["partner", "pool"])
    with trio.fail_after(TIMEOUT):
        async with wired(rng.choice(["TLSv1.2", "TLSv1.3"])) as w:
            sent: dict[str, bytes] = {}
            got: dict[str, bytes] = {}
            # A side has read the end of the other's stream: the relay has
            # passed that close_notify on (so "first" is unambiguous).
            eof_seen = {"partner": trio.Event(), "pool": trio.Event()}

            async def talk(side: str, stream: TLSStream) -> None:
                out = bytearray()
                for i, size in enumerate(plans[side]):
                    chunk = bytes([(i * 7 + len(out)) % 251]) * size
                    out += chunk
                    await stream.send_all(chunk)
                    if rng.random() < 0.3:
                        await trio.sleep(rng.random() / 200)
                sent[side] = bytes(out)
                if side != first_to_close:
                    await eof_seen[side].wait()
                await stream.send_eof()

            async def listen(side: str, stream: TLSStream) -> None:
                got[side] = await _read_to_eof(stream)
                eof_seen[side].set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.run_recorded)
                nursery.start_soon(talk, "partner", w.partner)
                nursery.start_soon(talk, "pool", w.pool)
                nursery.start_soon(listen, "partner", w.partner)
                nursery.start_soon(listen, "pool", w.pool)
            assert w.a.direct and w.b.direct
    assert got["pool"] == sent["partner"]
    assert got["partner"] == sent["pool"]
    assert w.outcome == [RelayOutcome(f"{first_to_close}_closed")]
    assert w.counted == {"a": len(sent["partner"]), "b": len(sent["pool"])}
