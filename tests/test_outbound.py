"""Outbound federation on real sockets: pool member -> edge -> partner edge, all on 127.0.0.1.

Every test runs the outbound listener's code (`edge.outbound.serve_outbound`
behind a trio TCP listener with the outbound server context), pool members as
real MTLS clients, partner edges as real MTLS servers that check the edge's
public certificate, and a real DNS server on a loopback UDP port serving the
SRV and A records the test sets. The relay is a small one written here (the
gateway's relay is plugged in by the accept loop).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from edge.core.config import Config, load_config
from edge.core.policies import load_policies
from edge.demo import write_identity
from edge.discovery import Discovery
from edge.logs import EventLog
from edge.outbound import (
    Outbound,
    OutboundClosed,
    OutboundRejected,
    outbound_server_context,
    serve_outbound,
)
from edge.pki import CA, Leaf
from edge.tls import TLSStream, client_context, server_context

EDGE_PUBLIC = "edge.contoso.example"
SRV = "_sipfederationtls._tcp.fabrikam.com"
MiB = 1024 * 1024


@dataclass
class Pki:
    enterprise: CA
    edge_ca: CA
    fabrikam: CA
    litware: CA
    public: Leaf
    internal: Leaf
    member: Leaf  # fe1.corp.test, in the topology


@pytest.fixture(scope="module")
def pki() -> Pki:
    enterprise = CA.root("Test Enterprise Root")
    edge_ca = CA.root("Test Edge Public CA")
    return Pki(
        enterprise=enterprise,
        edge_ca=edge_ca,
        fabrikam=CA.root("Fabrikam Root"),
        litware=CA.root("Litware Root"),
        public=edge_ca.issue(dns=[EDGE_PUBLIC]),  # clientAuth + serverAuth
        internal=enterprise.issue(dns=["edge.corp.test"]),
        member=enterprise.issue(dns=["fe1.corp.test"], eku=["client"]),
    )


# --- the world around the edge ---------------------------------------------------------------


class DnsServer:
    """A tiny authoritative server on a loopback UDP port; records set by the test."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.queries: list[tuple[str, str]] = []

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            task_status.started(sock.getsockname()[1])
            while True:
                wire, peer = await sock.recvfrom(4096)
                query = dns.message.from_wire(wire)
                response = dns.message.make_response(query)
                response.flags |= dns.flags.AA
                question = query.question[0]
                name = question.name.to_text(omit_final_dot=True).lower()
                rdtype = dns.rdatatype.to_text(question.rdtype)
                self.queries.append((name, rdtype))
                if (name, rdtype) in self.records:
                    texts = self.records[(name, rdtype)]
                    response.answer.append(
                        dns.rrset.from_text_list(question.name, 60, "IN", rdtype, texts)
                    )
                elif not any(n == name for n, _ in self.records):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                await sock.sendto(response.to_wire(), peer)


