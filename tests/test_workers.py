"""`edge run --workers 2`: shared ports, aggregated metrics, restart, drain."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import trio

from tests.gateway_harness import (
    EdgeProcess,
    Pki,
    echo_roundtrip,
    partner_stream,
    sample,
    scrape,
    start_edge,
    start_pool,
    write_federation,
)


async def _start(nursery: trio.Nursery, tmp_path: Path, pki: Pki, limits: str = "") -> EdgeProcess:
    pool = await start_pool(nursery, pki, ("fe1.corp.test",))
    config = write_federation(tmp_path, pki, [(h, p) for h, p, _ in pool], limits=limits)
    return await start_edge(nursery, config, ["--workers", "2"])


def _workers_started(edge: EdgeProcess) -> list[dict[str, object]]:
    return [e for e in edge.events if e["event"] == "worker_started"]


async def test_two_workers_share_the_port_and_metrics_add_up(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            edge = await _start(nursery, tmp_path, pki)
            assert {e["worker"] for e in _workers_started(edge)} == {0, 1}
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            ports = []
            for i in range(24):
                stream, port = await partner_stream(edge, pki, leaf)
                assert await echo_roundtrip(stream, b"w%d" % i) == b"w%d" % i
                await stream.aclose()
                ports.append(port)
            closed = [await edge.event_for_port(p, "connection_closed") for p in ports]
            # The kernel spread the connections over both workers.
            assert {e["worker"] for e in closed} == {0, 1}
            # One scrape of the supervisor sums both workers' counters.
            held, _ = await partner_stream(edge, pki, leaf)
            assert await echo_roundtrip(held, b"held") == b"held"
            fed = {"listener": "federation", "partner": "fabrikam.com"}
            expected_bytes = sum(len(b"w%d" % i) for i in range(24)) + 4
            # A live connection's bytes reach the counter per batch: within a
            # millisecond of the traffic pausing (docs/operations.md), so the
            # scrape is repeated for a moment rather than raced.
            for _ in range(100):
                samples = await scrape(edge)
                got = sample(samples, "edge_bytes_total", **fed, direction="from_partner")
                if got == expected_bytes:
                    break
                await trio.sleep(0.02)
            inbound = {"direction": "inbound"}
            assert sample(samples, "edge_handshakes_total", **fed, result="ok", **inbound) == 25
            assert sample(samples, "edge_connections_active", **fed, **inbound) == 1
            assert got == expected_bytes
            await held.aclose()
            edge.terminate()
            with trio.fail_after(20):
                assert await edge.process.wait() == 0
            nursery.cancel_scope.cancel()


async def test_a_killed_worker_is_replaced(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            edge = await _start(nursery, tmp_path, pki)
            victim = next(e for e in _workers_started(edge) if e["worker"] == 0)
            os.kill(int(str(victim["pid"])), signal.SIGKILL)
            exited = await edge.wait_for(lambda e: e["event"] == "worker_exited")
            assert exited["worker"] == 0 and exited["pid"] == victim["pid"]
            replacement = await edge.wait_for(
                lambda e: (
                    e["event"] == "worker_started"
                    and e["worker"] == 0
                    and e["pid"] != victim["pid"]
                )
            )
            assert replacement["pid"] != victim["pid"]
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            for _ in range(8):
                stream, _ = await partner_stream(edge, pki, leaf)
                assert await echo_roundtrip(stream, b"alive") == b"alive"
                await stream.aclose()
            edge.terminate()
            with trio.fail_after(20):
                assert await edge.process.wait() == 0
            nursery.cancel_scope.cancel()


async def test_sigterm_drains_every_worker(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            edge = await _start(nursery, tmp_path, pki, limits="drain_timeout_s = 10")
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            streams = []
            for _ in range(6):
                stream, port = await partner_stream(edge, pki, leaf)
                assert await echo_roundtrip(stream, b"pre") == b"pre"
                streams.append((stream, port))
            edge.terminate()
            await edge.wait_for(lambda e: e["event"] == "shutdown_started" and "worker" in e)
            for stream, _ in streams:
                assert await echo_roundtrip(stream, b"draining") == b"draining"
                await stream.aclose()
            with trio.fail_after(20):
                assert await edge.process.wait() == 0
            for _, port in streams:
                closed = await edge.event_for_port(port, "connection_closed")
                assert closed["end"] == "partner_closed"
            stopped = [e for e in edge.events if e["event"] == "worker_stopped"]
            assert sorted(e["worker"] for e in stopped) == [0, 1]
            assert all(e["code"] == 0 for e in stopped)
            nursery.cancel_scope.cancel()


def test_unwritable_metrics_folder_is_a_clear_startup_error(tmp_path: Path, pki: Pki) -> None:
    """A read-only root without a tmpfs: exit 1 with advice, never a traceback."""
    import subprocess
    import sys

    config = write_federation(tmp_path, pki, [("fe1.corp.test", 9)])
    (tmp_path / "a-file").write_text("in the way\n")
    result = subprocess.run(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(config), "--workers", "2"],
        env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "a-file" / "metrics")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "PROMETHEUS_MULTIPROC_DIR" in result.stderr and "tmpfs" in result.stderr
    assert "Traceback" not in result.stderr
    assert '"startup_failed"' in result.stdout
