"""edge.toml loading: a good file loads into typed objects; each mistake is named."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from edge.core.config import (
    ConfigError,
    Limits,
    Member,
    default_config_path,
    load_config,
    parse_address,
)
from edge.pki import CA

GOOD = """\
[identity]
public_cert = "certs/edge-public.pem"
public_key = "certs/edge-public.key"
internal_cert = "certs/edge-internal.pem"
internal_key = "certs/edge-internal.key"
internal_roots = ["certs/enterprise-root.pem"]

[[listeners]]
name = "federation"
address = "0.0.0.0:5061"
mode = "mtls"
policies = "federation_policies"
pool = "frontend"

[[listeners]]
name = "remote"
address = "[::1]:443"
mode = "tls"
pool = "frontend"

[[pools]]
name = "frontend"
members = [
  { host = "fe1.corp.example", address = "10.0.0.11", port = 5061 },
  { host = "fe2.corp.example", port = 5061 },
]

[metrics]
address = "127.0.0.1:9464"

[limits]
handshake_timeout_s = 5
max_connections = 100
"""


@pytest.fixture(scope="module")
def material() -> dict[str, bytes]:
    public_root = CA.root("Public Root").intermediate("Public Issuing")
    enterprise = CA.root("Enterprise Root")
    public = public_root.issue(dns=["edge.contoso.com"])
    internal = enterprise.issue(dns=["edge.corp.example"])
    return {
        "edge-public.pem": public.chain_pem(),
        "edge-public.key": public.key_pem(),
        "edge-internal.pem": internal.chain_pem(),
        "edge-internal.key": internal.key_pem(),
        "enterprise-root.pem": enterprise.cert_pem(),
        "other.key": CA.root("x").issue(dns=["x.example"]).key_pem(),
    }


@pytest.fixture
def site(tmp_path: Path, material: dict[str, bytes]) -> Path:
    """A directory with a valid edge.toml, its certificates and a policies folder."""
    (tmp_path / "certs").mkdir()
    for name, data in material.items():
        (tmp_path / "certs" / name).write_bytes(data)
    (tmp_path / "federation_policies").mkdir()
    (tmp_path / "edge.toml").write_text(GOOD)
    return tmp_path / "edge.toml"


def test_good_config_loads(site: Path) -> None:
    config = load_config(site)
    base = site.parent
    assert config.path == site
    ident = config.identity
    assert ident.public_cert == base / "certs/edge-public.pem"
    assert len(ident.public_chain) == 2
    assert ident.public_private_key.public_key() == ident.public_chain[0].public_key()
    assert ident.internal_private_key.public_key() == ident.internal_chain[0].public_key()
    assert len(ident.internal_root_certs) == 1
    assert "private" not in repr(ident).lower()
    fed, remote = config.listeners
    assert (fed.name, fed.host, fed.port, fed.mode) == ("federation", "0.0.0.0", 5061, "mtls")
    assert fed.policies == base / "federation_policies"
    assert (remote.host, remote.port, remote.mode, remote.policies) == ("::1", 443, "tls", None)
    assert config.pools["frontend"].members == (
        Member("fe1.corp.example", "10.0.0.11", 5061),
        Member("fe2.corp.example", None, 5061),
    )
    assert config.metrics is not None and (config.metrics.host, config.metrics.port) == (
        "127.0.0.1",
        9464,
    )
    assert config.limits == Limits(handshake_timeout_s=5.0, max_connections=100)


def test_key_material_never_in_repr(site: Path, material: dict[str, bytes]) -> None:
    text = repr(load_config(site))
    body = material["edge-public.key"].split(b"\n")[1].decode()
    assert body not in text


# (edit to apply to GOOD, text that must appear in the single problem line)
MALFORMED = [
    pytest.param(
        ("[limits]\n", "[limits]\nbogus = 1\n"), "limits.bogus: unknown key", id="unknown-key"
    ),
    pytest.param(
        ("[identity]", 'colour = "blue"\n[identity]'), ": colour: unknown key", id="unknown-top"
    ),
    pytest.param(
        ('name = "remote"\n', 'name = "remote"\nport = 1\n'),
        "listeners[1] (remote).port: unknown key",
        id="unknown-listener-key",
    ),
    pytest.param(
        ("max_connections = 100", 'max_connections = "100"'),
        "limits.max_connections: must be an integer",
        id="wrong-type-int",
    ),
    pytest.param(
        ("handshake_timeout_s = 5", "handshake_timeout_s = true"),
        "limits.handshake_timeout_s: must be a number",
        id="bool-not-number",
    ),
    pytest.param(
        ('public_key = "certs/edge-public.key"\n', ""),
        "identity.public_key: missing (required)",
        id="missing-key",
    ),
    pytest.param(
        ("certs/edge-public.key", "certs/nope.key"), "identity.public_key: ", id="missing-file"
    ),
    pytest.param(
        ('public_key = "certs/edge-public.key"', 'public_key = "certs/other.key"'),
        "identity.public_key: ",
        id="key-mismatch",
    ),
    pytest.param(
        ('public_key = "certs/edge-public.key"', 'public_key = "certs/edge-public.pem"'),
        "no readable private key",
        id="cert-as-key",
    ),
    pytest.param(
        ('public_cert = "certs/edge-public.pem"', 'public_cert = "certs/edge-public.key"'),
        "identity.public_cert: ",
        id="key-as-cert",
    ),
    pytest.param(
        ('pool = "frontend"\n\n[[listeners]]', 'pool = "backend"\n\n[[listeners]]'),
        "listeners[0] (federation).pool: no pool named 'backend'",
        id="unknown-pool",
    ),
    pytest.param(
        ('name = "remote"', 'name = "federation"'),
        "listeners[1].name: duplicate listener name 'federation'",
        id="dup-listener",
    ),
    pytest.param(
        (
            "[metrics]",
            '[[pools]]\nname = "frontend"\n'
            'members = [{ host = "fe3.corp.example", port = 1 }]\n\n[metrics]',
        ),
        "pools[1].name: duplicate pool name 'frontend'",
        id="dup-pool",
    ),
    pytest.param(
        ('"0.0.0.0:5061"', '"0.0.0.0"'),
        "listeners[0] (federation).address: '0.0.0.0' is not host:port",
        id="no-port",
    ),
    pytest.param(('"[::1]:443"', '"::1:443"'), "IPv6 address in brackets", id="ipv6-no-brackets"),
    pytest.param(
        ('"0.0.0.0:5061"', '"0.0.0.0:70000"'),
        "port must be a number from 0 to 65535",
        id="bad-port",
    ),
    pytest.param(
        ('mode = "mtls"', 'mode = "mutual"'),
        'listeners[0] (federation).mode: must be "mtls", "tls" or "outbound"',
        id="bad-mode",
    ),
    pytest.param(
        ('policies = "federation_policies"\n', ""),
        "listeners[0] (federation).policies: missing (required)",
        id="mtls-without-policies",
    ),
    pytest.param(
        ('policies = "federation_policies"', 'policies = "partners"'),
        "policies folder does not exist",
        id="policies-missing",
    ),
    pytest.param(
        ("port = 5061 },\n]", 'port = "5061" },\n]'),
        "pools[0] (frontend).members[1].port: must be an integer",
        id="member-port-type",
    ),
    pytest.param(
        (
            '{ host = "fe2.corp.example", port = 5061 }',
            '{ host = "fe2.corp.example:5061", port = 5061 }',
        ),
        "members[1].host: 'fe2.corp.example:5061' is not a host name",
        id="member-host",
    ),
    pytest.param(
        (
            'internal_roots = ["certs/enterprise-root.pem"]',
            'internal_roots = ["certs/edge-internal.key"]',
        ),
        "identity.internal_roots: ",
        id="roots-unreadable",
    ),
    pytest.param(
        (
            'internal_roots = ["certs/enterprise-root.pem"]',
            'internal_roots = ["certs/edge-internal.pem"]',
        ),
        "is not a CA certificate",
        id="root-not-ca",
    ),
    pytest.param(
        ('[metrics]\naddress = "127.0.0.1:9464"', "[metrics]\naddress = 9464"),
        "metrics.address: must be a non-empty string",
        id="metrics-type",
    ),
]


@pytest.mark.parametrize(("edit", "expected"), MALFORMED)
def test_malformed_config_names_key_and_file(
    site: Path, edit: tuple[str, str], expected: str
) -> None:
    old, new = edit
    text = site.read_text()
    assert old in text, f"test edit does not apply: {old!r}"
    site.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(site)
    problems = info.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{site}: "), problems
    assert expected in problems[0], problems


def test_problems_are_collected_not_first_only(site: Path) -> None:
    text = site.read_text().replace('mode = "mtls"', 'mode = "x"').replace("5 \n", "")
    text = text.replace("max_connections = 100", "max_connections = 0\nfoo = 1")
    site.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(site)
    joined = "\n".join(info.value.problems)
    assert len(info.value.problems) == 3
    for key in ("mode", "limits.max_connections", "limits.foo"):
        assert key in joined


def test_key_mismatch_names_both_files(site: Path) -> None:
    site.write_text(site.read_text().replace("certs/edge-public.key", "certs/other.key"))
    with pytest.raises(ConfigError) as info:
        load_config(site)
    (line,) = info.value.problems
    assert "other.key: does not match the certificate in identity.public_cert" in line


def test_encrypted_key_is_refused(site: Path, material: dict[str, bytes]) -> None:
    key = serialization.load_pem_private_key(material["edge-public.key"], None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (site.parent / "certs/edge-public.key").write_bytes(encrypted)
    with pytest.raises(ConfigError) as info:
        load_config(site)
    assert "identity.public_key" in info.value.problems[0]
    assert "encrypted" in info.value.problems[0]


def test_chain_out_of_order(site: Path, material: dict[str, bytes]) -> None:
    certs = material["edge-public.pem"].split(b"-----END CERTIFICATE-----\n")
    swapped = certs[1] + b"-----END CERTIFICATE-----\n" + certs[0] + b"-----END CERTIFICATE-----\n"
    (site.parent / "certs/edge-public.pem").write_bytes(swapped)
    with pytest.raises(ConfigError) as info:
        load_config(site)
    assert "identity.public_cert" in info.value.problems[0]
    assert "leaf first" in info.value.problems[0]


def test_unparsable_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "edge.toml"
    bad.write_text("[identity\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.problems[0].startswith(f"{bad}: not valid TOML")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert "absent.toml: configuration file does not exist" in info.value.problems[0]


def test_empty_file_lists_required_sections(tmp_path: Path) -> None:
    empty = tmp_path / "edge.toml"
    empty.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(empty)
    joined = "\n".join(info.value.problems)
    assert "[identity]: missing table" in joined
    assert "[[listeners]]: missing" in joined
    assert "[[pools]]: missing" in joined


def test_parse_address() -> None:
    assert parse_address("[2001:db8::1]:5061") == ("2001:db8::1", 5061)
    assert parse_address("edge.example:1") == ("edge.example", 1)
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)  # listen on a free port
    for bad in ("5061", ":5061", "host:", "host:x", "[nothex]:1", "::1:5061", "h:65536"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_default_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_CONFIG", raising=False)
    assert default_config_path() == Path("edge.toml")
    monkeypatch.setenv("EDGE_CONFIG", "/etc/edge/edge.toml")
    assert default_config_path() == Path("/etc/edge/edge.toml")


# ----------------------------------------------------------------------
# Pools: weights, limits, DNS discovery, health checks, PROXY v2, [dns]

POOLS_EXTENDED = """
[[pools]]
name = "discovered"
dns_srv = "_sipinternaltls._tcp.corp.example."
balance = "round_robin"
health_interval_s = 0.5
unhealthy_after = 3
healthy_after = 1
proxy_protocol = "v2"

