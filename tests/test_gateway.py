"""The gateway end to end: real MTLS on loopback, a real pool.

Admission, relay and limits run the gateway in the test's process
(``start_gateway``: no interpreter start per test); what is about `edge run`
itself (signals, drain and exit status, the metrics endpoint of the real
process, bad configuration on the command line, a 64 MiB transfer across two
processes) runs it as a subprocess. Each rejection is asserted by the exact
reason code the gateway logged for that very connection (matched by the
partner's source port).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from edge.tls import TLSStream, server_context
from tests.gateway_harness import (
    NOW,
    EdgeProcess,
    InProcessEdge,
    Pki,
    Samples,
    echo_roundtrip,
    edge_command,
    http_get,
    partner_stream,
    scrape,
    start_edge,
    start_gateway,
    start_pool,
    stop_edge,
    write_federation,
)

POOL = ("fe1.corp.test", "fe2.corp.test")


async def _federation(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: Pki,
    *,
    limits: str = "",
    policies: dict[str, str] | None = None,
    subprocess: bool = False,
) -> EdgeProcess | InProcessEdge:
    pool = await start_pool(nursery, pki, POOL)
    config = write_federation(
        tmp_path, pki, [(h, p) for h, p, _ in pool], limits=limits, policies=policies
    )
    if subprocess:
        return await start_edge(nursery, config)
    return await start_gateway(nursery, config)


async def _process(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, *, limits: str = ""
) -> EdgeProcess:
    edge = await _federation(nursery, tmp_path, pki, limits=limits, subprocess=True)
    assert isinstance(edge, EdgeProcess)
    return edge


async def test_two_partners_relayed_concurrently(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            edge = await _federation(nursery, tmp_path, pki)
            leaves = {
                "fabrikam.com": pki.fabrikam.issue(dns=["sip.fabrikam.com"]),
                "litware.com": pki.litware.issue(dns=["sip.litware.com"]),
            }
            ports: dict[str, int] = {}

            async def one(partner: str) -> None:
                stream, port = await partner_stream(edge, pki, leaves[partner])
                ports[partner] = port
                payload = f"{partner} says hello".encode() * 100
                assert await echo_roundtrip(stream, payload) == payload
                await stream.aclose()

            async with trio.open_nursery() as inner:
                for partner in leaves:
                    inner.start_soon(one, partner)
            members = set()
            for partner, port in ports.items():
                closed = await edge.event_for_port(port, "connection_closed")
                assert closed["partner"] == partner
                assert closed["bytes_from_partner"] == len(f"{partner} says hello") * 100
                assert closed["bytes_to_partner"] == closed["bytes_from_partner"]
                assert closed["fingerprint_sha256"]
                assert "sip." in closed["leaf_subject"]
                members.add(closed["member"])
            # Round robin: two connections went to the two members.
            assert members == set(POOL)
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_forty_concurrent_connections(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            edge = await _federation(nursery, tmp_path, pki)
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            ok: list[int] = []

            async def one(i: int) -> None:
                stream, _ = await partner_stream(edge, pki, leaf)
                payload = os.urandom(1000 + i)
                got = await echo_roundtrip(stream, payload)
                await stream.aclose()
                if got == payload:
                    ok.append(i)

            async with trio.open_nursery() as inner:
                for i in range(40):
                    inner.start_soon(one, i)
            assert sorted(ok) == list(range(40))
            await edge.wait_for(
                lambda _e: sum(1 for e in edge.events if e["event"] == "connection_closed") >= 40
            )
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_64_mib_each_way_sha256(tmp_path: Path, pki: Pki) -> None:
    size = 64 * 1024 * 1024
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            edge = await _process(nursery, tmp_path, pki)
            stream, port = await partner_stream(
                edge, pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            )
            sent, received = hashlib.sha256(), hashlib.sha256()
            total = 0

            async def sender() -> None:
                block = os.urandom(1 << 20)
                for i in range(size >> 20):
                    chunk = bytes([i & 0xFF]) + block[1:]
                    sent.update(chunk)
                    await stream.send_all(chunk)
                await stream.send_eof()

            async with trio.open_nursery() as inner:
                inner.start_soon(sender)
                while True:
                    data = await stream.receive_some(1 << 18)
                    if not data:
                        break
                    received.update(data)
                    total += len(data)
            await stream.aclose()
            assert total == size
            assert received.hexdigest() == sent.hexdigest()
            closed = await edge.event_for_port(port, "connection_closed")
            assert closed["bytes_from_partner"] == size
            assert closed["bytes_to_partner"] == size
            assert closed["end"] == "partner_closed"
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def _rejected_reason(edge: EdgeProcess, pki: Pki, leaf: object) -> dict[str, object]:
    from edge.pki import Leaf

    assert leaf is None or isinstance(leaf, Leaf)
    port = 0
    try:
        stream, port = await partner_stream(edge, pki, leaf)
        # TLS 1.3: the refusal shows on the first read.
        await stream.send_all(b"let me in")
        with trio.move_on_after(5):
            assert await stream.receive_some(100) == b"", "a refused partner got data back"
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    if port == 0:
        pytest.fail("no port recorded")
    return await edge.event_for_port(port, "connection_rejected")


# Refusals after the partner's own root verified the chain (issue 16 item 4).
_FROM_THE_PARTNERS_ROOT = ("expired", "bad_purpose", "name_mismatch")


def _handshakes(samples: Samples, **labels: str) -> float:
    """edge_handshakes_total summed over the series carrying ``labels``."""
    want = set(labels.items())
    return sum(
        v for (name, have), v in samples.items() if name == "edge_handshakes_total" and want <= have
    )


async def test_rejections_carry_exact_reason_codes(tmp_path: Path, pki: Pki) -> None:
    policies = {
        "fabrikam.com": 'domains = ["fabrikam.com"]\n',
        "litware.com": 'domains = ["litware.com"]\nenabled = false\n',
    }
    cases = {
        "unknown_ca": pki.stranger.issue(dns=["sip.stranger.test"]),
        "name_mismatch": pki.fabrikam.issue(dns=["sip.litware.com"]),
        "expired": pki.fabrikam.issue(
            dns=["sip.fabrikam.com"],
            not_before=NOW - _dt.timedelta(days=10),
            not_after=NOW - _dt.timedelta(days=1),
        ),
        "not_yet_valid": pki.fabrikam.issue(
            dns=["sip.fabrikam.com"],
            not_before=NOW + _dt.timedelta(days=1),
            not_after=NOW + _dt.timedelta(days=10),
        ),
        "bad_purpose": pki.fabrikam.issue(dns=["sip.fabrikam.com"], eku=["server"]),
        "partner_disabled": pki.litware.issue(dns=["sip.litware.com"]),
    }
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            edge = await _federation(nursery, tmp_path, pki, policies=policies)
            for expected, leaf in cases.items():
                event = await _rejected_reason(edge, pki, leaf)
                assert event["reason"] == expected, event
                assert event["detail"]
                if expected in _FROM_THE_PARTNERS_ROOT:
                    # The partner's own root verified the chain: the refusal is
                    # labelled with the partner, in the log and in the metric.
                    assert event.get("partner") == "fabrikam.com", event
            samples = await scrape(edge)
            for reason in _FROM_THE_PARTNERS_ROOT:
                assert _handshakes(samples, partner="fabrikam.com", result=reason) == 1
                assert _handshakes(samples, partner="unknown", result=reason) == 0
            assert _handshakes(samples, partner="unknown", result="unknown_ca") == 1
            # No client certificate: the handshake itself fails (TLS 1.3 alert).
            port = await _no_cert_connection(edge, pki)
            event = await edge.event_for_port(port, "connection_rejected")
            assert event["reason"] == "no_client_cert"
            # Garbage instead of a ClientHello.
            tcp = await trio.open_tcp_stream(*edge.address)
            port = tcp.socket.getsockname()[1]
            await tcp.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
            event = await edge.event_for_port(port, "connection_rejected")
            assert event["reason"] == "tls_error"
            await tcp.aclose()
            # The log never carries payload bytes.
            assert not any("let me in" in str(e) for e in edge.events)
            assert await stop_edge(edge) == 0
            # No bug reached the per-connection safety net.
            assert not any(e["event"] == "internal_error" for e in edge.events)
            nursery.cancel_scope.cancel()


async def _no_cert_connection(edge: EdgeProcess, pki: Pki) -> int:
    from edge.tls import client_context
    from tests.gateway_harness import EDGE_NAME

    tcp = await trio.open_tcp_stream(*edge.address)
    port = tcp.socket.getsockname()[1]
    stream = TLSStream(
        tcp, client_context([pki.edge_ca.cert]), server_side=False, server_hostname=EDGE_NAME
    )
    try:
        await stream.do_handshake()
        await stream.send_all(b"x")
        with trio.move_on_after(5):
            await stream.receive_some(10)
    except (trio.BrokenResourceError, OSError):
        pass
    await stream.aclose()
    return port


async def test_handshake_timeout(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            edge = await _federation(nursery, tmp_path, pki, limits="handshake_timeout_s = 0.5")
            silent = await trio.open_tcp_stream(*edge.address)
            port = silent.socket.getsockname()[1]
            event = await edge.event_for_port(port, "connection_rejected")
            assert event["reason"] == "handshake_timeout"
            # The gateway closed the socket.
            with trio.fail_after(5):
                assert await silent.receive_some(10) == b""
            await silent.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_idle_timeout_closes_relayed_connection(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            edge = await _federation(
                nursery, tmp_path, pki, limits="handshake_timeout_s = 5\nidle_timeout_s = 0.5"
            )
            stream, port = await partner_stream(
                edge, pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            )
            assert await echo_roundtrip(stream, b"ping") == b"ping"
            closed = await edge.event_for_port(port, "connection_closed")
            assert closed["end"] == "idle_timeout"
            await stream.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_member_with_certificate_for_another_host_is_untrusted(
    tmp_path: Path, pki: Pki
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            # The only member presents a valid enterprise certificate, for the wrong name.
            impostor_leaf = pki.member_leaf("other.corp.test")
            received: list[bytes] = []

            async def impostor(tcp: trio.SocketStream) -> None:
                ctx = server_context(
                    impostor_leaf.chain,
                    impostor_leaf.key,
                    require_client_cert=True,
                    client_roots=[pki.enterprise.cert],
                )
                stream = TLSStream(tcp, ctx, server_side=True)
                try:
                    await stream.do_handshake()
                    while data := await stream.receive_some(1000):
                        received.append(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                finally:
                    await stream.aclose()

            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, impostor, listeners)
            port = listeners[0].socket.getsockname()[1]
            config = write_federation(tmp_path, pki, [("fe1.corp.test", port)])
            edge = await start_gateway(nursery, config)
            event = await _rejected_reason(edge, pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"]))
            assert event["reason"] == "upstream_untrusted"
            assert "fe1.corp.test" in str(event["detail"])
            upstream = await edge.wait_for(lambda e: e["event"] == "upstream_error")
            assert upstream["reason"] == "upstream_untrusted"
            # Not one byte of the partner's data reached the impostor.
            assert received == []
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_all_members_down_is_no_upstream(tmp_path: Path, pki: Pki) -> None:
    closed_ports = []
    for _ in range(2):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        closed_ports.append(listeners[0].socket.getsockname()[1])
        await listeners[0].aclose()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            config = write_federation(tmp_path, pki, list(zip(POOL, closed_ports, strict=True)))
            edge = await start_gateway(nursery, config)
            event = await _rejected_reason(edge, pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"]))
            assert event["reason"] == "no_upstream"
            assert event["partner"] == "fabrikam.com"
            for host in POOL:
                assert host in str(event["detail"])
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_half_close_partner_first(tmp_path: Path, pki: Pki) -> None:
    """The partner's close_notify reaches the pool; the reply still flows back."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            edge = await _federation(nursery, tmp_path, pki)
            stream, port = await partner_stream(
                edge, pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            )
            payload = os.urandom(300_000)
            await stream.send_all(payload)
            await stream.send_eof()
            # The echo member only half-closes after it saw our EOF, so the
            # whole payload and then b"" must come back.
            got = b""
            while chunk := await stream.receive_some(65536):
                got += chunk
            assert got == payload
            await stream.aclose()
            closed = await edge.event_for_port(port, "connection_closed")
            assert closed["end"] == "partner_closed"
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_half_close_pool_first(tmp_path: Path, pki: Pki) -> None:
    """The pool's close_notify reaches the partner; the partner can still send."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            leaf = pki.member_leaf("fe1.corp.test")
            got_by_member = hashlib.sha256()
            member_done = trio.Event()

            async def banner_then_listen(tcp: trio.SocketStream) -> None:
                ctx = server_context(
                    leaf.chain,
                    leaf.key,
                    require_client_cert=True,
                    client_roots=[pki.enterprise.cert],
                )
                stream = TLSStream(tcp, ctx, server_side=True)
                try:
                    await stream.do_handshake()
                    await stream.send_all(b"banner")
                    await stream.send_eof()
                    while data := await stream.receive_some(65536):
                        got_by_member.update(data)
                finally:
                    member_done.set()
                    await stream.aclose()

            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, banner_then_listen, listeners)
            config = write_federation(
                tmp_path, pki, [("fe1.corp.test", listeners[0].socket.getsockname()[1])]
            )
            edge = await start_gateway(nursery, config)
            stream, port = await partner_stream(
                edge, pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            )
            got = b""
            while chunk := await stream.receive_some(100):
                got += chunk
            assert got == b"banner"  # then b"": the pool's EOF arrived
            payload = os.urandom(200_000)
            await stream.send_all(payload)
            await stream.send_eof()
            await member_done.wait()
            assert got_by_member.hexdigest() == hashlib.sha256(payload).hexdigest()
            await stream.aclose()
            closed = await edge.event_for_port(port, "connection_closed")
            assert closed["end"] == "pool_closed"
            assert closed["bytes_from_partner"] == len(payload)
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_sigterm_drains_then_exits_zero(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            edge = await _process(nursery, tmp_path, pki, limits="drain_timeout_s = 10")
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            stream, port = await partner_stream(edge, pki, leaf)
            assert await echo_roundtrip(stream, b"before") == b"before"
            edge.process.send_signal(signal.SIGTERM)
            await edge.wait_for(lambda e: e["event"] == "shutdown_started")
            # New connections are refused once draining.
            with pytest.raises(OSError):
                with trio.fail_after(5):
                    await trio.open_tcp_stream(*edge.address)
            # The open connection still relays during the drain.
            assert await echo_roundtrip(stream, b"during drain") == b"during drain"
            await stream.aclose()
            with trio.fail_after(15):
                assert await edge.process.wait() == 0
            closed = await edge.event_for_port(port, "connection_closed")
            assert closed["end"] == "partner_closed"
            assert edge.events[-1]["event"] == "gateway_stopped"
            nursery.cancel_scope.cancel()


async def test_drain_deadline_closes_lingering_connections(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            edge = await _process(nursery, tmp_path, pki, limits="drain_timeout_s = 0.5")
            stream, port = await partner_stream(
                edge, pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            )
            assert await echo_roundtrip(stream, b"x") == b"x"
            edge.process.send_signal(signal.SIGINT)
            with trio.fail_after(15):
                assert await edge.process.wait() == 0
            closed = await edge.event_for_port(port, "connection_closed")
            assert closed["end"] == "shutdown"
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_metrics_endpoint(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            edge = await _process(nursery, tmp_path, pki)
            stream, _ = await partner_stream(
                edge, pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            )
            assert await echo_roundtrip(stream, b"12345") == b"12345"
            await stream.aclose()
            await _rejected_reason(edge, pki, pki.stranger.issue(dns=["x.stranger.test"]))
            await edge.wait_for(lambda e: e["event"] == "connection_closed")
            status, text = await http_get(edge.metrics_address, "/metrics")
            assert status == 200
            fed = 'listener="federation"'
            inbound = 'direction="inbound"'  # labels come sorted by name
            assert (
                f'edge_handshakes_total{{{inbound},{fed},partner="fabrikam.com",result="ok"}} 1.0'
                in text
            )
            assert (
                f'edge_handshakes_total{{{inbound},{fed},partner="unknown",'
                f'result="unknown_ca"}} 1.0' in text
            )
            assert (
                f'edge_bytes_total{{direction="from_partner",{fed},partner="fabrikam.com"}} 5.0'
                in text
            )
            assert "edge_connections_active" in text
            assert "process_cpu_seconds_total" in text
            assert (await http_get(edge.metrics_address, "/healthz"))[0] == 200
            assert (await http_get(edge.metrics_address, "/readyz"))[0] == 200
            assert (await http_get(edge.metrics_address, "/nope"))[0] == 404
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------
# Malformed configurations: `edge run` exits 1, names the key or file, never listens.

_GOOD_IDENTITY = """[identity]
public_cert = "certs/edge-public.pem"
public_key = "certs/edge-public.key"
internal_cert = "certs/edge-internal.pem"
internal_key = "certs/edge-internal.key"
internal_roots = ["certs/enterprise-root.pem"]
"""
_GOOD_REST = """
[[listeners]]
name = "federation"
address = "127.0.0.1:0"
mode = "mtls"
policies = "federation_policies"
pool = "frontend"

