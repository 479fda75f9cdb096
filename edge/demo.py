"""`edge demo`: a whole federation on loopback, in one process, in seconds.

Owns the demo's throwaway world: a PKI made in a temporary folder, a two-member
mutual-TLS echo pool, the gateway started from a real ``edge.toml`` written
there, and partners playing each scenario. Both directions: partners
connecting in, and a pool member going out through the outbound listener to
partner edges found by DNS SRV in the demo's own DNS server (a tiny UDP
responder on 127.0.0.1 built on dnspython's message API). Also exports the
echo pool member and the partner client, which the tests and benchmarks reuse.

Must never touch anything outside its temporary folder or any address but
127.0.0.1, and never claims an outcome it did not observe: "actual" is the
echo coming back, or the reason code the gateway itself logged for that very
connection (matched by the client's source port).
"""

from __future__ import annotations

import datetime as _dt
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import trio
from cryptography import x509
from OpenSSL import SSL
from prometheus_client import CollectorRegistry

from edge.core.config import load_config
from edge.gateway import Gateway
from edge.logs import EventLog, LogFormat
from edge.metrics import Metrics
from edge.pki import CA, Leaf
from edge.tls import PrivateKey, TLSStream, client_context, server_context

__all__ = ["IDENTITY_TOML", "EchoMember", "connect_partner", "demo_command", "write_identity"]


# ----------------------------------------------------------------------
# Reusable pieces: an MTLS echo pool member and a partner client


class EchoMember:
    """A pool member: MTLS server that echoes, verifying clients with OpenSSL."""

    def __init__(
        self,
        chain: Sequence[x509.Certificate],
        key: PrivateKey,
        client_roots: Sequence[x509.Certificate],
    ) -> None:
        self.context = server_context(
            chain, key, require_client_cert=True, client_roots=client_roots
        )
        self.connections = 0

    async def handle(self, tcp: trio.SocketStream) -> None:
        stream = TLSStream(tcp, self.context, server_side=True)
        try:
            with trio.move_on_after(10):
                await stream.do_handshake()
            if not stream.handshake_done:
                return
            self.connections += 1
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    await stream.send_eof()
                    break
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.handle, listeners)


async def connect_partner(
    host: str,
    port: int,
    context: SSL.Context,
    server_hostname: str,
) -> TLSStream:
    """Connect and handshake as a partner would."""
    tcp = await trio.open_tcp_stream(host, port)
    stream = TLSStream(tcp, context, server_side=False, server_hostname=server_hostname)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


# ----------------------------------------------------------------------
# The demo world

EDGE_PUBLIC_NAME = "edge.contoso.example"
POOL_HOSTS = ("fe1.corp.contoso.example", "fe2.corp.contoso.example")


@dataclass
class Scenario:
    name: str
    expected: str  # "relayed" or a reason code
    leaf: Leaf | None


@dataclass
class OutboundScenario:
    """A pool member going out: the SNI it sends, and the certificate the
    partner edge that DNS SRV points at presents."""

    name: str
    expected: str  # "relayed" or a reason code
    sni: str
    partner_edge_leaf: Leaf


@dataclass
class World:
    folder: Path
    config_path: Path
    edge_root: x509.Certificate
    enterprise: CA
    pool_leaves: tuple[Leaf, ...]
    scenarios: list[Scenario]
    edge_ca: x509.Certificate  # issued public_cert: what partner edges require of us
    member_leaf: Leaf  # the pool member fe1's client certificate
    outbound: list[OutboundScenario]


class DemoDns:
    """The demo's DNS server: answers A and SRV from a fixed table over UDP on 127.0.0.1."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = records

    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # not DNS: no answer
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return bytes(response.to_wire())
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        texts = self.records.get((name, rdtype))
        if texts:
            response.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", rdtype, texts))
        elif not any(n == name for n, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return bytes(response.to_wire())

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            task_status.started(sock.getsockname()[1])
            while True:
                wire, peer = await sock.recvfrom(4096)
                reply = self.answer(wire)
                if reply is not None:
                    await sock.sendto(reply, peer)


def _free_port() -> int:
    """A free TCP port on 127.0.0.1 (port 0 twice on one address is an address clash)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _outbound_tables(dns_port: int, listener_port: int) -> str:
    return f"""
[[listeners]]
name = "to-partners"
address = "127.0.0.1:{listener_port}"
mode = "outbound"
policies = "federation_policies"
pools = ["frontend"]

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
"""


def _toml_path(p: Path) -> str:
    return str(p).replace("\\", "\\\\").replace('"', '\\"')


