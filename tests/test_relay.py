"""The relay on trio's in-memory streams: half-close, counters, idle timeout, stop.

No socket and no TLS: ``edge.relay.relay`` takes any two half-closeable
streams, which is what lets the SIP and outbound listeners reuse it. Timers
run on trio's MockClock.
"""

from __future__ import annotations

import trio
import trio.testing

from edge.relay import RELAY_CHUNK, RelayControl, RelayOutcome, relay


async def _drain(stream: trio.abc.ReceiveStream) -> bytes:
    got = b""
    for _ in range(1000):  # bounded: the peer always ends with EOF here
        chunk = await stream.receive_some(RELAY_CHUNK)
        if not chunk:
            return got
        got += chunk
    raise AssertionError("no EOF after 1000 chunks")


async def test_both_ways_with_half_close_and_counters() -> None:
    partner, relay_a = trio.testing.memory_stream_pair()
    relay_b, member = trio.testing.memory_stream_pair()
    counted = {"a": 0, "b": 0}
    outcome: list[RelayOutcome] = []

    async def run_relay() -> None:
        outcome.append(
            await relay(
                relay_a,
                relay_b,
                idle_timeout_s=60,
                names=("partner", "pool"),
                on_bytes_from_a=lambda n: counted.__setitem__("a", counted["a"] + n),
                on_bytes_from_b=lambda n: counted.__setitem__("b", counted["b"] + n),
            )
        )

    async def run_member() -> None:
        assert await _drain(member) == b"hello" * 1000
        await member.send_all(b"bye")
        await member.send_eof()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay)
            nursery.start_soon(run_member)
            await partner.send_all(b"hello" * 1000)
            await partner.send_eof()  # the partner ends first; the pool still answers
            assert await _drain(partner) == b"bye"
    assert outcome == [RelayOutcome("partner_closed")]
    assert counted == {"a": 5000, "b": 3}


async def test_idle_timeout_ends_a_silent_relay(autojump_clock: trio.testing.MockClock) -> None:
    _partner, relay_a = trio.testing.memory_stream_pair()
    relay_b, _member = trio.testing.memory_stream_pair()
    outcome = await relay(relay_a, relay_b, idle_timeout_s=30, names=("partner", "pool"))
    assert outcome.end == "idle_timeout"
    assert "idle_timeout_s=30" in outcome.detail


async def test_control_stop_ends_the_relay_with_its_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _partner, relay_a = trio.testing.memory_stream_pair()
    relay_b, _member = trio.testing.memory_stream_pair()
    control = RelayControl()
    outcome: list[RelayOutcome] = []

    async def run_relay() -> None:
        outcome.append(
            await relay(
                relay_a, relay_b, idle_timeout_s=3600, names=("partner", "pool"), control=control
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_relay)
        await trio.sleep(1)
        control.stop("trust_withdrawn", "partner removed")
    assert outcome == [RelayOutcome("trust_withdrawn", "partner removed")]
    # A stop before the relay starts ends it at once, with the same reason.
    early = RelayControl()
    early.stop("trust_withdrawn", "already gone")
    assert (await relay(relay_a, relay_b, idle_timeout_s=0, control=early)).end == "trust_withdrawn"
