"""Outbound federation through the running gateway (`edge run`'s Gateway, in process).

The gateway runs as a trio task of the test (tests/gateway_harness.py
`start_gateway`) with an inbound `federation` listener and an outbound
`to-partners` listener; pool members are real MTLS clients, partner edges are
real MTLS servers (tests/test_outbound.py `PartnerEdge`), and the test's own
DNS server on a loopback UDP port answers SRV and A queries (`[dns]
nameservers`). Every assertion reads what an operator sees: the log events
(`direction`, `member`, `partner_edge`, exact reason codes) and the metrics.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from edge.core.sip import Message, SipFramer
from edge.demo import write_identity
from edge.pki import CA, Leaf
from edge.tls import TLSStream, client_context
from tests.gateway_harness import InProcessEdge, start_gateway
from tests.test_outbound import DnsServer, PartnerEdge, Pki, _refused_port, refused, roundtrip
from tests.test_sip_outbound import SipPartnerEdge, sip

EDGE_PUBLIC = "edge.contoso.example"
OUT = "to-partners"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pki() -> Pki:
    enterprise = CA.root("Test Enterprise Root")
    edge_ca = CA.root("Test Edge Public CA")
    return Pki(
        enterprise=enterprise,
        edge_ca=edge_ca,
        fabrikam=CA.root("Fabrikam Root"),
        litware=CA.root("Litware Root"),
        public=edge_ca.issue(dns=[EDGE_PUBLIC]),  # serverAuth inbound, clientAuth outbound
        internal=enterprise.issue(dns=["edge.corp.test"]),  # clientAuth to pool, serverAuth
        member=enterprise.issue(dns=["fe1.corp.test"], eku=["client"]),
    )


@dataclass
class Partner:
    """One partner folder: its id, root CA, policy.toml text and CRL."""

    pid: str
    ca: CA
    policy: str = ""
    crl: bytes | None = None


@dataclass
class Site:
    edge: InProcessEdge
    dns: DnsServer
    nursery: trio.Nursery
    folder: Path
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def outbound_address(self) -> tuple[str, int]:
        host, _, port = self.edge.gateway.bound[OUT][0].rpartition(":")
        return host.strip("[]"), int(port)

    def metric(self, name: str, **labels: str) -> float | None:
        value: float | None = self.edge.gateway.metrics.registry.get_sample_value(name, labels)
        return value

    async def closed_or_rejected(self, port: int) -> dict[str, Any]:
        return await self.edge.wait_for(
            lambda e: (
                e.get("event") in ("connection_closed", "connection_rejected")
                and str(e.get("peer", "")).endswith(f":{port}")
            )
        )


def _write_site(
    folder: Path,
    pki: Pki,
    dns_port: int,
    partners: list[Partner],
    limits: str = "",
    protocol: str = "stream",
) -> Path:
    identity = write_identity(folder, pki.public, pki.internal, pki.enterprise)
    for p in partners:
        d = folder / "federation_policies" / p.pid
        d.mkdir(parents=True, exist_ok=True)
        (d / "root.pem").write_bytes(p.ca.cert_pem())
        (d / "policy.toml").write_text(p.policy or f'domains = ["{p.pid}"]\n')
        if p.crl is not None:
            (d / "partner.crl").write_bytes(p.crl)
    config = folder / "edge.toml"
    config.write_text(
        f"""{identity}
[[listeners]]
name = "federation"
address = "127.0.0.1:0"
mode = "mtls"
policies = "federation_policies"
pool = "frontend"

[[listeners]]
name = "{OUT}"
address = "127.0.0.2:0"  # port 0 twice on one address counts as a clash
mode = "outbound"
policies = "federation_policies"
pools = ["frontend"]
protocol = "{protocol}"

[[pools]]
name = "frontend"
members = [{{ host = "fe1.corp.test", address = "127.0.0.1", port = {_refused_port()} }}]

[dns]
nameservers = ["127.0.0.1:{dns_port}"]

[limits]
handshake_timeout_s = 5
{limits}

[policies]
poll_interval_s = 3600

