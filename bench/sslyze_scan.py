"""Scan an mtls listener with sslyze against Mozilla's TLS recommendations.

What it checks (issue 15): a partner-facing listener (``server_context`` with
``partner_trust``, the verdict inside the handshake) passes Mozilla
"intermediate" with ``[tls] profile = "intermediate"`` and Mozilla "modern"
with ``profile = "modern"``. sslyze opens a few hundred connections; our own
listener here has no per-source limits (the gateway's must be raised for a
scan of ``edge run``).

sslyze pins its own cryptography, so it lives in its own virtual environment:

    python -m venv /tmp/sslyze-venv && /tmp/sslyze-venv/bin/pip install sslyze
    python bench/sslyze_scan.py [--sslyze /tmp/sslyze-venv/bin/sslyze] [--timeout 120]

Runs offline (127.0.0.1 only): measured on the 2-core CI machine, 13 s for
both scans, plus 78 s to create the venv and install sslyze (so it is not in
.ci/run, whose steps stay under a minute each). The listener's
certificate comes from a throwaway CA, so sslyze's "certificate_path_validation"
finding is expected and the only one tolerated. Exit status 0 when both pass.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

# Before anything loads OpenSSL (trio and the stdlib above do not): `edge` points
# OPENSSL_CONF at edge/openssl.cnf, the key-exchange groups a Mozilla scan checks.
import edge  # noqa: F401
from edge.core.policies import load_policies
from edge.core.trust import PartnerTrust
from edge.pki import CA
from edge.tls import TLSError, TLSStream, server_context


def _partner(folder: Path) -> tuple[PartnerTrust, Path, Path]:
    """A partner folder, its trust, and a partner certificate sslyze presents."""
    root = CA.root("Scan Partner Root")
    (folder / "policies" / "fabrikam.com").mkdir(parents=True)
    (folder / "policies" / "fabrikam.com" / "root.pem").write_bytes(root.cert_pem())
    # Directly under the root: nassl's legacy OpenSSL (sslyze's SSL 2.0/3.0
    # probes) fails to load a multi-certificate client chain file.
    leaf = root.issue(dns=["sip.fabrikam.com"], eku=("client",))
    cert, key = leaf.write(folder, "partner")
    return PartnerTrust(load_policies(folder / "policies")), cert, key


async def _scan(sslyze: str, profile: str, timeout: float, folder: Path) -> tuple[bool, str]:
    trust, cert_file, key_file = _partner(folder / profile)
    # Mozilla "modern" asks for certificates of at most 90 days.
    lifespan = _dt.timedelta(days=60)
    server = CA.root("Scan Edge Root").issue(
        dns=["localhost"], eku=("server",), not_after=_dt.datetime.now(_dt.UTC) + lifespan
    )
    ctx = server_context(
        server.chain, server.key, require_client_cert=True, partner_trust=trust, profile=profile
    )

    async def handler(transport: trio.SocketStream) -> None:
        stream = TLSStream(transport, ctx, server_side=True)
        try:
            with trio.move_on_after(10):
                await stream.do_handshake()
                verdict = stream.handshake_verdict
                if verdict is not None and verdict.accepted:
                    await stream.send_all(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        except (TLSError, trio.BrokenResourceError):
            pass
        finally:
            await trio.aclose_forcefully(transport)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        command = [
            sslyze, f"--mozilla_config={profile}", "--cert", str(cert_file),
            "--key", str(key_file), f"127.0.0.1:{port}",
        ]  # fmt: skip
        # sslyze's own OpenSSLs (nassl's legacy 1.0.2 among them) must not read
        # ours: an unknown directive breaks its SSL 2.0 probe.
        env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
        with trio.fail_after(timeout):
            result = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False, env=env
            )
        nursery.cancel_scope.cancel()
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    # A throwaway CA is in no public trust store: that one finding is expected
    # offline; every other finding (protocols, suites, groups...) fails the scan.
    findings = re.findall(r"^\s+\* (\w+): ", output.split("COMPLIANCE AGAINST", 1)[-1], re.M)
    compliant = "Not compliant" not in output and "ERROR" not in output.split("COMPLIANCE", 1)[-1]
    only_trust = bool(findings) and set(findings) == {"certificate_path_validation"}
    return compliant or only_trust, output


def _summary(output: str) -> list[str]:
    """The compliance verdict and any scan error, without the trust-store noise
    (the scanned certificate is throwaway, trusted by no public store)."""
    lines = output.splitlines()
    keep: list[str] = []
    for i, line in enumerate(lines):
        if "Error when running" in line:
            keep += lines[i : i + 40]
        elif "COMPLIANCE AGAINST" in line:
            keep += [x for x in lines[i + 2 : i + 30] if x.strip()]
    return keep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sslyze", default="/tmp/sslyze-venv/bin/sslyze")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    ok_all = True
    with tempfile.TemporaryDirectory() as tmp:
        for profile in ("intermediate", "modern"):
            start = time.perf_counter()
            ok, output = trio.run(_scan, args.sslyze, profile, args.timeout, Path(tmp))
            took = time.perf_counter() - start
            print(f"profile={profile}: {'PASS' if ok else 'FAIL'} in {took:.1f} s")
            for line in _summary(output):
                print(f"    {line}")
            ok_all &= ok
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
