"""What one idle relayed connection costs in `edge run`: PSS per connection, and where it goes.

    python bench/idle_memory.py                          # this tree, 500 held, 2 reps
    python bench/idle_memory.py --tree main=/work/main --tree new=.   # A/B, interleaved
    python bench/idle_memory.py --tracemalloc --top 15   # + Python allocations by traceback

Same PKI, configuration and MTLS echo backend as bench/compare.py (whose phase
(d) gives the ratio against HAProxy and nginx). For each tree and rep, in
turn: a fresh `edge run` (nothing freed by earlier work to reuse), ``--held``
relayed connections opened (full MTLS handshake with the edge, the edge's own
MTLS to the pool member, one 1 KiB echo) and held idle; the edge process's
PSS (/proc/PID/smaps_rollup) and RSS (statm) are read before and after, once
the edge has stopped using CPU. ``--tracemalloc`` also runs the edge under
``tracemalloc`` (its bookkeeping inflates PSS: read the two figures from
separate runs) and diffs two snapshots (taken through SIGUSR1) grouped by
traceback: the Python allocations each held connection keeps. Only
127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import ssl
import statistics
import sys
import tempfile
import time
import tracemalloc
from multiprocessing.connection import Connection
from pathlib import Path

import compare_load as load
from compare import Clients, quiesce
from compare_relays import EDGE_NAME, Relay, backend, edge_relay, write_pki

_PAGE = os.sysconf("SC_PAGE_SIZE")

# Runs `edge run`; SIGUSR1 writes glibc's heap in use (mallinfo2: OpenSSL's
# allocations and Python's objects over 512 bytes; pymalloc's arenas are mmap'd
# outside it) to $EDGE_SNAPSHOT.N.done and, with $EDGE_TRACE set, starts
# tracemalloc (at the first signal: traced, start-up takes minutes here) and
# dumps a snapshot to $EDGE_SNAPSHOT.N.
_WRAPPER = """\
import ctypes, os, signal, sys, tracemalloc
import edge.cli
class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]
_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2
_n = [0]
def _dump(signum, frame):
    _n[0] += 1
    path = f"{os.environ['EDGE_SNAPSHOT']}.{_n[0]}"
    if os.environ.get("EDGE_TRACE"):
        if not tracemalloc.is_tracing():
            tracemalloc.start(int(os.environ.get("EDGE_TRACE_DEPTH", "12")))
        tracemalloc.take_snapshot().dump(path)
    info = _libc.mallinfo2()
    with open(path + ".done", "w") as f:
        f.write(str(info.uordblks + info.hblkhd))
    if os.environ.get("EDGE_EXIT_AT") == str(_n[0]):
        os._exit(0)  # under heaptrack: what is still allocated shows as "leaked"
signal.signal(signal.SIGUSR1, _dump)
sys.exit(edge.cli.main(sys.argv[1:]))
"""


def pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss line")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def edge_pid(relay: Relay) -> int:
    """The Python process of ``relay`` (under heaptrack, a child of its script)."""
    relay.refresh()
    exe = os.path.realpath(sys.executable)
    for pid in relay.pids:
        with contextlib.suppress(OSError):
            if os.path.realpath(f"/proc/{pid}/exe") == exe:
                return pid
    raise RuntimeError(f"{relay.name}: no Python process in {relay.pids}")


def snapshot(pid: int, path: str, n: int) -> tuple[int, tracemalloc.Snapshot | None]:
    """(glibc heap in use, tracemalloc snapshot or None) of the edge process."""
    os.kill(pid, signal.SIGUSR1)
    done = Path(f"{path}.{n}.done")
    deadline = time.monotonic() + 60
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("no tracemalloc snapshot after 60 s")
        time.sleep(0.1)
    time.sleep(0.1)  # written, now closed
    heap = int(done.read_text())
    traced = Path(f"{path}.{n}")
    return heap, tracemalloc.Snapshot.load(str(traced)) if traced.exists() else None


def hold(
    partner: load.Partner, port: int, count: int, burst: int, budget_s: float, pipe: Connection
) -> None:
    """``load.idle`` with a ``burst``-byte echo (one write, then read it all
    back) before each connection goes idle: what a connection keeps after
    moving a burst."""
    ctx = partner.context()
    payload = b"b" * burst
    held: list[ssl.SSLSocket] = []
    failed = 0
    deadline = time.monotonic() + budget_s
    pipe.send("ready")
    pipe.recv()
    buf = bytearray(burst)
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            ss = load._connect(ctx, partner, port)
            load._echo(ss, payload, buf)
        except (OSError, ssl.SSLError, ConnectionError):
            failed += 1
            continue
        held.append(ss)
    pipe.send({"held": len(held), "failed": failed})
    if pipe.poll(budget_s):  # release
        pipe.recv()
    for ss in held:
        ss.close()
    pipe.send("closed")


def _where(stat: tracemalloc.StatisticDiff) -> str:
    """The allocation's most recent frame in edge/ code, and the frame that allocated."""
    frames = list(stat.traceback)[::-1]  # most recent first
    ours = next((f for f in frames if "/edge/" in f.filename), None)
    mine = f"{ours.filename.split('/edge/')[-1]}:{ours.lineno}" if ours else "?"
    return f"{mine} [{Path(frames[0].filename).name}:{frames[0].lineno}]"