class PartnerEdge:
    """A partner's edge: an MTLS echo server that requires the edge's public cert.

    Counts connections, handshakes and application bytes, and hashes what it got.
    """

    def __init__(self, pki: Pki, leaf: Leaf) -> None:
        self.context = server_context(
            leaf.chain, leaf.key, require_client_cert=True, client_roots=[pki.edge_ca.cert]
        )
        self.port = 0
        self.connections = 0
        self.handshakes = 0
        self.app_bytes = 0
        self.client_names: list[str] = []
        self.received = hashlib.sha256()

    async def handle(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        stream = TLSStream(tcp, self.context, server_side=True)
        try:
            await stream.do_handshake()
            self.handshakes += 1
            leaf = stream.peer_chain[0]
            self.client_names.append(
                str(leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
            )
            while data := await stream.receive_some(65536):
                self.app_bytes += len(data)
                self.received.update(data)
                await stream.send_all(data)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    async def start(self, nursery: trio.Nursery) -> int:
        listeners = await nursery.start(trio.serve_tcp, self.handle, 0)
        self.port = listeners[0].socket.getsockname()[1]
        return self.port


def _refused_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _site(
    folder: Path,
    pki: Pki,
    dns_port: int,
    policies: dict[str, str],
    *,
    limits: str = "",
) -> Config:
    identity = write_identity(folder, pki.public, pki.internal, pki.enterprise)
    roots = {"fabrikam.com": pki.fabrikam, "litware.com": pki.litware}
    for pid, text in policies.items():
        d = folder / "federation_policies" / pid
        d.mkdir(parents=True, exist_ok=True)
        (d / "root.pem").write_bytes(roots[pid].cert_pem())
        (d / "policy.toml").write_text(text)
    path = folder / "edge.toml"
    path.write_text(
        f"""{identity}
[[listeners]]
name = "to-partners"
address = "127.0.0.1:0"
mode = "outbound"
policies = "federation_policies"
pools = ["frontend"]

[[pools]]
name = "frontend"
members = [{{ host = "fe1.corp.test", address = "127.0.0.1", port = 5061 }}]

[dns]
nameservers = ["127.0.0.1:{dns_port}"]

[limits]
handshake_timeout_s = 5
{limits}
"""
    )
    return load_config(path)


async def simple_relay(member: TLSStream, partner: TLSStream) -> tuple[int, int]:
    """Bytes both ways until both sides said EOF; (member->partner, partner->member)."""
    counts = [0, 0]

    async def pump(src: TLSStream, dst: TLSStream, index: int) -> None:
        try:
            while data := await src.receive_some(65536):
                counts[index] += len(data)
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, partner, member, 1)
        await pump(member, partner, 0)
    return counts[0], counts[1]


@dataclass
class Edge:
    """The outbound listener under test and what it reported."""

    outbound: Outbound
    context: SSL.Context
    port: int = 0
    closed: list[OutboundClosed] = field(default_factory=list)
    rejected: list[OutboundRejected] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, tcp: trio.SocketStream) -> None:
        stream = TLSStream(tcp, self.context, server_side=True)
        try:
            self.closed.append(await serve_outbound(stream, self.outbound, simple_relay))
        except OutboundRejected as exc:
            self.rejected.append(exc)
            self.events.append(exc.log_fields(self.outbound.listener.name, "peer"))

    async def wait(self, count: int = 1) -> None:
        with trio.fail_after(15):
            while len(self.closed) + len(self.rejected) < count:
                await trio.sleep(0.02)


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[Edge, trio.Nursery]]:
    listener = config.listeners[0]
    assert listener.policies is not None
    events: list[dict[str, Any]] = []
    log = EventLog("json", stream=io.StringIO(), sink=events.append)
    outbound = Outbound(
        config,
        listener,
        load_policies(listener.policies),
        discovery=Discovery(config.dns),
        log=log,
        rng=random.Random(1),
    )
    edge = Edge(outbound, outbound_server_context(config.identity), events=events)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, edge.handle, 0)
        edge.port = listeners[0].socket.getsockname()[1]
        yield edge, nursery
        nursery.cancel_scope.cancel()


async def member_connect(
    edge: Edge, pki: Pki, sni: str | None, leaf: Leaf | None = None
) -> TLSStream:
    leaf = leaf or pki.member
    tcp = await trio.open_tcp_stream("127.0.0.1", edge.port)
    ctx = client_context([pki.enterprise.cert], leaf.chain, leaf.key)
    stream = TLSStream(tcp, ctx, server_side=False, server_hostname=sni, check_hostname=False)
    await stream.do_handshake()
    return stream


