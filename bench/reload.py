"""How long a policy reload takes with many partners (issue: live trust changes).

Two measurements on the same folder of N partners (default 200; each with a
root, a CRL and a policy.toml):

1. in-process, the steps a reload runs: fingerprint the folder, load the
   snapshot (keeping the previous one for broken partners), build the verifier;
   median of several rounds;
2. end to end: a real `edge run` on that folder; we add partner N+1, send
   SIGHUP and time until the gateway logs `policies_reloaded`.

Target: a reload of 200 partners in under 2 s. Bounded in count and time;
loopback only. Run: `python bench/reload.py [--partners 200] [--rounds 5]`.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from edge.core.policies import load_policies
from edge.core.trust import PartnerTrust
from edge.demo import edge_toml, write_identity
from edge.pki import CA
from edge.watch import fingerprint


def make_partners(folder: Path, count: int) -> None:
    for i in range(count):
        ca = CA.root(f"Partner {i} Root")
        d = folder / f"partner{i}.example"
        d.mkdir(parents=True)
        (d / "root.pem").write_bytes(ca.cert_pem())
        (d / "partner.crl").write_bytes(ca.crl().public_bytes(Encoding.PEM))
        (d / "policy.toml").write_text(f'domains = ["partner{i}.example"]\n')


def in_process(folder: Path, rounds: int) -> list[float]:
    times = []
    previous = load_policies(folder)
    for _ in range(rounds):
        t0 = time.perf_counter()
        fingerprint([folder])
        snapshot = load_policies(folder, previous)
        PartnerTrust(snapshot)
        times.append(time.perf_counter() - t0)
        previous = snapshot
    return times


def end_to_end(folder: Path, count: int, timeout_s: float = 60) -> float:
    """Seconds from SIGHUP to `policies_reloaded` in a real `edge run`."""
    from tests.gateway_harness import Pki

    pki = Pki.make()
    base = folder.parent
    identity = write_identity(base, pki.public, pki.internal, pki.enterprise)
    config = base / "edge.toml"
    config.write_text(
        edge_toml(
            identity,
            [("fe1.corp.test", 9)],
            policies=folder.name,
            metrics=False,
            tables="[policies]\npoll_interval_s = 3600\n",
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    try:
        for line in proc.stdout:
            if json.loads(line)["event"] == "gateway_started":
                break
            if time.monotonic() > deadline:
                raise TimeoutError("edge did not start")
        late_root = CA.root("Late Partner Root")
        d = folder / f"partner{count}.example"
        d.mkdir()
        (d / "root.pem").write_bytes(late_root.cert_pem())
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGHUP)
        for line in proc.stdout:
            if json.loads(line)["event"] == "policies_reloaded":
                return time.perf_counter() - t0
            if time.monotonic() > deadline:
                raise TimeoutError("no reload logged")
        raise RuntimeError("edge exited")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partners", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    with tempfile.TemporaryDirectory(prefix="edge-reload-bench-") as tmp:
        folder = Path(tmp) / "federation_policies"
        t0 = time.perf_counter()
        make_partners(folder, args.partners)
        print(f"made {args.partners} partners in {time.perf_counter() - t0:.1f}s")
        times = in_process(folder, args.rounds)
        median = statistics.median(times)
        print(
            f"in-process reload (fingerprint + load + verifier), {args.partners} partners: "
            f"median {median * 1000:.0f} ms, min {min(times) * 1000:.0f} ms "
            f"over {args.rounds} rounds"
        )
        e2e = end_to_end(folder, args.partners)
        print(
            f"edge run: SIGHUP -> policies_reloaded with {args.partners + 1} partners: "
            f"{e2e * 1000:.0f} ms"
        )
        ok = median < 2.0 and e2e < 2.0
        print(f"target < 2 s: {'met' if ok else 'NOT met'}")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