[dns]
nameservers = ["10.0.0.2:53", "[2001:db8::53]:5353"]
"""


def test_pool_keys_load(site: Path) -> None:
    text = site.read_text().replace(
        '{ host = "fe2.corp.example", port = 5061 }',
        '{ host = "fe2.corp.example", port = 5061, weight = 3, max_connections = 50 }',
    )
    site.write_text(text + POOLS_EXTENDED)
    config = load_config(site)
    frontend = config.pools["frontend"]
    assert frontend.members[1] == Member(
        "fe2.corp.example", None, 5061, weight=3, max_connections=50
    )
    assert frontend.members[0].weight == 1 and frontend.members[0].max_connections is None
    # Defaults.
    assert frontend.dns_srv is None and frontend.proxy_protocol is None
    assert frontend.balance == "least_connections"
    assert (frontend.health_interval_s, frontend.unhealthy_after, frontend.healthy_after) == (
        5.0,
        2,
        2,
    )
    discovered = config.pools["discovered"]
    assert discovered.members == ()
    assert discovered.dns_srv == "_sipinternaltls._tcp.corp.example"
    assert discovered.balance == "round_robin"
    assert (discovered.health_interval_s, discovered.unhealthy_after) == (0.5, 3)
    assert discovered.healthy_after == 1
    assert discovered.proxy_protocol == "v2"
    assert config.dns.nameservers == (("10.0.0.2", 53), ("2001:db8::53", 5353))


POOL_MISTAKES = [
    pytest.param(
        "weight = 0, port = 1 }]",
        "members[0].weight: must be an integer from 1 to 1000, not an integer 0",
        id="weight",
    ),
    pytest.param(
        "max_connections = -1, port = 1 }]",
        "members[0].max_connections: must be an integer from 1",
        id="member-max-connections",
    ),
    pytest.param(
        'port = 1 }]\nbalance = "random"',
        'pools[1] (p).balance: must be "least_connections" or "round_robin"',
        id="balance",
    ),
    pytest.param(
        "port = 1 }]\nhealth_interval_s = 0",
        "pools[1] (p).health_interval_s: must be a number of seconds from 0.1 to 3600",
        id="health-interval",
    ),
    pytest.param(
        "port = 1 }]\nunhealthy_after = 0",
        "pools[1] (p).unhealthy_after: must be an integer from 1 to 100",
        id="unhealthy-after",
    ),
    pytest.param(
        'port = 1 }]\nhealthy_after = "2"',
        "pools[1] (p).healthy_after: must be an integer from 1 to 100",
        id="healthy-after",
    ),
    pytest.param(
        'port = 1 }]\nproxy_protocol = "v1"',
        'pools[1] (p).proxy_protocol: the only version is "v2"',
        id="proxy-protocol",
    ),
    pytest.param(
        'port = 1 }]\ndns_srv = "_sip._tcp.corp.example"',
        "pools[1] (p).members: give either members or dns_srv, not both",
        id="members-and-srv",
    ),
    pytest.param(
        'port = 1 }]\n[dns]\nnameservers = ["dns.corp.example:53"]',
        "dns.nameservers: 'dns.corp.example:53': a name server is an IP address",
        id="nameserver-name",
    ),
    pytest.param(
        'port = 1 }]\n[dns]\nnameservers = ["10.0.0.2"]',
        "dns.nameservers: '10.0.0.2' is not ip:port",
        id="nameserver-port",
    ),
    pytest.param(
        'port = 1 }]\n[dns]\nnameservers = "10.0.0.2:53"',
        'dns.nameservers: must be a list of "ip:port" strings',
        id="nameservers-type",
    ),
    pytest.param(
        'port = 1 }]\n[dns]\nservers = ["10.0.0.2:53"]',
        "dns.servers: unknown key",
        id="dns-unknown-key",
    ),
]


@pytest.mark.parametrize(("tail", "expected"), POOL_MISTAKES)
def test_pool_key_mistakes_are_named(site: Path, tail: str, expected: str) -> None:
    site.write_text(
        site.read_text() + f'\n[[pools]]\nname = "p"\nmembers = [{{ host = "h", {tail}\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(site)
    problems = info.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{site}: "), problems
    assert expected in problems[0], problems


def test_pool_needs_members_or_srv(site: Path) -> None:
    site.write_text(site.read_text() + '\n[[pools]]\nname = "p"\nbalance = "round_robin"\n')
    with pytest.raises(ConfigError) as info:
        load_config(site)
    assert info.value.problems == (
        f"{site}: pools[1] (p).members: missing (required unless dns_srv is set)",
    )
