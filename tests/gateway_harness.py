"""A federation on loopback for end-to-end tests: PKI, pool, and `edge run`.

The gateway runs as a real subprocess (`python -m edge.cli run`); the pool
members and the partners are trio tasks in the test, all over 127.0.0.1.
The gateway's JSON log lines are collected as they arrive, so a test can wait
for the exact event that a connection produced.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from edge.demo import EchoMember, edge_toml, write_identity
from edge.pki import CA, Leaf
from edge.tls import TLSStream, client_context

EDGE_NAME = "edge.contoso.example"
NOW = _dt.datetime.now(_dt.UTC)


@dataclass
class Pki:
    enterprise: CA
    edge_ca: CA
    fabrikam: CA
    litware_root: CA
    litware: CA
    stranger: CA
    public: Leaf
    internal: Leaf

    @classmethod
    def make(cls) -> Pki:
        enterprise = CA.root("Test Enterprise Root")
        edge_ca = CA.root("Test Edge Public CA")
        litware_root = CA.root("Litware Root")
        return cls(
            enterprise=enterprise,
            edge_ca=edge_ca,
            fabrikam=CA.root("Fabrikam Root"),
            litware_root=litware_root,
            litware=litware_root.intermediate("Litware Issuing CA"),
            stranger=CA.root("Stranger Root"),
            public=edge_ca.issue(dns=[EDGE_NAME], eku=["server"]),
            internal=enterprise.issue(dns=["edge.corp.test"], eku=["client"]),
        )

    def member_leaf(self, host: str) -> Leaf:
        return self.enterprise.issue(dns=[host], eku=["server"])


def write_federation(
    folder: Path,
    pki: Pki,
    members: Sequence[tuple[str, int]],
    *,
    limits: str = "",
    policies: dict[str, str] | None = None,
    extra: str = "",
) -> Path:
    """Write certs, federation_policies/ and edge.toml; return the config path."""
    identity = write_identity(folder, pki.public, pki.internal, pki.enterprise)
    default_policies = {
        "fabrikam.com": 'domains = ["fabrikam.com"]\n',
        "litware.com": 'domains = ["litware.com"]\n',
    }
    roots = {"fabrikam.com": pki.fabrikam, "litware.com": pki.litware_root}
    for pid, text in (policies or default_policies).items():
        d = folder / "federation_policies" / pid
        d.mkdir(parents=True, exist_ok=True)
        (d / "root.pem").write_bytes(roots[pid].cert_pem())
        (d / "policy.toml").write_text(text)
    config = folder / "edge.toml"
    config.write_text(
        edge_toml(
            identity,
            members,
            tables=f"[limits]\n{limits or 'handshake_timeout_s = 5'}\n{extra}\n",
        )
    )
    return config


class _Events:
    """Waiting on the log events a gateway (process or task) has emitted so far."""

    events: list[dict[str, Any]]
    changed: trio.Event

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                await self.changed.wait()

    async def event_for_port(self, port: int, name: str, timeout: float = 10) -> dict[str, Any]:
        suffix = f":{port}"
        return await self.wait_for(
            lambda e: e.get("event") == name and str(e.get("peer", "")).endswith(suffix),
            timeout,
        )


@dataclass
class EdgeProcess(_Events):
    """`edge run` as a subprocess, with its log lines parsed as they come."""

    process: trio.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: bytearray = field(default_factory=bytearray)
    changed: trio.Event = field(default_factory=trio.Event)
    address: tuple[str, int] = ("127.0.0.1", 0)
    metrics_address: str = ""

    async def read_stdout(self) -> None:
        assert self.process.stdout is not None
        buf = b""
        async for chunk in self.process.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    self.events.append(json.loads(line))
            self.changed.set()
            self.changed = trio.Event()

    async def read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk

    def terminate(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)


async def _reap(process: trio.Process) -> None:
    """Kill the gateway if the test ends (passes, fails or times out) with it running."""
    try:
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()


async def stop_edge(edge: EdgeProcess | InProcessEdge, timeout: float = 15) -> int:
    """SIGTERM, then the exit status (the gateway drains first)."""
    if isinstance(edge, InProcessEdge):
        return await edge.stop(timeout)
    edge.terminate()
    with trio.fail_after(timeout):
        return await edge.process.wait()


def edge_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge.cli", *args]


async def start_edge(nursery: trio.Nursery, config: Path, args: Sequence[str] = ()) -> EdgeProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = await trio.lowlevel.open_process(
        edge_command("run", "--config", str(config), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    edge = EdgeProcess(process)
    nursery.start_soon(edge.read_stdout)
    nursery.start_soon(edge.read_stderr)
    nursery.start_soon(_reap, process)
    try:
        started = await edge.wait_for(
            lambda e: e.get("event") in ("gateway_started", "startup_failed"), timeout=20
        )
    except trio.TooSlowError:
        process.kill()
        raise
    if started["event"] != "gateway_started":
        raise RuntimeError(f"edge did not start: {started} {edge.stderr.decode()}")
    host, _, port = started["listeners"]["federation"][0].rpartition(":")
    edge.address = (host.strip("[]"), int(port))
    edge.metrics_address = started["listeners"]["metrics"][0]
    return edge


async def start_pool(
    nursery: trio.Nursery, pki: Pki, hosts: Sequence[str]
) -> list[tuple[str, int, EchoMember]]:
    out = []
    for host in hosts:
        leaf = pki.member_leaf(host)
        member = EchoMember(leaf.chain, leaf.key, [pki.enterprise.cert])
        port = await nursery.start(member.serve)
        out.append((host, port, member))
    return out


async def partner_stream(
    edge: EdgeProcess | InProcessEdge, pki: Pki, leaf: Leaf | None
) -> tuple[TLSStream, int]:
    """A partner connection to the gateway, handshake done; and its local port."""
    ctx = client_context(
        [pki.edge_ca.cert], leaf.chain if leaf else None, leaf.key if leaf else None
    )
    tcp = await trio.open_tcp_stream(*edge.address)
    port = tcp.socket.getsockname()[1]
    stream = TLSStream(tcp, ctx, server_side=False, server_hostname=EDGE_NAME)
    await stream.do_handshake()
    return stream, port


async def echo_roundtrip(stream: TLSStream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    got = b""
    while len(got) < len(payload):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        got += chunk
    return got


# ----------------------------------------------------------------------
# The metrics endpoint, as a scraper sees it


async def http_get(address: str, path: str, timeout: float = 5) -> tuple[int, str]:
    """GET ``path`` from ``host:port`` over HTTP/1.1: (status code, body)."""
    host, _, port = address.rpartition(":")
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: edge\r\n\r\n".encode())
            raw = b""
            while chunk := await stream.receive_some(65536):
                raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(edge: EdgeProcess | InProcessEdge) -> Samples:
    """Every sample of ``/metrics``: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = await http_get(edge.metrics_address, "/metrics")
    assert status == 200, text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of one series, or None when it does not exist."""
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every series of one sample name: labels -> value."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


# ----------------------------------------------------------------------
# The gateway in this process: for admission, relay and reload logic, no
# subprocess start-up (~1 s each) and direct access to the current snapshot.


@dataclass
class InProcessEdge(_Events):
    """A ``Gateway`` run as a trio task of the test, its events collected."""

    gateway: Any
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)
    address: tuple[str, int] = ("127.0.0.1", 0)
    metrics_address: str = ""

    def sink(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.changed.set()
        self.changed = trio.Event()

    async def stop(self, timeout: float = 15) -> int:
        """What SIGTERM does in `edge run`: drain, stop; 0 once stopped."""
        self.gateway.request_shutdown("SIGTERM")
        await self.wait_for(lambda e: e.get("event") == "gateway_stopped", timeout)
        return 0


async def start_gateway(nursery: trio.Nursery, config: Path) -> InProcessEdge:
    """Load ``config`` and run its gateway in ``nursery`` (cancel the nursery to stop)."""
    from prometheus_client import CollectorRegistry

    from edge.core.config import load_config
    from edge.gateway import Gateway
    from edge.logs import EventLog
    from edge.metrics import Metrics

    edge = InProcessEdge(gateway=None)
    log = EventLog("json", sink=edge.sink)
    log.enabled = False  # events go to the list only
    gateway = Gateway(load_config(config), log, Metrics(CollectorRegistry()))
    edge.gateway = gateway
    gateway.load_policies()
    bound = await nursery.start(gateway.run)
    host, _, port = bound["federation"][0].rpartition(":")
    edge.address = (host.strip("[]"), int(port))
    edge.metrics_address = bound.get("metrics", [""])[0]
    return edge
