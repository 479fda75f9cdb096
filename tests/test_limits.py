"""Admission limits: the pure per-source limiter, then each limit through `edge run`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import trio

from edge.core.limits import SourceLimits, source_key
from tests.gateway_harness import (
    EdgeProcess,
    Pki,
    echo_roundtrip,
    partner_stream,
    start_edge,
    start_pool,
    stop_edge,
    write_federation,
)

# ----------------------------------------------------------------------
# The core: time is an argument, so no clock is needed.


def test_ipv6_sources_are_grouped_by_64_and_mapped_ipv4_by_address() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::9")
    assert source_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("192.0.2.7") == "192.0.2.7"


def test_concurrent_connections_per_source() -> None:
    limits = SourceLimits(max_per_source=2, rate_per_s=1000, burst=1000)
    assert limits.admit("192.0.2.1", 0) is None
    assert limits.admit("192.0.2.1", 0) is None
    refusal = limits.admit("192.0.2.1", 0)
    assert refusal is not None and "max_connections_per_source" in refusal
    assert limits.admit("192.0.2.2", 0) is None  # another source is unaffected
    limits.release("192.0.2.1")
    assert limits.admit("192.0.2.1", 0) is None


def test_token_bucket_burst_then_rate() -> None:
    limits = SourceLimits(max_per_source=10_000, rate_per_s=10, burst=5)
    for _ in range(5):
        assert limits.admit("198.51.100.1", 100.0) is None
    refusal = limits.admit("198.51.100.1", 100.0)
    assert refusal is not None and "new_connections_per_source_per_s" in refusal
    # 0.1 s refills exactly one token at 10/s.
    assert limits.admit("198.51.100.1", 100.1) is None
    assert limits.admit("198.51.100.1", 100.1) is not None
    # A long pause refills to the burst, never beyond it.
    for _ in range(5):
        assert limits.admit("198.51.100.1", 1000.0) is None
    assert limits.admit("198.51.100.1", 1000.0) is not None


def test_idle_sources_are_forgotten_and_tracking_is_bounded() -> None:
    limits = SourceLimits(max_per_source=10, rate_per_s=1, burst=2, max_tracked=3)
    for i in range(3):
        assert limits.admit(f"203.0.113.{i}", 0.0) is None
        limits.release(f"203.0.113.{i}")
    # Full table, buckets not yet refilled: a new source is refused (fail closed).
    refusal = limits.admit("203.0.113.99", 0.5)
    assert refusal is not None and "tracking 3 sources" in refusal
    # Once their buckets are full again, idle sources are forgotten.
    assert limits.admit("203.0.113.99", 10.0) is None
    assert len(limits) == 1


def test_a_source_with_live_connections_is_never_forgotten() -> None:
    limits = SourceLimits(max_per_source=1, rate_per_s=1, burst=1, max_tracked=1)
    assert limits.admit("192.0.2.1", 0.0) is None
    limits.prune(1000.0)
    assert len(limits) == 1
    refusal = limits.admit("192.0.2.1", 1000.0)
    assert refusal is not None and "max_connections_per_source" in refusal


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SourceLimits(max_per_source=0, rate_per_s=1, burst=1)


# ----------------------------------------------------------------------
# Through `edge run`: each limit refuses with over_limit, before a handshake.


async def _start(nursery: trio.Nursery, tmp_path: Path, pki: Pki, limits: str) -> EdgeProcess:
    pool = await start_pool(nursery, pki, ("fe1.corp.test",))
    config = write_federation(
        tmp_path,
        pki,
        [(h, p) for h, p, _ in pool],
        limits=limits if "handshake_timeout_s" in limits else "handshake_timeout_s = 3\n" + limits,
        policies={
            "fabrikam.com": 'domains = ["fabrikam.com"]\nmax_connections = 2\n',
        },
    )
    return await start_edge(nursery, config)


async def _raw_connection(edge: EdgeProcess) -> tuple[trio.SocketStream, int]:
    tcp = await trio.open_tcp_stream(*edge.address)
    return tcp, tcp.socket.getsockname()[1]


async def _first_refusal(
    edge: EdgeProcess, held: list[tuple[trio.SocketStream, int]]
) -> dict[str, object]:
    """Open stalled connections until the gateway refuses one; return that event.

    Deterministic under load: no guess of when the gateway accepted the
    earlier ones. Every connection opened is appended to ``held``.
    """
    for _ in range(40):
        tcp, port = await _raw_connection(edge)
        held.append((tcp, port))
        with trio.move_on_after(0.3):
            return await edge.event_for_port(port, "connection_rejected")
    raise AssertionError("no connection was refused")


async def test_max_connections_per_source(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            edge = await _start(nursery, tmp_path, pki, "max_connections_per_source = 2")
            held = [await _raw_connection(edge) for _ in range(2)]
            extra, port = await _raw_connection(edge)
            event = await edge.event_for_port(port, "connection_rejected")
            assert event["reason"] == "over_limit"
            assert "max_connections_per_source" in event["detail"]
            with trio.fail_after(5):
                assert await extra.receive_some(10) == b""  # closed, no handshake spent
            for tcp, _ in held:
                await tcp.aclose()
            await extra.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_max_handshakes_in_progress(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            edge = await _start(
                nursery, tmp_path, pki, "max_handshakes_in_progress = 3\nhandshake_timeout_s = 20"
            )
            stalled: list[tuple[trio.SocketStream, int]] = []
            event = await _first_refusal(edge, stalled)
            assert event["reason"] == "over_limit"
            assert "max_handshakes_in_progress" in str(event["detail"])
            assert len(stalled) >= 4  # three held the slots before one was refused
            for tcp, _ in stalled:
                # One byte of a ClientHello first: a connection closed before any
                # byte is a load balancer's probe, counted but not logged.
                with contextlib.suppress(trio.BrokenResourceError):
                    await tcp.send_all(b"\x16")
                await tcp.aclose()
            # Freed slots admit a real partner again, once every stalled
            # connection has ended (each one's own event, not a count).
            for _, port in stalled:
                await edge.event_for_port(port, "connection_rejected")
            stream, _ = await partner_stream(
                edge, pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            )
            assert await echo_roundtrip(stream, b"ok") == b"ok"
            await stream.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_new_connection_rate_per_source(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            edge = await _start(
                nursery,
                tmp_path,
                pki,
                "new_connections_per_source_per_s = 0.5\nnew_connections_per_source_burst = 3",
            )
            conns = [await _raw_connection(edge) for _ in range(4)]
            event = await edge.event_for_port(conns[3][1], "connection_rejected")
            assert event["reason"] == "over_limit"
            assert "new_connections_per_source_per_s" in event["detail"]
            for tcp, _ in conns:
                await tcp.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_policy_max_connections_per_partner(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            edge = await _start(nursery, tmp_path, pki, "")
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            open_streams = []
            for _ in range(2):
                stream, _ = await partner_stream(edge, pki, leaf)
                assert await echo_roundtrip(stream, b"in") == b"in"
                open_streams.append(stream)
            third, port = await partner_stream(edge, pki, leaf)
            event = await edge.event_for_port(port, "connection_rejected")
            assert event["reason"] == "over_limit"
            assert event["partner"] == "fabrikam.com"
            await third.aclose()
            for stream in open_streams:
                await stream.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_max_connections_global(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            edge = await _start(
                nursery, tmp_path, pki, "max_connections = 2\nhandshake_timeout_s = 20"
            )
            held: list[tuple[trio.SocketStream, int]] = []
            event = await _first_refusal(edge, held)
            assert event["reason"] == "over_limit"
            assert "max_connections=2" in str(event["detail"])
            assert len(held) >= 3
            for tcp, _ in held:
                await tcp.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()