def measure(
    relay: Relay, partner: load.Partner, held: int, folder: Path, top: int, burst: int
) -> dict[str, float]:
    relay.stop()
    try:
        relay.start()
    except RuntimeError as exc:
        raise RuntimeError(f"{relay.name}: {exc}: {relay.log_tail(20)}") from exc
    quiesce(relay)
    pid = edge_pid(relay)
    clients = Clients()
    path = str(folder / relay.name)
    try:
        if burst:
            pipes = [
                clients.spawn(hold, partner, relay.port, held // 2, burst, 120) for _ in range(2)
            ]
        else:
            pipes = [
                clients.spawn(load.idle, partner, relay.port, held // 2, 4, 120) for _ in range(2)
            ]
        for p in pipes:
            clients.expect(p, 30)
        pss0, rss0 = pss_bytes(pid), rss_bytes(pid)
        heap0, snap0 = snapshot(pid, path, 1)
        for p in pipes:
            p.send("go")
        results = [clients.expect(p, 150) for p in pipes]
        quiesce(relay)
        time.sleep(1.0)
        pss1, rss1 = pss_bytes(pid), rss_bytes(pid)
        heap1, snap1 = snapshot(pid, path, 2)
        for p in pipes:
            p.send("release")
        for p in pipes:
            clients.expect(p, 60)
    finally:
        clients.close()
    n = sum(r["held"] for r in results)
    failed = sum(r["failed"] for r in results)
    if n == 0:
        raise RuntimeError(f"{relay.name}: no connection held: {relay.log_tail()}")
    out = {"held": n, "failed": failed, "pss": (pss1 - pss0) / 1024 / n}
    out["rss"] = (rss1 - rss0) / 1024 / n
    out["heap"] = (heap1 - heap0) / 1024 / n
    if snap0 is not None and snap1 is not None:
        diff = snap1.compare_to(snap0, "traceback")
        out["py"] = sum(d.size_diff for d in diff) / 1024 / n
        out["py_blocks"] = sum(d.count_diff for d in diff) / n
        size: dict[str, int] = {}
        count: dict[str, int] = {}
        for d in diff:
            key = _where(d)
            size[key] = size.get(key, 0) + d.size_diff
            count[key] = count.get(key, 0) + d.count_diff
        print(f"  {relay.name}: Python allocations held per connection, by edge/ line [allocator]:")
        for key in sorted(size, key=lambda k: -size[k])[:top]:
            print(f"    {size[key] / n:8.0f} B {count[key] / n:6.2f} blocks  {key}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held", type=int, default=500, help="idle relayed connections held")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        help="NAME=PATH: run edge from this source tree (repeat for an A/B); default: this one",
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=0,
        help="KiB each connection echoes in one write before it idles (default: 1 KiB echo)",
    )
    parser.add_argument("--tracemalloc", action="store_true", help="diff Python allocations")
    parser.add_argument("--top", type=int, default=12, help="tracebacks shown")
    parser.add_argument(
        "--heaptrack",
        action="store_true",
        help="run edge under heaptrack; it exits holding the connections, so "
        "`heaptrack_print --print-leaks 1 FOLDER/heaptrack.NAME.*` shows what they hold "
        "(use with --keep, one rep, one tree)",
    )
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (snapshots)")
    args = parser.parse_args()
    # The interpreter itself, not a shim script (heaptrack follows the first exec).
    exe = os.path.realpath(sys.executable)
    here = Path(__file__).resolve().parent.parent
    trees = [t.split("=", 1) for t in args.tree] or [["edge", str(here)]]
    with tempfile.TemporaryDirectory(prefix="edge-idle-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        files = write_pki(folder)
        partner = load.Partner(
            str(files.partner_chain), str(files.partner_key), str(files.edge_ca), EDGE_NAME
        )
        back = backend(folder, files)
        back.start()
        relays: list[Relay] = []
        for name, path in trees:
            relay = edge_relay(folder, files, back.port, 1, name=name)
            relay.env = {"PYTHONPATH": str(Path(path).resolve())}
            relay.argv[1:3] = ["-c", _WRAPPER]
            relay.env["EDGE_SNAPSHOT"] = str(folder / name)
            if args.tracemalloc:
                relay.env["EDGE_TRACE"] = "1"
            if args.heaptrack:
                relay.argv[:1] = ["heaptrack", "-o", str(folder / f"heaptrack.{name}"), exe]
                relay.env["EDGE_EXIT_AT"] = "2"
            relays.append(relay)
        results: dict[str, list[dict[str, float]]] = {r.name: [] for r in relays}
        try:
            for rep in range(args.reps):
                for relay in relays if rep % 2 == 0 else relays[::-1]:
                    r = measure(relay, partner, args.held, folder, args.top, args.burst * 1024)
                    results[relay.name].append(r)
                    shown = " ".join(f"{k}={v:.1f}" for k, v in r.items())
                    print(f"rep {rep + 1} {relay.name}: {shown}", flush=True)
        finally:
            for relay in relays:
                relay.stop()
            back.stop()
    load_avg = os.getloadavg()
    print(f"\nload average {load_avg[0]:.2f} {load_avg[1]:.2f}; {args.held} held, KiB/connection")
    for name, runs in results.items():
        keys = [k for k in ("pss", "rss", "heap", "py", "py_blocks") if k in runs[0]]
        cols = "  ".join(
            f"{k} {statistics.median(r[k] for r in runs):.1f} "
            f"({', '.join(f'{r[k]:.1f}' for r in runs)})"
            for k in keys
        )
        print(f"  {name:10} {cols}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