[sip]
domains = ["corp.test"]
"""
    )
    return config


@asynccontextmanager
async def site(
    tmp_path: Path, pki: Pki, partners: list[Partner], limits: str = "", protocol: str = "stream"
) -> AsyncIterator[Site]:
    dns_server = DnsServer()
    async with trio.open_nursery() as nursery:
        dns_port = await nursery.start(dns_server.serve)
        config = _write_site(tmp_path, pki, dns_port, partners, limits, protocol)
        edge = await start_gateway(nursery, config)
        yield Site(edge, dns_server, nursery, tmp_path)
        nursery.cancel_scope.cancel()


async def member_connect(
    s: Site, pki: Pki, sni: str | None, leaf: Leaf | None = None
) -> tuple[TLSStream, int]:
    """A pool member's MTLS connection to the outbound listener; (stream, local port)."""
    leaf = leaf or pki.member
    tcp = await trio.open_tcp_stream(*s.outbound_address)
    port = tcp.socket.getsockname()[1]
    ctx = client_context([pki.enterprise.cert], leaf.chain, leaf.key)
    stream = TLSStream(tcp, ctx, server_side=False, server_hostname=sni, check_hostname=False)
    await stream.do_handshake()
    return stream, port


def srv(domain: str) -> tuple[str, str]:
    return (f"_sipfederationtls._tcp.{domain}", "SRV")


# --- tests ----------------------------------------------------------------------------------


async def test_srv_priority_failover_logs_and_metrics(tmp_path: Path, pki: Pki) -> None:
    litware_ca = pki.litware
    partners = [Partner("fabrikam.com", pki.fabrikam), Partner("litware.com", litware_ca)]
    async with site(tmp_path, pki, partners) as s:
        sip1 = PartnerEdge(pki, pki.fabrikam.issue(dns=["sip1.fabrikam.com"], eku=["server"]))
        sip2 = PartnerEdge(pki, pki.fabrikam.issue(dns=["sip2.fabrikam.com"], eku=["server"]))
        backup = PartnerEdge(pki, litware_ca.issue(dns=["sip2.litware.com"], eku=["server"]))
        for partner in (sip1, sip2, backup):
            await partner.start(s.nursery)
        s.dns.records = {
            srv("fabrikam.com"): [
                f"20 10 {sip2.port} sip2.fabrikam.com.",
                f"10 10 {sip1.port} sip1.fabrikam.com.",
            ],
            ("sip1.fabrikam.com", "A"): ["127.0.0.1"],
            ("sip2.fabrikam.com", "A"): ["127.0.0.1"],
            # litware's first choice refuses: failover inside the same connection.
            srv("litware.com"): [
                f"10 10 {_refused_port()} sip1.litware.com.",
                f"20 10 {backup.port} sip2.litware.com.",
            ],
            ("sip1.litware.com", "A"): ["127.0.0.1"],
            ("sip2.litware.com", "A"): ["127.0.0.1"],
        }
        member, port = await member_connect(s, pki, "sip.fabrikam.com")
        assert await roundtrip(member, b"OPTIONS one") == b"OPTIONS one"
        assert (
            s.metric(
                "edge_connections_active",
                listener=OUT,
                partner="fabrikam.com",
                direction="outbound",
            )
            == 1
        )
        await member.aclose()
        event = await s.closed_or_rejected(port)
        assert (sip1.app_bytes, sip2.app_bytes) == (11, 0)
        assert sip1.client_names == [EDGE_PUBLIC]  # the edge presented public_cert
        assert event["event"] == "connection_closed"
        assert (event["listener"], event["direction"], event["member"], event["partner"]) == (
            OUT,
            "outbound",
            "fe1.corp.test",
            "fabrikam.com",
        )
        assert event["partner_edge"].startswith(f"sip1.fabrikam.com:{sip1.port}")
        assert (event["bytes_to_partner"], event["bytes_from_partner"]) == (11, 11)
        assert event["end"] == "pool_closed"

        member, port = await member_connect(s, pki, "litware.com")
        assert await roundtrip(member, b"OPTIONS two") == b"OPTIONS two"
        await member.aclose()
        event = await s.closed_or_rejected(port)
        assert event["event"] == "connection_closed" and event["partner"] == "litware.com"
        assert event["partner_edge"].startswith(f"sip2.litware.com:{backup.port}")
        assert backup.app_bytes == 11

        for partner in ("fabrikam.com", "litware.com"):
            labels = {"listener": OUT, "partner": partner, "direction": "outbound"}
            assert s.metric("edge_handshakes_total", result="ok", **labels) == 1
            assert s.metric("edge_connections_active", **labels) == 0
            assert s.metric("edge_connection_duration_seconds_count", **labels) == 1
            assert s.metric("edge_bytes_total", listener=OUT, partner=partner,
                            direction="to_partner") == 11  # fmt: skip
        # Nothing went through the inbound path.
        assert (
            s.metric(
                "edge_handshakes_total",
                listener=OUT,
                partner="fabrikam.com",
                result="ok",
                direction="inbound",
            )
            is None
        )


