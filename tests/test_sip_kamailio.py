"""A real SIP proxy as the partner: Kamailio dials the edge's inbound SIP listener (issue 18).

Topology, all on 127.0.0.1:

    test UA --UDP--> Kamailio, fabrikam's SIP proxy
        ==TLS, client certificate sip.fabrikam.com from fabrikam's root==>
    gateway (`protocol = "sip"` MTLS listener, run in this process)
        ==MTLS==> `SipPool` (records every byte, answers each request 200)

Kamailio relays every request statefully (`tm`) over one TLS connection to
the edge, and logs the exact bytes of each request it sends (`onsend_route`),
so the test compares what the pool received with what Kamailio put on the
TLS connection. The edge's 403 travels back through Kamailio's transaction to
the UA, as it would to a partner's user.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from edge.core.sip import Message
from tests.gateway_harness import EDGE_NAME, Pki
from tests.kamailio_harness import (
    KAMAILIO_MODULES,
    ONSEND_ROUTE,
    PROTO_TLS,
    Kamailio,
    missing,
    parse_datagram,
    running_kamailio,
    tls_cfg,
)
from tests.test_sip_gateway import parse, rejections, start_sip_edge

TIMEOUT = 60.0  # the whole test, generous for a loaded machine
ANSWER_TIMEOUT = 20.0

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


def partner_proxy_script(folder: Path, pki: Pki, edge_port: int) -> str:
    """fabrikam's Kamailio routing script (and its tls.cfg, written to `folder`).

    Its TLS client presents a certificate for sip.fabrikam.com from fabrikam's
    root and verifies the edge's public certificate against the edge's CA.
    """
    folder.mkdir(parents=True, exist_ok=True)
    leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
    cert, key = leaf.write(folder, "sip.fabrikam.com")
    edge_ca = folder / "edge-ca.pem"
    edge_ca.write_bytes(pki.edge_ca.cert_pem())
    tls_file = folder / "tls.cfg"
    tls_file.write_text(tls_cfg(cert, key, edge_ca, EDGE_NAME))
    return f"""
mpath="{KAMAILIO_MODULES}/"
loadmodule "tls.so"
loadmodule "sl.so"
loadmodule "tm.so"
loadmodule "pv.so"
loadmodule "xlog.so"
modparam("tls", "config", "{tls_file}")

request_route {{
    # Readiness probe: OPTIONS to Kamailio itself.
    if ($rm == "OPTIONS" && $rd == "127.0.0.1") {{
        sl_send_reply("200", "Ready");
        exit;
    }}
    # Everything else goes to the partner edge (ours) over TLS.
    $du = "sip:127.0.0.1:{edge_port};transport=tls";
    if (!t_relay()) {{
        sl_reply_error();
    }}
    exit;
}}
{ONSEND_ROUTE}"""


def kamailio_cfg(script: str) -> Callable[[int, int], str]:
    """The full kamailio.cfg for ports (udp, tls): loopback listeners, then `script`."""

    def make(udp: int, tls: int) -> str:
        return f"""#!KAMAILIO
