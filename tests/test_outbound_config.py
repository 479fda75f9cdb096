"""Outbound federation's configuration: the listener, `edge` in policy.toml, the limit,
and the certificate purposes an outbound listener needs (each mistake named)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from edge.core.config import ConfigError, load_config
from edge.core.policies import load_policies, parse_edge
from edge.core.reasons import Reason
from edge.pki import CA

CONFIG = """\
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

[[listeners]]
name = "to-partners"
address = "127.0.0.1:5062"
mode = "outbound"
policies = "federation_policies"
pools = ["frontend"]

[[pools]]
name = "frontend"
members = [{ host = "fe1.corp.example", address = "10.0.0.11", port = 5061 }]

[limits]
max_outbound_connections_per_partner = 7
"""


def _site(
    folder: Path,
    text: str = CONFIG,
    *,
    public_eku: Sequence[str] | None = ("client", "server"),
    internal_eku: Sequence[str] | None = ("client", "server"),
) -> Path:
    enterprise = CA.root("Enterprise Root")
    public = CA.root("Public Root").issue(dns=["edge.contoso.com"], eku=public_eku)
    internal = enterprise.issue(dns=["edge.corp.example"], eku=internal_eku)
    certs = folder / "certs"
    public.write(certs, "edge-public")
    internal.write(certs, "edge-internal")
    (certs / "enterprise-root.pem").write_bytes(enterprise.cert_pem())
    (folder / "federation_policies").mkdir(exist_ok=True)
    path = folder / "edge.toml"
    path.write_text(text)
    return path


def _problems(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return "\n".join(info.value.problems)


def test_outbound_listener_loads(tmp_path: Path) -> None:
    config = load_config(_site(tmp_path))
    inbound, outbound = config.listeners
    assert (inbound.mode, inbound.pool, inbound.pools) == ("mtls", "frontend", ())
    assert (outbound.mode, outbound.pool, outbound.pools) == ("outbound", "", ("frontend",))
    assert outbound.policies == tmp_path / "federation_policies"
    assert config.limits.max_outbound_connections_per_partner == 7


def test_outbound_limit_default(tmp_path: Path) -> None:
    text = CONFIG.replace("max_outbound_connections_per_partner = 7", "")
    assert load_config(_site(tmp_path, text)).limits.max_outbound_connections_per_partner == 1000


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            'pools = ["frontend"]',
            'pools = ["frontend", "backend"]',
            "listeners[1] (to-partners).pools: no pool named 'backend'",
        ),
        ('pools = ["frontend"]', "pools = []", "pools: must be a non-empty list of pool names"),
        ('pools = ["frontend"]', "", "listeners[1] (to-partners).pools: missing (required"),
        (
            'pools = ["frontend"]',
            'pool = "frontend"',
            "(to-partners).pool: an outbound listener names who may use it with pools",
        ),
        (
            'pool = "frontend"\n\n[[listeners]]',
            'pool = "frontend"\npools = ["frontend"]\n\n[[listeners]]',
            "(federation).pools: only outbound listeners take pools",
        ),
        (
            'mode = "outbound"\npolicies = "federation_policies"\n',
            'mode = "outbound"\n',
            "listeners[1] (to-partners).policies: missing (required)",
        ),
        (
            "max_outbound_connections_per_partner = 7",
            "max_outbound_connections_per_partner = 0",
            "limits.max_outbound_connections_per_partner: must be an integer >= 1",
        ),
    ],
)
def test_outbound_listener_mistakes(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in CONFIG
    problems = _problems(_site(tmp_path, CONFIG.replace(old, new)))
    assert expected in problems
    assert str(tmp_path / "edge.toml") in problems


def test_internal_cert_must_allow_server_auth_with_an_outbound_listener(tmp_path: Path) -> None:
    problems = _problems(_site(tmp_path, internal_eku=["client"]))
    assert "identity.internal_cert" in problems
    assert str(tmp_path / "certs/edge-internal.pem") in problems
    assert "does not include serverAuth" in problems


def test_public_cert_must_allow_client_auth_with_an_outbound_listener(tmp_path: Path) -> None:
    problems = _problems(_site(tmp_path, public_eku=["server"]))
    assert "identity.public_cert" in problems
    assert str(tmp_path / "certs/edge-public.pem") in problems
    assert "does not include clientAuth" in problems


def test_purposes_unchecked_without_outbound_listener_and_eku_absent_is_fine(
    tmp_path: Path,
) -> None:
    start = CONFIG.index('[[listeners]]\nname = "to-partners"')
    inbound_only = CONFIG[:start] + CONFIG[CONFIG.index("[[pools]]") :]
    load_config(_site(tmp_path / "a", inbound_only, public_eku=["server"], internal_eku=["client"]))
    load_config(_site(tmp_path / "b", public_eku=None, internal_eku=None))


def test_policy_edge_key(tmp_path: Path) -> None:
    root = CA.root("Fabrikam Root")
    for pid, text in {
        "fabrikam.com": 'edge = "SIP.Fabrikam.com:5061"\n',
        "litware.com": 'edge = "[2001:db8::5]:5061"\n',
        "bad-port.com": 'edge = "sip.bad-port.com"\n',
        "bad-host.com": 'edge = "sip_bad host:5061"\n',
        "bad-type.com": "edge = 5061\n",
    }.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "root.pem").write_bytes(root.cert_pem())
        (tmp_path / pid / "policy.toml").write_text(text)
    snapshot = load_policies(tmp_path)
    assert snapshot.partners["fabrikam.com"].edge == ("sip.fabrikam.com", 5061)
    assert snapshot.partners["litware.com"].edge == ("2001:db8::5", 5061)
    assert snapshot.broken == {"bad-port.com", "bad-host.com", "bad-type.com"}
    for pid in ("bad-port.com", "bad-host.com", "bad-type.com"):
        (problem,) = snapshot.problems_of(pid)
        assert str(problem).startswith(f"{tmp_path / pid / 'policy.toml'}: edge: ")


def test_parse_edge() -> None:
    assert parse_edge("10.0.0.1:5061") == ("10.0.0.1", 5061)
    for bad in ("sip.fabrikam.com:0", "sip.fabrikam.com:99999", "localhost:5061", ":5061", ""):
        with pytest.raises(ValueError):
            parse_edge(bad)


def test_outbound_reason_codes() -> None:
    assert [
        Reason.NOT_IN_TOPOLOGY,
        Reason.UNKNOWN_DESTINATION,
        Reason.PARTNER_UNREACHABLE,
        Reason.PARTNER_UNTRUSTED,
    ] == ["not_in_topology", "unknown_destination", "partner_unreachable", "partner_untrusted"]
