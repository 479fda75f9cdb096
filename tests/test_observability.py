"""What an operator sees: metrics and the audit log after scripted traffic.

Each end-to-end test drives a real `edge run` subprocess over loopback MTLS
(tests/gateway_harness.py), then scrapes `/metrics` and reads the JSON log.
Counters are asserted exactly: the script knows how many connections of each
kind it made, so any drift (a double count, a lost one) is a bug.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from edge.core.config import load_config
from edge.demo import EchoMember
from edge.gateway import Gateway
from edge.logs import EventLog
from edge.metrics import Metrics
from edge.pki import CA, Leaf
from edge.tls import TLSStream, client_context
from tests.gateway_harness import (
    EDGE_NAME,
    NOW,
    EdgeProcess,
    Pki,
    echo_roundtrip,
    http_get,
    partner_stream,
    sample,
    scrape,
    series,
    start_edge,
    start_pool,
    write_federation,
)

POOL = ("fe1.corp.test", "fe2.corp.test")
FED = "federation"
IN = "inbound"  # the direction label of partner connections

# docs/reference/log-events.md: what each final event must carry.
CLOSED_FIELDS = (
    "listener",
    "partner",
    "peer",
    "leaf_subject",
    "fingerprint_sha256",
    "member",
    "bytes_from_partner",
    "bytes_to_partner",
    "duration_s",
    "end",
)
REJECTED_FIELDS = ("listener", "peer", "reason", "detail")


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.make()


async def _stop(edge: EdgeProcess) -> None:
    edge.terminate()
    with trio.fail_after(15):
        assert await edge.process.wait() == 0


async def _refused(edge: EdgeProcess, pki: Pki, leaf: Leaf | None) -> int:
    """A connection the gateway must refuse; returns its source port."""
    ctx = client_context(
        [pki.edge_ca.cert], leaf.chain if leaf else None, leaf.key if leaf else None
    )
    tcp = await trio.open_tcp_stream(*edge.address)
    port: int = tcp.socket.getsockname()[1]
    stream = TLSStream(tcp, ctx, server_side=False, server_hostname=EDGE_NAME)
    try:
        await stream.do_handshake()
        # TLS 1.3: the refusal shows on the first read.
        await stream.send_all(b"let me in")
        with trio.move_on_after(5):
            assert await stream.receive_some(100) == b"", "a refused partner got data back"
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    await trio.aclose_forcefully(stream)
    return port


def _final_events(edge: EdgeProcess, port: int) -> list[dict[str, object]]:
    suffix = f":{port}"
    return [
        e
        for e in edge.events
        if e["event"] in ("connection_closed", "connection_rejected")
        and str(e.get("peer", "")).endswith(suffix)
    ]


async def test_scripted_traffic_counters_bytes_active_and_log(tmp_path: Path, pki: Pki) -> None:
    policies = {
        "fabrikam.com": 'domains = ["fabrikam.com"]\n',
        "litware.com": 'domains = ["litware.com"]\nmax_connections = 1\n',
    }
    fabrikam = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
    litware = pki.litware.issue(dns=["sip.litware.com"])
    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            pool = await start_pool(nursery, pki, POOL)
            config = write_federation(
                tmp_path, pki, [(h, p) for h, p, _ in pool], policies=policies
            )
            edge = await start_edge(nursery, config)
            closed_ports: dict[int, tuple[str, int]] = {}  # port -> (partner, payload size)
            rejected_ports: dict[int, str] = {}  # port -> expected reason

            async def relayed(partner: str, leaf: Leaf, size: int) -> None:
                stream, port = await partner_stream(edge, pki, leaf)
                payload = os.urandom(size)
                assert await echo_roundtrip(stream, payload) == payload
                await stream.aclose()
                closed_ports[port] = (partner, size)
                await edge.event_for_port(port, "connection_closed")

            # Five relayed connections, sizes chosen to span several 64 KiB chunks.
            for size in (1_000, 20_000, 300_000):
                await relayed("fabrikam.com", fabrikam, size)
            await relayed("litware.com", litware, 5_000)

            # A held connection: the active gauge shows it while it is open...
            held, held_port = await partner_stream(edge, pki, litware)
            assert await echo_roundtrip(held, b"x" * 70_000) == b"x" * 70_000
            now = await scrape(edge)
            active = "edge_connections_active"
            assert sample(now, active, listener=FED, partner="litware.com", direction=IN) == 1
            assert sample(now, active, listener=FED, partner="fabrikam.com", direction=IN) == 0
            # ...and litware (max_connections = 1) is refused a second one.
            rejected_ports[await _refused(edge, pki, litware)] = "over_limit"
            await held.aclose()
            closed_ports[held_port] = ("litware.com", 70_000)
            await edge.event_for_port(held_port, "connection_closed")

            # Refusals: strangers, a partner's CA naming another partner, an expired
            # leaf, no certificate at all.
            rejected_ports[await _refused(edge, pki, pki.stranger.issue(dns=["a.test"]))] = (
                "unknown_ca"
            )
            rejected_ports[await _refused(edge, pki, pki.stranger.issue(dns=["b.test"]))] = (
                "unknown_ca"
            )
            rejected_ports[
                await _refused(edge, pki, pki.fabrikam.issue(dns=["sip.litware.com"]))
            ] = "name_mismatch"
            expired = pki.fabrikam.issue(
                dns=["sip.fabrikam.com"],
                not_before=NOW - _dt.timedelta(days=10),
                not_after=NOW - _dt.timedelta(days=1),
            )
            rejected_ports[await _refused(edge, pki, expired)] = "expired"
            rejected_ports[await _refused(edge, pki, None)] = "no_client_cert"
            for port in rejected_ports:
                await edge.event_for_port(port, "connection_rejected")
            after = await scrape(edge)
            await _stop(edge)
            nursery.cancel_scope.cancel()

    # Exact counters per partner and result. A chain no partner's root verified
    # (unknown_ca) and no cert count under "unknown"; a refusal after the
    # partner's own root verified the chain (expired, name_mismatch: issue 16
    # item 4) and over_limit know their partner.
    handshakes = {
        (dict(labels)["partner"], dict(labels)["result"]): v
        for labels, v in series(after, "edge_handshakes_total").items()
        if v
    }
    assert handshakes == {
        ("fabrikam.com", "ok"): 3,
        ("litware.com", "ok"): 2,
        ("litware.com", "over_limit"): 1,
        ("unknown", "unknown_ca"): 2,
        ("fabrikam.com", "name_mismatch"): 1,
        ("fabrikam.com", "expired"): 1,
        ("unknown", "no_client_cert"): 1,
    }
    # The active gauge is back to 0 once everything closed.
    assert (
        sample(after, "edge_connections_active", listener=FED, partner="litware.com", direction=IN)
        == 0
    )
    # Bytes: application bytes each way (the echo returns all of them), and
    # the log's per-connection numbers add up to the counters.
    closed = {p: _final_events(edge, p) for p in closed_ports}
    for partner in ("fabrikam.com", "litware.com"):
        scripted = sum(size for name, size in closed_ports.values() if name == partner)
        logged = sum(
            int(str(e[0]["bytes_from_partner"]))
            for e in closed.values()
            if e[0]["partner"] == partner
        )
        for direction in ("from_partner", "to_partner"):
            got = sample(
                after, "edge_bytes_total", listener=FED, partner=partner, direction=direction
            )
            assert got == pytest.approx(scripted, rel=0.001), (partner, direction)
            assert got == logged
    # Histograms count what happened.
    for partner, n in (("fabrikam.com", 3), ("litware.com", 2)):
        count = sample(
            after,
            "edge_connection_duration_seconds_count",
            listener=FED,
            partner=partner,
            direction=IN,
        )
        assert count == n
    assert sample(after, "edge_upstream_connect_duration_seconds_count", pool="frontend") == 5
    assert not any(series(after, "edge_upstream_errors_total").values())
    # Round robin reached both members, so both are up.
    for host in POOL:
        assert sample(after, "edge_pool_member_up", pool="frontend", member=host) == 1
    handshake_count = sample(after, "edge_handshake_duration_seconds_count", listener=FED)
    assert handshake_count is not None and handshake_count >= 5 + 1 + 4

    # Exactly one final event per connection, with every documented field.
    for port, (partner, size) in closed_ports.items():
        events = closed[port]
        assert len(events) == 1, events
        event = events[0]
        assert event["event"] == "connection_closed"
        for name in CLOSED_FIELDS:
            assert event.get(name) is not None, (name, event)
        assert event["partner"] == partner
        assert event["bytes_from_partner"] == event["bytes_to_partner"] == size
        assert event["member"] in POOL
        assert event["listener"] == FED
        leaf = fabrikam if partner == "fabrikam.com" else litware
        fingerprint = hashlib.sha256(leaf.cert.public_bytes(serialization.Encoding.DER))
        assert event["fingerprint_sha256"] == fingerprint.hexdigest()
    for port, reason in rejected_ports.items():
        events = _final_events(edge, port)
        assert len(events) == 1, events
        event = events[0]
        assert event["event"] == "connection_rejected"
        for name in REJECTED_FIELDS:
            assert event.get(name), (name, event)
        assert event["reason"] == reason
    finals = [e for e in edge.events if e["event"] in ("connection_closed", "connection_rejected")]
    assert len(finals) == len(closed_ports) + len(rejected_ports)
    # Never a private key or a payload byte in the log.
    text = str(edge.events)
    assert "PRIVATE KEY" not in text and "let me in" not in text and "xxxx" not in text


async def test_thirty_strangers_add_no_series(tmp_path: Path, pki: Pki) -> None:
    """A flood of strangers, each from its own CA with its own names: one series."""
    strangers = [
        CA.root(f"Stranger {i} Root").issue(dns=[f"sip{i}.stranger{i}.test", "sip.fabrikam.com"])
        for i in range(31)
    ]
    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            pool = await start_pool(nursery, pki, POOL)
            config = write_federation(tmp_path, pki, [(h, p) for h, p, _ in pool])
            edge = await start_edge(nursery, config)
            await edge.event_for_port(
                await _refused(edge, pki, strangers[0]), "connection_rejected"
            )
            before = await scrape(edge)
            ports = []
            for leaf in strangers[1:]:
                ports.append(await _refused(edge, pki, leaf))
            for port in ports:
                await edge.event_for_port(port, "connection_rejected")
            after = await scrape(edge)
            await _stop(edge)
            nursery.cancel_scope.cancel()

    def edge_series(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> set[object]:
        return {key for key in samples if key[0].startswith("edge_")}

    assert edge_series(after) == edge_series(before)
    unknown = sample(
        after,
        "edge_handshakes_total",
        listener=FED,
        partner="unknown",
        result="unknown_ca",
        direction=IN,
    )
    assert unknown == 31
    partners = {dict(labels)["partner"] for labels in series(after, "edge_handshakes_total")}
    assert partners <= {"fabrikam.com", "litware.com", "unknown"}


async def test_expiry_gauges_equal_not_after(tmp_path: Path, pki: Pki) -> None:
    next_update = (NOW + _dt.timedelta(days=3)).replace(microsecond=0)
    crl = pki.fabrikam.crl(next_update=next_update)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            config = write_federation(tmp_path, pki, [("fe1.corp.test", 1)])
            crl_file = tmp_path / "federation_policies" / "fabrikam.com" / "fabrikam.crl"
            crl_file.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
            edge = await start_edge(nursery, config)
            got = await scrape(edge)
            await _stop(edge)
            nursery.cancel_scope.cancel()

    def subject(cert: x509.Certificate) -> str:
        return cert.subject.rfc4514_string()

    expected = {
        ("public", "", subject(c)): c.not_valid_after_utc.timestamp() for c in pki.public.chain
    }
    expected |= {
        ("internal", "", subject(c)): c.not_valid_after_utc.timestamp() for c in pki.internal.chain
    }
    expected[("internal_root", "", subject(pki.enterprise.cert))] = (
        pki.enterprise.cert.not_valid_after_utc.timestamp()
    )
    for pid, root in (("fabrikam.com", pki.fabrikam.cert), ("litware.com", pki.litware_root.cert)):
        expected[("partner_root", pid, subject(root))] = root.not_valid_after_utc.timestamp()
    exported = {
        (dict(k)["role"], dict(k)["partner"], dict(k)["subject"]): v
        for k, v in series(got, "edge_certificate_expiry_timestamp_seconds").items()
    }
    assert exported == expected
    crls = series(got, "edge_crl_next_update_timestamp_seconds")
    assert crls == {
        frozenset({("partner", "fabrikam.com"), ("issuer", subject(pki.fabrikam.cert))}): (
            next_update.timestamp()
        )
    }
    assert sample(got, "edge_partners", state="enabled") == 2
    assert sample(got, "edge_partners", state="disabled") == 0
    assert sample(got, "edge_partners", state="broken") == 0
    # prometheus-client's own collectors stay on.
    assert sample(got, "process_cpu_seconds_total") is not None
    assert any(name.startswith("python_info") for name, _ in got)


def test_reload_export_removes_vanished_partners(tmp_path: Path, pki: Pki) -> None:
    """export_reload_metrics is idempotent and drops series of removed partners."""
    config_path = write_federation(tmp_path, pki, [("fe1.corp.test", 1)])
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    gateway = Gateway(load_config(config_path), EventLog(sink=lambda _e: None), metrics)
    gateway.log.enabled = False
    gateway.load_policies()
    litware = ("partner_root", "litware.com", pki.litware_root.cert.subject.rfc4514_string())

    def expiry_labels() -> set[tuple[str, ...]]:
        return {
            (s.labels["role"], s.labels["partner"], s.labels["subject"])
            for family in metrics.certificate_expiry.collect()
            for s in family.samples
        }

    assert litware in expiry_labels()
    first = expiry_labels()
    gateway.export_reload_metrics()
    assert expiry_labels() == first
    # Simulate a reload without litware.com's folder: its root's series goes.
    (tmp_path / "federation_policies" / "litware.com" / "root.pem").unlink()
    (tmp_path / "federation_policies" / "litware.com" / "policy.toml").unlink()
    (tmp_path / "federation_policies" / "litware.com").rmdir()
    gateway.load_policies()
    assert expiry_labels() == first - {litware}
    assert registry.get_sample_value("edge_partners", {"state": "enabled"}) == 1
    assert registry.get_sample_value("edge_policy_reloads_total", {"result": "error"}) == 0


async def _partner_attempt(edge: EdgeProcess, pki: Pki, leaf: Leaf) -> None:
    """One partner connection (relayed or refused): traffic that exercises the pool."""
    try:
        stream, _ = await partner_stream(edge, pki, leaf)
        with trio.move_on_after(2):
            await echo_roundtrip(stream, b"ping")
        await trio.aclose_forcefully(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _readyz_until(
    edge: EdgeProcess, pki: Pki, leaf: Leaf, status: int, timeout: float
) -> str:
    """Poll /readyz (with partner traffic between polls) until it answers ``status``."""
    with trio.fail_after(timeout):
        while True:
            got, body = await http_get(edge.metrics_address, "/readyz")
            if got == status:
                return body
            await _partner_attempt(edge, pki, leaf)
            await trio.sleep(0.2)


async def test_readyz_follows_pool_members(tmp_path: Path, pki: Pki) -> None:
    """All members down -> 503 with a short reason; one back -> 200."""
    leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            members: list[tuple[str, int, EchoMember, trio.CancelScope]] = []

            async def serve(member: EchoMember, port: int, scope: trio.CancelScope) -> int:
                async def run(task_status: trio.TaskStatus[int]) -> None:
                    with scope:
                        await member.serve(port=port, task_status=task_status)

                started: int = await nursery.start(run)
                return started

            for host in POOL:
                m_leaf = pki.member_leaf(host)
                member = EchoMember(m_leaf.chain, m_leaf.key, [pki.enterprise.cert])
                scope = trio.CancelScope()
                members.append((host, await serve(member, 0, scope), member, scope))
            config = write_federation(tmp_path, pki, [(h, p) for h, p, _, _ in members])
            edge = await start_edge(nursery, config)
            await _readyz_until(edge, pki, leaf, 200, timeout=5)
            for *_, scope in members:
                scope.cancel()
            body = await _readyz_until(edge, pki, leaf, 503, timeout=8)
            assert body.strip()  # a short reason
            host, port, member, _ = members[0]
            await serve(member, port, trio.CancelScope())
            await _readyz_until(edge, pki, leaf, 200, timeout=8)
            await _stop(edge)
            nursery.cancel_scope.cancel()


DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_dashboard_and_rules_name_only_exported_metrics() -> None:
    """A renamed metric must not silently blank a panel or mute an alert."""
    import json
    import re

    registry = CollectorRegistry()
    Metrics(registry)
    known: set[str] = set()
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    for family in registry.collect():
        # The family name too: descriptions may name a histogram as a whole.
        known |= {family.name} | {family.name + s for s in suffixes[family.type]}
    rules = (DEPLOY / "prometheus" / "edge.rules.yml").read_text()
    recorded = set(re.findall(r"record: (edge:[a-z0-9_:]+)", rules))
    dashboard_text = (DEPLOY / "grafana" / "dashboards" / "edge.json").read_text()
    dashboard = json.loads(dashboard_text)
    assert dashboard["uid"] == "edge-gateway"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs and all(exprs)
    for text in (rules, dashboard_text):
        assert set(re.findall(r"\bedge_[a-z_]+", text)) <= known
        assert set(re.findall(r"\bedge:[a-z0-9_:]+", text)) <= recorded
