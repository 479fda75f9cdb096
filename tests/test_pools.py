"""Pools: the balancer and health machine as pure functions, then the real thing.

The first half runs the sans-I/O decisions of ``edge.core.balance`` in microseconds.
The second half runs real members (MTLS on 127.0.0.1), a real DNS server
(dnspython's message parsing and rendering on a loopback UDP port, serving
records the test changes while the edge runs) and, end to end, the
whole gateway in this process.
"""

from __future__ import annotations

import io
import random
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import CollectorRegistry
from proxyprotocol.result import ProxyResult, ProxyResultIPv4
from proxyprotocol.v2 import ProxyProtocolV2

from edge.core.balance import Candidate, Health, advance, choose, observe, refresh_delay
from edge.core.config import load_config
from edge.core.proxy_protocol import PP2_TYPE_EDGE_PARTNER
from edge.core.snapshot import build_snapshot
from edge.logs import EventLog
from edge.metrics import Metrics
from edge.pki import Leaf
from edge.pools import PoolSet, UpstreamUnavailable
from edge.tls import TLSStream, client_context, server_context
from tests.gateway_harness import (
    EDGE_NAME,
    Pki,
    echo_roundtrip,
    partner_stream,
    start_gateway,
    stop_edge,
    write_federation,
)

# ----------------------------------------------------------------------
# Core: pure decisions


def _simulate(
    weights: dict[str, int],
    balance: str,
    picks: int,
    *,
    hold: int = 0,
    seed: int = 7,
) -> Counter[str]:
    """Pick ``picks`` times; each connection lives for ``hold`` later picks on average."""
    rng = random.Random(seed)
    active: Counter[str] = Counter()
    passes: dict[str, float] = dict.fromkeys(weights, 0.0)
    live: list[str] = []
    chosen_count: Counter[str] = Counter()
    for _ in range(picks):
        cands = [
            Candidate(key=k, weight=w, active=active[k], passes=passes[k])
            for k, w in weights.items()
        ]
        c = choose(cands, balance)  # type: ignore[arg-type]
        assert c is not None
        passes[str(c.key)] = advance(c)
        chosen_count[str(c.key)] += 1
        active[str(c.key)] += 1
        live.append(str(c.key))
        # Connections end at random, so the pool holds about `hold` of them.
        while len(live) > hold:
            ended = live.pop(rng.randrange(len(live)))
            active[ended] -= 1
    return chosen_count


def _within(counts: Counter[str], weights: dict[str, int], tolerance: float) -> None:
    total = sum(counts.values())
    weight_sum = sum(weights.values())
    for key, weight in weights.items():
        expected = total * weight / weight_sum
        assert abs(counts[key] - expected) <= tolerance * expected, (key, counts, expected)


def test_weights_hold_over_1000_connections() -> None:
    weights = {"fe1": 1, "fe2": 2, "fe3": 3, "fe4": 4}
    for balance in ("least_connections", "round_robin"):
        for hold in (0, 5, 50, 2000):  # short-lived to never-ending connections
            _within(_simulate(weights, balance, 1000, hold=hold), weights, 0.10)
    # Idle members and short connections: exactly proportional.
    assert _simulate(weights, "round_robin", 1000) == Counter(
        {"fe1": 100, "fe2": 200, "fe3": 300, "fe4": 400}
    )


def test_least_connections_prefers_the_idle_member() -> None:
    cands = [
        Candidate(key="busy", weight=1, active=10, passes=5.0),
        Candidate(key="idle", weight=1, active=0, passes=6.0),
    ]
    chosen = choose(cands, "least_connections")
    assert chosen is not None and chosen.key == "idle"
    # Round robin ignores the load, goes by pass.
    chosen = choose(cands, "round_robin")
    assert chosen is not None and chosen.key == "busy"
    # Weighted: 10 connections on weight 10 is lighter than 2 on weight 1.
    cands = [Candidate(key="big", weight=10, active=10), Candidate(key="small", weight=1, active=2)]
    chosen = choose(cands, "least_connections")
    assert chosen is not None and chosen.key == "big"


