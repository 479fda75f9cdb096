"""CPU per full MTLS connection through `edge run`, A/B between source trees (issue 19).

The load is compare.py's phase (a): each connection is a full MTLS handshake
with the partner's certificate, one 1 KiB echo through the pool (the edge's own
MTLS handshake with the member) and a graceful close; the figure is the edge
process's user+system CPU (/proc) per connection. Several edges, each from its
own source tree, listen at once on the same PKI and backend; rounds visit them
in turn (rotating the order), so load from elsewhere hits every tree alike.

    python bench/handshake.py --tree main=/work/main --tree new=. --rounds 5
    python bench/handshake.py --tree new=. --rounds 1 --profile /tmp/prof

`--profile FOLDER` runs each edge under cProfile with the *CPU* clock
(`time.process_time`, so waiting is not counted), switched on only for the
measured connections (SIGUSR1 on, SIGUSR2 off and write FOLDER/NAME.prof).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import compare_load as load
from compare import run_connections
from compare_relays import EDGE_NAME, backend, edge_relay, write_pki

# Runs `edge.cli` under a CPU-clock profiler that only counts between SIGUSR1 and SIGUSR2.
_PROFILED = """
import cProfile, runpy, signal, sys, time
out = sys.argv[1]
sys.argv = ["edge"] + sys.argv[2:]
prof = cProfile.Profile(time.process_time)
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
def _stop(*_):
    prof.disable()
    prof.dump_stats(out)
signal.signal(signal.SIGUSR2, _stop)
runpy.run_module("edge.cli", run_name="__main__")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=SOURCE_TREE")
    parser.add_argument("--connections", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="write NAME.prof here (CPU clock)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-handshake-") as tmp:
        folder = Path(tmp)
        files = write_pki(folder)
        partner = load.Partner(
            str(files.partner_chain), str(files.partner_key), str(files.edge_ca), EDGE_NAME
        )
        back = backend(folder, files)
        back.start()
        relays = []
        for spec in args.tree:
            name, _, tree = spec.partition("=")
            relay = edge_relay(folder, files, back.port, 1, name=name)
            # Each tree's own OpenSSL settings: this process imported edge (from
            # PYTHONPATH), which set OPENSSL_CONF for every child to its own copy.
            source = Path(tree).resolve()
            relay.env = {
                "PYTHONPATH": str(source),
                "OPENSSL_CONF": str(source / "edge" / "openssl.cnf"),
            }
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                out = str((args.profile / f"{name}.prof").resolve())
                relay.argv = [sys.executable, "-c", _PROFILED, out, *relay.argv[3:]]
            relays.append(relay)
        cpu: dict[str, list[float]] = {r.name: [] for r in relays}
        try:
            for relay in relays:
                relay.start()
            for rnd in range(args.rounds):
                shift = rnd % len(relays)
                for relay in relays[shift:] + relays[:shift]:
                    assert relay.proc is not None
                    if args.profile is not None:
                        os.kill(relay.proc.pid, signal.SIGUSR1)
                    figures = run_connections(relay, back, partner, args.connections, budget=120)
                    if args.profile is not None:
                        os.kill(relay.proc.pid, signal.SIGUSR2)
                    cpu[relay.name].append(figures["a_cpu"])
                    print(
                        f"round {rnd + 1} {relay.name:8} {figures['a_cpu']:.2f} ms CPU/connection "
                        f"({figures['a_rate']:.0f}/s; load {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
        finally:
            time.sleep(0.5)  # a profile being written
            for relay in relays:
                relay.stop()
            back.stop()
    for name, values in cpu.items():
        shown = " ".join(f"{v:.2f}" for v in values)
        print(f"{name:8} median {statistics.median(values):.2f} ms CPU/connection  [{shown}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
