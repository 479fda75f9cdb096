"""Outbound SIP routing on real sockets: one pool connection, two partner edges, all on 127.0.0.1.

Every test runs `edge.sip_outbound.serve_outbound_sip` behind a trio TCP
listener with the outbound server context, the pool member as a real MTLS
client speaking SIP, two partner edges (fabrikam.com, found by DNS SRV, and
contoso.com, at its static `edge`) as real MTLS servers with their own roots
that answer each request 200, and a real DNS server on a loopback UDP port.
Our own SIP domain (`[sip] domains`) is adatum.com.
"""

from __future__ import annotations

import io
import random
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from edge.core.config import Config, load_config
from edge.core.policies import load_policies
from edge.core.sip import NEED_DATA, Message, SipFramer
from edge.core.sip_route import Report
from edge.demo import write_identity
from edge.discovery import Discovery
from edge.logs import EventLog
from edge.outbound import Outbound, OutboundRejected, outbound_server_context
from edge.pki import CA, Leaf
from edge.sip_outbound import SipOutboundClosed, SipPartnerClosed, serve_outbound_sip
from edge.tls import TLSStream, client_context, server_context
from tests.kamailio_harness import KAMAILIO, KAMAILIO_MODULES, free_port, tls_cfg
from tests.test_outbound import DnsServer, _refused_port

EDGE_PUBLIC = "edge.adatum.example"
FAB_SRV = "_sipfederationtls._tcp.fabrikam.com"
TIMEOUT = 15.0


@dataclass
class Pki:
    enterprise: CA
    edge_ca: CA
    fabrikam: CA
    contoso: CA
    public: Leaf
    internal: Leaf
    member: Leaf


@pytest.fixture(scope="module")
def pki() -> Pki:
    enterprise = CA.root("Test Enterprise Root")
    edge_ca = CA.root("Test Edge Public CA")
    return Pki(
        enterprise=enterprise,
        edge_ca=edge_ca,
        fabrikam=CA.root("Fabrikam Root"),
        contoso=CA.root("Contoso Root"),
        public=edge_ca.issue(dns=[EDGE_PUBLIC]),
        internal=enterprise.issue(dns=["edge.corp.test"]),
        member=enterprise.issue(dns=["fe1.corp.test"], eku=["client"]),
    )