async def test_static_edge_and_srv_target_outside_the_partners_domains(
    tmp_path: Path, pki: Pki
) -> None:
    northwind = CA.root("Northwind Root")
    adatum = CA.root("Adatum Root")
    static = PartnerEdge(pki, adatum.issue(dns=["edge.adatum.net"], eku=["server"]))
    stray = PartnerEdge(pki, northwind.issue(dns=["sip.evil.example"], eku=["server"]))
    good = PartnerEdge(pki, northwind.issue(dns=["sip.northwind.com"], eku=["server"]))
    async with trio.open_nursery() as partners_nursery:
        for partner in (static, stray, good):
            await partner.start(partners_nursery)
        partners = [
            Partner(
                "adatum.com",
                adatum,
                f'domains = ["adatum.com"]\nedge = "edge.adatum.net:{static.port}"\n',
            ),
            Partner("northwind.com", northwind),
        ]
        async with site(tmp_path, pki, partners) as s:
            s.dns.records = {
                ("edge.adatum.net", "A"): ["127.0.0.1"],
                srv("northwind.com"): [
                    f"1 10 {stray.port} sip.evil.example.",
                    f"10 10 {good.port} sip.northwind.com.",
                ],
                ("sip.evil.example", "A"): ["127.0.0.1"],
                ("sip.northwind.com", "A"): ["127.0.0.1"],
            }
            member, port = await member_connect(s, pki, "adatum.com")
            assert await roundtrip(member, b"hello") == b"hello"
            await member.aclose()
            event = await s.closed_or_rejected(port)
            assert event["event"] == "connection_closed"
            assert event["partner_edge"].startswith(f"edge.adatum.net:{static.port}")
            assert static.app_bytes == 5
            assert srv("adatum.com") not in s.dns.queries  # static edge: no SRV lookup

            member, port = await member_connect(s, pki, "sip.northwind.com")
            assert await roundtrip(member, b"ping") == b"ping"
            await member.aclose()
            event = await s.closed_or_rejected(port)
            assert event["partner_edge"].startswith(f"sip.northwind.com:{good.port}")
            assert stray.connections == 0 and good.app_bytes == 4
            assert ("sip.evil.example", "A") not in s.dns.queries
            ignored = [e for e in s.edge.events if e["event"] == "srv_target_ignored"]
            assert [(e["partner"], e["target"], e["port"]) for e in ignored] == [
                ("northwind.com", "sip.evil.example", stray.port)
            ]
        partners_nursery.cancel_scope.cancel()


async def test_partner_edges_that_must_not_be_trusted(tmp_path: Path, pki: Pki) -> None:
    tailspin = CA.root("Tailspin Root")
    wingtip = CA.root("Wingtip Root")
    woodgrove = CA.root("Woodgrove Root")
    revoked_leaf = woodgrove.issue(dns=["sip.woodgrove.com"], eku=["server"])
    crl = woodgrove.crl([revoked_leaf.cert.serial_number]).public_bytes(Encoding.PEM)
    edges = {
        # A certificate from another (trusted) partner's root: fabrikam's CA vouching
        # for tailspin's name.
        "tailspin.com": (
            PartnerEdge(pki, pki.fabrikam.issue(dns=["sip.tailspin.com"], eku=["server"])),
            "unknown_ca: ",
        ),
        "wingtip.com": (
            PartnerEdge(pki, wingtip.issue(dns=["www.wingtip.com"], eku=["server"])),
            "name_mismatch: ",
        ),
        "woodgrove.com": (PartnerEdge(pki, revoked_leaf), "revoked: "),
    }
    partners = [
        Partner("fabrikam.com", pki.fabrikam),
        Partner("tailspin.com", tailspin),
        Partner("wingtip.com", wingtip),
        Partner("woodgrove.com", woodgrove, crl=crl),
        Partner("litware.com", pki.litware),
    ]
    async with site(tmp_path, pki, partners) as s:
        records: dict[tuple[str, str], list[str]] = {}
        for domain, (partner, _) in edges.items():
            await partner.start(s.nursery)
            records[srv(domain)] = [f"10 10 {partner.port} sip.{domain}."]
            records[(f"sip.{domain}", "A")] = ["127.0.0.1"]
        # litware.com: its only edge refuses connections.
        records[srv("litware.com")] = [f"10 10 {_refused_port()} sip.litware.com."]
        records[("sip.litware.com", "A")] = ["127.0.0.1"]
        s.dns.records = records
        for domain, (partner, code) in edges.items():
            member, port = await member_connect(s, pki, f"sip.{domain}")
            await refused(member)
            event = await s.closed_or_rejected(port)
            assert event["event"] == "connection_rejected", event
            assert (event["reason"], event["direction"], event["partner"]) == (
                "partner_untrusted",
                "outbound",
                domain,
            )
            assert event["detail"].startswith(code), event["detail"]
            assert event["member"] == "fe1.corp.test"
            assert event["partner_edge"].startswith(f"sip.{domain}:{partner.port}")
            # The partner's edge finished a handshake and never got a member byte.
            assert (partner.handshakes, partner.app_bytes) == (1, 0)
            assert (
                s.metric(
                    "edge_handshakes_total",
                    listener=OUT,
                    partner=domain,
                    result="partner_untrusted",
                    direction="outbound",
                )
                == 1
            )
        member, port = await member_connect(s, pki, "litware.com")
        await refused(member)
        event = await s.closed_or_rejected(port)
        assert (event["reason"], event["partner"]) == ("partner_unreachable", "litware.com")
        assert (
            s.metric(
                "edge_handshakes_total",
                listener=OUT,
                partner="litware.com",
                result="partner_unreachable",
                direction="outbound",
            )
            == 1
        )


