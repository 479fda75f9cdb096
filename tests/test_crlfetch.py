"""CRLs fetched from distribution points, through a running `edge run`.

The test serves the partner's CRL over HTTP on 127.0.0.1 itself (h11 on trio)
and changes what it serves; the gateway must fetch, cache, refresh, and act.
"""

from __future__ import annotations

from pathlib import Path

import h11
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from edge.crlfetch import distribution_points
from tests.gateway_harness import (
    Pki,
    echo_roundtrip,
    partner_stream,
    start_edge,
    start_pool,
    write_federation,
)


def test_distribution_points_are_read_from_the_certificate(pki: Pki) -> None:
    leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"], crl_url="http://127.0.0.1:9/x.crl")
    assert distribution_points(leaf.cert) == ["http://127.0.0.1:9/x.crl"]
    assert distribution_points(pki.fabrikam.issue(dns=["a.fabrikam.com"]).cert) == []
    ldap = pki.fabrikam.issue(dns=["b.fabrikam.com"], crl_url="ldap://dir.example/cn=crl")
    assert distribution_points(ldap.cert) == []  # only http:// is fetched


class CrlServer:
    """Serves ``files[path]`` over HTTP/1.1; counts requests per path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: dict[str, int] = {}

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            with trio.move_on_after(5):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(4096))
                        continue
                    break
                if not isinstance(event, h11.Request):
                    return
                path = event.target.decode()
                self.requests[path] = self.requests.get(path, 0) + 1
                body = self.files.get(path)
                status = 200 if body is not None else 404
                body = body if body is not None else b"not found"
                headers = [("content-length", str(len(body))), ("connection", "close")]
                out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
                out += (conn.send(h11.Data(data=body)) or b"") + (
                    conn.send(h11.EndOfMessage()) or b""
                )
                await stream.send_all(out)
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await stream.aclose()


async def test_fetched_crl_admits_then_revokes_a_live_connection(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = CrlServer()
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, server.handle, listeners)
            url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/fabrikam.crl"
            pool = await start_pool(nursery, pki, ("fe1.corp.test",))
            config = write_federation(
                tmp_path,
                pki,
                [(h, p) for h, p, _ in pool],
                policies={
                    "fabrikam.com": 'domains = ["fabrikam.com"]\nrevocation = "require-crl"\n'
                },
                extra='[revocation]\nfetch = true\ncache_dir = "crls"\nrefresh_interval_s = 1\n',
            )
            edge = await start_edge(nursery, config)
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"], crl_url=url)

            # No CRL yet: require-crl fails closed, and the gateway learns the URL.
            server.files["/fabrikam.crl"] = pki.fabrikam.crl().public_bytes(Encoding.DER)
            stream, port = await partner_stream(edge, pki, leaf)
            await stream.aclose()
            rejected = await edge.event_for_port(port, "connection_rejected")
            assert rejected["reason"] == "crl_unavailable"
            fetched = await edge.wait_for(lambda e: e["event"] == "crl_fetched")
            assert fetched["url"] == url and fetched["revoked"] == 0
            applied = await edge.wait_for(lambda e: e["event"] == "crls_applied")
            assert applied["partners"] == {"fabrikam.com": 1}

            # With the fetched CRL the partner is relayed.
            live, live_port = await partner_stream(edge, pki, leaf)
            assert await echo_roundtrip(live, b"with crl") == b"with crl"
            assert list((tmp_path / "crls" / "fabrikam.com").glob("*.crl"))

            # The CA revokes the certificate; the refresh closes the live connection.
            revoking = pki.fabrikam.crl([leaf.cert.serial_number])
            server.files["/fabrikam.crl"] = revoking.public_bytes(Encoding.PEM)
            closed = await edge.event_for_port(live_port, "connection_closed", timeout=15)
            assert closed["end"] == "trust_withdrawn"
            assert closed["reason"] == "revoked"
            await live.aclose()

            # A failed refresh keeps the last good CRL.
            del server.files["/fabrikam.crl"]
            failed = await edge.wait_for(lambda e: e["event"] == "crl_fetch_failed", timeout=15)
            assert failed["kept_last_good"] is True
            stream, port = await partner_stream(edge, pki, leaf)
            await stream.aclose()
            assert (await edge.event_for_port(port, "connection_rejected"))["reason"] == "revoked"
            edge.terminate()
            with trio.fail_after(15):
                assert await edge.process.wait() == 0
            nursery.cancel_scope.cancel()