debug=2
log_stderror=yes
children=1
tcp_children=1
auto_aliases=no
listen=udp:127.0.0.1:{udp}
listen=tls:127.0.0.1:{tls}
enable_tls=yes
{script}"""

    return make


def ua_request(ua_port: int, call_id: str, from_host: str, body: bytes) -> bytes:
    """A user's MESSAGE to contoso, sent to fabrikam's proxy over UDP.

    No `rport` in Via: Kamailio then forwards the UA's Via untouched, so an
    answer's Via can be compared with it exactly.
    """
    lines = [
        "MESSAGE sip:bob@contoso.com SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{ua_port};branch=z9hG4bK-{call_id}",
        "Max-Forwards: 70",
        f'From: "Alice" <sip:alice@{from_host}>;tag=ua-{call_id}',
        "To: <sip:bob@contoso.com>",
        f"Call-ID: {call_id}",
        "CSeq: 7 MESSAGE",
        "Content-Type: text/plain",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def transact(
    ua: trio.socket.SocketType, kamailio: Kamailio, request: bytes, call_id: str
) -> Message:
    """Send `request` to Kamailio until its final answer for `call_id` arrives.

    UDP: resent every second while unanswered (Kamailio's `tm` absorbs the
    retransmissions, so the edge sees the request once).
    """
    with trio.fail_after(ANSWER_TIMEOUT):
        for _ in range(int(ANSWER_TIMEOUT)):
            await ua.sendto(request, ("127.0.0.1", kamailio.udp))
            with trio.move_on_after(1.0):
                for _ in range(1000):  # datagrams per wait (other answers, resent ones)
                    answer = parse_datagram(await ua.recv(65536))
                    if (
                        answer is not None
                        and answer.headers.get("call-id") == call_id
                        and (answer.head.status_code or 0) >= 200
                    ):
                        return answer
    raise AssertionError(f"no answer for {call_id}: {kamailio.log_tail()}")


def sent_over_tls(kamailio: Kamailio) -> list[bytes]:
    """The exact bytes of each request Kamailio sent over TLS (to the edge), in order."""
    return [data for proto, data in kamailio.sent_messages() if proto == PROTO_TLS]


async def test_a_real_kamailio_partner_proxy_through_the_inbound_sip_listener(
    tmp_path: Path, pki: Pki
) -> None:
    ua = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await ua.bind(("127.0.0.1", 0))
    ua_port = ua.getsockname()[1]
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                edge, pool = await start_sip_edge(nursery, tmp_path, pki)
                folder = tmp_path / "kamailio"
                script = partner_proxy_script(folder, pki, edge.address[1])
                async with running_kamailio(folder, kamailio_cfg(script), ua) as kamailio:
                    # (1) fabrikam's user: the pool gets exactly what Kamailio sent.
                    allowed = ua_request(ua_port, "kam-ok-1", "fabrikam.com", b"hello bob")
                    answer = await transact(ua, kamailio, allowed, "kam-ok-1")
                    assert answer.head.status_code == 200, kamailio.log_tail()
                    (first,) = sent_over_tls(kamailio)
                    assert bytes(pool.received) == first
                    (at_pool,) = parse(first)
                    assert at_pool.method == "MESSAGE"
                    assert at_pool.head.request_uri == "sip:bob@contoso.com"
                    assert at_pool.headers.get("call-id") == "kam-ok-1"
                    assert at_pool.headers.get("from") == (
                        '"Alice" <sip:alice@fabrikam.com>;tag=ua-kam-ok-1'
                    )
                    assert at_pool.headers.get("cseq") == "7 MESSAGE"
                    assert at_pool.body == b"hello bob"
                    # Kamailio's own Via on top (TLS, its listener), the UA's below.
                    (kamailio_via, ua_via) = at_pool.headers.get_all("via")
                    assert kamailio_via.startswith(
                        f"SIP/2.0/TLS 127.0.0.1:{kamailio.tls};branch=z9hG4bK"
                    )
                    assert ua_via == f"SIP/2.0/UDP 127.0.0.1:{ua_port};branch=z9hG4bK-kam-ok-1"

                    # (2) A litware.com From on fabrikam's connection: the edge's 403
                    # reaches the user through Kamailio; the pool gets nothing.
                    forged = ua_request(ua_port, "kam-forged", "litware.com", b"wire the money")
                    answer = await transact(ua, kamailio, forged, "kam-forged")
                    assert answer.head.status_code == 403, kamailio.log_tail()
                    (request,) = parse(forged)
                    assert answer.headers.get_all("via") == request.headers.get_all("via")
                    for name in ("from", "call-id", "cseq"):
                        assert answer.headers.get_all(name) == request.headers.get_all(name)
                    assert answer.headers.get("warning") == '399 edge "sip_domain_mismatch"'
                    # The edge logs after it answers: wait for the event, then expect one.
                    await edge.wait_for(lambda e: e.get("event") == "sip_rejected", ANSWER_TIMEOUT)
                    (rejected,) = rejections(edge)
                    assert str(rejected.pop("peer")).startswith("127.0.0.1:")
                    assert rejected == {
                        "level": "warning",
                        "event": "sip_rejected",
                        "listener": "federation",
                        "partner": "fabrikam.com",
                        "method": "MESSAGE",
                        "call_id": "kam-forged",
                        "offending_domain": "litware.com",
                        "reason": "sip_domain_mismatch",
                        "answered": 403,
                        "detail": "",
                    }
                    # Kamailio did send it over TLS, on the same connection; the next
                    # allowed request is the next thing the pool sees.
                    again = ua_request(ua_port, "kam-ok-2", "sip.fabrikam.com", b"still here")
                    answer = await transact(ua, kamailio, again, "kam-ok-2")
                    assert answer.head.status_code == 200, kamailio.log_tail()
                    sent = sent_over_tls(kamailio)
                    assert [parse(data)[0].headers.get("call-id") for data in sent] == [
                        "kam-ok-1",
                        "kam-forged",
                        "kam-ok-2",
                    ]
                    assert bytes(pool.received) == sent[0] + sent[2]
                    assert pool.connections == 1
                # Kamailio stopped: its one TLS connection to the edge closed, and
                # the edge counted only what it relayed.
                closed = await edge.wait_for(
                    lambda e: e.get("event") == "connection_closed", ANSWER_TIMEOUT
                )
                assert closed["partner"] == "fabrikam.com"
                assert closed["bytes_from_partner"] == len(sent[0] + sent[2])
                assert [e["event"] for e in edge.events].count("connection_rejected") == 0
                assert [e["event"] for e in edge.events].count("connection_closed") == 1
                nursery.cancel_scope.cancel()
    finally:
        ua.close()