def test_least_connections_steers_around_a_member_that_holds_connections() -> None:
    """One member never finishes its connections: it gets far fewer new ones."""
    active: Counter[str] = Counter()
    passes = {"slow": 0.0, "fast1": 0.0, "fast2": 0.0}
    picks: Counter[str] = Counter()
    for _ in range(300):
        cands = [Candidate(key=k, weight=1, active=active[k], passes=passes[k]) for k in passes]
        c = choose(cands, "least_connections")
        assert c is not None
        key = str(c.key)
        passes[key] = advance(c)
        picks[key] += 1
        if key == "slow":
            active[key] += 1  # the fast members finish at once
    assert picks["slow"] < 300 / 3 / 2, picks


def test_eligibility_down_full_unroutable_excluded() -> None:
    cands = [
        Candidate(key="down", weight=1, up=False),
        Candidate(key="full", weight=1, active=3, max_connections=3),
        Candidate(key="noaddr", weight=1, routable=False),
        Candidate(key="tried", weight=1),
    ]
    assert choose(cands, "least_connections", ["tried"]) is None
    ok = choose(cands, "least_connections")
    assert ok is not None and ok.key == "tried"
    # Last resort: the members out of rotation, still not full or unroutable ones.
    last = choose(cands, "least_connections", ["tried"], down=True)
    assert last is not None and last.key == "down"


def test_srv_priority_and_zero_weight() -> None:
    cands = [
        Candidate(key="backup", weight=100, priority=20),
        Candidate(key="zero", weight=0, priority=10),
        Candidate(key="main", weight=5, priority=10),
    ]
    for _ in range(3):
        chosen = choose(cands, "least_connections")
        assert chosen is not None and chosen.key == "main"
    # Weight 0 serves when nothing else of its priority can; then the next priority.
    chosen = choose(cands, "least_connections", ["main"])
    assert chosen is not None and chosen.key == "zero"
    chosen = choose(cands, "least_connections", ["main", "zero"])
    assert chosen is not None and chosen.key == "backup"


def test_health_machine_thresholds() -> None:
    h = Health()
    assert h.up
    h = observe(h, False, unhealthy_after=3, healthy_after=2)
    h = observe(h, False, unhealthy_after=3, healthy_after=2)
    assert h.up  # two failures of three
    h = observe(h, True, unhealthy_after=3, healthy_after=2)  # a success resets the streak
    for _ in range(2):
        h = observe(h, False, unhealthy_after=3, healthy_after=2)
    assert h.up
    h = observe(h, False, unhealthy_after=3, healthy_after=2)
    assert not h.up
    h = observe(h, True, unhealthy_after=3, healthy_after=2)
    assert not h.up
    h = observe(h, True, unhealthy_after=3, healthy_after=2)
    assert h.up
    # Counters are capped: no unbounded growth on a member that stays down.
    for _ in range(1000):
        h = observe(h, False, unhealthy_after=3, healthy_after=2)
    assert h == Health(up=False, successes=0, failures=3)


def test_refresh_delay_is_clamped() -> None:
    assert refresh_delay([0]) == 1.0
    assert refresh_delay([30, 7]) == 7
    assert refresh_delay([86400]) == 300
    assert refresh_delay([]) == 300


# ----------------------------------------------------------------------
# Shell: real members, a real DNS server, real handshakes on 127.0.0.1


SRV_NAME = "_sipinternaltls._tcp.corp.test"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.make()


