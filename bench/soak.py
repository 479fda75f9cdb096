"""Soak: does `edge run` stay flat in memory and file descriptors under a mixed load?

Issue 8, item 6. One real `edge run` subprocess on 127.0.0.1, a two-member echo
pool and every load generator in this process (trio), for a bounded time:

- good partners: loops that connect, echo a few KiB, close (short-lived), and
  loops that hold one relayed connection for ~30 s echoing every second
  (long-lived, so reloads re-authorize live connections);
- strangers: a certificate from an unknown root (`unknown_ca`);
- stalls: batches of TCP connections that never send a byte
  (`handshake_timeout`, handshake_timeout_s = 2);
- reloads: every few seconds, in turn: touch a partner's policy.toml, add a
  partner folder, remove it again; each followed by SIGHUP.

Every `--sample-s` seconds it reads the gateway's VmRSS (/proc/PID/status) and
its open descriptors (/proc/PID/fd), then prints a table and a verdict: after
a warm-up (the first third), the median of the last third must not exceed
the median of the middle third by more than `--tolerance` (default 10%), for
RSS and for fds (fds: or by 4, whichever is more); the least-squares trend
after warm-up is printed too. Exit status 0 when flat and every outcome was
the expected one.

Every loop is bounded by the deadline and by a count; only 127.0.0.0/8 is used
(each generator has its own source address, so the per-source limits of
issue 8 do not turn the mix into `over_limit`).

Run from the repository root: `python bench/soak.py` (10 minutes),
`python bench/soak.py --quick` (1 minute), `--minutes 3`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.pki import CA
from edge.tls import TLSStream, client_context
from tests.gateway_harness import (
    EDGE_NAME,
    Pki,
    start_pool,
    write_federation,
)

HANDSHAKE_TIMEOUT_S = 2
# A hard cap on connections per generator loop, whatever the duration.
MAX_ITERATIONS = 1_000_000


def read_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def count_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.pki = Pki.make()
        self.deadline = 0.0
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.events: Counter[str] = Counter()  # "event/reason-or-end" from the gateway's log
        self.client: Counter[str] = Counter()  # what the generators saw
        self.rows: list[dict[str, Any]] = []
        self.stderr_tail = b""
        self.traceback_seen = False
        self.process: trio.Process | None = None

    # ------------------------------------------------------------------
    # The gateway

    async def read_stdout(self, started: trio.Event) -> None:
        assert self.process is not None and self.process.stdout is not None
        buf = b""
        async for chunk in self.process.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                event = json.loads(line)
                name = event.get("event", "?")
                if name == "gateway_started":
                    host, _, port = event["listeners"]["federation"][0].rpartition(":")
                    self.address = (host.strip("[]"), int(port))
                    started.set()
                elif name == "startup_failed":
                    raise RuntimeError(f"edge did not start: {event}")
                detail = event.get("reason") or event.get("end") or event.get("result") or ""
                self.events[f"{name}/{detail}" if detail else name] += 1

    async def read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr_tail = (self.stderr_tail + chunk)[-65536:]
            if b"Traceback" in self.stderr_tail:
                self.traceback_seen = True

    # ------------------------------------------------------------------
    # Load generators

    def running(self) -> bool:
        return trio.current_time() < self.deadline

    async def connect(self, source: str, leaf: Any) -> TLSStream:
        ctx = client_context([self.pki.edge_ca.cert], leaf.chain, leaf.key)
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            await sock.bind((source, 0))
            await sock.connect(self.address)
        except BaseException:
            sock.close()
            raise
        stream = TLSStream(
            trio.SocketStream(sock), ctx, server_side=False, server_hostname=EDGE_NAME
        )
        await stream.do_handshake()
        return stream

    async def echo(self, stream: TLSStream, payload: bytes) -> bool:
        await stream.send_all(payload)
        got = b""
        while len(got) < len(payload):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            got += chunk
        return got == payload

    async def good_short(self, k: int) -> None:
        leaf = self.pki.fabrikam.issue(dns=[f"sip{k}.fabrikam.com"])
        rng = random.Random(k)
        for _ in range(MAX_ITERATIONS):
            if not self.running():
                return
            try:
                with trio.fail_after(10):
                    stream = await self.connect(f"127.3.0.{k + 1}", leaf)
                    ok = True
                    for _ in range(rng.randint(1, 4)):
                        ok = ok and await self.echo(stream, rng.randbytes(rng.randint(1, 64) << 10))
                    await stream.aclose()
                self.client["good_ok" if ok else "good_bad_echo"] += 1
            except (trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
                self.client[f"good_failed:{type(exc).__name__}"] += 1
            await trio.sleep(self.args.pause_s)

    async def good_long(self, k: int) -> None:
        leaf = self.pki.fabrikam.issue(dns=[f"long{k}.fabrikam.com"])
        for _ in range(MAX_ITERATIONS):
            if not self.running():
                return
            try:
                with trio.fail_after(60):
                    stream = await self.connect(f"127.3.1.{k + 1}", leaf)
                    ok = True
                    for i in range(30):
                        if not self.running():
                            break
                        ok = ok and await self.echo(stream, f"long-lived {i}".encode() * 20)
                        await trio.sleep(1)
                    await stream.aclose()
                self.client["long_ok" if ok else "long_bad_echo"] += 1
            except (trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
                self.client[f"long_failed:{type(exc).__name__}"] += 1

    async def strangers(self) -> None:
        leaf = self.pki.stranger.issue(dns=["sip.stranger.test"])
        for _ in range(MAX_ITERATIONS):
            if not self.running():
                return
            try:
                with trio.fail_after(10):
                    stream = await self.connect("127.3.2.1", leaf)
                    await stream.send_all(b"let me in")
                    data = await stream.receive_some(100)
                    self.client["stranger_got_data" if data else "stranger_refused"] += 1
                    await trio.aclose_forcefully(stream)
            except (trio.BrokenResourceError, OSError):
                self.client["stranger_refused"] += 1
            except trio.TooSlowError:
                self.client["stranger_timeout"] += 1
            await trio.sleep(self.args.pause_s * 4)

    async def stalls(self) -> None:
        batch = self.args.stall_batch
        for round_ in range(MAX_ITERATIONS):
            if not self.running():
                return

            async def one(source: str) -> None:
                sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
                with sock:
                    await sock.bind((source, 0))
                    await sock.connect(self.address)
                    try:
                        with trio.fail_after(HANDSHAKE_TIMEOUT_S + 10):
                            data = await sock.recv(100)
                        self.client["stall_got_data" if data else "stall_dropped"] += 1
                    except OSError:
                        self.client["stall_dropped"] += 1
                    except trio.TooSlowError:
                        self.client["stall_not_dropped"] += 1

            async with trio.open_nursery() as nursery:
                for i in range(batch):
                    nursery.start_soon(one, f"127.4.{round_ % 200}.{i + 1}")

    async def reloads(self) -> None:
        policies = self.folder / "federation_policies"
        for n in range(MAX_ITERATIONS):
            await trio.sleep(self.args.reload_s)
            if not self.running():
                return
            step = n % 3
            temp = policies / "visitor.example"
            if step == 0:
                policy = policies / "fabrikam.com" / "policy.toml"
                policy.write_text(policy.read_text())  # same content, new mtime
            elif step == 1:
                temp.mkdir(exist_ok=True)
                (temp / "root.pem").write_bytes(CA.root(f"Visitor Root {n}").cert_pem())
            else:
                for f in temp.iterdir():
                    f.unlink()
                temp.rmdir()
            assert self.process is not None
            self.process.send_signal(signal.SIGHUP)
            self.client[("reload_touch", "reload_add", "reload_remove")[step]] += 1

    # ------------------------------------------------------------------
    # Sampling and the verdict

    async def sampler(self, pid: int, t0: float) -> None:
        for _ in range(MAX_ITERATIONS):
            row = {
                "t": trio.current_time() - t0,
                "rss_kib": read_rss_kib(pid),
                "fds": count_fds(pid),
                "good": self.client["good_ok"] + self.client["long_ok"],
                "refused": self.events["connection_rejected/unknown_ca"],
                "timeouts": self.events["connection_rejected/handshake_timeout"],
                "reloads": self.events["policies_reloaded/ok"],
            }
            self.rows.append(row)
            print(_format_row(row), flush=True)
            if not self.running():
                return
            await trio.sleep(min(self.args.sample_s, max(0.0, self.deadline - trio.current_time())))

    async def run(self) -> int:
        args = self.args
        async with trio.open_nursery() as nursery:
            pool = await start_pool(nursery, self.pki, ("fe1.corp.test", "fe2.corp.test"))
            config = write_federation(
                self.folder,
                self.pki,
                [(h, p) for h, p, _ in pool],
                limits=f"handshake_timeout_s = {HANDSHAKE_TIMEOUT_S}\nidle_timeout_s = 120",
            )
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
            try:
                started = trio.Event()
                nursery.start_soon(self.read_stdout, started)
                nursery.start_soon(self.read_stderr)
                with trio.fail_after(30):
                    await started.wait()
                pid = self.process.pid
                t0 = trio.current_time()
                self.deadline = t0 + args.minutes * 60
                print(
                    f"soak: edge pid {pid} on {self.address[0]}:{self.address[1]}, "
                    f"{args.minutes:g} min, sample every {args.sample_s:g} s"
                )
                print(_HEADER, flush=True)
                with trio.fail_after(args.minutes * 60 + 120):
                    async with trio.open_nursery() as load:
                        for k in range(args.good):
                            load.start_soon(self.good_short, k)
                        for k in range(args.long):
                            load.start_soon(self.good_long, k)
                        load.start_soon(self.strangers)
                        load.start_soon(self.stalls)
                        load.start_soon(self.reloads)
                        load.start_soon(self.sampler, pid, t0)
            finally:
                with trio.CancelScope(shield=True):
                    if self.process.returncode is None:
                        self.process.send_signal(signal.SIGTERM)
                    with trio.move_on_after(40):
                        await self.process.wait()
                    if self.process.returncode is None:
                        self.process.kill()
                        await self.process.wait()
            nursery.cancel_scope.cancel()
        return self.report()

    def report(self) -> int:
        rows = self.rows
        print()
        print("gateway log events:", dict(sorted(self.events.items())))
        print("generators saw:    ", dict(sorted(self.client.items())))
        print(f"gateway exit status: {self.process.returncode if self.process else None}")
        problems = []
        if len(rows) < 6:
            print("verdict: too few samples for a verdict (run longer)")
            return 1
        third = len(rows) // 3
        middle, last = rows[third : 2 * third], rows[2 * third :]
        settled = rows[third:]
        # Medians resist the in-flight connections a sample happens to catch; fds
        # also get an absolute floor, since a stall batch alone moves them by 20.
        for key, unit, floor in (("rss_kib", "KiB", 0.0), ("fds", "fds", 4.0)):
            m = statistics.median(r[key] for r in middle)
            n = statistics.median(r[key] for r in last)
            change = (n - m) / m if m else 0.0
            flat = n - m <= max(self.args.tolerance * m, floor)
            slope = _slope([r["t"] / 60 for r in settled], [float(r[key]) for r in settled])
            print(
                f"{key}: start {rows[0][key]}, end of warm-up {rows[third - 1][key]} {unit}; "
                f"median middle third {m:.0f}, last third {n:.0f} ({change:+.1%}); "
                f"after warm-up min {min(r[key] for r in settled)}, "
                f"max {max(r[key] for r in settled)}, trend {slope:+.1f} {unit}/min"
                f" -> {'flat' if flat else 'NOT flat'}"
            )
            if not flat:
                problems.append(f"{key} grew {change:+.1%}")
        bad = {
            k: v
            for k, v in self.client.items()
            if k.startswith(("good_failed", "good_bad", "long_failed", "long_bad"))
            or k in ("stranger_got_data", "stall_got_data", "stall_not_dropped")
        }
        if bad:
            problems.append(f"unexpected outcomes {bad}")
        internal = self.events["connection_rejected/internal_error"] + self.events["internal_error"]
        if internal:
            problems.append(f"{internal} internal_error events")
        if self.traceback_seen:
            problems.append("Traceback on the gateway's stderr")
        if self.process is None or self.process.returncode != 0:
            problems.append("the gateway did not exit 0 on SIGTERM")
        if problems:
            print("verdict: FAIL: " + "; ".join(problems))
            return 1
        print(
            f"verdict: flat after warm-up (last third within {self.args.tolerance:.0%} "
            "of the middle third), every outcome as expected"
        )
        return 0


_HEADER = (
    f"{'t_s':>7} {'rss_MiB':>8} {'fds':>5} {'good':>7} {'unk_ca':>7} {'hs_tmo':>7} {'reload':>6}"
)


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 when undefined)."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def _format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['t']:7.0f} {row['rss_kib'] / 1024:8.1f} {row['fds']:5d} {row['good']:7d} "
        f"{row['refused']:7d} {row['timeouts']:7d} {row['reloads']:6d}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="duration (default 10)")
    parser.add_argument("--quick", action="store_true", help="1 minute, samples every 2 s")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--good", type=int, default=4, help="short-lived partner loops")
    parser.add_argument("--long", type=int, default=4, help="long-lived partner loops")
    parser.add_argument("--stall-batch", type=int, default=20, help="stalled sockets per batch")
    parser.add_argument("--reload-s", type=float, default=5.0, help="seconds between reloads")
    parser.add_argument("--pause-s", type=float, default=0.05, help="pause between connections")
    parser.add_argument("--tolerance", type=float, default=0.10, help="flatness tolerance")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.sample_s = 1.0, 2.0
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes must be in (0, 1440]")
    with tempfile.TemporaryDirectory(prefix="edge-soak-") as tmp:
        return trio.run(Soak(args, Path(tmp)).run)


if __name__ == "__main__":
    sys.exit(main())
