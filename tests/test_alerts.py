"""The TLS alert a refused partner's admin sees, on a real gateway listener (issue 15).

Debian's ``openssl s_client`` (TLS 1.2 and 1.3) against an in-process gateway:
the verdict is reached inside the handshake, so the partner gets the alert
that says why, and the gateway logs the matching reason code. A name outside
the partner's domains has no OpenSSL error of its own: edge/verify_alert.py
sets one, so its alert is ``bad_certificate`` (docs/operations.md, "What a
refused partner sees").
"""

from __future__ import annotations

import datetime as _dt
import shutil
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from edge import verify_alert
from edge.core.reasons import Reason
from tests.gateway_harness import InProcessEdge, Pki, start_gateway, start_pool, write_federation

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl(1) not installed")

# OpenSSL 3.0's s_client wording for each alert, by the reason the gateway logs.
EXPECTED_ALERT = {
    "unknown_ca": "alert unknown ca",  # 48
    "expired": "alert certificate expired",  # 45
    "revoked": "alert certificate revoked",  # 44
    "name_mismatch": "alert bad certificate",  # 42: edge/verify_alert.py
}


async def _s_client(port: int, args: list[str]) -> str:
    """s_client's whole output; -ign_eof keeps a TLS 1.3 client (whose handshake
    completes before the server judged it) reading until the alert arrives."""
    assert OPENSSL is not None
    with trio.fail_after(15):
        result = await trio.run_process(
            [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof", *args],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return (result.stdout + result.stderr).decode("utf-8", "replace")


def _rejections(edge: InProcessEdge) -> int:
    return sum(e["event"] == "connection_rejected" for e in edge.events)


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
async def test_refused_partner_gets_the_alert_that_says_why(
    tmp_path: Path, pki: Pki, version: str
) -> None:
    now = _dt.datetime.now(_dt.UTC)
    revoked = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
    leaves = {
        "unknown_ca": pki.stranger.issue(dns=["sip.fabrikam.com"]),
        "expired": pki.fabrikam.issue(
            dns=["sip.fabrikam.com"],
            not_before=now - _dt.timedelta(days=10),
            not_after=now - _dt.timedelta(days=1),
        ),
        "revoked": revoked,
        "name_mismatch": pki.fabrikam.issue(dns=["sip.outside.example"]),
    }
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            pool = await start_pool(nursery, pki, ["fe1.corp.test"])
            config = write_federation(tmp_path, pki, [(h, p) for h, p, _ in pool])
            crl = pki.fabrikam.crl([revoked.cert.serial_number])
            folder = tmp_path / "federation_policies" / "fabrikam.com"
            (folder / "fabrikam.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
            edge = await start_gateway(nursery, config)
            for reason, leaf in leaves.items():
                cert_file, key_file = leaf.write(tmp_path, f"{reason}{version}")
                seen = _rejections(edge)
                args = [version, "-cert", str(cert_file), "-cert_chain", str(cert_file)]
                args += ["-key", str(key_file), "-servername", "edge.contoso.example"]
                output = await _s_client(edge.address[1], args)
                assert EXPECTED_ALERT[reason] in output, (reason, output)
                # Each attempt logs exactly one refusal: the (seen + 1)th.
                await edge.wait_for(lambda _e, n=seen: _rejections(edge) > n)
                rejected = [e for e in edge.events if e["event"] == "connection_rejected"][seen]
                assert rejected["reason"] == reason, rejected
            assert not [e for e in edge.events if e["event"] == "connection_closed"]
            nursery.cancel_scope.cancel()


def test_core_refusals_pick_the_error_whose_alert_says_why() -> None:
    """The private-binding callback is installed (a pyOpenSSL upgrade that removes
    a name it needs would fall back to ``internal_error``), and each core reason
    maps to the X509_V_ERR code OpenSSL turns into its alert."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    assert verify_alert.install(ctx, SSL.VERIFY_PEER, lambda *_: False, lambda _c: None)
    assert verify_alert.error_code_for(Reason.NAME_MISMATCH) == 28  # bad_certificate
    assert verify_alert.error_code_for(Reason.WEAK_CRYPTO) == 28
    assert verify_alert.error_code_for(Reason.EXPIRED) == 10  # certificate_expired
    assert verify_alert.error_code_for(Reason.REVOKED) == 23  # certificate_revoked
    assert verify_alert.error_code_for(Reason.BAD_PURPOSE) == 26  # unsupported_certificate
    assert verify_alert.error_code_for(Reason.PARTNER_DISABLED) == 50  # handshake_failure
    assert verify_alert.error_code_for(None) == 50
