"""`edge verify` and `edge check` through the real command line (subprocesses)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge.pki import CA

REPO = Path(__file__).resolve().parent.parent
NOW = dt.datetime.now(dt.UTC)


def edge(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=60,
    )


@dataclass
class Site:
    base: Path
    config: Path
    policies: Path
    good_chain: Path
    wrong_name_chain: Path
    member_chain: Path
    fabrikam_root_expiry: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    base = tmp_path_factory.mktemp("cli")
    certs = base / "certs"
    certs.mkdir()
    fab_root = CA.root("Fabrikam CLI Root")
    fab_issuing = fab_root.intermediate("Fabrikam CLI Issuing")
    contoso = CA.root("Contoso CLI Root")
    enterprise = CA.root("Enterprise CLI Root")
    policies = base / "federation_policies"
    (policies / "fabrikam.com").mkdir(parents=True)
    (policies / "fabrikam.com" / "root.pem").write_bytes(fab_root.cert_pem())
    (policies / "fabrikam.com" / "policy.toml").write_text('pool = "frontend"\n')
    (policies / "contoso.com").mkdir()
    (policies / "contoso.com" / "root.cer").write_bytes(contoso.cert_pem())

    enterprise.issue(dns=["edge.contoso.com"]).write(certs, "edge-public")
    enterprise.issue(dns=["edge.corp.example"]).write(certs, "edge-internal")
    (certs / "enterprise-root.pem").write_bytes(enterprise.cert_pem())
    config = base / "edge.toml"
    config.write_text(
        """\
[identity]
public_cert = "certs/edge-public.pem"
public_key = "certs/edge-public.key"
internal_cert = "certs/edge-internal.pem"
internal_key = "certs/edge-internal.key"
internal_roots = ["certs/enterprise-root.pem"]

[[listeners]]
name = "federation"
address = "127.0.0.1:5061"
mode = "mtls"
policies = "federation_policies"
pool = "frontend"

