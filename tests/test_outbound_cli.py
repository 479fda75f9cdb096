"""`edge check` and `edge verify` for outbound federation (in-process, offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from edge.cli import main
from edge.demo import write_identity
from edge.pki import CA, certs_pem

CONFIG_TAIL = """
[[listeners]]
name = "to-partners"
address = "127.0.0.1:5062"
mode = "outbound"
policies = "federation_policies"
pools = ["frontend"]

[[pools]]
name = "frontend"
members = [{ host = "fe1.corp.test", address = "10.0.0.11", port = 5061 }]
"""


def _site(folder: Path, *, public_eku: tuple[str, ...] = ("client", "server")) -> Path:
    enterprise = CA.root("Enterprise Root")
    public = CA.root("Edge CA").issue(dns=["edge.contoso.example"], eku=public_eku)
    internal = enterprise.issue(dns=["edge.corp.test"])
    identity = write_identity(folder, public, internal, enterprise)
    fabrikam = CA.root("Fabrikam Root")
    for pid, text in {
        "fabrikam.com": 'domains = ["fabrikam.com", "fabrikam.net"]\n',
        "litware.com": 'edge = "sip.litware.com:5061"\n',
    }.items():
        d = folder / "federation_policies" / pid
        d.mkdir(parents=True)
        (d / "root.pem").write_bytes(fabrikam.cert_pem())
        (d / "policy.toml").write_text(text)
    path = folder / "edge.toml"
    path.write_text(identity + CONFIG_TAIL)
    return path


def test_check_lists_how_each_partner_is_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--config", str(_site(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "listener to-partners: outbound on 127.0.0.1:5062 for members of pools frontend" in out
    assert (
        "outbound: reached by DNS SRV _sipfederationtls._tcp.fabrikam.com, "
        "_sipfederationtls._tcp.fabrikam.net"
    ) in out
    assert "outbound: reached by static edge sip.litware.com:5061" in out


def test_check_names_a_public_cert_without_client_auth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--config", str(_site(tmp_path, public_eku=("server",)))]) == 1
    out = capsys.readouterr().out
    assert f"identity.public_cert: {tmp_path / 'certs/edge-public.pem'}" in out
    assert "does not include clientAuth" in out


def test_verify_server_for_a_partner_uses_its_crls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fabrikam = CA.root("Fabrikam Root")
    d = tmp_path / "fabrikam.com"
    d.mkdir()
    (d / "root.pem").write_bytes(fabrikam.cert_pem())
    leaf = fabrikam.issue(dns=["sip.fabrikam.com"], eku=["server"])
    chain = tmp_path / "chain.pem"
    chain.write_bytes(certs_pem(leaf.chain))
    args = ["verify", str(chain), "--policies", str(tmp_path), "--partner", "fabrikam.com"]
    args += ["--purpose", "server", "--name", "sip.fabrikam.com"]
    assert main(args) == 0
    assert capsys.readouterr().out == "accepted partner=fabrikam.com\n"
    (d / "fabrikam.crl").write_bytes(
        fabrikam.crl([leaf.cert.serial_number]).public_bytes(Encoding.PEM)
    )
    assert main(args) == 1
    assert capsys.readouterr().out.startswith("rejected reason=revoked: ")