async def test_members_the_edge_refuses(tmp_path: Path, pki: Pki) -> None:
    async with site(tmp_path, pki, [Partner("fabrikam.com", pki.fabrikam)]) as s:
        partner = PartnerEdge(pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"], eku=["server"]))
        await partner.start(s.nursery)
        s.dns.records = {
            srv("fabrikam.com"): [f"10 10 {partner.port} sip.fabrikam.com."],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
        }
        # The enterprise CA issued it, but fe7 is no member of the frontend pool.
        fe7 = pki.enterprise.issue(dns=["fe7.corp.test"], eku=["client"])
        member, port = await member_connect(s, pki, "sip.fabrikam.com", fe7)
        await refused(member)
        event = await s.closed_or_rejected(port)
        assert (event["event"], event["reason"], event["direction"]) == (
            "connection_rejected",
            "not_in_topology",
            "outbound",
        )
        assert "fe7.corp.test" in event["detail"] and "member" not in event

        member, port = await member_connect(s, pki, None)  # no SNI
        await refused(member)
        event = await s.closed_or_rejected(port)
        assert (event["reason"], event["member"]) == ("unknown_destination", "fe1.corp.test")

        # A partner's certificate on the outbound listener: refused in the handshake,
        # never taken for an inbound partner connection.
        stranger = pki.fabrikam.issue(dns=["fe1.corp.test"], eku=["client"])
        with suppress(trio.BrokenResourceError):
            member, port = await member_connect(s, pki, "sip.fabrikam.com", stranger)
            await refused(member)
        event = await s.edge.wait_for(
            lambda e: e.get("event") == "connection_rejected" and e.get("reason") == "tls_error"
        )
        assert (event["listener"], event["direction"]) == (OUT, "outbound")

        assert partner.connections == 0
        unknown = {"listener": OUT, "partner": "unknown", "direction": "outbound"}
        assert s.metric("edge_handshakes_total", result="not_in_topology", **unknown) == 1
        assert s.metric("edge_handshakes_total", result="unknown_destination", **unknown) == 1
        assert s.metric("edge_handshakes_total", result="tls_error", **unknown) == 1


async def test_partner_removed_while_connected_is_closed_by_the_reload(
    tmp_path: Path, pki: Pki
) -> None:
    partners = [Partner("fabrikam.com", pki.fabrikam), Partner("litware.com", pki.litware)]
    async with site(tmp_path, pki, partners) as s:
        partner = PartnerEdge(pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"], eku=["server"]))
        await partner.start(s.nursery)
        s.dns.records = {
            srv("fabrikam.com"): [f"10 10 {partner.port} sip.fabrikam.com."],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
        }
        member, port = await member_connect(s, pki, "sip.fabrikam.com")
        assert await roundtrip(member, b"REGISTER") == b"REGISTER"
        shutil.rmtree(tmp_path / "federation_policies" / "fabrikam.com")
        # One poll of the reloader (what every poll_interval_s runs) closes it.
        await s.edge.gateway.poll_once()
        reloaded = await s.edge.wait_for(lambda e: e.get("event") == "policies_reloaded")
        assert reloaded["removed"] == ["fabrikam.com"]
        event = await s.closed_or_rejected(port)
        assert (event["event"], event["end"], event["reason"]) == (
            "connection_closed",
            "trust_withdrawn",
            "unknown_destination",
        )
        assert (event["direction"], event["member"], event["partner"]) == (
            "outbound",
            "fe1.corp.test",
            "fabrikam.com",
        )
        assert event["bytes_to_partner"] == 8
        with trio.fail_after(5), suppress(trio.BrokenResourceError):
            assert await member.receive_some(100) == b""
        await member.aclose()
        assert (
            s.metric(
                "edge_connections_active",
                listener=OUT,
                partner="fabrikam.com",
                direction="outbound",
            )
            == 0
        )


async def test_eight_mib_both_ways_intact_through_the_gateway(tmp_path: Path, pki: Pki) -> None:
    async with site(tmp_path, pki, [Partner("fabrikam.com", pki.fabrikam)]) as s:
        partner = PartnerEdge(pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"], eku=["server"]))
        await partner.start(s.nursery)
        s.dns.records = {
            srv("fabrikam.com"): [f"10 10 {partner.port} sip.fabrikam.com."],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
        }
        payload = random.Random(17).randbytes(8 * MiB)
        member, port = await member_connect(s, pki, "sip.fabrikam.com")
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
        event = await s.closed_or_rejected(port)
        expected = hashlib.sha256(payload).hexdigest()
        assert partner.received.hexdigest() == expected  # member -> partner
        assert (received, got.hexdigest()) == (8 * MiB, expected)  # partner -> member
        assert (event["bytes_to_partner"], event["bytes_from_partner"]) == (8 * MiB, 8 * MiB)
        for direction in ("to_partner", "from_partner"):
            assert (
                s.metric(
                    "edge_bytes_total", listener=OUT, partner="fabrikam.com", direction=direction
                )
                == 8 * MiB
            )


async def test_shutdown_drains_then_closes_outbound_connections(tmp_path: Path, pki: Pki) -> None:
    fabrikam = [Partner("fabrikam.com", pki.fabrikam)]
    async with site(tmp_path, pki, fabrikam, limits="drain_timeout_s = 0.5") as s:
        partner = PartnerEdge(pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"], eku=["server"]))
        await partner.start(s.nursery)
        s.dns.records = {
            srv("fabrikam.com"): [f"10 10 {partner.port} sip.fabrikam.com."],
            ("sip.fabrikam.com", "A"): ["127.0.0.1"],
        }
        member, port = await member_connect(s, pki, "sip.fabrikam.com")
        assert await roundtrip(member, b"SUBSCRIBE") == b"SUBSCRIBE"
        s.edge.gateway.request_shutdown("test")
        started = await s.edge.wait_for(lambda e: e.get("event") == "shutdown_started")
        assert started["active_connections"] == 1  # the outbound one counts
        # The drain waited for it, then closed it: one connection_closed, end=shutdown.
        timeout = await s.edge.wait_for(lambda e: e.get("event") == "drain_timeout")
        assert timeout["closing"] == 1
        event = await s.closed_or_rejected(port)
        assert (event["event"], event["end"], event["direction"]) == (
            "connection_closed",
            "shutdown",
            "outbound",
        )
        assert (event["member"], event["partner"]) == ("fe1.corp.test", "fabrikam.com")
        await s.edge.wait_for(lambda e: e.get("event") == "gateway_stopped")
        await member.aclose()


async def test_sip_outbound_listener_routes_each_request_through_the_gateway(
    tmp_path: Path, pki: Pki
) -> None:
    # Issue 21 through `edge run`'s rooms: one member connection on a
    # protocol = "sip" outbound listener, requests routed by Request-URI, the
    # partner's 200 back on the member's connection, events and metrics.
    fab = SipPartnerEdge(
        pki,  # type: ignore[arg-type]  # the same fields the SIP test's Pki has
        pki.fabrikam.issue(dns=["sip.fabrikam.com"], eku=["server"]),
        "fabrikam",
    )
    async with trio.open_nursery() as partners_nursery:
        await fab.start(partners_nursery)
        partners = [
            Partner(
                "fabrikam.com",
                pki.fabrikam,
                f'domains = ["fabrikam.com"]\nedge = "sip.fabrikam.com:{fab.port}"\n',
            )
        ]
        async with site(tmp_path, pki, partners, protocol="sip") as s:
            s.dns.records = {("sip.fabrikam.com", "A"): ["127.0.0.1"]}
            member, _ = await member_connect(s, pki, None)
            request = sip("sip:bob@fabrikam.com", from_uri="sip:alice@corp.test")
            await member.send_all(request)
            framer = SipFramer()
            with trio.fail_after(10):
                answer = None
                while answer is None:
                    data = await member.receive_some(65536)
                    assert data, "the edge closed the member's connection"
                    framer.feed(data)
                    event = framer.next_event()
                    if isinstance(event, Message):
                        answer = event
            assert answer.head.status_code == 200 and answer.headers.get("server") == "fabrikam"
            assert bytes(fab.received) == request  # byte for byte, nothing rewritten
            # A forged From goes nowhere: the edge answers 403 itself.
            await member.send_all(
                sip("sip:bob@fabrikam.com", from_uri="sip:ceo@fabrikam.com", call_id="c2")
            )
            with trio.fail_after(10):
                answer = None
                while answer is None:
                    event = framer.next_event()
                    if isinstance(event, Message):
                        answer = event
                        break
                    data = await member.receive_some(65536)
                    assert data
                    framer.feed(data)
            assert answer.head.status_code == 403
            assert bytes(fab.received) == request
            await member.aclose()
            pool_closed = await s.edge.wait_for(
                lambda e: (
                    e.get("event") == "connection_closed"
                    and e.get("direction") == "outbound"
                    and "partner" not in e
                )
            )
            assert pool_closed["member"] == "fe1.corp.test"
            partner_closed = await s.edge.wait_for(
                lambda e: (
                    e.get("event") == "connection_closed" and e.get("partner") == "fabrikam.com"
                )
            )
            assert partner_closed["partner_edge"].startswith("sip.fabrikam.com:")
            rejected = [e for e in s.edge.events if e["event"] == "sip_rejected"]
            assert [(e["reason"], e["offending_domain"], e["answered"]) for e in rejected] == [
                ("sip_domain_mismatch", "fabrikam.com", 403)
            ]
            labels = {"listener": OUT, "partner": "fabrikam.com", "direction": "to_partner"}
            assert s.metric("edge_sip_messages_total", **labels, result="relayed") == 1
            # Refused before routing: the pool spoke for a domain not ours, no partner yet.
            mismatch = {**labels, "partner": "unknown", "result": "sip_domain_mismatch"}
            assert s.metric("edge_sip_messages_total", **mismatch) == 1
            from_labels = {**labels, "direction": "from_partner"}
            assert s.metric("edge_sip_messages_total", **from_labels, result="relayed") == 1
            assert s.metric(
                "edge_bytes_total", listener=OUT, partner="fabrikam.com", direction="to_partner"
            ) == len(request)
        partners_nursery.cancel_scope.cancel()


async def test_outbound_connections_count_in_max_connections(tmp_path: Path, pki: Pki) -> None:
    # max_connections bounds the whole gateway: a live outbound connection takes
    # the one slot, so an inbound connection is refused at accept (over_limit).
    edge_leaf = pki.fabrikam.issue(dns=["edge.fabrikam.com"], eku=["server"])
    partner_edge = PartnerEdge(pki, edge_leaf)
    async with trio.open_nursery() as partners_nursery:
        await partner_edge.start(partners_nursery)
        policy = f'domains = ["fabrikam.com"]\nedge = "edge.fabrikam.com:{partner_edge.port}"\n'
        partners = [Partner("fabrikam.com", pki.fabrikam, policy)]
        async with site(tmp_path, pki, partners, limits="max_connections = 1") as s:
            s.dns.records = {("edge.fabrikam.com", "A"): ["127.0.0.1"]}
            member, _ = await member_connect(s, pki, "fabrikam.com")
            assert await roundtrip(member, b"hold") == b"hold"  # live, relaying
            host, _, port = s.edge.gateway.bound["federation"][0].rpartition(":")
            inbound = await trio.open_tcp_stream(host.strip("[]"), int(port))
            inbound_port = inbound.socket.getsockname()[1]
            refused_event = await s.closed_or_rejected(inbound_port)
            assert (refused_event["event"], refused_event["reason"]) == (
                "connection_rejected",
                "over_limit",
            )
            assert "max_connections=1" in refused_event["detail"]
            await inbound.aclose()
            assert await roundtrip(member, b"still") == b"still"
            await member.aclose()
        partners_nursery.cancel_scope.cancel()
