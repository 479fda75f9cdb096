"""What an idle relayed connection holds (issue 19, "memory per idle relayed connection").

- A partner's live connections share one parsed copy of each certificate of
  its chain and verified path (edge.shared_certs), and a reload still
  re-checks them and closes one whose partner was removed.
- A server TLSStream keeps the handshake's verdict, not the judgement (the
  judge's own per-connection copy of the walked path).
- The relay waits for an idle side in its own frame and still relays, times
  out and stops as before.

bench/idle_memory.py measures the bytes; these tests pin the structure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

import pytest
import trio
from cryptography import x509

from edge import shared_certs
from edge.admission import LiveConnection
from edge.core.trust import PartnerTrust
from edge.pki import CA
from edge.relay import relay
from edge.shared_certs import share_chain, share_verdict
from edge.tls import TLSStream, client_context, handshake_verdict, server_context
from tests.gateway_harness import (
    EDGE_NAME,
    InProcessEdge,
    Pki,
    echo_roundtrip,
    partner_stream,
    start_gateway,
    write_federation,
)
from tests.test_live_trust import MEMBER, SlowMember

TIMEOUT = 30


def _reparsed(cert: x509.Certificate) -> x509.Certificate:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_der_x509_certificate(cert.public_bytes(Encoding.DER))


def test_equal_certificates_come_back_as_one_object() -> None:
    root = CA.root("Share Root")
    leaf = root.issue(dns=["sip.example.com"])
    first = share_chain([leaf.cert, root.cert])
    second = share_chain([_reparsed(leaf.cert), _reparsed(root.cert)])
    assert first == second  # equal by DER: nothing about them changed
    assert all(a is b for a, b in zip(first, second, strict=True))


def test_the_shared_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_certs, "MAX_SHARED", 8)
    monkeypatch.setattr(shared_certs, "_SHARED", {})
    root = CA.root("Bound Root")
    certs = [root.issue(dns=[f"h{i}.example.com"]).cert for i in range(20)]
    for cert in certs:
        assert share_chain([cert])[0] == cert
        assert shared_certs.shared_count() <= 8
    assert share_chain([certs[-1]])[0] is certs[-1]  # the newest is still there


def test_big_certificates_are_never_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    """Peer-controlled size: a certificate over MAX_SHARED_DER stays the
    connection's own, and no shared chain or verdict holds it."""
    from edge.core.trust import Verdict

    monkeypatch.setattr(shared_certs, "MAX_SHARED_DER", 64)
    monkeypatch.setattr(shared_certs, "_SHARED", {})
    root = CA.root("Big Root")
    cert = root.issue(dns=["big.example.com"]).cert
    again = _reparsed(cert)
    assert share_chain([cert])[0] is cert
    assert share_chain([again])[0] is again  # not swapped for the first one
    verdict = Verdict(True, None, "ok", "big.example.com", (again,))
    assert share_verdict(verdict) is verdict
    assert shared_certs.shared_count() == 0


def test_a_verdict_without_a_path_is_left_alone() -> None:
    from edge.core.reasons import Reason
    from edge.core.trust import Verdict

    verdict = Verdict(False, Reason.UNKNOWN_CA, "no path")
    assert share_verdict(verdict) is verdict


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listeners[0].accept())

        nursery.start_soon(accept)
        client = await trio.open_tcp_stream("127.0.0.1", port)
    for listener in listeners:
        await listener.aclose()
    return accepted[0], client


async def test_server_stream_keeps_the_verdict_not_the_judgement(tmp_path: Path) -> None:
    from edge.core.policies import load_policies

    root = CA.root("Judged Root")
    (tmp_path / "partners" / "fabrikam.com").mkdir(parents=True)
    (tmp_path / "partners" / "fabrikam.com" / "root.pem").write_bytes(root.cert_pem())
    (tmp_path / "partners" / "fabrikam.com" / "policy.toml").write_text(
        'domains = ["fabrikam.com"]\n'
    )
    trust = PartnerTrust(load_policies(tmp_path / "partners"))
    edge_ca = CA.root("Edge CA")
    server_leaf = edge_ca.issue(dns=[EDGE_NAME], eku=["server"])
    partner = root.issue(dns=["sip.fabrikam.com"], eku=["client"])
    ctx = server_context(
        server_leaf.chain, server_leaf.key, require_client_cert=True, partner_trust=trust
    )
    client_ctx = client_context([edge_ca.cert], partner.chain, partner.key)
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await _tcp_pair()
        server = TLSStream(server_tcp, ctx, server_side=True)
        client = TLSStream(client_tcp, client_ctx, server_side=False, server_hostname=EDGE_NAME)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        verdict = server.handshake_verdict
        assert verdict is not None and verdict.accepted, verdict
        assert verdict.partner == "fabrikam.com"
        # The judgement (and its copy of the path) went with the handshake.
        assert handshake_verdict(server.connection) is None
        # The gateway may swap in its shared, equal copy; nothing else.
        equal = dataclasses.replace(verdict)
        server.share_verdict(equal)
        assert server.handshake_verdict is equal
        with pytest.raises(ValueError):
            server.share_verdict(dataclasses.replace(verdict, partner="litware.com"))
        assert server.handshake_verdict is equal
        await client.send_all(b"still works")
        assert await server.receive_some(100) == b"still works"
        await server.aclose()
        await client.aclose()


def _live(edge: InProcessEdge) -> list[LiveConnection]:
    assert edge.gateway is not None
    return list(edge.gateway._admission.live.values())