[[pools]]
name = "frontend"
members = [{ host = "fe1.corp.example", port = 5061 }]
"""
    )
    good, _ = fab_issuing.issue(dns=["sip.fabrikam.com"]).write(base, "good")
    wrong, _ = fab_issuing.issue(dns=["sip.fabrikam.com.evil.example"]).write(base, "wrong")
    member, _ = enterprise.issue(dns=["fe1.corp.example"]).write(base, "member")
    return Site(
        base=base,
        config=config,
        policies=policies,
        good_chain=good,
        wrong_name_chain=wrong,
        member_chain=member,
        fabrikam_root_expiry=f"{fab_root.cert.not_valid_after_utc:%Y-%m-%d}",
    )


# --- edge verify ------------------------------------------------------------------


def test_verify_accepted(site: Site) -> None:
    result = edge("verify", site.good_chain, "--policies", site.policies)
    assert (result.returncode, result.stdout) == (0, "accepted partner=fabrikam.com\n")


def test_verify_rejected_one_line(site: Site) -> None:
    result = edge("verify", site.wrong_name_chain, "--policies", site.policies)
    assert result.returncode == 1
    assert result.stdout.startswith("rejected reason=name_mismatch: ")
    assert result.stdout.count("\n") == 1


def test_verify_json_with_config_and_at(site: Site) -> None:
    at = (NOW + dt.timedelta(days=800)).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = edge("verify", site.good_chain, "--config", site.config, "--at", at, "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["reason"] == "expired" and data["accepted"] is False
    assert data["purpose"] == "client" and data["result"] == "rejected"
    result = edge("verify", site.good_chain, "--config", site.config, "--json")
    data = json.loads(result.stdout)
    assert result.returncode == 0 and data["partner"] == "fabrikam.com"
    assert len(data["chain"]) == 3 and len(data["chain"][0]["sha256"]) == 64


def test_verify_only_named_partner(site: Site) -> None:
    result = edge(
        "verify", site.good_chain, "--policies", site.policies, "--partner", "contoso.com"
    )
    assert result.returncode == 1
    assert result.stdout.startswith("rejected reason=unknown_ca: ")


def test_verify_server_purpose_with_internal_roots(site: Site) -> None:
    ok = edge(
        "verify", site.member_chain, "--config", site.config,
        "--purpose", "server", "--name", "FE1.corp.example",
    )  # fmt: skip
    assert (ok.returncode, ok.stdout) == (0, "accepted\n")
    bad = edge(
        "verify", site.member_chain, "--config", site.config,
        "--purpose", "server", "--name", "fe2.corp.example",
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stdout.startswith("rejected reason=name_mismatch: ")


def test_verify_server_purpose_with_partner_roots(site: Site) -> None:
    result = edge(
        "verify", site.good_chain, "--policies", site.policies, "--partner", "fabrikam.com",
        "--purpose", "server", "--name", "sip.fabrikam.com",
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, "accepted partner=fabrikam.com\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--purpose", "server"], "needs --name", id="server-without-name"),
        pytest.param(["--at", "yesterday"], "not an ISO 8601 time", id="bad-at"),
        pytest.param(
            ["--partner", "nobody.example"], "no partner 'nobody.example'", id="no-partner"
        ),
        pytest.param(["--config", "missing.toml"], "configuration error", id="bad-config"),
        pytest.param(["--policies", "nowhere"], "policies folder does not exist", id="no-folder"),
    ],
)
def test_verify_usage_errors_exit_2(site: Site, args: list[str], message: str) -> None:
    if "--policies" not in args and "--config" not in args:
        args = [*args, "--policies", str(site.policies)]
    result = edge("verify", site.good_chain, *args, cwd=site.base)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert result.stdout == ""


def test_verify_unreadable_chain_and_argparse_errors(site: Site) -> None:
    (site.base / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nxx\n")
    result = edge("verify", site.base / "junk.pem", "--policies", site.policies)
    assert result.returncode == 2 and "junk.pem: no readable certificate" in result.stderr
    result = edge("verify", site.good_chain, "--config", "a", "--policies", "b")
    assert result.returncode == 2 and "not allowed with" in result.stderr


# --- edge check -------------------------------------------------------------------


def test_check_config_clean(site: Site) -> None:
    result = edge("check", "--config", site.config)
    assert result.returncode == 0, result.stdout
    out = result.stdout
    assert "partner fabrikam.com: enabled" in out
    assert "partner contoso.com: enabled" in out
    assert f"(root.pem) expires {site.fabrikam_root_expiry}" in out
    assert "listener federation: mtls on 127.0.0.1:5061 -> pool frontend" in out
    assert out.endswith("ok: everything loads cleanly\n")


def test_check_uses_edge_config_env(site: Site) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge.cli", "check"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "EDGE_CONFIG": str(site.config)},
        timeout=60,
    )
    assert result.returncode == 0 and "partner fabrikam.com: enabled" in result.stdout


def test_check_broken_partner_and_unknown_pool(tmp_path: Path, site: Site) -> None:
    base = tmp_path / "site"
    shutil.copytree(site.base, base)
    (base / "federation_policies" / "fabrikam.com" / "policy.toml").write_text('pool = "backend"\n')
    (base / "federation_policies" / "contoso.com" / "policy.toml").write_text("colour = 1\n")
    result = edge("check", "--config", base / "edge.toml")
    assert result.returncode == 1
    out = result.stdout
    assert "partner contoso.com: BROKEN" in out
    contoso = base / "federation_policies" / "contoso.com" / "policy.toml"
    assert f"error: {contoso}:1: colour: unknown key" in out
    assert "policy.toml:1: pool: no pool named 'backend'" in out
    assert out.endswith("2 problem(s) found\n")


def test_check_broken_config_names_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text("[identity]\npublic_cert = 1\n")
    result = edge("check", "--config", config)
    assert result.returncode == 1
    assert f"error: {config}:2: identity.public_cert: must be a non-empty string" in result.stdout


def test_check_repository_example_folder() -> None:
    result = edge("check", "--policies", "federation_policies")
    assert result.returncode == 0, result.stdout
    assert "partner fabrikam.com: enabled" in result.stdout
    assert "(fabrikam-root.cer) expires 2046-01-01" in result.stdout


def test_check_usage_error() -> None:
    assert edge("check", "--bogus").returncode == 2
    assert edge().returncode == 2


def test_check_and_run_report_an_address_clash_alike(tmp_path: Path, site: Site) -> None:
    """Both go through build_snapshot: what check calls broken, run refuses to start on."""
    base = tmp_path / "site"
    shutil.copytree(site.base, base)
    config = base / "edge.toml"
    config.write_text(config.read_text() + '\n[metrics]\naddress = "0.0.0.0:5061"\n')
    clash = "metrics address 0.0.0.0:5061 clashes with listener 'federation' on 127.0.0.1:5061"
    check = edge("check", "--config", config)
    assert check.returncode == 1
    assert f"error: {config}: {clash}" in check.stdout
    run = edge("run", "--config", config)
    assert run.returncode == 1
    assert clash in run.stderr
    assert "Traceback" not in run.stderr