def write_identity(folder: Path, public: Leaf, internal: Leaf, enterprise: CA) -> str:
    """Write the edge's certificates under ``folder/certs``; the `[identity]` naming them.

    The one place the demo, the tests and the benchmarks lay out an edge's
    identity, so their edge.toml files agree with each other.
    """
    certs = folder / "certs"
    public.write(certs, "edge-public")
    internal.write(certs, "edge-internal")
    (certs / "enterprise-root.pem").write_bytes(enterprise.cert_pem())
    return IDENTITY_TOML


IDENTITY_TOML = """\
[identity]
public_cert = "certs/edge-public.pem"
public_key = "certs/edge-public.key"
internal_cert = "certs/edge-internal.pem"
internal_key = "certs/edge-internal.key"
internal_roots = ["certs/enterprise-root.pem"]
"""


def edge_toml(
    identity: str,
    members: Sequence[tuple[str, int]],
    *,
    policies: str = "federation_policies",
    pool_settings: str = "",
    metrics: bool = True,
    tables: str = "",
    header: str = "",
) -> str:
    """The edge.toml of one mtls listener on a free loopback port and one pool.

    The one writer of this file for the demo, the tests and the benchmarks.
    ``members``: (host, port) dialled at 127.0.0.1; ``pool_settings``: extra
    ``key = value`` lines of the pool; ``tables``: further tables, verbatim
    (``[limits]``, ``[policies]``, ``[dns]``...).
    """
    member_lines = ",\n  ".join(
        f'{{ host = "{h}", address = "127.0.0.1", port = {p} }}' for h, p in members
    )
    metrics_table = '[metrics]\naddress = "127.0.0.1:0"\n' if metrics else ""
    return f"""{header}{identity}
[[listeners]]
name = "federation"
address = "127.0.0.1:0"
mode = "mtls"
policies = "{policies}"
pool = "frontend"

[[pools]]
name = "frontend"
{pool_settings}members = [
  {member_lines},
]

{metrics_table}
{tables}"""


def build_world(folder: Path, pool_ports: Sequence[int] | None = None) -> World:
    """Write the PKI, partner folders and edge.toml into ``folder``."""
    now = _dt.datetime.now(_dt.UTC)
    enterprise = CA.root("Contoso Enterprise Root CA")
    edge_public_ca = CA.root("Contoso Public Issuing CA")
    # Both directions: public serves partners and is shown to partner edges
    # (clientAuth); internal dials the pool and serves it on the outbound
    # listener (serverAuth).
    public = edge_public_ca.issue(dns=[EDGE_PUBLIC_NAME], eku=["client", "server"])
    internal = enterprise.issue(dns=["edge.corp.contoso.example"], eku=["client", "server"])
    identity = write_identity(folder, public, internal, enterprise)
    pool_leaves = tuple(enterprise.issue(dns=[h], eku=["server"]) for h in POOL_HOSTS)

    policies = folder / "federation_policies"
    fabrikam = CA.root("Fabrikam Root CA")
    litware_root = CA.root("Litware Root CA")
    litware = litware_root.intermediate("Litware Issuing CA 1")
    stranger = CA.root("Stranger Root CA")
    for pid, root, domains in (
        ("fabrikam.com", fabrikam, ["fabrikam.com"]),
        ("litware.com", litware_root, ["litware.com"]),
    ):
        d = policies / pid
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{pid.split('.')[0]}-root.pem").write_bytes(root.cert_pem())
        (d / "policy.toml").write_text(f"domains = {domains!r}\n".replace("'", '"'))

    ports = list(pool_ports) if pool_ports is not None else [0, 0]
    config = folder / "edge.toml"
    config.write_text(
        edge_toml(
            identity,
            list(zip(POOL_HOSTS, ports, strict=True)),
            header="# Written by `edge demo`: a throwaway federation on loopback.\n",
            tables="[limits]\nhandshake_timeout_s = 5\nidle_timeout_s = 60\ndrain_timeout_s = 2\n",
        )
    )
    scenarios = [
        Scenario(
            "trusted partner (fabrikam.com, root-issued)",
            "relayed",
            fabrikam.issue(dns=["sip.fabrikam.com"], eku=["client", "server"]),
        ),
        Scenario(
            "trusted partner (litware.com, via intermediate)",
            "relayed",
            litware.issue(dns=["sip.litware.com"], eku=["client", "server"]),
        ),
        Scenario(
            "stranger CA",
            "unknown_ca",
            stranger.issue(dns=["sip.stranger.example"], eku=["client"]),
        ),
        Scenario(
            "fabrikam's CA posing as litware.com",
            "name_mismatch",
            fabrikam.issue(dns=["sip.litware.com"], eku=["client"]),
        ),
        Scenario(
            "expired certificate",
            "expired",
            fabrikam.issue(
                dns=["sip.fabrikam.com"],
                eku=["client"],
                not_before=now - _dt.timedelta(days=30),
                not_after=now - _dt.timedelta(days=1),
            ),
        ),
        Scenario("no client certificate", "no_client_cert", None),
    ]
    outbound = [
        # fabrikam's edge, found by SRV, with a certificate from fabrikam's root.
        OutboundScenario(
            "outbound: fe1 -> fabrikam.com (edge found by SRV)",
            "relayed",
            "sip.fabrikam.com",
            fabrikam.issue(dns=["sip.fabrikam.com"], eku=["server"]),
        ),
        # "litware's edge" presents a certificate from fabrikam's root: refused
        # before a single member byte is sent.
        OutboundScenario(
            "outbound: fe1 -> litware.com (edge cert from fabrikam's root)",
            "partner_untrusted",
            "sip.litware.com",
            fabrikam.issue(dns=["sip.litware.com"], eku=["server"]),
        ),
    ]
    return World(
        folder=folder,
        config_path=config,
        edge_root=edge_public_ca.cert,
        enterprise=enterprise,
        pool_leaves=pool_leaves,
        scenarios=scenarios,
        edge_ca=edge_public_ca.cert,
        member_leaf=enterprise.issue(dns=[POOL_HOSTS[0]], eku=["client"]),
        outbound=outbound,
    )


