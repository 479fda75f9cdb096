"""Verification rate of the partner-trust core against bare pyOpenSSL, same chain, same run.

What it measures (issue 3, item 6): `PartnerTrust.verify_client` on a
3-certificate ECDSA P-256 chain (leaf, issuing CA, root in the partner's
folder) with N partners configured (default 50), against a bare pyOpenSSL
`X509StoreContext(...).verify_certificate()` of the same chain on a store that
holds only that partner's root, with the certificates already converted to
pyOpenSSL objects. The bare figure is the cost of the signature and path checks
alone; ours adds partner lookup, purpose, names and revocation. Target: our
rate >= 0.5 x bare. Since issue 15 the path comes from pyca/cryptography's
verifier and a verified (partner, chain) is cached with its validity window,
so a third line shows a chain never seen before (cache cleared each call).
Since issue 19 an accepted verdict itself is remembered for a few seconds
(`edge.core.verdict_cache`), so the first two lines are that cache's hit
(with and without parsing the certificates) and the third the whole work.

A second line measures our core on certificates parsed afresh from DER each
time (what a new connection hands in), to show the conversion cache at work.

Loops are bounded by count AND time: each round stops after --iterations or
--seconds, whichever comes first. Rounds alternate bare/core so drift (CPU
frequency, a noisy neighbour) hits both; the median round is reported.

    python bench/verify.py [--partners 50] [--rounds 5] [--iterations 20000] [--seconds 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

from edge.core.policies import load_policies
from edge.core.trust import PartnerTrust
from edge.pki import CA


def _rate(fn: Callable[[], object], iterations: int, seconds: float) -> float:
    """Calls per second of `fn`, over at most `iterations` calls or `seconds`."""
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    done = 0
    # Check the clock every 64 calls: cheap, and still bounded in time.
    while done < iterations:
        for _ in range(64):
            fn()
        done += 64
        if time.perf_counter() >= deadline:
            break
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partners", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        folder = Path(tmp)
        issuing: list[CA] = []
        for i in range(args.partners):
            root = CA.root(f"Bench Partner {i} Root")
            issuing.append(root.intermediate(f"Bench Partner {i} Issuing"))
            (folder / f"partner{i}.example").mkdir()
            (folder / f"partner{i}.example" / "root.pem").write_bytes(root.cert_pem())
        snapshot = load_policies(folder)
    assert not snapshot.problems, snapshot.problems
    trust = PartnerTrust(snapshot)

    # The partner in the middle: no luck from being first or last in any order.
    target = args.partners // 2
    leaf = issuing[target].issue(dns=[f"sip.partner{target}.example"])
    chain = leaf.chain
    pid = f"partner{target}.example"
    verdict = trust.verify_client(chain)
    assert verdict.accepted and verdict.partner == pid, verdict.line
    assert len(verdict.chain) == 3

    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(snapshot.partners[pid].roots[0]))
    leaf_x = crypto.X509.from_cryptography(chain[0])
    untrusted = [crypto.X509.from_cryptography(c) for c in chain[1:]]

    def bare() -> None:
        crypto.X509StoreContext(store, leaf_x, untrusted).verify_certificate()

    def core() -> None:
        trust.verify_client(chain)

    ders = [c.public_bytes(serialization.Encoding.DER) for c in chain]

    def core_fresh() -> None:
        trust.verify_client([x509.load_der_x509_certificate(d) for d in ders])

    def core_cold() -> None:
        # A chain never seen before: pyca's path building and signatures, no cache.
        trust.clear_verified_paths()
        trust.verify_client(chain)

    bare_rates: list[float] = []
    core_rates: list[float] = []
    fresh_rates: list[float] = []
    cold_rates: list[float] = []
    for _ in range(args.rounds):
        bare_rates.append(_rate(bare, args.iterations, args.seconds))
        core_rates.append(_rate(core, args.iterations, args.seconds))
        fresh_rates.append(_rate(core_fresh, args.iterations, args.seconds))
        cold_rates.append(_rate(core_cold, args.iterations, args.seconds))
    b = statistics.median(bare_rates)
    c = statistics.median(core_rates)
    f = statistics.median(fresh_rates)
    k = statistics.median(cold_rates)
    print(f"partners configured: {args.partners}; chain: ECDSA P-256 leaf <- issuing <- root")
    print(f"bare pyOpenSSL X509StoreContext:   {b:10.0f} verifications/s ({1e6 / b:6.1f} us)")
    print(f"edge PartnerTrust.verify_client:   {c:10.0f} verifications/s ({1e6 / c:6.1f} us)")
    print(f"  same, certificates parsed afresh: {f:9.0f} verifications/s ({1e6 / f:6.1f} us)")
    print(f"  same, a chain never seen (cold):  {k:9.0f} verifications/s ({1e6 / k:6.1f} us)")
    print(f"ratio core/bare: {c / b:.2f} (target >= 0.5); fresh/bare: {f / b:.2f}", end="")
    print(f"; cold/bare: {k / b:.2f}")
    return 0 if c / b >= 0.5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