async def test_live_connections_share_certificates_and_still_withdraw(
    tmp_path: Path, pki: Pki
) -> None:
    leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            member = SlowMember(pki)
            member_port = await nursery.start(member.serve)
            config = write_federation(tmp_path, pki, [(MEMBER, member_port)])
            edge = await start_gateway(nursery, config)
            streams: list[tuple[TLSStream, int]] = []
            for _ in range(3):
                stream, port = await partner_stream(edge, pki, leaf)
                assert await echo_roundtrip(stream, b"hello") == b"hello"
                streams.append((stream, port))
            live = _live(edge)
            assert len(live) == 3
            chains = [entry.conn.chain for entry in live]
            paths = [entry.conn.verdict.chain for entry in live if entry.conn.verdict]
            assert len(paths) == 3
            for chain, path in zip(chains, paths, strict=True):
                # One object per certificate for every connection of the partner,
                # and the chain's leaf is the path's leaf.
                assert chain[0] is chains[0][0] and chain[0] is path[0]
                assert all(a is b for a, b in zip(path, paths[0], strict=True))
            assert paths[0][-1] == pki.fabrikam.cert  # the anchor, equal by DER
            # Equal verdicts and chains are one object too, and so are the log labels.
            assert all(entry.conn.verdict is live[0].conn.verdict for entry in live)
            assert all(entry.conn.chain is chains[0] for entry in live)
            assert all(entry.conn.leaf_subject is live[0].conn.leaf_subject for entry in live)
            # The reload still re-checks the shared chain: the partner removed,
            # every live connection closes as trust_withdrawn.
            shutil.rmtree(tmp_path / "federation_policies" / "fabrikam.com")
            assert edge.gateway is not None
            await edge.gateway.poll_once(forced=True)
            for stream, port in streams:
                closed = await edge.event_for_port(port, "connection_closed")
                assert closed["end"] == "trust_withdrawn", closed
                assert closed["reason"] == "unknown_ca", closed
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("direct", [True, False], ids=["hub", "pumps"])
async def test_idle_relay_wakes_for_data_and_for_its_idle_timeout(
    direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both sides idle after a first exchange (the hub: parked, the sockets in
    its epoll set; the pumps: waiting in relay_idle_fd's path): a later byte
    still crosses, and the idle timeout still ends it."""
    from edge import relay as relay_module

    monkeypatch.setattr(relay_module, "DIRECT", direct)
    ca = CA.root("Relay CA")
    leaf = ca.issue(dns=["relay.test"], eku=["server", "client"])
    sctx = server_context(leaf.chain, leaf.key, require_client_cert=False)
    cctx = client_context([ca.cert])
    with trio.fail_after(TIMEOUT):
        a_srv, a_cli = await _tcp_pair()
        b_srv, b_cli = await _tcp_pair()
        # The relay between a (server side of pair a) and b (client side of pair b).
        a = TLSStream(a_srv, sctx, server_side=True)
        outer_a = TLSStream(a_cli, cctx, server_side=False, server_hostname="relay.test")
        b = TLSStream(b_cli, cctx, server_side=False, server_hostname="relay.test")
        outer_b = TLSStream(b_srv, sctx, server_side=True)
        async with trio.open_nursery() as nursery:
            for s in (a, outer_a, b, outer_b):
                nursery.start_soon(s.do_handshake)
        outcome = None

        async def run() -> None:
            nonlocal outcome
            outcome = await relay(a, b, idle_timeout_s=3.0, names=("partner", "pool"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            for word in (b"first", b"after idle"):
                await outer_a.send_all(word)
                assert await outer_b.receive_some(100) == word
                await outer_b.send_all(word.upper())
                assert await outer_a.receive_some(100) == word.upper()
                await trio.sleep(0.3)  # both pumps park on their idle socket
        assert outcome is not None and outcome.end == "idle_timeout", outcome
        assert a.direct is direct and b.direct is direct
        for s in (a, outer_a, b, outer_b):
            await s.aclose()


def _heap_in_use() -> int:
    """glibc's heap in use (OpenSSL allocates there; mallinfo2, glibc 2.33+)."""
    import ctypes
    import gc

    class Mallinfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    gc.collect()
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


async def test_a_burst_leaves_no_big_buffers_behind() -> None:
    """OpenSSL's memory BIOs keep the size they grew to: 256 KiB each way
    through a pair of streams used to leave ~0.5 MiB of buffers per pair for
    as long as it lived. Now each BIO holds at most about one slice."""
    pytest.importorskip("ctypes")
    ca = CA.root("Burst CA")
    leaf = ca.issue(dns=["burst.test"], eku=["server", "client"])
    sctx = server_context(leaf.chain, leaf.key, require_client_cert=False)
    cctx = client_context([ca.cert])
    pairs = 16
    payload = b"p" * (256 * 1024)

    async def drain(stream: TLSStream, size: int) -> None:
        got = 0
        while got < size:
            chunk = await stream.receive_some(128 * 1024)
            assert chunk
            got += len(chunk)

    with trio.fail_after(TIMEOUT):
        streams: list[tuple[TLSStream, TLSStream]] = []
        for _ in range(pairs):
            server_tcp, client_tcp = await _tcp_pair()
            server = TLSStream(server_tcp, sctx, server_side=True)
            client = TLSStream(client_tcp, cctx, server_side=False, server_hostname="burst.test")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.do_handshake)
                nursery.start_soon(client.do_handshake)
            streams.append((server, client))
        before = _heap_in_use()
        for server, client in streams:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, payload)
                nursery.start_soon(drain, server, len(payload))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send_all, payload)
                nursery.start_soon(drain, client, len(payload))
        kept = (_heap_in_use() - before) / pairs
        for server, client in streams:
            await server.aclose()
            await client.aclose()
    print(f"heap kept per pair after the burst: {kept / 1024:.0f} KiB")
    assert kept < 256 * 1024, f"{kept / 1024:.0f} KiB kept per pair of idle streams"
