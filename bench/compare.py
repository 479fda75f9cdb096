"""Our gateway side by side with HAProxy and nginx: the same load through each relay (issue 10).

One command:

    python bench/compare.py            # 3 rounds, ~4 minutes on 2 cores (budget: 10)
    python bench/compare.py --quick    # 3 smaller rounds, ~3 minutes

It writes one PKI (ECDSA P-256: partner root -> intermediate -> partner leaf,
the edge's public and internal certificates, an enterprise root and the pool
member's certificate), starts an MTLS echo backend (HAProxy + Lua, C TLS, it
verifies the relay's client certificate), starts every relay at once on its
own port, `edge run` (one worker; two when `edge run --workers` exists),
HAProxy (`mode tcp`, one thread and two) and nginx `stream` (one worker
process and two), and then, in rounds that visit the relays in turn:

(a) CPU per relayed connection: the partner does a full MTLS handshake with
    its certificate, a 1 KiB echo and a graceful close; the relay's user+system
    CPU (/proc, the process and its descendants) over the run / connections;
    connections per second alongside;
(b) CPU per MiB relayed through one long connection, both directions counted
    (the client sends N MiB and reads the N MiB echo at the same time); MiB/s;
(c) round-trip p50 / p99 of 1 KiB echoes on one persistent connection while
    100 other connections echo 1 KiB back to back;
(d) resident memory per idle established relayed connection, holding 2,000
    (each did its handshake and one echo); the relay is restarted before this
    figure so that memory freed by earlier runs is not reused.

Each figure is the median of the rounds (at least 3), printed as a ratio to
HAProxy's and nginx's with the same number of workers, from the same run. The
load generators are separate processes (compare_load.py, stdlib ssl); their
CPU is not counted, and the "who was busy" table shows how much of a core the
relay, the backend and the clients each used, so a bottleneck elsewhere than
the relay is visible.

If HAProxy, nginx or nginx's stream module are missing, the script installs
them with apt-get when run as root, or prints the command to run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import compare_load as load
from compare_relays import (
    EDGE_NAME,
    NGINX_STREAM_MODULE,
    Files,
    Relay,
    backend,
    edge_relay,
    haproxy_relay,
    nginx_relay,
    openssl_versions,
    write_pki,
)

MiB = 1024 * 1024
_FORK = mp.get_context("fork")

FIGURES: list[tuple[str, str, str]] = [
    # key, label, format
    ("a_cpu", "(a) CPU ms / connection", "{:.2f}"),
    ("a_rate", "    connections / s", "{:.0f}"),
    ("b_cpu", "(b) CPU ms / MiB relayed", "{:.2f}"),
    ("b_rate", "    MiB/s relayed", "{:.0f}"),
    ("c_p50", "(c) echo p50 ms, 100 busy", "{:.2f}"),
    ("c_p99", "    echo p99 ms, 100 busy", "{:.2f}"),
    ("c_cpu", "    CPU us / 1 KiB echo", "{:.0f}"),
    ("d_mem", "(d) KiB / idle connection", "{:.1f}"),
    ("e_cpu", "(e) CPU us / msg, saturating", "{:.0f}"),
    ("e_rate", "    messages / s, saturating", "{:.0f}"),
    ("f_cpu", "(f) CPU us / msg, paced", "{:.0f}"),
    ("f_p50", "    paced p50 ms", "{:.2f}"),
    ("f_p99", "    paced p99 ms", "{:.2f}"),
]
BUSY = [
    ("a_relay", "(a) relay"),
    ("a_backend", "(a) backend"),
    ("a_client", "(a) clients"),
    ("b_relay", "(b) relay"),
    ("b_backend", "(b) backend"),
    ("b_client", "(b) client"),
    ("e_relay", "(e) relay"),
    ("e_client", "(e) clients"),
    ("f_relay", "(f) relay"),
    ("f_client", "(f) clients"),
]


# ----------------------------------------------------------------------
# Tools


def ensure_tools(install: bool) -> bool:
    missing = []
    if shutil.which("haproxy") is None:
        missing.append("haproxy")
    if shutil.which("nginx") is None:
        missing.append("nginx")
    if not NGINX_STREAM_MODULE.exists():
        missing.append("libnginx-mod-stream")
    if not missing:
        return True
    command = ["apt-get", "install", "-y", *missing]
    if install and os.geteuid() == 0:
        print(f"installing {' '.join(missing)} with apt-get", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=300)
        done = subprocess.run(command, env=env, check=False, timeout=600)
        if done.returncode == 0:
            return True
    print(f"compare.py needs: {' '.join(missing)}. Install them with:\n  sudo {' '.join(command)}")
    return False


def edge_has_workers() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "edge.cli", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "--workers" in out.stdout


# ----------------------------------------------------------------------
# Running the clients


class Clients:
    """Load-generator processes, each with a pipe: ready -> go -> result."""

    def __init__(self) -> None:
        self.procs: list[tuple[mp.process.BaseProcess, Connection]] = []

    def spawn(self, target: Callable[..., None], *args: Any) -> Connection:
        parent, child = _FORK.Pipe()
        proc = _FORK.Process(target=target, args=(*args, child), daemon=True)
        proc.start()
        child.close()
        self.procs.append((proc, parent))
        return parent

    @staticmethod
    def expect(pipe: Connection, timeout: float) -> Any:
        if not pipe.poll(timeout):
            raise RuntimeError(f"a load client said nothing for {timeout:g}s")
        return pipe.recv()

    def close(self) -> None:
        for proc, pipe in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            pipe.close()
        self.procs.clear()


def quiesce(relay: Relay, limit_s: float = 15.0) -> None:
    """Wait until the relay stops using CPU (work left from the previous run)."""
    deadline = time.monotonic() + limit_s
    last = relay.cpu()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = relay.cpu()
        if now - last < 0.011:
            return
        last = now


def run_connections(
    relay: Relay, back: Relay, partner: load.Partner, count: int, budget: float
) -> dict[str, float]:
    quiesce(relay)
    clients = Clients()
    try:
        pipes = [
            clients.spawn(load.connections, partner, relay.port, count // 2, 4, budget)
            for _ in range(2)
        ]
        for p in pipes:
            clients.expect(p, 30)
        relay.refresh()
        c0, b0, t0 = relay.cpu(), back.cpu(), time.monotonic()
        for p in pipes:
            p.send("go")
        results = [clients.expect(p, budget + 30) for p in pipes]
        wall = time.monotonic() - t0
        time.sleep(0.3)  # the relay's last closes and log lines
        cpu, bcpu = relay.cpu() - c0, back.cpu() - b0
    finally:
        clients.close()
    ok = sum(r["ok"] for r in results)
    failed = sum(r["failed"] for r in results)
    if failed:
        errors = [e for r in results for e in r["errors"]]
        print(f"  {relay.name}: {failed} connections failed: {errors[:2]}", flush=True)
    if ok == 0:
        raise RuntimeError(f"{relay.name}: no connection succeeded")
    return {
        "a_cpu": cpu * 1000 / ok,
        "a_rate": ok / wall,
        "a_relay": cpu / wall,
        "a_backend": bcpu / wall,
        "a_client": sum(r["cpu"] for r in results) / wall,
    }


def run_stream(
    relay: Relay, back: Relay, partner: load.Partner, mib: int, budget: float
) -> dict[str, float]:
    quiesce(relay)
    clients = Clients()
    try:
        pipe = clients.spawn(load.stream, partner, relay.port, mib, budget)
        clients.expect(pipe, 30)
        relay.refresh()
        c0, b0 = relay.cpu(), back.cpu()
        pipe.send("go")
        result = clients.expect(pipe, budget + 30)
        cpu, bcpu = relay.cpu() - c0, back.cpu() - b0
    finally:
        clients.close()
    if result["error"]:
        raise RuntimeError(f"{relay.name}: stream failed: {result['error']}")
    relayed = result["bytes"] / MiB
    wall = result["wall"]
    return {
        "b_cpu": cpu * 1000 / relayed,
        "b_rate": relayed / wall,
        "b_relay": cpu / wall,
        "b_backend": bcpu / wall,
        "b_client": result["cpu"] / wall,
    }


def run_latency(
    relay: Relay, partner: load.Partner, busy: int, seconds: float, samples: int
) -> dict[str, float]:
    quiesce(relay)
    clients = Clients()
    try:
        busy_pipes = [
            clients.spawn(load.busy, partner, relay.port, busy // 2, seconds + 30) for _ in range(2)
        ]
        for p in busy_pipes:
            clients.expect(p, 60)
        probe = clients.spawn(load.probe, partner, relay.port, seconds, samples)
        clients.expect(probe, 30)
        relay.refresh()
        c0 = relay.cpu()
        for p in busy_pipes:
            p.send("go")
        time.sleep(0.5)  # the busy connections reach their steady state
        probe.send("go")
        result = clients.expect(probe, seconds + 30)
        for p in busy_pipes:
            p.send("stop")
        busy_results = [clients.expect(p, 30) for p in busy_pipes]
        cpu = relay.cpu() - c0
    finally:
        clients.close()
    errors = [r["error"] for r in [result, *busy_results] if r["error"]]
    if errors or "p99" not in result:
        raise RuntimeError(f"{relay.name}: latency run failed: {errors or result}")
    echoes = result["samples"] + sum(r["echoes"] for r in busy_results)
    return {
        "c_p50": result["p50"] * 1000,
        "c_p99": result["p99"] * 1000,
        "c_cpu": cpu * 1e6 / max(echoes, 1),
    }


def run_saturate(
    relay: Relay, partner: load.Partner, conns: int, procs: int, seconds: float
) -> dict[str, float]:
    """(e) ``conns`` connections over ``procs`` load processes, each echoing
    1 KiB back to back for ``seconds``: relay CPU per message, messages/s."""
    quiesce(relay)
    clients = Clients()
    try:
        share = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
        pipes = [clients.spawn(load.busy, partner, relay.port, n, seconds + 30) for n in share if n]
        for p in pipes:
            clients.expect(p, 60)
        relay.refresh()
        for p in pipes:
            p.send("go")
        time.sleep(min(0.5, seconds / 4))  # every connection reaches its steady state
        c0, t0 = relay.cpu(), time.monotonic()
        # CPU is read over this window only (after the warm-up); the echoes
        # are counted over each process's whole run and scaled to the window.
        time.sleep(seconds)
        cpu, wall = relay.cpu() - c0, time.monotonic() - t0
        for p in pipes:
            p.send("stop")
        results = [clients.expect(p, 30) for p in pipes]
    finally:
        clients.close()
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        raise RuntimeError(f"{relay.name}: saturating run failed: {errors[:2]}")
    # Each process ran for its own wall (warm-up + window + stop latency): its
    # echo rate over that wall, times the window, is its share of the window.
    rate = sum(r["echoes"] / r["wall"] for r in results if r["wall"] > 0)
    messages = rate * wall
    return {
        "e_cpu": cpu * 1e6 / max(messages, 1.0),
        "e_rate": rate,
        "e_relay": cpu / wall,
        "e_client": sum(r["cpu"] / r["wall"] for r in results if r["wall"] > 0),
    }


def run_paced(
    relay: Relay, partner: load.Partner, conns: int, procs: int, rate: float, seconds: float
) -> dict[str, float]:
    """(f) ``rate`` 1 KiB messages/s spread over ``conns`` connections, open loop:
    relay CPU per message and the latency percentiles."""
    quiesce(relay)
    clients = Clients()
    try:
        share = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
        share = [n for n in share if n]
        pipes = [
            clients.spawn(
                load.paced,
                partner,
                relay.port,
                n,
                rate * n / conns,
                seconds,
                i / len(share),
            )
            for i, n in enumerate(share)
        ]
        for p in pipes:
            clients.expect(p, 60)
        relay.refresh()
        c0, t0 = relay.cpu(), time.monotonic()
        for p in pipes:
            p.send("go")
        results = [clients.expect(p, seconds + 40) for p in pipes]
        cpu, wall = relay.cpu() - c0, time.monotonic() - t0
    finally:
        clients.close()
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        raise RuntimeError(f"{relay.name}: paced run failed: {errors[:2]}")
    latencies = sorted(x for r in results for x in r["latencies"])
    if len(latencies) < 100:
        raise RuntimeError(f"{relay.name}: paced run: only {len(latencies)} echoes")
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "f_cpu": cpu * 1e6 / len(latencies),
        "f_p50": statistics.median(latencies) * 1000,
        "f_p99": q[98] * 1000,
        "f_relay": cpu / wall,
        "f_client": sum(r["cpu"] for r in results) / wall,
    }


def run_idle(relay: Relay, partner: load.Partner, count: int, budget: float) -> dict[str, float]:
    # A fresh relay: memory freed by earlier runs would otherwise be reused.
    relay.stop()
    relay.start()
    quiesce(relay)
    clients = Clients()
    try:
        pipes = [
            clients.spawn(load.idle, partner, relay.port, count // 2, 4, budget) for _ in range(2)
        ]
        for p in pipes:
            clients.expect(p, 30)
        relay.refresh()
        before = relay.rss()
        for p in pipes:
            p.send("go")
        results = [clients.expect(p, budget + 30) for p in pipes]
        quiesce(relay)
        relay.refresh()
        after = relay.rss()
        for p in pipes:
            p.send("release")
        for p in pipes:
            clients.expect(p, 60)
    finally:
        clients.close()
    held = sum(r["held"] for r in results)
    failed = sum(r["failed"] for r in results)
    if failed or held < count * 0.95:
        print(f"  {relay.name}: held {held} idle connections, {failed} failed", flush=True)
    if held == 0:
        raise RuntimeError(f"{relay.name}: no idle connection could be opened")
    return {"d_mem": (after - before) / 1024 / held}


# ----------------------------------------------------------------------
# Report


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def report(
    medians: dict[str, dict[str, float | None]], workers: list[int], header: list[str]
) -> str:
    lines = list(header)
    cols = ["figure".ljust(28)]
    for w in workers:
        cols += [f"edge-{w}w", f"haproxy-{w}w", f"nginx-{w}w", "edge/hap", "edge/ngx"]
    lines.append(" ".join(c.rjust(10) if i else c for i, c in enumerate(cols)))
    for key, label, fmt in FIGURES:
        row = [label.ljust(28)]
        for w in workers:
            e = medians[f"edge-{w}w"].get(key)
            h = medians[f"haproxy-{w}w"].get(key)
            n = medians[f"nginx-{w}w"].get(key)
            row += [_fmt(e, fmt), _fmt(h, fmt), _fmt(n, fmt), _ratio(e, h), _ratio(e, n)]
        lines.append(" ".join(c.rjust(10) if i else c for i, c in enumerate(row)))
    lines.append("")
    lines.append("who was busy (fraction of one core, median):")
    names = [n for n in medians if not n.startswith("_")]
    lines.append(" ".join(["".ljust(28)] + [n.rjust(11) for n in names]))
    for key, label in BUSY:
        vals = [_fmt(medians[n].get(key), "{:.2f}") for n in names]
        lines.append(" ".join([label.ljust(28)] + [v.rjust(11) for v in vals]))
    lines.append("")
    lines.append(targets(medians))
    lines.append("")
    lines.append(targets_19(medians))
    return "\n".join(lines)


def targets(medians: dict[str, dict[str, float | None]]) -> str:
    """Issue 10 item 3, against the best peer with one worker."""
    ours = medians["edge-1w"]
    peers = [medians["haproxy-1w"], medians["nginx-1w"]]
    out = ["targets (issue 10 item 3; edge-1w against the best 1-worker peer):"]
    for key, what, factor in (
        ("a_cpu", "CPU per connection <= best peer", 1.0),
        ("b_cpu", "CPU per MiB <= 1.5 x best peer", 1.5),
        ("d_mem", "memory per idle connection <= best peer", 1.0),
        ("c_p99", "p99 latency <= 1.5 x best peer", 1.5),
    ):
        values = [p[key] for p in peers if p.get(key) is not None]
        mine = ours.get(key)
        if not values or mine is None:
            out.append(f"  {what}: n/a")
            continue
        best = min(v for v in values if v is not None)
        verdict = "met" if mine <= factor * best else "NOT met"
        out.append(
            f"  {what}: edge {mine:.2f} vs best {best:.2f} "
            f"-> {mine / best:.2f} x (limit {factor:g}): {verdict}"
        )
    return "\n".join(out)


def targets_19(medians: dict[str, dict[str, float | None]]) -> str:
    """Issue 19's targets: edge-1w against the best 1-worker peer (lower is better
    except messages/s, where the ratio must be at least the limit)."""
    ours = medians["edge-1w"]
    peers = [medians["haproxy-1w"], medians["nginx-1w"]]
    out = ["targets (issue 19; edge-1w against the best 1-worker peer):"]
    for key, what, factor, higher_better in (
        ("e_cpu", "CPU per small message, saturating <= 1.5 x", 1.5, False),
        ("e_rate", "messages/s at saturation >= 0.67 x", 0.67, True),
        ("f_cpu", "CPU per small message, paced <= 1.5 x", 1.5, False),
        ("f_p99", "p99 at the paced load <= 2 x", 2.0, False),
        ("a_cpu", "CPU per full MTLS connection <= 1.25 x", 1.25, False),
        ("d_mem", "memory per idle connection <= 1.25 x", 1.25, False),
        ("b_cpu", "bulk CPU per MiB <= 1.2 x", 1.2, False),
    ):
        values = [v for p in peers if (v := p.get(key)) is not None]
        mine = ours.get(key)
        if not values or mine is None:
            out.append(f"  {what}: n/a")
            continue
        best = max(values) if higher_better else min(values)
        ratio = mine / best if best else float("inf")
        met = ratio >= factor if higher_better else ratio <= factor
        out.append(
            f"  {what}: edge {mine:.3g} vs best {best:.3g} -> {ratio:.2f} x "
            f"(limit {factor:g}): {'met' if met else 'NOT met'}"
        )
    return "\n".join(out)


def before_after(base_runs: list[dict[str, float]], ours: dict[str, float | None]) -> str:
    """edge-base (--baseline-edge) against edge-1w, medians of the same rounds."""
    lines = ["before/after (edge-base = --baseline-edge, same run):"]
    heads = ["edge-base", "edge-1w", "after/bef"]
    lines.append(" ".join(["figure".ljust(28), *(h.rjust(10) for h in heads)]))
    for key, label, fmt in FIGURES:
        before = _median([r[key] for r in base_runs if key in r])
        after = ours.get(key)
        if before is None and after is None:
            continue
        cells = [_fmt(before, fmt), _fmt(after, fmt), _ratio(after, before)]
        lines.append(" ".join([label.ljust(28), *(c.rjust(10) for c in cells)]))
    return "\n".join(lines)


# ----------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (~3 minutes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, help="(a) connections per run")
    parser.add_argument("--mib", type=int, help="(b) MiB each way per run")
    parser.add_argument("--idle", type=int, default=2000, help="(d) idle connections held")
    parser.add_argument("--latency-seconds", type=float, help="(c) probe duration per run")
    parser.add_argument("--sip-conns", type=int, default=100, help="(e)/(f) connections")
    parser.add_argument("--sip-seconds", type=float, help="(e)/(f) seconds per run")
    parser.add_argument("--paced-rate", type=float, default=2000.0, help="(f) messages/s")
    parser.add_argument(
        "--load-procs", type=int, default=2, help="(e)/(f) load-generator processes"
    )
    parser.add_argument("--only", help="comma-separated relay names, e.g. edge-1w,haproxy-1w")
    parser.add_argument("--skip", default="", help="figures to skip, e.g. d or c,d")
    parser.add_argument("--budget", type=float, default=560.0, help="no new round after this")
    parser.add_argument("--json", type=Path, help="also write raw runs and medians here")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs)")
    parser.add_argument(
        "--baseline-edge",
        type=Path,
        help="also run edge from this source tree (e.g. a git worktree of main) as edge-base, "
        "for a before/after comparison in the same run",
    )
    parser.add_argument(
        "--profile-edge", type=Path, help="run edge under cProfile, write FOLDER/edge-1w.prof"
    )
    args = parser.parse_args()
    conns = args.connections or (300 if args.quick else 600)
    mib = args.mib or (64 if args.quick else 128)
    lat_s = args.latency_seconds or (2.0 if args.quick else 3.0)
    idle_n = 1000 if args.quick and args.idle == 2000 else args.idle
    sip_s = args.sip_seconds or (2.0 if args.quick else 4.0)
    sip_n, procs, rate = args.sip_conns, args.load_procs, args.paced_rate
    rounds = max(args.rounds, 1)
    skip = set(args.skip.split(",")) - {""}

    if not ensure_tools(install=not args.no_install):
        return 2
    started = time.monotonic()
    workers = [1, 2]
    ours_two = edge_has_workers()
    versions = openssl_versions()

    tmp = tempfile.TemporaryDirectory(prefix="edge-compare-") if args.keep is None else None
    folder = Path(tmp.name) if tmp else args.keep
    assert folder is not None
    folder.mkdir(parents=True, exist_ok=True)
    files: Files = write_pki(folder)
    partner = load.Partner(
        str(files.partner_chain), str(files.partner_key), str(files.edge_ca), EDGE_NAME
    )
    back = backend(folder, files)
    back.start()
    relays: list[Relay] = []
    for w in workers:
        if w == 1 or ours_two:
            relays.append(edge_relay(folder, files, back.port, w, args.profile_edge))
        relays.append(haproxy_relay(folder, files, back.port, w))
        relays.append(nginx_relay(folder, files, back.port, w))
    if args.baseline_edge is not None:
        base = edge_relay(folder, files, back.port, 1, name="edge-base")
        # Its own OpenSSL settings too: importing edge here pointed OPENSSL_CONF,
        # which every relay inherits, at this tree's edge/openssl.cnf.
        base.env = {
            "PYTHONPATH": str(args.baseline_edge.resolve()),
            "OPENSSL_CONF": str(args.baseline_edge.resolve() / "edge" / "openssl.cnf"),
        }
        relays.insert(1, base)
    if args.only:
        wanted = set(args.only.split(",")) | ({"edge-base"} if args.baseline_edge else set())
        relays = [r for r in relays if r.name in wanted]
    runs: dict[str, list[dict[str, float]]] = {r.name: [] for r in relays}
    try:
        for relay in relays:
            relay.start()
        print(f"backend and {len(relays)} relays listening; {rounds} rounds", flush=True)
        for rnd in range(rounds):
            if rnd >= 3 and time.monotonic() - started > args.budget:
                print(f"budget of {args.budget:g}s spent: stopping after {rnd} rounds")
                break
            order = relays[rnd % len(relays) :] + relays[: rnd % len(relays)]
            for relay in order:
                t = time.monotonic()
                figures: dict[str, float] = {}
                phases: list[tuple[str, Callable[[], dict[str, float]]]] = [
                    ("d", partial(run_idle, relay, partner, idle_n, budget=120)),
                    ("a", partial(run_connections, relay, back, partner, conns, budget=120)),
                    ("b", partial(run_stream, relay, back, partner, mib, budget=120)),
                    ("c", partial(run_latency, relay, partner, 100, lat_s, 20000)),
                    ("e", partial(run_saturate, relay, partner, sip_n, procs, sip_s)),
                    ("f", partial(run_paced, relay, partner, sip_n, procs, rate, sip_s)),
                ]
                for letter, phase in phases:
                    if letter in skip:
                        continue
                    try:
                        figures |= phase()
                    except RuntimeError as exc:
                        # One failed phase (too few samples on a loaded
                        # machine, say) leaves that figure out of this round.
                        print(f"  ({letter}) {relay.name}: {exc}", flush=True)
                if not relay.alive():
                    raise RuntimeError(f"{relay.name} died: {relay.log_tail()}")
                runs[relay.name].append(figures)
                shown = " ".join(f"{k}={v:.3g}" for k, v in figures.items())
                print(
                    f"round {rnd + 1} {relay.name:11} {time.monotonic() - t:5.1f}s {shown}",
                    flush=True,
                )
    finally:
        for relay in relays:
            relay.stop()
        back.stop()
        if tmp is not None:
            tmp.cleanup()

    medians: dict[str, dict[str, float | None]] = {}
    for name in ["edge-1w", "haproxy-1w", "nginx-1w", "edge-2w", "haproxy-2w", "nginx-2w"]:
        keys = {k for run in runs.get(name, []) for k in run}
        medians[name] = {k: _median([run[k] for run in runs[name] if k in run]) for k in keys}
    n_runs = min((len(v) for v in runs.values()), default=0)
    header = [
        f"compare.py {_dt.date.today().isoformat()}: {os.cpu_count()} cores, "
        f"{platform.machine()}, Linux {platform.release()}, Python {platform.python_version()}; "
        f"median of {n_runs} runs; {time.monotonic() - started:.0f}s",
        f"  edge:    {versions['edge']}",
        f"  haproxy: {versions['haproxy']}",
        f"  nginx:   {versions['nginx']}",
        f"  clients: {versions['client']}",
        f"  load: (a) {conns} connections, 8 client threads; (b) {mib} MiB each way; "
        f"(c) 100 busy + 1 probe for {lat_s:g}s; (d) {idle_n} idle; "
        f"(e) {args.sip_conns} saturating for {sip_s:g}s; (f) {args.paced_rate:g} msg/s "
        f"over {args.sip_conns} for {sip_s:g}s; {args.load_procs} load processes",
        "" if ours_two else "  edge-2w: n/a (`edge run --workers` does not exist yet)",
        "",
    ]
    text = report(medians, workers, [h for h in header if h != ""] + [""])
    if runs.get("edge-base"):
        text += "\n\n" + before_after(runs["edge-base"], medians["edge-1w"])
    print()
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps({"runs": runs, "medians": medians, "versions": versions}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