[[pools]]
name = "frontend"
members = [{ host = "fe1.corp.test", address = "127.0.0.1", port = 5061 }]
"""

BAD_CONFIGS = {
    "unknown top-level key": (_GOOD_IDENTITY + _GOOD_REST + "\n[extra]\nx = 1\n", "extra"),
    "unknown identity key": (
        _GOOD_IDENTITY.replace("[identity]\n", '[identity]\npublic_crt = "x"\n') + _GOOD_REST,
        "public_crt",
    ),
    "missing certificate file": (
        _GOOD_IDENTITY.replace("certs/edge-public.pem", "certs/missing.pem") + _GOOD_REST,
        "missing.pem",
    ),
    "key does not match certificate": (
        _GOOD_IDENTITY.replace(
            'public_key = "certs/edge-public.key"', 'public_key = "certs/edge-internal.key"'
        )
        + _GOOD_REST,
        "public_key",
    ),
    "wrong type": (
        _GOOD_IDENTITY + _GOOD_REST + '\n[limits]\nhandshake_timeout_s = "ten"\n',
        "handshake_timeout_s",
    ),
    "pool does not exist": (
        _GOOD_IDENTITY + _GOOD_REST.replace('pool = "frontend"', 'pool = "backend"'),
        "backend",
    ),
    "bad mode": (_GOOD_IDENTITY + _GOOD_REST.replace('mode = "mtls"', 'mode = "plain"'), "mode"),
    "bad address": (
        _GOOD_IDENTITY + _GOOD_REST.replace('address = "127.0.0.1:0"', 'address = "localhost"'),
        "address",
    ),
    "missing policies folder": (
        _GOOD_IDENTITY
        + _GOOD_REST.replace('policies = "federation_policies"', 'policies = "nowhere"'),
        "nowhere",
    ),
    "TOML syntax error": (_GOOD_IDENTITY + "[[listeners]\nname = 1\n", "edge.toml"),
    "unreadable key file": (
        _GOOD_IDENTITY.replace("certs/edge-internal.key", "certs/garbage.key") + _GOOD_REST,
        "garbage.key",
    ),
    "member without port": (
        _GOOD_IDENTITY + _GOOD_REST.replace(", port = 5061", ""),
        "port",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_malformed_config_fails_naming_the_problem(case: str, tmp_path: Path, pki: Pki) -> None:
    text, must_name = BAD_CONFIGS[case]
    write_federation(tmp_path, pki, [("fe1.corp.test", 5061)])
    (tmp_path / "certs" / "garbage.key").write_text("not a key\n")
    config = tmp_path / "edge.toml"
    config.write_text(text)
    result = subprocess.run(
        edge_command("run", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result
    assert must_name in result.stderr, result.stderr
    assert "gateway_started" not in result.stdout
    assert "Traceback" not in result.stderr


async def test_tls_mode_listener_relays_without_client_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    """mode = "tls": server authentication only; identity is the inner protocol's."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            pool = await start_pool(nursery, pki, POOL[:1])
            config = write_federation(tmp_path, pki, [(h, p) for h, p, _ in pool])
            text = config.read_text().replace(
                'mode = "mtls"\npolicies = "federation_policies"\n', 'mode = "tls"\n'
            )
            assert 'mode = "tls"' in text
            config.write_text(text)
            edge = await start_gateway(nursery, config)
            stream, port = await partner_stream(edge, pki, None)  # no client certificate
            assert await echo_roundtrip(stream, b"remote user") == b"remote user"
            await stream.aclose()
            closed = await edge.event_for_port(port, "connection_closed")
            assert closed["partner"] == "unknown"
            assert closed["leaf_subject"] is None
            assert closed["member"] == POOL[0]
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()