async def _play(
    scenario: Scenario,
    world: World,
    address: tuple[str, int],
    events: list[dict[str, Any]],
) -> tuple[str, str]:
    """Run one scenario; return (actual outcome, detail)."""
    leaf = scenario.leaf
    ctx = client_context(
        [world.edge_root], leaf.chain if leaf else None, leaf.key if leaf else None
    )
    host, port = address
    tcp = await trio.open_tcp_stream(host, port)
    local_port = tcp.socket.getsockname()[1]
    stream = TLSStream(tcp, ctx, server_side=False, server_hostname=EDGE_PUBLIC_NAME)
    payload = f"hello from {scenario.name}".encode()
    echoed = await _echo_attempt(stream, payload)
    if echoed == payload:
        # Wait for the gateway's connection_closed to name the member.
        with trio.move_on_after(2):
            while not _event_for(events, local_port, "connection_closed"):
                await trio.sleep(0.01)
        closed = _event_for(events, local_port, "connection_closed")
        return "relayed", f"via {closed['member']}" if closed else ""
    with trio.move_on_after(2):
        while not _event_for(events, local_port, "connection_rejected"):
            await trio.sleep(0.01)
    rejected = _event_for(events, local_port, "connection_rejected")
    if rejected is None:
        return "no verdict logged", ""
    return str(rejected["reason"]), str(rejected.get("detail", ""))


async def _play_outbound(
    scenario: OutboundScenario,
    world: World,
    address: tuple[str, int],
    events: list[dict[str, Any]],
) -> tuple[str, str]:
    """A pool member connects to the outbound listener with the scenario's SNI."""
    leaf = world.member_leaf
    ctx = client_context([world.enterprise.cert], leaf.chain, leaf.key)
    tcp = await trio.open_tcp_stream(*address)
    local_port = tcp.socket.getsockname()[1]
    stream = TLSStream(
        tcp, ctx, server_side=False, server_hostname=scenario.sni, check_hostname=False
    )
    payload = f"OPTIONS sip:{scenario.sni} from {POOL_HOSTS[0]}".encode()
    echoed = await _echo_attempt(stream, payload)
    name = "connection_closed" if echoed == payload else "connection_rejected"
    with trio.move_on_after(5):
        while not _event_for(events, local_port, name):
            await trio.sleep(0.01)
    event = _event_for(events, local_port, name)
    if event is None:
        return "no verdict logged", ""
    if name == "connection_closed":
        return "relayed", f"via {event['partner_edge']}"
    return str(event["reason"]), str(event.get("detail", ""))


def _event_for(events: list[dict[str, Any]], port: int, name: str) -> dict[str, Any] | None:
    suffix = f":{port}"
    for event in events:
        if event.get("event") == name and str(event.get("peer", "")).endswith(suffix):
            return event
    return None


async def _fetch(address: str, path: str) -> str:
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: demo\r\n\r\n".encode())
        body = b""
        with trio.move_on_after(5):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                body += chunk
    return body.decode("utf-8", "replace")