class DnsServer:
    """A tiny authoritative server on a loopback UDP port, records set by the test."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.servfail = False
        self.queries = 0
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            task_status.started(self.port)
            while True:
                wire, peer = await sock.recvfrom(4096)
                query = dns.message.from_wire(wire)
                self.queries += 1
                response = dns.message.make_response(query)
                response.flags |= dns.flags.AA
                question = query.question[0]
                name = question.name.to_text(omit_final_dot=True).lower()
                rdtype = dns.rdatatype.to_text(question.rdtype)
                if self.servfail:
                    response.set_rcode(dns.rcode.SERVFAIL)
                elif (name, rdtype) in self.records:
                    ttl, texts = self.records[(name, rdtype)]
                    response.answer.append(
                        dns.rrset.from_text_list(question.name, ttl, "IN", rdtype, texts)
                    )
                elif not any(n == name for n, _ in self.records):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                await sock.sendto(response.to_wire(), peer)


class Member:
    """An MTLS echo member that can be killed and restarted on the same port.

    Records the application bytes it received, and (``proxy=True``) decodes
    the PROXY v2 header in front of each connection with the independent
    decoder before its TLS handshake.
    """

    def __init__(self, pki: Pki, host: str, *, cert_host: str | None = None, proxy: bool = False):
        leaf = pki.member_leaf(cert_host or host)
        self.host = host
        self.context = server_context(
            leaf.chain, leaf.key, require_client_cert=True, client_roots=[pki.enterprise.cert]
        )
        self.proxy = proxy
        self.port = 0
        self.app_bytes = 0
        self.app_connections = 0
        self.headers: list[ProxyResult] = []
        self.scope = trio.CancelScope()

    async def _read_proxy_header(self, tcp: trio.SocketStream) -> bytes:
        data = b""
        while len(data) < 16:
            data += await tcp.receive_some(16 - len(data))
        total = 16 + int.from_bytes(data[14:16], "big")
        while len(data) < total:
            data += await tcp.receive_some(total - len(data))
        self.headers.append(ProxyProtocolV2().unpack(data))
        return data

    async def handle(self, tcp: trio.SocketStream) -> None:
        try:
            if self.proxy:
                await self._read_proxy_header(tcp)
            stream = TLSStream(tcp, self.context, server_side=True)
            await stream.do_handshake()
            counted = False
            while data := await stream.receive_some(65536):
                if not counted:
                    counted = True
                    self.app_connections += 1
                self.app_bytes += len(data)
                await stream.send_all(data)
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await trio.aclose_forcefully(tcp)

    async def start(self, nursery: trio.Nursery) -> int:
        self.scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[int]) -> None:
            with self.scope:
                listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
                task_status.started(listeners[0].socket.getsockname()[1])
                await trio.serve_listeners(self.handle, listeners)

        self.port = await nursery.start(run)
        return self.port

    def kill(self) -> None:
        self.scope.cancel()


def _config(
    folder: Path, pki: Pki, pools: str, *, dns_port: int | None = None, limits: str = ""
) -> Path:
    """write_federation's PKI and partner folders, with our own pools and [dns]."""
    path = write_federation(folder, pki, [("placeholder.corp.test", 1)], limits=limits)
    text = path.read_text()
    start = text.index("[[pools]]")
    end = text.index("[metrics]")
    extra = f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n\n' if dns_port else ""
    path.write_text(text[:start] + pools + "\n" + extra + text[end:])
    return path


def _member_line(m: Member, **extra: Any) -> str:
    fields = "".join(f", {k} = {v!r}" for k, v in extra.items()).replace("'", '"')
    return f'{{ host = "{m.host}", address = "127.0.0.1", port = {m.port}{fields} }}'


def _poolset(config: Path) -> tuple[PoolSet, Metrics, list[dict[str, Any]]]:
    cfg = load_config(config)
    ident = cfg.identity
    ctx = client_context(
        ident.internal_root_certs, ident.internal_chain, ident.internal_private_key
    )
    events: list[dict[str, Any]] = []
    metrics = Metrics(CollectorRegistry())
    log = EventLog("json", stream=io.StringIO(), sink=events.append)
    snapshot = build_snapshot(cfg, {})
    return PoolSet(lambda: snapshot, lambda: ctx, metrics, log), metrics, events


async def _roundtrip(pools: PoolSet, pool: str, payload: bytes = b"ping") -> str:
    stream, lease = await pools.connect(pool, None)
    with lease:
        await stream.send_all(payload)
        got = b""
        while len(got) < len(payload):
            got += await stream.receive_some(65536)
        assert got == payload
        await stream.aclose()
    return lease.host