def sip(
    target: str,
    *,
    method: str = "MESSAGE",
    from_uri: str = "sip:alice@adatum.com",
    call_id: str = "c1",
    body: bytes = b"",
) -> bytes:
    lines = [
        f"{method} {target} SIP/2.0",
        "Via: SIP/2.0/TLS fe1.corp.test:5061;branch=z9hG4bK-1",
        "Max-Forwards: 70",
        f"From: <{from_uri}>;tag=a1",
        f"To: <{target}>",
        f"Call-ID: {call_id}",
        f"CSeq: 1 {method}",
        "Content-Type: text/plain",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def ok_for(request: Message, stamp: str) -> bytes:
    """A partner's 200 (RFC 3261 8.2.6 copies), stamped so the test can tell who sent it."""
    h = request.headers
    lines = ["SIP/2.0 200 OK"]
    lines += [f"Via: {v}" for v in h.get_all("via")]
    lines += [
        f"From: {h.get('from')}",
        f"To: {h.get('to')};tag={stamp}",
        f"Call-ID: {h.get('call-id')}",
        f"CSeq: {h.get('cseq')}",
        f"Server: {stamp}",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class SipPartnerEdge:
    """A partner's edge: MTLS (requires the edge's public cert), answers each request 200."""

    def __init__(self, pki: Pki, leaf: Leaf, stamp: str) -> None:
        self.context = server_context(
            leaf.chain, leaf.key, require_client_cert=True, client_roots=[pki.edge_ca.cert]
        )
        self.stamp = stamp
        self.port = 0
        self.connections = 0
        self.handshakes = 0
        self.received = bytearray()
        self.messages: list[Message] = []
        self.sent = bytearray()  # what it sent back (its 200s, its own requests)
        self.streams: list[TLSStream] = []
        self.eofs = 0

    async def handle(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        stream = TLSStream(tcp, self.context, server_side=True)
        framer = SipFramer()
        try:
            await stream.do_handshake()
            self.handshakes += 1
            self.streams.append(stream)
            while data := await stream.receive_some(65536):
                self.received += data
                framer.feed(data)
                for _ in range(100):
                    event = framer.next_event()
                    if event is NEED_DATA:
                        break
                    if isinstance(event, Message):
                        self.messages.append(event)
                        if event.is_request and event.method != "ACK":
                            await self.send(stream, ok_for(event, self.stamp))
            self.eofs += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.eofs += 1
        finally:
            await stream.aclose()

    async def send(self, stream: TLSStream, data: bytes) -> None:
        self.sent += data
        await stream.send_all(data)

    async def start(self, nursery: trio.Nursery) -> int:
        listeners = await nursery.start(trio.serve_tcp, self.handle, 0)
        self.port = listeners[0].socket.getsockname()[1]
        return self.port


@dataclass
class Edge:
    """The outbound SIP listener under test and everything it reported."""

    outbound: Outbound
    config: Config
    port: int = 0
    reports: list[Report] = field(default_factory=list)
    partner_closed: list[SipPartnerClosed] = field(default_factory=list)
    partner_rejected: list[OutboundRejected] = field(default_factory=list)
    closed: list[SipOutboundClosed] = field(default_factory=list)
    rejected: list[OutboundRejected] = field(default_factory=list)

    async def handle(self, tcp: trio.SocketStream) -> None:
        stream = TLSStream(tcp, outbound_server_context(self.config.identity), server_side=True)
        try:
            self.closed.append(
                await serve_outbound_sip(
                    stream,
                    self.outbound,
                    sip=self.config.sip,
                    idle_timeout_s=self.config.limits.idle_timeout_s,
                    peer="127.0.0.1:1",
                    on_report=self.reports.append,
                    on_partner_closed=self.partner_closed.append,
                    on_partner_rejected=self.partner_rejected.append,
                )
            )
        except OutboundRejected as exc:
            self.rejected.append(exc)

    def results(self) -> list[tuple[str, str, str]]:
        return [(r.direction, r.partner, r.result) for r in self.reports]


@dataclass
class World:
    edge: Edge
    fabrikam: SipPartnerEdge
    contoso: SipPartnerEdge
    dns: DnsServer
    folder: Path
    nursery: trio.Nursery


def _write_site(
    folder: Path, pki: Pki, dns_port: int, contoso_port: int, limits: str = ""
) -> Config:
    identity = write_identity(folder, pki.public, pki.internal, pki.enterprise)
    policies = {
        "fabrikam.com": (pki.fabrikam, ""),  # found by DNS SRV
        "contoso.com": (pki.contoso, f'edge = "sip.contoso.com:{contoso_port}"\n'),
    }
    for pid, (ca, text) in policies.items():
        d = folder / "federation_policies" / pid
        d.mkdir(parents=True, exist_ok=True)
        (d / "root.pem").write_bytes(ca.cert_pem())
        (d / "policy.toml").write_text(text)
    path = folder / "edge.toml"
    path.write_text(
        f"""{identity}
[[listeners]]
name = "to-partners"
address = "127.0.0.1:0"
mode = "outbound"
protocol = "sip"
policies = "federation_policies"
pools = ["frontend"]

[[pools]]
name = "frontend"
members = [{{ host = "fe1.corp.test", address = "127.0.0.1", port = 5061 }}]

[sip]
domains = ["adatum.com"]

[dns]
nameservers = ["127.0.0.1:{dns_port}"]

[limits]
handshake_timeout_s = 5
{limits}
"""
    )
    return load_config(path)


@asynccontextmanager
async def world(
    tmp_path: Path, pki: Pki, *, contoso_ca: CA | None = None, limits: str = ""
) -> AsyncIterator[World]:
    dns_server = DnsServer()
    fabrikam = SipPartnerEdge(
        pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"], eku=["server"]), "fabrikam"
    )
    contoso = SipPartnerEdge(
        pki, (contoso_ca or pki.contoso).issue(dns=["sip.contoso.com"], eku=["server"]), "contoso"
    )
    async with trio.open_nursery() as nursery:
        dns_port = await nursery.start(dns_server.serve)
        await fabrikam.start(nursery)
        await contoso.start(nursery)
        dns_server.records = {
            (FAB_SRV, "SRV"): [f"10 10 {fabrikam.port} sip.fabrikam.com."],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
            ("sip.contoso.com", "A"): ["127.0.0.1"],
        }
        config = _write_site(tmp_path, pki, dns_port, contoso.port, limits)
        listener = config.listeners[0]
        assert listener.policies is not None and listener.protocol == "sip"
        outbound = Outbound(
            config,
            listener,
            load_policies(listener.policies),
            discovery=Discovery(config.dns),
            log=EventLog("json", stream=io.StringIO()),
            rng=random.Random(1),
        )
        edge = Edge(outbound, config)
        listeners = await nursery.start(trio.serve_tcp, edge.handle, 0)
        edge.port = listeners[0].socket.getsockname()[1]
        yield World(edge, fabrikam, contoso, dns_server, tmp_path, nursery)
        nursery.cancel_scope.cancel()


class Member:
    """The pool member: one TLS connection, SIP framed as it arrives."""

    def __init__(self, stream: TLSStream) -> None:
        self.stream = stream
        self.framer = SipFramer()
        self.raw = bytearray()
        self.messages: list[Message] = []

    @classmethod
    async def connect(cls, w: World, pki: Pki) -> Member:
        tcp = await trio.open_tcp_stream("127.0.0.1", w.edge.port)
        ctx = client_context([pki.enterprise.cert], pki.member.chain, pki.member.key)
        stream = TLSStream(tcp, ctx, server_side=False, server_hostname=None)
        await stream.do_handshake()
        return cls(stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self, count: int) -> list[Message]:
        """Until `count` more messages arrived; returns them."""
        start = len(self.messages)
        with trio.fail_after(TIMEOUT):
            while len(self.messages) < start + count:
                data = await self.stream.receive_some(65536)
                assert data, "the edge closed the member's connection"
                self.raw += data
                self.framer.feed(data)
                for _ in range(100):
                    event = self.framer.next_event()
                    if event is NEED_DATA:
                        break
                    assert isinstance(event, Message), event
                    self.messages.append(event)
        return self.messages[start:]


async def until(predicate: object, what: str) -> None:
    assert callable(predicate)
    with trio.fail_after(TIMEOUT):
        while not predicate():
            await trio.sleep(0.01)


def warning(message: Message) -> str | None:
    return message.headers.get("warning")


# --- tests ------------------------------------------------------------------------------


async def test_one_connection_fans_out_per_request_uri(tmp_path: Path, pki: Pki) -> None:
    async with world(tmp_path, pki) as w:
        member = await Member.connect(w, pki)
        to_fab = sip("sip:a@fabrikam.com", call_id="f1", body=b"hello fabrikam")
        to_con = sip("sip:b@contoso.com", call_id="c1", body=b"hello contoso")
        await member.send(to_fab)
        await member.send(to_con)
        answers = await member.receive(2)
        # Each partner edge got exactly its own request, byte for byte.
        assert bytes(w.fabrikam.received) == to_fab
        assert bytes(w.contoso.received) == to_con
        # Both answers came back on the member's connection, unchanged.
        by_call = {a.headers.get("call-id"): a for a in answers}
        assert by_call["f1"].headers.get("server") == "fabrikam"
        assert by_call["c1"].headers.get("server") == "contoso"
        assert sorted(bytes(a.raw) for a in answers) == sorted(
            [bytes(w.fabrikam.sent), bytes(w.contoso.sent)]
        )
        assert bytes(member.raw) in (
            bytes(w.fabrikam.sent + w.contoso.sent),
            bytes(w.contoso.sent + w.fabrikam.sent),
        )
        # One connection per partner, reused for the next request.
        again = sip("sip:c@sip.fabrikam.com", call_id="f2")
        await member.send(again)
        (answer,) = await member.receive(1)
        assert answer.headers.get("call-id") == "f2"
        assert (w.fabrikam.connections, w.contoso.connections) == (1, 1)
        assert bytes(w.fabrikam.received) == to_fab + again
        assert w.fabrikam.messages[0].head.status_code is None
        assert sorted(w.edge.results()) == sorted(
            [("outbound", "fabrikam.com", "relayed")] * 2
            + [("outbound", "contoso.com", "relayed")]
            + [("inbound", "fabrikam.com", "relayed")] * 2
            + [("inbound", "contoso.com", "relayed")]
        )
        # The pool connection ends: both partner connections close with it.
        await member.stream.aclose()
        await until(lambda: len(w.edge.closed) == 1, "pool connection end")
        await until(lambda: len(w.edge.partner_closed) == 2, "partner connection ends")
        await until(lambda: w.fabrikam.eofs == 1 and w.contoso.eofs == 1, "partner EOFs")
        closed = w.edge.closed[0]
        assert (closed.member, closed.end) == ("fe1.corp.test", "pool_closed")
        assert closed.partners == {"fabrikam.com": 1, "contoso.com": 1}
        fields = {c.partner: c.log_fields() for c in w.edge.partner_closed}
        fab = fields["fabrikam.com"]
        assert (fab["direction"], fab["member"], fab["end"]) == (
            "outbound",
            "fe1.corp.test",
            "pool_closed",
        )
        assert fab["partner_edge"].startswith(f"sip.fabrikam.com:{w.fabrikam.port}")
        assert fields["contoso.com"]["partner_edge"].startswith(f"sip.contoso.com:{w.contoso.port}")
        assert fab["bytes_to_partner"] == len(to_fab + again)
        assert fab["bytes_from_partner"] == len(w.fabrikam.sent)
        assert w.edge.rejected == [] and w.edge.partner_rejected == []


async def test_partner_with_another_partners_root_gets_no_byte_and_pool_gets_503(
    tmp_path: Path, pki: Pki
) -> None:
    # contoso's edge presents a certificate from fabrikam's root (trusted, for fabrikam).
    async with world(tmp_path, pki, contoso_ca=pki.fabrikam) as w:
        member = await Member.connect(w, pki)
        request = sip("sip:b@contoso.com", call_id="u1")
        await member.send(request)
        (answer,) = await member.receive(1)
        assert answer.head.status_code == 503
        assert warning(answer) == '399 edge "partner_untrusted"'
        assert answer.headers.get("call-id") == "u1"
        assert w.contoso.handshakes == 1 and w.contoso.received == b""
        (rejection,) = w.edge.partner_rejected
        assert (rejection.reason, rejection.partner, rejection.member) == (
            "partner_untrusted",
            "contoso.com",
            "fe1.corp.test",
        )
        assert rejection.detail.startswith("unknown_ca: ")
        (report,) = w.edge.reports
        assert (report.partner, report.result, report.answered) == (
            "contoso.com",
            "partner_untrusted",
            503,
        )
        # The pool connection lives on: fabrikam is still reachable over it.
        await member.send(sip("sip:a@fabrikam.com", call_id="f1"))
        (ok,) = await member.receive(1)
        assert ok.head.status_code == 200
        assert w.contoso.received == b""
        await member.stream.aclose()


async def test_unknown_domain_and_foreign_from_are_answered_by_the_edge(
    tmp_path: Path, pki: Pki
) -> None:
    async with world(tmp_path, pki) as w:
        member = await Member.connect(w, pki)
        await member.send(sip("sip:x@litware.com", call_id="n1"))
        (not_found,) = await member.receive(1)
        assert not_found.head.status_code == 404
        assert warning(not_found) == '399 edge "unknown_destination"'
        # From a domain outside [sip] domains: 403, and it goes nowhere.
        await member.send(sip("sip:a@fabrikam.com", from_uri="sip:eve@contoso.com", call_id="s1"))
        (forbidden,) = await member.receive(1)
        assert forbidden.head.status_code == 403
        assert warning(forbidden) == '399 edge "sip_domain_mismatch"'
        assert forbidden.headers.get("call-id") == "s1"
        assert w.fabrikam.connections == 0 and w.contoso.connections == 0
        assert [(r.result, r.answered, r.offending_domain) for r in w.edge.reports] == [
            ("unknown_destination", 404, "litware.com"),
            ("sip_domain_mismatch", 403, "contoso.com"),
        ]
        assert w.dns.queries == []  # nothing was even looked up
        await member.stream.aclose()


async def test_partner_removed_while_live_is_closed_and_later_requests_get_503(
    tmp_path: Path, pki: Pki
) -> None:
    async with world(tmp_path, pki) as w:
        member = await Member.connect(w, pki)
        await member.send(sip("sip:a@fabrikam.com", call_id="f1"))
        await member.send(sip("sip:b@contoso.com", call_id="c1"))
        await member.receive(2)
        assert w.edge.outbound.live_count("fabrikam.com") == 1
        # A reload without fabrikam.com: its fan-out connection closes at once.
        shutil.rmtree(w.folder / "federation_policies" / "fabrikam.com")
        assert w.edge.outbound.update(load_policies(w.folder / "federation_policies")) == 1
        await until(lambda: w.fabrikam.eofs == 1, "fabrikam's connection closed")
        await until(lambda: len(w.edge.partner_closed) == 1, "connection_closed for fabrikam")
        (closed,) = w.edge.partner_closed
        assert (closed.partner, closed.end, closed.reason) == (
            "fabrikam.com",
            "trust_withdrawn",
            "unknown_destination",
        )
        assert w.edge.outbound.live_count("fabrikam.com") == 0
        # The next request to it: 503 from the edge, and no new dial.
        await member.send(sip("sip:a@fabrikam.com", call_id="f2"))
        (answer,) = await member.receive(1)
        assert answer.head.status_code == 503
        assert answer.headers.get("call-id") == "f2"
        assert warning(answer) == '399 edge "unknown_destination"'
        assert w.fabrikam.connections == 1
        # contoso is untouched.
        await member.send(sip("sip:b@contoso.com", call_id="c2"))
        (ok,) = await member.receive(1)
        assert (ok.head.status_code, ok.headers.get("server")) == (200, "contoso")
        assert w.contoso.connections == 1
        await member.stream.aclose()


async def test_split_and_batched_requests_are_routed_right(tmp_path: Path, pki: Pki) -> None:
    async with world(tmp_path, pki) as w:
        member = await Member.connect(w, pki)
        split = sip("sip:a@fabrikam.com", call_id="f1", body=b"x" * 3000)
        # Three TLS records, cut inside the start line and inside the body.
        for piece in (split[:7], split[7:200], split[200:]):
            await member.send(piece)
            await trio.sleep(0.02)
        (first,) = await member.receive(1)
        assert first.headers.get("call-id") == "f1"
        assert bytes(w.fabrikam.received) == split
        # Two requests for two partners in one record.
        to_con = sip("sip:b@contoso.com", call_id="c1")
        to_fab = sip("sip:a@fabrikam.com", call_id="f2")
        await member.send(to_con + to_fab)
        answers = await member.receive(2)
        assert sorted(a.headers.get("call-id") or "" for a in answers) == ["c1", "f2"]
        assert bytes(w.contoso.received) == to_con
        assert bytes(w.fabrikam.received) == split + to_fab
        await member.stream.aclose()


async def test_partner_in_dialog_request_reaches_the_member(tmp_path: Path, pki: Pki) -> None:
    async with world(tmp_path, pki) as w:
        member = await Member.connect(w, pki)
        await member.send(sip("sip:a@fabrikam.com", method="INVITE", call_id="dlg"))
        await member.receive(1)
        # fabrikam hangs up over the connection the edge opened (RFC 5923 reuse).
        bye = sip(
            "sip:alice@fe1.corp.test:5061;transport=tls",
            method="BYE",
            from_uri="sip:a@fabrikam.com",
            call_id="dlg",
        )
        await w.fabrikam.send(w.fabrikam.streams[0], bye)
        (got,) = await member.receive(1)
        assert bytes(got.raw) == bye
        # The member's 200 for the BYE goes back to fabrikam by its Call-ID.
        ok = ok_for(got, "member")
        await member.send(ok)
        await until(lambda: len(w.fabrikam.messages) == 2, "fabrikam got the 200")
        assert bytes(w.fabrikam.messages[1].raw) == ok
        # A partner cannot speak for another partner's domain: 403 back to it.
        forged = sip("sip:alice@adatum.com", from_uri="sip:eve@contoso.com", call_id="x")
        await w.fabrikam.send(w.fabrikam.streams[0], forged)
        await until(lambda: len(w.fabrikam.messages) == 3, "fabrikam got the 403")
        assert w.fabrikam.messages[2].head.status_code == 403
        assert ("inbound", "fabrikam.com", "sip_domain_mismatch") in w.edge.results()
        await member.stream.aclose()


async def test_member_outside_the_topology_is_refused_before_any_sip(
    tmp_path: Path, pki: Pki
) -> None:
    async with world(tmp_path, pki) as w:
        stranger = pki.enterprise.issue(dns=["fe7.corp.test"], eku=["client"])
        tcp = await trio.open_tcp_stream("127.0.0.1", w.edge.port)
        ctx = client_context([pki.enterprise.cert], stranger.chain, stranger.key)
        stream = TLSStream(tcp, ctx, server_side=False)
        await stream.do_handshake()
        with trio.fail_after(TIMEOUT):
            try:
                await stream.send_all(sip("sip:a@fabrikam.com"))
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await until(lambda: len(w.edge.rejected) == 1, "rejection")
        assert w.edge.rejected[0].reason == "not_in_topology"
        assert w.fabrikam.connections == 0 and w.edge.reports == []
        await stream.aclose()


async def test_unreachable_partner_gets_503_naming_why(tmp_path: Path, pki: Pki) -> None:
    async with world(tmp_path, pki) as w:
        w.dns.records[(FAB_SRV, "SRV")] = [f"10 10 {_refused_port()} sip.fabrikam.com."]
        member = await Member.connect(w, pki)
        # Two requests wait for the same dial; both get the 503, the ACK none.
        first = sip("sip:a@fabrikam.com", call_id="w1")
        second = sip("sip:b@fabrikam.com", call_id="w2")
        await member.send(first + second + sip("sip:a@fabrikam.com", method="ACK", call_id="w3"))
        answers = await member.receive(2)
        assert [(a.head.status_code, a.headers.get("call-id")) for a in answers] == [
            (503, "w1"),
            (503, "w2"),
        ]
        assert {warning(a) for a in answers} == {'399 edge "partner_unreachable"'}
        (rejection,) = w.edge.partner_rejected
        assert (rejection.reason, rejection.partner) == ("partner_unreachable", "fabrikam.com")
        assert w.edge.partner_closed == []  # never opened, so no connection_closed
        # contoso still works over the same pool connection.
        await member.send(sip("sip:b@contoso.com", call_id="c1"))
        (ok,) = await member.receive(1)
        assert ok.head.status_code == 200
        await member.stream.aclose()


async def test_keepalive_and_malformed_pool_input(tmp_path: Path, pki: Pki) -> None:
    async with world(tmp_path, pki) as w:
        member = await Member.connect(w, pki)
        first = sip("sip:a@fabrikam.com", call_id="f1")
        await member.send(first)
        await member.receive(1)
        # An RFC 5626 ping is answered by the edge and goes nowhere.
        await member.send(b"\r\n\r\n")
        with trio.fail_after(TIMEOUT):
            assert await member.stream.receive_some(100) == b"\r\n"
        # A request without Content-Length: 400, then the fan-out ends.
        bad = sip("sip:a@fabrikam.com", call_id="bad").replace(b"Content-Length: 0\r\n", b"")
        await member.send(bad)
        (answer,) = await member.receive(1)
        assert answer.head.status_code == 400
        assert warning(answer) == '399 edge "sip_malformed"'
        await until(lambda: len(w.edge.closed) == 1, "pool connection end")
        assert w.edge.closed[0].end == "sip_malformed"
        await until(lambda: len(w.edge.partner_closed) == 1, "fabrikam closed")
        assert w.edge.partner_closed[0].end == "pool_closed"
        assert bytes(w.fabrikam.received) == first  # neither the ping nor the bad request
        await member.stream.aclose()


async def test_partner_connections_count_in_the_per_partner_limit(tmp_path: Path, pki: Pki) -> None:
    limits = "max_outbound_connections_per_partner = 1"
    async with world(tmp_path, pki, limits=limits) as w:
        first = await Member.connect(w, pki)
        await first.send(sip("sip:a@fabrikam.com", call_id="f1"))
        (ok,) = await first.receive(1)
        assert ok.head.status_code == 200
        # A second pool connection would need a second fabrikam connection: 503.
        second = await Member.connect(w, pki)
        await second.send(sip("sip:a@fabrikam.com", call_id="f2"))
        (answer,) = await second.receive(1)
        assert answer.head.status_code == 503
        assert warning(answer) == '399 edge "over_limit"'
        assert [r.reason for r in w.edge.partner_rejected] == ["over_limit"]
        assert w.fabrikam.connections == 1
        # contoso is its own count.
        await second.send(sip("sip:b@contoso.com", call_id="c1"))
        (ok,) = await second.receive(1)
        assert ok.head.status_code == 200
        await first.stream.aclose()
        await second.stream.aclose()


# --- a real SIP pool: Kamailio ----------------------------------------------------------


def _kamailio_config(folder: Path, pki: Pki, edge_port: int) -> tuple[Path, int]:
    """A pool proxy: every request it receives on UDP goes to the edge over one TLS
    connection (client certificate fe1.corp.test), as a Lync/Skype pool does."""
    cert, key = pki.member.write(folder, "member")
    roots = folder / "enterprise-root.pem"
    roots.write_bytes(pki.enterprise.cert_pem())
    udp, tls = free_port(2), free_port(1)  # SOCK_DGRAM, SOCK_STREAM
    (folder / "tls.cfg").write_text(tls_cfg(cert, key, roots))
    cfg = folder / "kamailio.cfg"
    cfg.write_text(
        f"""#!KAMAILIO
debug=2
log_stderror=yes
children=1
tcp_children=1
auto_aliases=no
listen=udp:127.0.0.1:{udp}
listen=tls:127.0.0.1:{tls}
enable_tls=yes
mpath="{KAMAILIO_MODULES}/"
loadmodule "tls.so"
loadmodule "sl.so"
loadmodule "tm.so"
loadmodule "pv.so"
modparam("tls", "config", "{folder / "tls.cfg"}")

request_route {{
    $du = "sip:127.0.0.1:{edge_port};transport=tls";
    if (!t_relay()) {{
        sl_reply_error();
    }}
    exit;
}}
"""
    )
    return cfg, udp


def _ua_request(target: str, call_id: str, ua_port: int) -> bytes:
    lines = [
        f"MESSAGE {target} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{ua_port};branch=z9hG4bK-{call_id};rport",
        "Max-Forwards: 70",
        "From: <sip:alice@adatum.com>;tag=ua1",
        f"To: <{target}>",
        f"Call-ID: {call_id}",
        "CSeq: 1 MESSAGE",
        "Content-Length: 2",
    ]
    return ("\r\n".join(lines) + "\r\n\r\nhi").encode()


@pytest.mark.skipif(
    not Path(KAMAILIO).exists() or not (KAMAILIO_MODULES / "tls.so").exists(),
    reason="Kamailio with its TLS module is not installed (kamailio, kamailio-tls-modules)",
)
async def test_a_real_kamailio_pool_reaches_two_partners_over_one_connection(
    tmp_path: Path, pki: Pki
) -> None:
    import os
    import signal
    import subprocess

    async with world(tmp_path, pki) as w:
        accepted: list[int] = []
        handle = w.edge.handle

        async def counting(tcp: trio.SocketStream) -> None:
            accepted.append(1)
            await handle(tcp)

        listeners = await w.nursery.start(trio.serve_tcp, counting, 0)
        edge_port = listeners[0].socket.getsockname()[1]
        kam_dir = tmp_path / "kamailio"
        kam_dir.mkdir()
        cfg, kam_udp = _kamailio_config(kam_dir, pki, edge_port)
        log = (kam_dir / "kamailio.log").open("wb")
        process = subprocess.Popen(
            [KAMAILIO, "-f", str(cfg), "-DD", "-E", "-m", "64", "-M", "8", "-w", str(kam_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its worker children share our process group id
        )
        ua = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        try:
            await ua.bind(("127.0.0.1", 0))
            ua_port = ua.getsockname()[1]
            answers: dict[str, Message] = {}

            async def collect(expect: set[str], resend: dict[str, bytes]) -> None:
                # UDP: resend what is unanswered every half second (bounded).
                for _ in range(40):
                    for call_id, data in resend.items():
                        if call_id not in answers:
                            await ua.sendto(data, ("127.0.0.1", kam_udp))
                    with trio.move_on_after(0.5):
                        while not expect <= answers.keys():
                            wire = await ua.recv(65536)
                            framer = SipFramer()
                            framer.feed(wire)
                            event = framer.next_event()
                            if isinstance(event, Message) and event.head.status_code == 200:
                                answers[event.headers.get("call-id") or ""] = event
                    if expect <= answers.keys():
                        return
                raise AssertionError(
                    f"no answer from the partners through Kamailio: "
                    f"{(kam_dir / 'kamailio.log').read_text()[-2000:]}"
                )

            to_fab = _ua_request("sip:a@fabrikam.com", "kam-f1", ua_port)
            to_con = _ua_request("sip:b@contoso.com", "kam-c1", ua_port)
            await collect({"kam-f1"}, {"kam-f1": to_fab})
            await collect({"kam-c1"}, {"kam-c1": to_con})
            assert answers["kam-f1"].headers.get("server") == "fabrikam"
            assert answers["kam-c1"].headers.get("server") == "contoso"
            # Each partner saw only its own request (Kamailio added its Via).
            assert {m.headers.get("call-id") for m in w.fabrikam.messages} == {"kam-f1"}
            assert {m.headers.get("call-id") for m in w.contoso.messages} == {"kam-c1"}
            assert w.fabrikam.messages[0].head.request_uri == "sip:a@fabrikam.com"
            assert w.fabrikam.messages[0].body == b"hi"
            vias = w.fabrikam.messages[0].headers.get_all("via")
            assert len(vias) == 2 and vias[0].startswith("SIP/2.0/TLS 127.0.0.1:")
            # Kamailio used one TLS connection to the edge for both destinations.
            assert len(accepted) == 1
            assert w.edge.rejected == []
        finally:
            ua.close()
            with trio.CancelScope(shield=True):
                os.killpg(process.pid, signal.SIGTERM)
                with trio.move_on_after(10):
                    while process.poll() is None:
                        await trio.sleep(0.05)
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(5)
            log.close()