async def _run_demo(folder: Path, out: Any) -> int:
    enterprise_placeholder = build_world(folder)  # PKI and policies first
    # Start the pool on free ports, then rewrite edge.toml with them.
    members = [
        EchoMember(leaf.chain, leaf.key, [enterprise_placeholder.enterprise.cert])
        for leaf in enterprise_placeholder.pool_leaves
    ]
    world = enterprise_placeholder
    # The partners' edges: MTLS echo servers requiring the edge's public certificate.
    partner_edges = [
        EchoMember(o.partner_edge_leaf.chain, o.partner_edge_leaf.key, [world.edge_ca])
        for o in world.outbound
    ]
    events: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(m.serve) for m in members]
        records: dict[tuple[str, str], list[str]] = {}
        for going_out, partner_edge in zip(world.outbound, partner_edges, strict=True):
            edge_port = await nursery.start(partner_edge.serve)
            domain = going_out.sni.split(".", 1)[1]
            records[(f"_sipfederationtls._tcp.{domain}", "SRV")] = [
                f"10 10 {edge_port} {going_out.sni}."
            ]
            records[(going_out.sni, "A")] = ["127.0.0.1"]
        dns_port = await nursery.start(DemoDns(records).serve)
        _rewrite_pool_ports(world.config_path, ports)
        with world.config_path.open("a") as f:
            f.write(_outbound_tables(dns_port, _free_port()))
        config = load_config(world.config_path)
        log = EventLog("json", sink=events.append)
        log.enabled = False
        gateway = Gateway(config, log, Metrics(CollectorRegistry()))
        gateway.load_policies()
        bound = await nursery.start(gateway.run)
        fed = bound["federation"][0]
        host, _, port = fed.rpartition(":")
        address = (host.strip("[]"), int(port))
        print(f"edge demo: gateway on {fed}, pool {ports}, files in {folder}", file=out)
        out_host, _, out_port = bound["to-partners"][0].rpartition(":")
        out_address = (out_host.strip("[]"), int(out_port))
        rows: list[tuple[Scenario | OutboundScenario, str, str]] = []
        for scenario in world.scenarios:
            actual, detail = await _play(scenario, world, address, events)
            rows.append((scenario, actual, detail))
        for outbound in world.outbound:
            actual, detail = await _play_outbound(outbound, world, out_address, events)
            rows.append((outbound, actual, detail))
        metrics_text = await _fetch(bound["metrics"][0], "/metrics")
        gateway.request_shutdown("demo finished")
        nursery.cancel_scope.cancel()
    width = max(len(s.name) for s, _, _ in rows)
    print(file=out)
    print(f"{'scenario':<{width}}  {'expected':<17} {'actual':<17} ok", file=out)
    print(f"{'-' * width}  {'-' * 17} {'-' * 17} --", file=out)
    failures = 0
    for played, actual, detail in rows:
        ok = actual == played.expected
        failures += not ok
        mark = "yes" if ok else "NO"
        line = f"{played.name:<{width}}  {played.expected:<17} {actual:<17} {mark}"
        shown = detail and (actual == "relayed" or actual == "partner_untrusted")
        print(line + (f"   ({detail})" if shown else ""), file=out)
    print(file=out)
    print("metrics (from the gateway's /metrics endpoint):", file=out)
    for line in metrics_text.splitlines():
        if line.startswith(("edge_handshakes_total{", "edge_bytes_total{", "edge_partners{")):
            print(f"  {line}", file=out)
    print(file=out)
    if failures:
        print(f"edge demo: {failures} scenario(s) did not match", file=out)
        return 1
    print(f"edge demo: all {len(rows)} scenarios matched", file=out)
    return 0


def _rewrite_pool_ports(config_path: Path, ports: Sequence[int]) -> None:
    text = config_path.read_text()
    for port in ports:
        text = text.replace("port = 0 }", f"port = {port} }}", 1)
    config_path.write_text(text)


def demo_command(log_format: LogFormat = "text") -> int:
    """`edge demo`: returns 0 only if every scenario's outcome matched."""
    _ = log_format
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp:
        status = trio.run(_run_demo, Path(tmp), sys.stdout)
    print(f"edge demo: finished in {time.monotonic() - started:.1f}s", file=sys.stdout)
    return status


async def _echo_attempt(stream: TLSStream, payload: bytes) -> bytes:
    """Handshake, send `payload`, read back as much of it as comes within 5 s; close."""
    echoed = b""
    try:
        with trio.move_on_after(5):
            await stream.do_handshake()
            await stream.send_all(payload)
            while len(echoed) < len(payload):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                echoed += chunk
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await stream.aclose()
    return echoed
