"""Cost of pools: `edge run` with a 1-member pool vs an 8-member pool, same run.

Two gateways (real `edge run` subprocesses) run side by side on loopback, one
whose pool has 1 member and one whose pool has 8 (all MTLS echo members in
this process), with active health checks every --health-interval seconds
(default 1 s, five times more often than the default, to make their cost
visible). Rounds alternate between the two. In each round, --clients partner
tasks open connections back to back for --seconds: full MTLS handshake with
the gateway, the gateway's handshake with a member (chosen by the balancer),
a 64-byte echo, close.

Printed per setup: connections per second (wall), and the gateway process's
own CPU time per connection (user + system from /proc, so the clients' and
members' CPU in this process does not blur it). The ratio 8/1 near 1.0 means
balancing over 8 members and checking them costs nothing measurable.

    python bench/pools.py --quick    # 2 rounds x 2 s; ~15 s
    python bench/pools.py            # 4 rounds x 5 s; ~50 s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trio
from OpenSSL import SSL

from edge.demo import EchoMember, edge_toml, write_identity
from edge.pki import CA
from edge.tls import TLSStream, client_context

EDGE_NAME = "edge.bench.example"
PAYLOAD = b"x" * 64
# No round may start after this many seconds; each is bounded by fail_after too.
BUDGET_S = 110.0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


class Pki:
    def __init__(self) -> None:
        self.enterprise = CA.root("Bench Enterprise Root")
        self.edge_ca = CA.root("Bench Edge Public CA")
        self.partner_ca = CA.root("Bench Partner Root")
        self.public = self.edge_ca.issue(dns=[EDGE_NAME], eku=["server"])
        self.internal = self.enterprise.issue(dns=["edge.corp.bench"], eku=["client"])
        self.partner = self.partner_ca.issue(dns=["sip.partner.example"], eku=["client"])


def _write_site(folder: Path, pki: Pki, ports: list[int], health_interval: float) -> Path:
    identity = write_identity(folder, pki.public, pki.internal, pki.enterprise)
    policy = folder / "federation_policies" / "partner.example"
    policy.mkdir(parents=True)
    (policy / "root.pem").write_bytes(pki.partner_ca.cert_pem())
    config = folder / "edge.toml"
    config.write_text(
        edge_toml(
            identity,
            [(f"fe{i}.corp.bench", p) for i, p in enumerate(ports)],
            pool_settings=f"health_interval_s = {health_interval}\n",
            metrics=False,
            tables=(
                "[limits]\n"
                "# One source (127.0.0.1) makes every connection: lift the per-source limits.\n"
                "max_connections_per_source = 100000\n"
                "new_connections_per_source_per_s = 1000000\n"
                "new_connections_per_source_burst = 1000000\n"
            ),
        )
    )
    return config


async def _start_edge(config: Path) -> tuple[trio.Process, tuple[str, int]]:
    log = config.parent / "edge.log"
    out = log.open("wb")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    with trio.fail_after(20):
        while True:
            for line in log.read_text().splitlines():
                if '"gateway_started"' in line:
                    address = json.loads(line)["listeners"]["federation"][0]
                    host, _, port = address.rpartition(":")
                    return process, (host, int(port))
                if '"startup_failed"' in line:
                    raise RuntimeError(line)
            await trio.sleep(0.05)


async def _load(address: tuple[str, int], ctx: SSL.Context, clients: int, seconds: float) -> int:
    done = 0
    deadline = trio.current_time() + seconds

    async def client() -> None:
        nonlocal done
        while trio.current_time() < deadline:
            tcp = await trio.open_tcp_stream(*address)
            stream = TLSStream(tcp, ctx, server_side=False, server_hostname=EDGE_NAME)
            try:
                await stream.do_handshake()
                await stream.send_all(PAYLOAD)
                got = b""
                while len(got) < len(PAYLOAD):
                    chunk = await stream.receive_some(1024)
                    if not chunk:
                        raise RuntimeError("connection closed before the echo")
                    got += chunk
                done += 1
            finally:
                await stream.aclose()

    with trio.fail_after(seconds + 30):
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client)
    return done


async def main(args: argparse.Namespace) -> None:
    rounds = args.rounds or (2 if args.quick else 4)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    started = trio.current_time()
    pki = Pki()
    partner_ctx = client_context([pki.edge_ca.cert], pki.partner.chain, pki.partner.key)
    results: dict[int, list[tuple[float, float]]] = {1: [], 8: []}
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            ports = []
            for i in range(8):
                leaf = pki.enterprise.issue(dns=[f"fe{i}.corp.bench"], eku=["server"])
                member = EchoMember(leaf.chain, leaf.key, [pki.enterprise.cert])
                ports.append(await nursery.start(member.serve))
            edges: dict[int, tuple[trio.Process, tuple[str, int]]] = {}
            for n in (1, 8):
                folder = Path(tmp) / f"pool{n}"
                folder.mkdir()
                edges[n] = await _start_edge(
                    _write_site(folder, pki, ports[:n], args.health_interval)
                )
            try:
                # Warm up both (imports, first handshakes), then alternate.
                for n in (1, 8):
                    await _load(edges[n][1], partner_ctx, args.clients, 0.5)
                for r in range(rounds):
                    if trio.current_time() - started > BUDGET_S:
                        print(f"budget of {BUDGET_S:g}s reached after {r} rounds")
                        break
                    for n in (1, 8) if r % 2 == 0 else (8, 1):
                        process, address = edges[n]
                        cpu0 = _cpu_seconds(process.pid)
                        t0 = trio.current_time()
                        done = await _load(address, partner_ctx, args.clients, seconds)
                        wall = trio.current_time() - t0
                        cpu = _cpu_seconds(process.pid) - cpu0
                        results[n].append((done / wall, 1000 * cpu / max(done, 1)))
                        print(
                            f"round {r + 1} members={n}: {done / wall:7.1f} conn/s, "
                            f"edge CPU {1000 * cpu / max(done, 1):.2f} ms/conn",
                            flush=True,
                        )
            finally:
                for process, _ in edges.values():
                    process.terminate()
                for process, _ in edges.values():
                    with trio.move_on_after(15):
                        await process.wait()
            nursery.cancel_scope.cancel()
    rate = {n: statistics.median(r for r, _ in results[n]) for n in results}
    cpu = {n: statistics.median(c for _, c in results[n]) for n in results}
    print(
        f"median members=1: {rate[1]:.1f} conn/s, {cpu[1]:.2f} ms edge CPU/conn; "
        f"members=8: {rate[8]:.1f} conn/s, {cpu[8]:.2f} ms edge CPU/conn"
    )
    print(
        f"ratio 8/1: conn/s {rate[8] / rate[1]:.3f}, edge CPU per conn {cpu[8] / cpu[1]:.3f} "
        f"(health checks every {args.health_interval:g}s, {args.clients} clients)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--health-interval", type=float, default=1.0)
    ns = parser.parse_args()
    trio.run(main, ns)