async def roundtrip(stream: TLSStream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    got = b""
    with trio.fail_after(10):
        while len(got) < len(payload):
            data = await stream.receive_some(65536)
            if not data:
                break
            got += data
    return got


async def refused(stream: TLSStream) -> None:
    """The member sends a request; the edge must close without relaying it."""
    with trio.fail_after(10):
        try:
            await stream.send_all(b"INVITE sip:bob@fabrikam.com SIP/2.0\r\n\r\n")
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await stream.aclose()


@asynccontextmanager
async def world() -> AsyncIterator[tuple[DnsServer, trio.Nursery, int]]:
    dns_server = DnsServer()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(dns_server.serve)
        yield dns_server, nursery, port
        nursery.cancel_scope.cancel()


def fab_server(pki: Pki, *names: str, ca: CA | None = None) -> Leaf:
    return (ca or pki.fabrikam).issue(dns=list(names), eku=["server"])


# --- tests ----------------------------------------------------------------------------------


async def test_srv_priority_then_failover(tmp_path: Path, pki: Pki) -> None:
    async with world() as (dns_server, nursery, dns_port):
        first = PartnerEdge(pki, fab_server(pki, "sip1.fabrikam.com"))
        second = PartnerEdge(pki, fab_server(pki, "sip2.fabrikam.com"))
        await first.start(nursery)
        await second.start(nursery)
        dns_server.records = {
            (SRV, "SRV"): [
                f"20 10 {second.port} sip2.fabrikam.com.",
                f"10 10 {first.port} sip1.fabrikam.com.",
            ],
            ("sip1.fabrikam.com", "A"): ["127.0.0.1"],
            ("sip2.fabrikam.com", "A"): ["127.0.0.1"],
        }
        config = _site(tmp_path, pki, dns_port, {"fabrikam.com": ""})
        async with running(config) as (edge, _):
            # Priority 10 first.
            member = await member_connect(edge, pki, "sip.fabrikam.com")
            assert await roundtrip(member, b"OPTIONS one") == b"OPTIONS one"
            await member.aclose()
            await edge.wait(1)
            assert (first.app_bytes, second.app_bytes) == (11, 0)
            assert first.client_names == [EDGE_PUBLIC]  # the edge presented public_cert
            fields = edge.closed[0].log_fields()
            assert fields["direction"] == "outbound"
            assert fields["member"] == "fe1.corp.test"
            assert fields["partner"] == "fabrikam.com"
            assert fields["partner_edge"].startswith(f"sip1.fabrikam.com:{first.port}")
            assert edge.closed[0].relay_result == (11, 11)

            # The first target refuses: failover to the second, in the same connection.
            dns_server.records[(SRV, "SRV")] = [
                f"20 10 {second.port} sip2.fabrikam.com.",
                f"10 10 {_refused_port()} sip1.fabrikam.com.",
            ]
            edge.outbound.discovery = Discovery(config.dns)  # forget the cached answer
            member = await member_connect(edge, pki, "sip.fabrikam.com")
            assert await roundtrip(member, b"OPTIONS two") == b"OPTIONS two"
            await member.aclose()
            await edge.wait(2)
            assert second.app_bytes == 11
            assert edge.closed[1].partner_edge.startswith(f"sip2.fabrikam.com:{second.port}")


async def test_srv_answers_are_cached_for_their_ttl(tmp_path: Path, pki: Pki) -> None:
    async with world() as (dns_server, nursery, dns_port):
        partner = PartnerEdge(pki, fab_server(pki, "sip.fabrikam.com"))
        await partner.start(nursery)
        dns_server.records = {
            (SRV, "SRV"): [f"10 10 {partner.port} sip.fabrikam.com."],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
        }
        config = _site(tmp_path, pki, dns_port, {"fabrikam.com": ""})
        async with running(config) as (edge, _):
            for n in range(3):
                member = await member_connect(edge, pki, "sip.fabrikam.com")
                assert await roundtrip(member, b"x") == b"x"
                await member.aclose()
                await edge.wait(n + 1)
            assert dns_server.queries.count((SRV, "SRV")) == 1
            assert dns_server.queries.count(("sip.fabrikam.com", "A")) == 1


async def test_static_edge_without_srv(tmp_path: Path, pki: Pki) -> None:
    async with world() as (dns_server, nursery, dns_port):
        partner = PartnerEdge(pki, fab_server(pki, "edge.fabrikam.net"))
        await partner.start(nursery)
        dns_server.records = {("edge.fabrikam.net", "A"): ["127.0.0.1"]}
        policy = f'domains = ["fabrikam.com"]\nedge = "edge.fabrikam.net:{partner.port}"\n'
        config = _site(tmp_path, pki, dns_port, {"fabrikam.com": policy})
        async with running(config) as (edge, _):
            member = await member_connect(edge, pki, "fabrikam.com")
            assert await roundtrip(member, b"hello") == b"hello"
            await member.aclose()
            await edge.wait()
            assert partner.app_bytes == 5
            assert (SRV, "SRV") not in dns_server.queries


async def test_srv_target_outside_partner_domains_is_ignored_and_logged(
    tmp_path: Path, pki: Pki
) -> None:
    async with world() as (dns_server, nursery, dns_port):
        # A genuine certificate for the stray host: only the domain rule keeps it out.
        stray = PartnerEdge(pki, fab_server(pki, "sip.evil.example"))
        good = PartnerEdge(pki, fab_server(pki, "sip.fabrikam.com"))
        await stray.start(nursery)
        await good.start(nursery)
        dns_server.records = {
            (SRV, "SRV"): [
                f"1 10 {stray.port} sip.evil.example.",
                f"10 10 {good.port} sip.fabrikam.com.",
            ],
            ("sip.evil.example", "A"): ["127.0.0.1"],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
        }
        config = _site(tmp_path, pki, dns_port, {"fabrikam.com": ""})
        async with running(config) as (edge, _):
            member = await member_connect(edge, pki, "sip.fabrikam.com")
            assert await roundtrip(member, b"ping") == b"ping"
            await member.aclose()
            await edge.wait()
            assert stray.connections == 0 and good.app_bytes == 4
            assert ("sip.evil.example", "A") not in dns_server.queries
            ignored = [e for e in edge.events if e["event"] == "srv_target_ignored"]
            assert [(e["partner"], e["target"], e["port"]) for e in ignored] == [
                ("fabrikam.com", "sip.evil.example", stray.port)
            ]


async def _rejected_dial(
    tmp_path: Path, pki: Pki, leaf: Leaf, *, policy: str = "", crl: bytes | None = None
) -> tuple[OutboundRejected, PartnerEdge]:
    async with world() as (dns_server, nursery, dns_port):
        partner = PartnerEdge(pki, leaf)
        await partner.start(nursery)
        dns_server.records = {
            (SRV, "SRV"): [f"10 10 {partner.port} sip.fabrikam.com."],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
        }
        config = _site(tmp_path, pki, dns_port, {"fabrikam.com": policy, "litware.com": ""})
        if crl is not None:
            (tmp_path / "federation_policies" / "fabrikam.com" / "fabrikam.crl").write_bytes(crl)
        async with running(config) as (edge, _):
            member = await member_connect(edge, pki, "sip.fabrikam.com")
            await refused(member)
            await edge.wait()
            assert not edge.closed
            return edge.rejected[0], partner


async def test_partner_edge_from_another_partners_root(tmp_path: Path, pki: Pki) -> None:
    # Litware's CA is trusted (for litware.com) and certifies sip.fabrikam.com: no.
    leaf = fab_server(pki, "sip.fabrikam.com", ca=pki.litware)
    rejection, partner = await _rejected_dial(tmp_path, pki, leaf)
    assert rejection.reason == "partner_untrusted"
    assert rejection.detail.startswith("unknown_ca: ")
    assert rejection.member == "fe1.corp.test" and rejection.partner == "fabrikam.com"
    assert rejection.partner_edge is not None
    assert rejection.partner_edge.startswith(f"sip.fabrikam.com:{partner.port}")
    # The partner's edge completed a handshake and never got a member byte.
    assert partner.handshakes == 1 and partner.app_bytes == 0
    fields = rejection.log_fields("to-partners", "peer")
    assert (fields["direction"], fields["reason"]) == ("outbound", "partner_untrusted")


async def test_partner_edge_with_the_wrong_host_name(tmp_path: Path, pki: Pki) -> None:
    rejection, partner = await _rejected_dial(tmp_path, pki, fab_server(pki, "www.fabrikam.com"))
    assert rejection.reason == "partner_untrusted"
    assert rejection.detail.startswith("name_mismatch: ")
    assert partner.app_bytes == 0


async def test_revoked_partner_edge_certificate(tmp_path: Path, pki: Pki) -> None:
    leaf = fab_server(pki, "sip.fabrikam.com")
    crl = pki.fabrikam.crl([leaf.cert.serial_number]).public_bytes(Encoding.PEM)
    rejection, partner = await _rejected_dial(tmp_path, pki, leaf, crl=crl)
    assert rejection.reason == "partner_untrusted"
    assert rejection.detail.startswith("revoked: ")
    assert partner.app_bytes == 0


async def test_partner_unreachable(tmp_path: Path, pki: Pki) -> None:
    async with world() as (dns_server, _, dns_port):
        dns_server.records = {
            (SRV, "SRV"): [f"10 10 {_refused_port()} sip.fabrikam.com."],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
            # litware.com publishes no SRV record at all.
            ("litware.com", "A"): ["127.0.0.1"],
        }
        config = _site(tmp_path, pki, dns_port, {"fabrikam.com": "", "litware.com": ""})
        async with running(config) as (edge, _):
            for sni in ("sip.fabrikam.com", "sip.litware.com"):
                await refused(await member_connect(edge, pki, sni))
            await edge.wait(2)
            reasons = sorted((r.partner, r.reason) for r in edge.rejected)
            assert reasons == [
                ("fabrikam.com", "partner_unreachable"),
                ("litware.com", "partner_unreachable"),
            ]


async def test_member_not_in_topology_and_no_sni(tmp_path: Path, pki: Pki) -> None:
    async with world() as (dns_server, nursery, dns_port):
        partner = PartnerEdge(pki, fab_server(pki, "sip.fabrikam.com"))
        await partner.start(nursery)
        dns_server.records = {
            (SRV, "SRV"): [f"10 10 {partner.port} sip.fabrikam.com."],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
        }
        config = _site(tmp_path, pki, dns_port, {"fabrikam.com": ""})
        async with running(config) as (edge, _):
            # The enterprise CA issued it, but fe7 is no member of the frontend pool.
            stranger = pki.enterprise.issue(dns=["fe7.corp.test"], eku=["client"])
            await refused(await member_connect(edge, pki, "sip.fabrikam.com", stranger))
            await edge.wait(1)
            assert edge.rejected[0].reason == "not_in_topology"
            assert "fe7.corp.test" in edge.rejected[0].detail
            await refused(await member_connect(edge, pki, None))
            await edge.wait(2)
            assert edge.rejected[1].reason == "unknown_destination"
            assert edge.rejected[1].member == "fe1.corp.test"
            await refused(await member_connect(edge, pki, "sip.litware.com"))
            await edge.wait(3)
            assert edge.rejected[2].reason == "unknown_destination"
            # A certificate from outside internal_roots fails the TLS handshake itself.
            outsider = pki.fabrikam.issue(dns=["fe1.corp.test"], eku=["client"])
            with contextlib.suppress(trio.BrokenResourceError):
                await refused(await member_connect(edge, pki, "sip.fabrikam.com", outsider))
            await edge.wait(4)
            assert edge.rejected[3].reason == "tls_error"
            assert edge.rejected[3].member is None
            assert partner.connections == 0


async def test_partner_removed_while_connected_is_closed(tmp_path: Path, pki: Pki) -> None:
    async with world() as (dns_server, nursery, dns_port):
        partner = PartnerEdge(pki, fab_server(pki, "sip.fabrikam.com"))
        await partner.start(nursery)
        dns_server.records = {
            (SRV, "SRV"): [f"10 10 {partner.port} sip.fabrikam.com."],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
        }
        config = _site(
            tmp_path,
            pki,
            dns_port,
            {"fabrikam.com": "", "litware.com": ""},
            limits="max_outbound_connections_per_partner = 1",
        )
        async with running(config) as (edge, _):
            member = await member_connect(edge, pki, "sip.fabrikam.com")
            assert await roundtrip(member, b"REGISTER") == b"REGISTER"
            assert edge.outbound.live_count("fabrikam.com") == 1
            # The per-partner limit holds while it is live.
            await refused(await member_connect(edge, pki, "sip.fabrikam.com"))
            await edge.wait(1)
            assert edge.rejected[0].reason == "over_limit"
            # A reload without fabrikam.com closes the live connection.
            shutil.rmtree(tmp_path / "federation_policies" / "fabrikam.com")
            assert edge.outbound.update(load_policies(tmp_path / "federation_policies")) == 1
            await edge.wait(2)
            closed = edge.closed[0]
            assert (closed.end, closed.reason) == ("trust_withdrawn", "unknown_destination")
            assert closed.log_fields()["end"] == "trust_withdrawn"
            # The member sees its connection end (close_notify, or a cut: both closed).
            with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
                assert await member.receive_some(100) == b""
            assert edge.outbound.live_count("fabrikam.com") == 0


async def test_withdraw_keeps_trusted_partners(tmp_path: Path, pki: Pki) -> None:
    async with world() as (dns_server, nursery, dns_port):
        partner = PartnerEdge(pki, fab_server(pki, "sip.fabrikam.com"))
        await partner.start(nursery)
        dns_server.records = {
            (SRV, "SRV"): [f"10 10 {partner.port} sip.fabrikam.com."],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
        }
        config = _site(tmp_path, pki, dns_port, {"fabrikam.com": ""})
        async with running(config) as (edge, _):
            member = await member_connect(edge, pki, "sip.fabrikam.com")
            assert await roundtrip(member, b"a") == b"a"
            assert edge.outbound.withdraw({"fabrikam.com"}) == 0
            assert await roundtrip(member, b"b") == b"b"
            # Disabled by a reload: closed with partner_disabled.
            policy = tmp_path / "federation_policies" / "fabrikam.com" / "policy.toml"
            policy.write_text("enabled = false\n")
            assert edge.outbound.update(load_policies(tmp_path / "federation_policies")) == 1
            await edge.wait(1)
            assert (edge.closed[0].end, edge.closed[0].reason) == (
                "trust_withdrawn",
                "partner_disabled",
            )
            await member.aclose()


async def test_eight_mib_both_ways_intact(tmp_path: Path, pki: Pki) -> None:
    async with world() as (dns_server, nursery, dns_port):
        partner = PartnerEdge(pki, fab_server(pki, "sip.fabrikam.com"))
        await partner.start(nursery)
        dns_server.records = {
            (SRV, "SRV"): [f"10 10 {partner.port} sip.fabrikam.com."],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
        }
        config = _site(tmp_path, pki, dns_port, {"fabrikam.com": ""})
        async with running(config) as (edge, _):
            payload = random.Random(17).randbytes(8 * MiB)
            member = await member_connect(edge, pki, "sip.fabrikam.com")
            got = hashlib.sha256()
            received = 0

            async def send() -> None:
                view = memoryview(payload)
                for offset in range(0, len(payload), 256 * 1024):
                    await member.send_all(view[offset : offset + 256 * 1024])
                await member.send_eof()

            with trio.fail_after(60):
                async with trio.open_nursery() as inner:
                    inner.start_soon(send)
                    while data := await member.receive_some(65536):
                        got.update(data)
                        received += len(data)
            await member.aclose()
            await edge.wait()
            expected = hashlib.sha256(payload).hexdigest()
            assert partner.received.hexdigest() == expected  # member -> partner
            assert (received, got.hexdigest()) == (8 * MiB, expected)  # partner -> member
            assert edge.closed[0].relay_result == (8 * MiB, 8 * MiB)


async def test_registered_connections_are_withdrawn_like_relayed_ones(
    tmp_path: Path, pki: Pki
) -> None:
    # The hook another driver (outbound SIP) tracks its partner connections with.
    config = _site(tmp_path, pki, 53, {"fabrikam.com": "", "litware.com": ""})
    assert config.listeners[0].policies is not None
    outbound = Outbound(config, config.listeners[0], load_policies(config.listeners[0].policies))
    with outbound.registered("fabrikam.com") as live:
        assert outbound.live_count("fabrikam.com") == 1
        assert outbound.withdraw({"fabrikam.com", "litware.com"}) == 0
        with trio.fail_after(5), live.scope:
            assert outbound.withdraw({"litware.com"}) == 1
            await trio.sleep_forever()
        assert live.withdrawn is not None and live.withdrawn[0] == "unknown_destination"
    assert outbound.live_count("fabrikam.com") == 0