async def _until(predicate: Any, timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return
    pytest.fail(f"not within {timeout}s: {what}")


def _gauge(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_srv_and_a_discovery_with_ttl_change(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            dns_server = DnsServer()
            dns_port = await nursery.start(dns_server.serve)
            fe1, fe2, fe3 = (Member(pki, f"fe{i}.corp.test") for i in (1, 2, 3))
            for m in (fe1, fe2, fe3):
                await m.start(nursery)
            dns_server.records = {
                (SRV_NAME, "SRV"): (1, [f"10 5 {fe1.port} fe1.corp.test."]),
                ("fe1.corp.test", "A"): (1, ["127.0.0.1"]),
                ("fe2.corp.test", "A"): (1, ["127.0.0.1"]),
                ("fe3.corp.test", "A"): (1, ["127.0.0.1"]),
            }
            pools_toml = (
                f'[[pools]]\nname = "frontend"\ndns_srv = "{SRV_NAME}"\n\n'
                f'[[pools]]\nname = "byname"\n'
                f'members = [{{ host = "fe3.corp.test", port = {fe3.port} }}]\n'
            )
            pools, metrics, events = _poolset(_config(tmp_path, pki, pools_toml, dns_port=dns_port))
            assert pools.readiness()[0] is False  # nothing resolved yet
            nursery.start_soon(pools.run)
            await _until(lambda: pools.readiness()[0], 5, "SRV and A answers")
            assert pools.members("frontend")[("fe1.corp.test", fe1.port)]["priority"] == 10
            assert await _roundtrip(pools, "frontend") == "fe1.corp.test"
            assert await _roundtrip(pools, "byname") == "fe3.corp.test"
            up = _gauge(metrics, "edge_pool_member_up", pool="frontend", member="fe1.corp.test")
            assert up == 1
            # The TTL (1 s) runs out and the new answer names a second target.
            dns_server.records[(SRV_NAME, "SRV")] = (
                1,
                [f"10 5 {fe1.port} fe1.corp.test.", f"10 5 {fe2.port} fe2.corp.test."],
            )
            await _until(lambda: len(pools.members("frontend")) == 2, 5, "fe2 added")
            await _until(
                lambda: pools.members("frontend")[("fe2.corp.test", fe2.port)]["addresses"],
                5,
                "fe2 resolved",
            )
            hosts = {await _roundtrip(pools, "frontend") for _ in range(4)}
            assert hosts == {"fe1.corp.test", "fe2.corp.test"}
            assert any(e["event"] == "pool_member_added" for e in events)
            # DNS fails: the last good answer stays, the failure is logged and counted.
            dns_server.servfail = True
            await _until(
                # This pool's: the other pool's lookups may fail first.
                lambda: any(e["event"] == "dns_error" and e["pool"] == "frontend" for e in events),
                5,
                "dns_error logged",
            )
            assert len(pools.members("frontend")) == 2
            assert (_gauge(metrics, "edge_dns_failures_total", pool="frontend") or 0) >= 1
            assert await _roundtrip(pools, "byname") == "fe3.corp.test"
            # DNS back, fe1 dropped from the answer: it leaves the pool and its series goes.
            dns_server.servfail = False
            dns_server.records[(SRV_NAME, "SRV")] = (1, [f"10 5 {fe2.port} fe2.corp.test."])
            await _until(lambda: len(pools.members("frontend")) == 1, 8, "fe1 removed")
            assert (
                _gauge(metrics, "edge_pool_member_up", pool="frontend", member="fe1.corp.test")
                is None
            )
            assert await _roundtrip(pools, "frontend") == "fe2.corp.test"
            nursery.cancel_scope.cancel()


async def test_wrong_name_member_never_receives_a_byte(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            good = Member(pki, "fe1.corp.test")
            # Listed as fe2, but its (valid, enterprise-issued) certificate names another host:
            # what a hijacked DNS answer or a wrong address would lead to.
            impostor = Member(pki, "fe2.corp.test", cert_host="intruder.corp.test")
            await good.start(nursery)
            await impostor.start(nursery)
            pools_toml = (
                '[[pools]]\nname = "frontend"\nbalance = "round_robin"\nunhealthy_after = 1\n'
                f"members = [{_member_line(impostor)}, {_member_line(good)}]\n"
            )
            pools, metrics, events = _poolset(_config(tmp_path, pki, pools_toml))
            for _ in range(6):
                assert await _roundtrip(pools, "frontend", b"secret" * 100) == "fe1.corp.test"
            assert impostor.app_bytes == 0 and impostor.app_connections == 0
            assert good.app_connections == 6
            errors = [e for e in events if e["event"] == "upstream_error"]
            # Tried once, taken out of rotation at once (unhealthy_after = 1), not again.
            assert [e["reason"] for e in errors] == ["upstream_untrusted"]
            assert pools.members("frontend")[("fe2.corp.test", impostor.port)]["up"] is False
            labels = {"pool": "frontend", "member": "fe2.corp.test", "reason": "upstream_untrusted"}
            assert _gauge(metrics, "edge_upstream_errors_total", **labels) == 1
            # Alone in its pool it is still never used: upstream_untrusted, no byte.
            solo = _config(
                tmp_path / "solo",
                pki,
                f'[[pools]]\nname = "frontend"\nmembers = [{_member_line(impostor)}]\n',
            )
            alone, _, _ = _poolset(solo)
            with pytest.raises(UpstreamUnavailable) as raised:
                await alone.connect("frontend", None)
            assert raised.value.reason == "upstream_untrusted"
            assert impostor.app_bytes == 0
            nursery.cancel_scope.cancel()


async def test_passive_failures_max_connections_and_last_resort(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            fe1, fe2 = Member(pki, "fe1.corp.test"), Member(pki, "fe2.corp.test")
            await fe1.start(nursery)
            await fe2.start(nursery)
            pools_toml = (
                '[[pools]]\nname = "frontend"\nunhealthy_after = 1\nhealthy_after = 1\n'
                "health_interval_s = 3600\n"  # no active check: only traffic decides here
                f"members = [{_member_line(fe1, max_connections=1)}, {_member_line(fe2)}]\n"
            )
            pools, _, events = _poolset(_config(tmp_path, pki, pools_toml))
            # max_connections = 1: while fe1 holds one, the next goes to fe2.
            s1, lease1 = await pools.connect("frontend", None)
            s2, lease2 = await pools.connect("frontend", None)
            assert (lease1.host, lease2.host) == ("fe1.corp.test", "fe2.corp.test")
            s3, lease3 = await pools.connect("frontend", None)
            assert lease3.host == "fe2.corp.test"
            for s, lease in ((s1, lease1), (s2, lease2), (s3, lease3)):
                await s.aclose()
                lease.release()
            lease1.release()  # idempotent
            assert pools.members("frontend")[("fe1.corp.test", fe1.port)]["active"] == 0
            # fe1 dies: the first connection that meets it moves on to fe2 (a passive
            # check), and fe1 is out of rotation for the next ones.
            fe1.kill()
            hosts = [await _roundtrip(pools, "frontend") for _ in range(4)]
            assert hosts == ["fe2.corp.test"] * 4
            assert [e["member"] for e in events if e["event"] == "upstream_error"] == [
                "fe1.corp.test"
            ]
            assert any(e["event"] == "pool_member_down" for e in events)
            # fe2 dies too: out-of-rotation fe1 is still tried (last resort) before
            # no_upstream, and once fe1 is back that attempt succeeds.
            fe2.kill()
            with pytest.raises(UpstreamUnavailable) as raised:
                await pools.connect("frontend", None)
            assert raised.value.reason == "no_upstream"
            assert "fe1.corp.test" in raised.value.detail
            assert "fe2.corp.test" in raised.value.detail
            assert pools.readiness()[0] is False
            await fe1.start(nursery)
            assert await _roundtrip(pools, "frontend") == "fe1.corp.test"
            assert pools.readiness() == (True, "ready")
            nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------
# End to end: the whole gateway (in this process) with real members and /metrics


async def _http_get(address: str, path: str) -> tuple[int, str]:
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
    await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def _member_up(metrics_text: str, host: str) -> float | None:
    prefix = f'edge_pool_member_up{{member="{host}",pool="frontend"}} '
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


async def _member_up_becomes(edge: Any, host: str, value: float, timeout: float) -> None:
    with trio.move_on_after(timeout):
        while True:
            _, text = await _http_get(edge.metrics_address, "/metrics")
            if _member_up(text, host) == value:
                return
            await trio.sleep(0.05)
    pytest.fail(f"edge_pool_member_up for {host} did not become {value} within {timeout}s")


async def _readyz_becomes(edge: Any, status: int, timeout: float) -> str:
    with trio.move_on_after(timeout):
        while True:
            got, body = await _http_get(edge.metrics_address, "/readyz")
            if got == status:
                return body
            await trio.sleep(0.05)
    pytest.fail(f"/readyz did not become {status} within {timeout}s")


async def _relayed_member(edge: Any, pki: Pki, leaf: Any) -> str:
    stream, port = await partner_stream(edge, pki, leaf)
    await stream.send_all(b"hello")
    got = b""
    while len(got) < 5:
        chunk = await stream.receive_some(100)
        assert chunk, "no echo"
        got += chunk
    await stream.aclose()
    closed = await edge.event_for_port(port, "connection_closed")
    return str(closed["member"])


async def _stop(edge: Any) -> None:
    assert await stop_edge(edge) == 0


async def test_member_killed_restarted_then_all_down(tmp_path: Path, pki: Pki) -> None:
    interval = 0.5
    leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
    with trio.fail_after(45):
        async with trio.open_nursery() as nursery:
            fe1, fe2 = Member(pki, "fe1.corp.test"), Member(pki, "fe2.corp.test")
            await fe1.start(nursery)
            await fe2.start(nursery)
            pools_toml = (
                f'[[pools]]\nname = "frontend"\nhealth_interval_s = {interval}\n'
                "unhealthy_after = 1\nhealthy_after = 1\n"
                f"members = [{_member_line(fe1)}, {_member_line(fe2)}]\n"
            )
            edge = await start_gateway(nursery, _config(tmp_path, pki, pools_toml))
            await _readyz_becomes(edge, 200, 5)
            # One live connection on each member.
            live = []
            for _ in range(2):
                stream, port = await partner_stream(edge, pki, leaf)
                await stream.send_all(b"x")
                assert await stream.receive_some(10) == b"x"
                live.append((stream, port))
            assert fe1.app_connections == 1 and fe2.app_connections == 1
            t_kill = trio.current_time()
            fe2.kill()
            # Its live connection ends; the other one keeps going.
            ended = []
            for stream, port in live:
                with trio.move_on_after(0.5):
                    try:
                        await stream.send_all(b"y")
                        if await stream.receive_some(10) == b"y":
                            continue
                    except trio.BrokenResourceError:
                        pass
                ended.append(port)
            assert len(ended) == 1
            closed = await edge.event_for_port(ended[0], "connection_closed")
            assert closed["member"] == "fe2.corp.test"
            assert closed["end"].startswith("pool_")
            # Marked down by the next health check: within one interval (plus slack
            # for a loaded machine), with no partner traffic needed.
            await _member_up_becomes(edge, "fe2.corp.test", 0, interval + 2)
            assert trio.current_time() - t_kill < interval + 2
            down = await edge.wait_for(lambda e: e["event"] == "pool_member_down")
            assert down["member"] == "fe2.corp.test"
            # New connections go to fe1 only, and no partner meets the dead member.
            for _ in range(4):
                assert await _relayed_member(edge, pki, leaf) == "fe1.corp.test"
            assert not [e for e in edge.events if e["event"] == "upstream_error"]
            # fe2 restarts on its port and comes back into rotation.
            await fe2.start(nursery)
            await _member_up_becomes(edge, "fe2.corp.test", 1, interval + 2)
            members = {await _relayed_member(edge, pki, leaf) for _ in range(4)}
            assert "fe2.corp.test" in members
            for stream, _ in live:
                await stream.aclose()
            # Everything down: /readyz 503 and partners refused with no_upstream.
            fe1.kill()
            fe2.kill()
            body = await _readyz_becomes(edge, 503, interval + 2)
            assert "pool frontend has no member up" in body
            stream, port = await partner_stream(edge, pki, leaf)
            with trio.move_on_after(5):
                try:
                    await stream.send_all(b"anyone?")
                    assert await stream.receive_some(10) == b""
                except trio.BrokenResourceError:
                    pass
            rejected = await edge.event_for_port(port, "connection_rejected")
            assert rejected["reason"] == "no_upstream"
            # One member back: ready again.
            await fe1.start(nursery)
            await _readyz_becomes(edge, 200, interval + 2)
            assert await _relayed_member(edge, pki, leaf) == "fe1.corp.test"
            await _stop(edge)
            nursery.cancel_scope.cancel()


async def test_weights_on_real_traffic(tmp_path: Path, pki: Pki) -> None:
    leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            fe1, fe2 = Member(pki, "fe1.corp.test"), Member(pki, "fe2.corp.test")
            await fe1.start(nursery)
            await fe2.start(nursery)
            pools_toml = (
                '[[pools]]\nname = "frontend"\nbalance = "round_robin"\n'
                f"members = [{_member_line(fe1, weight=3)}, {_member_line(fe2, weight=1)}]\n"
            )
            edge = await start_gateway(nursery, _config(tmp_path, pki, pools_toml))
            counts = Counter([await _relayed_member(edge, pki, leaf) for _ in range(24)])
            assert counts == Counter({"fe1.corp.test": 18, "fe2.corp.test": 6})
            await _stop(edge)
            nursery.cancel_scope.cancel()


async def test_proxy_v2_header_reaches_the_member(tmp_path: Path, pki: Pki) -> None:
    leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"], common_name="Fabrikam SIP Edge")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            fe1 = Member(pki, "fe1.corp.test", proxy=True)
            await fe1.start(nursery)
            pools_toml = (
                '[[pools]]\nname = "frontend"\nproxy_protocol = "v2"\nhealth_interval_s = 0.2\n'
                f"members = [{_member_line(fe1)}]\n"
            )
            edge = await start_gateway(nursery, _config(tmp_path, pki, pools_toml))
            # Health checks speak PROXY too (LOCAL), or the member would reject them.
            await _until(lambda: any(not h.proxied for h in fe1.headers), 5, "a LOCAL header")
            await _member_up_becomes(edge, "fe1.corp.test", 1, 2)
            stream, port = await partner_stream(edge, pki, leaf)
            await stream.send_all(b"hello")
            assert await stream.receive_some(10) == b"hello"
            await stream.aclose()
            closed = await edge.event_for_port(port, "connection_closed")
            proxied = [h for h in fe1.headers if h.proxied]
            assert len(proxied) == 1
            header = proxied[0]
            assert isinstance(header, ProxyResultIPv4)
            assert (str(header.source[0]), header.source[1]) == ("127.0.0.1", port)
            assert (str(header.dest[0]), header.dest[1]) == edge.address
            tlv = header.tlv
            assert tlv.authority == EDGE_NAME  # the SNI the partner sent
            assert tlv[PP2_TYPE_EDGE_PARTNER] == b"fabrikam.com"
            assert tlv.ssl.has_ssl and tlv.ssl.has_cert_conn and tlv.ssl.verified
            assert tlv.ssl.version == closed["tls_version"]
            # The authorized name (the SAN that matched), never the raw CN (issue 15).
            assert tlv.ssl.cn == "sip.fabrikam.com"
            assert fe1.app_bytes == 5
            await _stop(edge)
            nursery.cancel_scope.cancel()


def _leaf_with_raw_cn(pki: Pki, cn: str) -> Leaf:
    """A fabrikam leaf (SAN sip.fabrikam.com) whose subject CN is ``cn`` unchecked:
    CR/LF/NUL or 65,500 bytes, as a careless or hostile partner CA issues it."""
    proto = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
    with warnings.catch_warnings():  # cryptography warns about the length: that is the point
        warnings.simplefilter("ignore")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(pki.fabrikam.cert.subject)
        .public_key(proto.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(proto.cert.not_valid_before_utc)
        .not_valid_after(proto.cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("sip.fabrikam.com")]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.fabrikam.key.public_key()),
            False,
        )
        .sign(pki.fabrikam.key, hashes.SHA256())
    )
    return Leaf(cert, proto.key, (cert, *pki.fabrikam.chain))


async def test_hostile_cn_never_reaches_the_pool(tmp_path: Path, pki: Pki) -> None:
    """Issue 15: a CN with CR/LF/NUL reached the pool byte for byte and a 65,500-byte
    CN overflowed the PROXY header (internal_error). The pool gets the authorized
    SAN instead, and the connection is relayed as any other."""
    cases = {
        "CR/LF/NUL": "sip.fabrikam.com\r\nX-Injected: 1\x00evil",
        "65,500 bytes": "a" * 65_500,
    }
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            fe1 = Member(pki, "fe1.corp.test", proxy=True)
            await fe1.start(nursery)
            pools_toml = (
                '[[pools]]\nname = "frontend"\nproxy_protocol = "v2"\n'
                f"members = [{_member_line(fe1)}]\n"
            )
            edge = await start_gateway(nursery, _config(tmp_path, pki, pools_toml))
            for what, cn in cases.items():
                stream, port = await partner_stream(edge, pki, _leaf_with_raw_cn(pki, cn))
                assert await echo_roundtrip(stream, b"hello") == b"hello", what
                await stream.aclose()
                closed = await edge.event_for_port(port, "connection_closed")
                assert closed["partner"] == "fabrikam.com", (what, closed)
                assert closed["end"] == "partner_closed", (what, closed)
            proxied = [h for h in fe1.headers if h.proxied]
            assert len(proxied) == len(cases)
            for header in proxied:
                assert header.tlv.ssl.cn == "sip.fabrikam.com"
                assert header.tlv.ssl.verified
            assert fe1.app_bytes == 5 * len(cases)
            assert not [e for e in edge.events if e["event"] == "internal_error"]
            await _stop(edge)
            nursery.cancel_scope.cancel()
