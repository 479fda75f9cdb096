"""The CRL fetcher wired into the running gateway (issue 15): it fetches only for
partners loaded now whose revocation is not off, and `[revocation]` applies live.

In process (`start_gateway`), real TLS partners, a real HTTP server on 127.0.0.1
serving real CRLs (so `allow_private_networks = true`). Where a test says "not
fetched", it first shows that the same server is fetched from in that test, then
waits a few refresh intervals and counts requests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import trio
from cryptography.hazmat.primitives.serialization import Encoding

from tests.gateway_harness import (
    InProcessEdge,
    Pki,
    echo_roundtrip,
    partner_stream,
    start_gateway,
    start_pool,
    write_federation,
)
from tests.test_crlfetch import CrlServer

_FETCH = (
    '[revocation]\nfetch = true\ncache_dir = "crls"\nrefresh_interval_s = 0.5\n'
    "allow_private_networks = true\nmin_rebuild_interval_s = 0.5\n"
)
# Several refresh intervals: a source still wanted would be fetched again meanwhile.
_QUIET_S = 2.5


async def _crl_server(nursery: trio.Nursery) -> tuple[CrlServer, str]:
    server = CrlServer()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, server.handle, listeners)
    return server, f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def _relayed(edge: InProcessEdge, pki: Pki, leaf: object) -> None:
    stream, _ = await partner_stream(edge, pki, leaf)  # type: ignore[arg-type]
    assert await echo_roundtrip(stream, b"hello") == b"hello"
    await stream.aclose()


async def _fetched_twice(server: CrlServer, path: str) -> None:
    """The source is fetched and refreshed (bounded by the caller's fail_after)."""
    while server.requests.get(path, 0) < 2:
        await trio.sleep(0.05)


async def test_a_removed_partner_stops_being_fetched_for(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            server, base = await _crl_server(nursery)
            server.files["/fabrikam.crl"] = pki.fabrikam.crl().public_bytes(Encoding.DER)
            pool = await start_pool(nursery, pki, ("fe1.corp.test",))
            config = write_federation(tmp_path, pki, [(h, p) for h, p, _ in pool], extra=_FETCH)
            edge = await start_gateway(nursery, config)
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"], crl_url=f"{base}/fabrikam.crl")
            await _relayed(edge, pki, leaf)
            await _fetched_twice(server, "/fabrikam.crl")

            shutil.rmtree(tmp_path / "federation_policies" / "fabrikam.com")
            await edge.gateway.poll_once(forced=True)
            reloaded = await edge.wait_for(lambda e: e["event"] == "policies_reloaded")
            assert reloaded["removed"] == ["fabrikam.com"]
            before = server.requests["/fabrikam.crl"]
            await trio.sleep(_QUIET_S)
            assert server.requests["/fabrikam.crl"] == before
            await edge.stop()
            nursery.cancel_scope.cancel()


async def test_fetch_false_reloaded_stops_fetching_and_applies_live(
    tmp_path: Path, pki: Pki
) -> None:
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            server, base = await _crl_server(nursery)
            server.files["/fabrikam.crl"] = pki.fabrikam.crl().public_bytes(Encoding.DER)
            pool = await start_pool(nursery, pki, ("fe1.corp.test",))
            config = write_federation(tmp_path, pki, [(h, p) for h, p, _ in pool], extra=_FETCH)
            edge = await start_gateway(nursery, config)
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"], crl_url=f"{base}/fabrikam.crl")
            await _relayed(edge, pki, leaf)
            await _fetched_twice(server, "/fabrikam.crl")
            await edge.wait_for(lambda e: e["event"] == "crls_applied")

            config.write_text(config.read_text().replace("fetch = true", "fetch = false"))
            await edge.gateway.poll_once(forced=True)
            reloaded = await edge.wait_for(lambda e: e["event"] == "config_reloaded")
            assert reloaded["applied"] == ["revocation"]
            assert reloaded["needs_restart"] == []
            assert edge.gateway.snapshot.config.revocation.fetch is False
            before = server.requests["/fabrikam.crl"]
            # The fetched CRLs are withdrawn too (only folder CRLs count again).
            while edge.gateway.snapshot.fetched_crls:
                await trio.sleep(0.05)  # bounded by fail_after
            await trio.sleep(_QUIET_S)
            assert server.requests["/fabrikam.crl"] == before
            await _relayed(edge, pki, leaf)  # crl-if-present: no CRL, still relayed
            assert server.requests["/fabrikam.crl"] == before
            await edge.stop()
            nursery.cancel_scope.cancel()


async def test_a_revocation_off_partner_is_never_fetched_for(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            server, base = await _crl_server(nursery)
            server.files["/fabrikam.crl"] = pki.fabrikam.crl().public_bytes(Encoding.DER)
            server.files["/litware.crl"] = pki.litware.crl().public_bytes(Encoding.DER)
            pool = await start_pool(nursery, pki, ("fe1.corp.test",))
            config = write_federation(
                tmp_path,
                pki,
                [(h, p) for h, p, _ in pool],
                policies={
                    "fabrikam.com": 'domains = ["fabrikam.com"]\nrevocation = "off"\n',
                    "litware.com": 'domains = ["litware.com"]\n',
                },
                extra=_FETCH,
            )
            edge = await start_gateway(nursery, config)
            off = pki.fabrikam.issue(dns=["sip.fabrikam.com"], crl_url=f"{base}/fabrikam.crl")
            on = pki.litware.issue(dns=["sip.litware.com"], crl_url=f"{base}/litware.crl")
            await _relayed(edge, pki, off)
            await _relayed(edge, pki, on)
            await _fetched_twice(server, "/litware.crl")  # the fetcher does run
            await _relayed(edge, pki, off)
            await trio.sleep(_QUIET_S)
            assert "/fabrikam.crl" not in server.requests
            await edge.stop()
            nursery.cancel_scope.cancel()
