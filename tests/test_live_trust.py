"""Live withdrawal of trust on a real in-process gateway (issue 15).

- A connection admitted under snapshot N that is still dialling the pool when
  snapshot N+1 (its partner removed) arrives is re-checked before its first
  relayed byte: ``trust_withdrawn``, and the member never sees a byte.
- A relayed connection ends when the earliest certificate of its verified path
  expires, the partner's root included: ``trust_withdrawn``, reason ``expired``.
  Short-lived certificates made here (seconds), so the wall clock is real.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import shutil
from pathlib import Path

import pytest
import trio

from edge.pki import CA
from edge.tls import TLSStream, server_context
from tests.gateway_harness import (
    InProcessEdge,
    Pki,
    echo_roundtrip,
    partner_stream,
    start_gateway,
    write_federation,
)

MEMBER = "fe1.corp.test"


class SlowMember:
    """An MTLS echo member whose TLS accept can be held: the edge's dial then
    waits, as on a loaded pool member. Counts the application bytes it got."""

    def __init__(self, pki: Pki) -> None:
        leaf = pki.member_leaf(MEMBER)
        self.context = server_context(
            leaf.chain, leaf.key, require_client_cert=True, client_roots=[pki.enterprise.cert]
        )
        self.hold: trio.Event | None = None
        self.arrived = trio.Event()
        self.app_bytes = 0

    async def handle(self, tcp: trio.SocketStream) -> None:
        hold = self.hold
        try:
            if hold is not None:
                self.arrived.set()
                with trio.fail_after(20):
                    await hold.wait()
            stream = TLSStream(tcp, self.context, server_side=True)
            await stream.do_handshake()
            while data := await stream.receive_some(65536):
                self.app_bytes += len(data)
                await stream.send_all(data)
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await trio.aclose_forcefully(tcp)

    async def serve(self, task_status: trio.TaskStatus[int]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.handle, listeners)


async def _gateway(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> tuple[InProcessEdge, SlowMember]:
    member = SlowMember(pki)
    port = await nursery.start(member.serve)
    config = write_federation(tmp_path, pki, [(MEMBER, port)])
    return await start_gateway(nursery, config), member


async def test_partner_removed_while_dialling_never_relays(tmp_path: Path, pki: Pki) -> None:
    leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            edge, member = await _gateway(nursery, tmp_path, pki)
            release = member.hold = trio.Event()
            # Admitted under snapshot N; the edge is now dialling the held member.
            stream, port = await partner_stream(edge, pki, leaf)
            await stream.send_all(b"sent before the withdrawal")
            await member.arrived.wait()
            # Snapshot N+1 without the partner, while the dial is in progress.
            before = edge.gateway.current.server_contexts["federation"]
            shutil.rmtree(tmp_path / "federation_policies" / "fabrikam.com")
            await edge.gateway.poll_once(forced=True)
            # A new verifier, so a new context (a used one cannot be changed).
            assert edge.gateway.current.server_contexts["federation"] is not before
            reloaded = await edge.wait_for(lambda e: e["event"] == "policies_reloaded")
            assert reloaded["removed"] == ["fabrikam.com"], reloaded
            release.set()  # the dial completes now
            closed = await edge.event_for_port(port, "connection_closed")
            assert closed["end"] == "trust_withdrawn", closed
            assert closed["reason"] == "unknown_ca", closed
            assert closed["bytes_from_partner"] == 0, closed
            assert member.app_bytes == 0
            with trio.move_on_after(5):
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await stream.receive_some(10) == b""
            await stream.aclose()
            assert member.app_bytes == 0
            assert not [e for e in edge.events if e["event"] == "internal_error"]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("which", ["leaf", "root"])
async def test_live_connection_closes_when_its_path_expires(
    tmp_path: Path, pki: Pki, which: str
) -> None:
    # Long enough for the gateway to start and admit the partner on a loaded machine.
    soon = _dt.datetime.now(_dt.UTC) + _dt.timedelta(seconds=7)
    if which == "root":
        # The partner's own root expires first (its leaf would outlive it).
        pki = dataclasses.replace(pki, fabrikam=CA.root("Fabrikam Short Root", not_after=soon))
        leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
    else:
        leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"], not_after=soon)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            edge, _ = await _gateway(nursery, tmp_path, pki)
            stream, port = await partner_stream(edge, pki, leaf)
            assert await echo_roundtrip(stream, b"still valid") == b"still valid"
            closed = await edge.event_for_port(port, "connection_closed", timeout=20)
            assert closed["end"] == "trust_withdrawn", closed
            assert closed["reason"] == "expired", closed
            assert closed["partner"] == "fabrikam.com", closed
            assert _dt.datetime.now(_dt.UTC) > soon  # closed only once it expired
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_completed_handshake_without_a_verdict_never_relays(tmp_path: Path, pki: Pki) -> None:
    """Fail closed: a listener context without the judge (no verdict reached in
    the handshake) lets a handshake complete, and the gateway still refuses."""
    leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            edge, member = await _gateway(nursery, tmp_path, pki)
            gateway = edge.gateway
            ident = gateway.config.identity
            judgeless = server_context(
                ident.public_chain, ident.public_private_key, require_client_cert=True
            )
            contexts = {"federation": judgeless}
            gateway.current = dataclasses.replace(gateway.current, server_contexts=contexts)
            stream, port = await partner_stream(edge, pki, leaf)
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(b"let me in")
            rejected = await edge.event_for_port(port, "connection_rejected")
            assert rejected["reason"] == "internal_error", rejected
            assert "without a verdict" in rejected["detail"], rejected
            assert member.app_bytes == 0
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_tls_profile_reaches_the_listener_and_rebuilds_contexts(
    tmp_path: Path, pki: Pki
) -> None:
    """`[tls] profile = "modern"`: a TLS 1.2 partner is refused by the real listener;
    a profile change builds new contexts (pyOpenSSL forbids changing a used one)."""
    from OpenSSL import SSL

    from edge.core.config import load_config
    from edge.core.snapshot import build_snapshot
    from edge.current import build_current
    from edge.tls import client_context
    from tests.gateway_harness import EDGE_NAME

    leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            member = SlowMember(pki)
            port = await nursery.start(member.serve)
            modern = write_federation(
                tmp_path, pki, [(MEMBER, port)], extra='[tls]\nprofile = "modern"\n'
            )
            edge = await start_gateway(nursery, modern)
            old = client_context([pki.edge_ca.cert], leaf.chain, leaf.key)
            old.set_max_proto_version(SSL.TLS1_2_VERSION)
            tcp = await trio.open_tcp_stream(*edge.address)
            local = tcp.socket.getsockname()[1]
            stream = TLSStream(tcp, old, server_side=False, server_hostname=EDGE_NAME)
            with pytest.raises(trio.BrokenResourceError):
                await stream.do_handshake()
            rejected = await edge.event_for_port(local, "connection_rejected")
            assert rejected["reason"] == "tls_error", rejected
            # TLS 1.3 is relayed.
            stream13, _ = await partner_stream(edge, pki, leaf)
            assert await echo_roundtrip(stream13, b"1.3") == b"1.3"
            await stream13.aclose()
            nursery.cancel_scope.cancel()
    snapshot = build_snapshot(load_config(modern), {})
    current = build_current(snapshot)
    assert build_current(snapshot, current).server_contexts == current.server_contexts
    assert build_current(snapshot, current).client_context is current.client_context
    # Only the profile differs (same folders, same verifier, same identity).
    tls = dataclasses.replace(snapshot.config.tls, profile="intermediate")
    other = dataclasses.replace(snapshot, config=dataclasses.replace(snapshot.config, tls=tls))
    rebuilt = build_current(other, current)
    assert rebuilt.client_context is not current.client_context
    for name, ctx in rebuilt.server_contexts.items():
        assert ctx is not current.server_contexts[name]
