"""Operator tools (issue 16): version, sd_notify, `edge check --json`, PKCS#12 and
passphrase keys, log levels and escaping, TCP probes, readiness, bind errors,
--workers expiry series, and the documented example configuration."""

from __future__ import annotations

import configparser
import importlib.metadata
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from prometheus_client import CollectorRegistry

import edge.core.config as config_module
from edge.cli import main
from edge.core.config import ConfigError, bind_error, load_config
from edge.core.readiness import decide_readiness
from edge.core.snapshot import build_snapshot
from edge.logs import EventLog
from edge.metrics import Metrics
from edge.pki import CA, write_private
from edge.probes import closed_before_sending
from edge.sdnotify import Notifier
from tests.gateway_harness import Pki, start_edge, stop_edge, write_federation

REPO = Path(__file__).resolve().parent.parent
VERSION = importlib.metadata.version("edge-federation-gateway")


@pytest.fixture
def site(tmp_path: Path, pki: Pki) -> Path:
    """A loadable edge.toml (keys at mode 0600) with two partners."""
    return write_federation(tmp_path, pki, [("fe1.corp.test", 5061)])


# --- 1. version ---------------------------------------------------------------------


def test_version_flag_prints_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"edge {VERSION}"


def test_build_info_gauge_is_one_with_version_python_openssl() -> None:
    from cryptography.hazmat.backends.openssl.backend import backend

    registry = CollectorRegistry()
    Metrics(registry)
    labels = {
        "version": VERSION,
        "python": ".".join(map(str, sys.version_info[:3])),
        "openssl": backend.openssl_version_text(),
    }
    assert registry.get_sample_value("edge_build_info", labels) == 1


# --- 2. systemd ---------------------------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, bound to a short path."""
    folder = tempfile.mkdtemp(prefix="edge-notify-")  # AF_UNIX paths are <= 107 bytes
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder)


def _fields(sock: socket.socket) -> dict[str, str]:
    message = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in message.split("\n"))


def test_sdnotify_speaks_the_protocol(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()
    assert notifier.ready("serving 2 listeners")
    assert _fields(sock) == {"READY": "1", "STATUS": "serving 2 listeners"}
    assert notifier.reloading()
    fields = _fields(sock)
    assert fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) > 0
    assert notifier.stopping("draining")
    assert _fields(sock) == {"STOPPING": "1", "STATUS": "draining"}
    # A status text cannot add a field of its own.
    assert notifier.status("x\nREADY=1")
    assert _fields(sock) == {"STATUS": "x READY=1"}


def test_sdnotify_abstract_socket_and_no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edge-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier().ready()
        assert sock.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier().ready()  # outside systemd: nothing, and no error
    assert not Notifier("/nonexistent/notify").ready()  # systemd gone: no exception


def test_systemd_unit_is_notify_reloadable_and_hardened() -> None:
    unit_file = REPO / "deploy/systemd/edge.service"
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit_file.read_text())
    service = parser["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["User"] == "edge"
    expected = {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }
    for key, value in expected.items():
        assert service[key] == value, key
    assert "@system-service" in unit_file.read_text()
    assert "/var/lib/edge" in service["ReadWritePaths"]
    assert service["ReadOnlyPaths"] == "/etc/edge"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    copy = Path(tempfile.mkdtemp()) / "edge.service"
    try:
        # verify insists the binary exists: point it at this Python.
        copy.write_text(unit_file.read_text().replace("/usr/local/bin/edge", sys.executable))
        result = subprocess.run(
            [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == "", result.stderr
    finally:
        shutil.rmtree(copy.parent)


async def test_gateway_sends_ready_over_notify_socket(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tempfile.mkdtemp(prefix="edge-notify-")
    path = os.path.join(folder, "notify")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        await sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        config = write_federation(tmp_path, pki, [("fe1.corp.test", 1)])
        async with trio.open_nursery() as nursery:
            edge = await start_edge(nursery, config)
            with trio.fail_after(5):  # sent with gateway_started, already read
                message = await sock.recv(4096)
            assert b"READY=1" in message.split(b"\n")
            await stop_edge(edge)
    finally:
        sock.close()
        shutil.rmtree(folder)


async def test_gateway_started_carries_version(tmp_path: Path, pki: Pki) -> None:
    config = write_federation(tmp_path, pki, [("fe1.corp.test", 1)])
    async with trio.open_nursery() as nursery:
        edge = await start_edge(nursery, config)
        started = next(e for e in edge.events if e["event"] == "gateway_started")
        await stop_edge(edge)
    assert started["version"] == VERSION


# --- 3. edge check --json -----------------------------------------------------------


def test_check_json_partners_roots_and_problem_lines(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = site.parent / "federation_policies"
    (policies / "litware.com" / "policy.toml").write_text('domains = ["litware.com"]\nenabled =\n')
    assert main(["check", "--json", "--config", str(site)]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False
    assert document["version"] == VERSION
    assert document["config"]["state"] == "loaded"
    partners = {p["id"]: p for p in document["partners"]}
    assert partners["fabrikam.com"]["state"] == "enabled"
    assert partners["fabrikam.com"]["domains"] == ["fabrikam.com"]
    (root,) = partners["fabrikam.com"]["roots"]
    assert root["subject"].startswith("CN=Fabrikam Root")
    assert root["not_after"].endswith("Z") and root["expired"] is False
    assert partners["litware.com"]["state"] == "broken"
    (problem,) = document["problems"]
    assert problem["severity"] == "error"
    assert problem["file"] == str(policies / "litware.com" / "policy.toml")
    assert problem["partner"] == "litware.com"
    assert (problem["line"], problem["column"]) == (2, 10)  # tomllib: 1-based, after "="


def test_check_json_config_problems_carry_lines(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = site.read_text()
    site.write_text(text.replace("handshake_timeout_s = 5", "handshake_timeout_s = 5\nbogus = 1"))
    assert main(["check", "--json", "--config", str(site)]) == 1
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    lines = site.read_text().splitlines()
    assert problem["key"] == "limits.bogus"
    assert problem["file"] == str(site)
    assert lines[problem["line"] - 1] == "bogus = 1"
    assert problem["message"].startswith("unknown key")
    # A TOML syntax error: tomllib's line and column.
    site.write_text(text + "\n[metrics\n")
    assert main(["check", "--json", "--config", str(site)]) == 1
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert problem["line"] == len(text.splitlines()) + 2
    assert problem["column"] is not None
    assert "not valid TOML" in problem["message"]


def test_check_text_names_file_and_line(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The text output points at the line too (``file:line: ...``), like the JSON."""
    text = site.read_text()
    site.write_text(text.replace("handshake_timeout_s = 5", "handshake_timeout_s = 5\nbogus = 1"))
    assert main(["check", "--config", str(site)]) == 1
    out = capsys.readouterr().out
    line = site.read_text().splitlines().index("bogus = 1") + 1
    assert f"error: {site}:{line}: limits.bogus: unknown key" in out, out
    site.write_text(text)
    policies = site.parent / "federation_policies"
    (policies / "litware.com" / "policy.toml").write_text('domains = ["litware.com"]\nenabled =\n')
    assert main(["check", "--config", str(site)]) == 1
    out = capsys.readouterr().out
    assert f"error: {policies / 'litware.com' / 'policy.toml'}:2:10: " in out, out


def test_check_json_clean_is_ok(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--json", "--config", str(site)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is True and document["problems"] == []
    roles = {c["role"] for c in document["config"]["certificates"]}
    assert roles == {"public", "internal", "internal_root"}


# --- 4. PKCS#12 and passphrase-protected keys ---------------------------------------


def _identity_site(tmp_path: Path, identity: str) -> Path:
    """A loadable edge.toml with the given [identity] table."""
    (tmp_path / "federation_policies").mkdir(exist_ok=True)
    config = tmp_path / "edge.toml"
    config.write_text(
        identity
        + """
[[listeners]]
name = "federation"
address = "127.0.0.1:5061"
policies = "federation_policies"
pool = "frontend"

[[pools]]
name = "frontend"
members = [{ host = "fe1.corp.test", port = 5061 }]
"""
    )
    return config


@pytest.fixture(scope="module")
def pfx_material() -> dict[str, object]:
    public_ca = CA.root("Public Root")
    issuing = public_ca.intermediate("Public Issuing")
    enterprise = CA.root("Enterprise Root")
    return {
        "public": issuing.issue(dns=["edge.contoso.com"], eku=["server"]),
        "internal": enterprise.issue(dns=["edge.corp.test"], eku=["client"]),
        "enterprise": enterprise,
        "issuing": issuing,
    }


PASS = b"Corr3ct horse!"


def _write_pfx(path: Path, leaf: object, password: bytes | None) -> None:
    from edge.pki import Leaf

    assert isinstance(leaf, Leaf)
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    data = pkcs12.serialize_key_and_certificates(
        b"edge", leaf.key, leaf.cert, list(reversed(leaf.chain[1:])), encryption
    )
    write_private(path, data)


def _write_pass(path: Path, secret: bytes) -> None:
    write_private(path, secret + b"\n")


def test_identity_from_pkcs12_and_encrypted_pem(
    tmp_path: Path, pfx_material: dict[str, object]
) -> None:
    from edge.pki import CA, Leaf

    public, internal, enterprise = (pfx_material[k] for k in ("public", "internal", "enterprise"))
    assert isinstance(public, Leaf) and isinstance(internal, Leaf) and isinstance(enterprise, CA)
    _write_pfx(tmp_path / "public.pfx", public, PASS)
    _write_pass(tmp_path / "public.pass", PASS)
    (tmp_path / "internal.pem").write_bytes(internal.chain_pem())
    write_private(
        tmp_path / "internal.key",
        internal.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASS),
        ),
    )
    _write_pass(tmp_path / "internal.pass", PASS)
    (tmp_path / "root.pem").write_bytes(enterprise.cert_pem())
    config = load_config(
        _identity_site(
            tmp_path,
            """[identity]
public_pkcs12 = "public.pfx"
public_pkcs12_passphrase_file = "public.pass"
internal_cert = "internal.pem"
internal_key = "internal.key"
internal_key_passphrase_file = "internal.pass"
internal_roots = ["root.pem"]
""",
        )
    )
    ident = config.identity
    assert ident.public_chain == public.chain  # leaf, then the intermediate, in order
    assert ident.public_private_key.public_key() == public.cert.public_key()
    assert ident.internal_private_key.public_key() == internal.cert.public_key()
    assert ident.public_cert == ident.public_key == tmp_path / "public.pfx"
    assert config.warnings == ()


def _problems(config: Path) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        load_config(config)
    for problem in info.value.problems:
        assert PASS.decode() not in problem and "wrong" not in PASS.decode()
    return info.value.problems


def test_pkcs12_and_passphrase_errors_name_file_and_key(
    tmp_path: Path, pfx_material: dict[str, object]
) -> None:
    from edge.pki import CA, Leaf

    public, internal, enterprise = (pfx_material[k] for k in ("public", "internal", "enterprise"))
    assert isinstance(public, Leaf) and isinstance(internal, Leaf) and isinstance(enterprise, CA)
    _write_pfx(tmp_path / "public.pfx", public, PASS)
    _write_pass(tmp_path / "wrong.pass", b"not it")
    (tmp_path / "root.pem").write_bytes(enterprise.cert_pem())
    (tmp_path / "internal.pem").write_bytes(internal.chain_pem())
    write_private(
        tmp_path / "other.key",
        public.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASS),
        ),
    )
    _write_pass(tmp_path / "good.pass", PASS)
    problems = _problems(
        _identity_site(
            tmp_path,
            """[identity]
public_pkcs12 = "public.pfx"
public_pkcs12_passphrase_file = "wrong.pass"
internal_cert = "internal.pem"
internal_key = "other.key"
internal_key_passphrase_file = "good.pass"
internal_roots = ["root.pem"]
""",
        )
    )
    config = tmp_path / "edge.toml"
    assert problems == (
        f"{config}: identity.public_pkcs12: {tmp_path / 'public.pfx'}: cannot read the PKCS#12 "
        "file (wrong passphrase in identity.public_pkcs12_passphrase_file, or not PKCS#12)",
        f"{config}: identity.internal_key: {tmp_path / 'other.key'}: does not match the "
        f"certificate in identity.internal_cert ({internal.cert.subject.rfc4514_string()})",
    )
    problems = _problems(
        _identity_site(
            tmp_path,
            """[identity]
public_pkcs12 = "missing.pfx"
internal_cert = "internal.pem"
internal_key = "other.key"
internal_key_passphrase_file = "wrong.pass"
internal_roots = ["root.pem"]
""",
        )
    )
    assert problems == (
        f"{config}: identity.public_pkcs12: {tmp_path / 'missing.pfx'}: file does not exist",
        f"{config}: identity.internal_key: {tmp_path / 'other.key'}: cannot decrypt the key: "
        "wrong passphrase in identity.internal_key_passphrase_file, or not a private key",
    )
    problems = _problems(
        _identity_site(
            tmp_path,
            """[identity]
public_pkcs12 = "public.pfx"
public_cert = "internal.pem"
internal_cert = "internal.pem"
internal_key = "other.key"
internal_roots = ["root.pem"]
""",
        )
    )
    assert (
        f"{config}: identity.public_cert: give either public_cert and public_key, " in (problems[0])
    )
    assert problems[-1] == (
        f"{config}: identity.internal_key: {tmp_path / 'other.key'}: the key is encrypted; "
        "name its passphrase file in identity.internal_key_passphrase_file (or give an "
        "unencrypted PKCS#8 key)"
    )


# --- 5. logs ------------------------------------------------------------------------


def test_every_event_has_a_level_from_one_table() -> None:
    out = io.StringIO()
    log = EventLog("json", out)
    log.event("gateway_started")
    log.event("connection_rejected", reason="unknown_ca")
    log.event("startup_failed")
    log.emit({"ts": "t", "event": "worker_exited"})  # a record built elsewhere
    levels = [json.loads(line)["level"] for line in out.getvalue().splitlines()]
    assert levels == ["info", "warning", "error", "error"]


def test_text_log_escapes_control_characters_so_no_line_is_forged() -> None:
    out = io.StringIO()
    log = EventLog("text", out)
    # Tabs, not spaces: "quote the value if it has a space" does not catch it.
    forged = "CN=evil\n2026-01-01T00:00:00.000Z\tinfo\tconnection_closed\tpartner=fabrikam.com"
    log.event(
        "connection_rejected",
        leaf_subject=forged,
        detail="a\rb\x1b[31mc\x7fd\u2028e\x85f",
        peer='x" y=1',
    )
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    line = text[:-1]
    assert line.isprintable()
    assert 'leaf_subject="CN=evil\\x0a2026-01-01T00:00:00.000Z\\x09info\\x09' in line
    assert 'detail="a\\x0db\\x1b[31mc\\x7fd\\u2028e\\x85f"' in line
    assert 'peer="x\\" y=1"' in line
    assert " warning connection_rejected " in line
    # JSON escapes by itself: still one line, and the value round-trips.
    out = io.StringIO()
    EventLog("json", out).event("connection_rejected", leaf_subject=forged)
    assert out.getvalue().count("\n") == 1
    assert json.loads(out.getvalue())["leaf_subject"] == forged


# --- 6. TCP probes ------------------------------------------------------------------


async def _accepted_after(client_action: str) -> tuple[bool, bytes]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    if client_action == "fin":
        await client.aclose()
    elif client_action == "rst":
        client.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        client.socket.close()
    else:
        await client.send_all(b"\x16\x03\x01")
        await client.aclose()
    with trio.fail_after(5):
        probe = await closed_before_sending(server)
        rest = b"" if probe else await server.receive_some(10)
    await server.aclose()
    for listener in listeners:
        await listener.aclose()
    return probe, rest


async def test_probe_classification_peeks_without_consuming() -> None:
    assert await _accepted_after("fin") == (True, b"")
    assert await _accepted_after("rst") == (True, b"")
    # A real client's first bytes stay for the TLS handshake.
    assert await _accepted_after("data") == (False, b"\x16\x03\x01")


def test_tcp_probes_counter_per_listener() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.tcp_probes.labels("federation").inc()
    assert registry.get_sample_value("edge_tcp_probes_total", {"listener": "federation"}) == 1


async def test_gateway_counts_tcp_probes_without_logging_them(tmp_path: Path, pki: Pki) -> None:
    import httpx

    config = write_federation(tmp_path, pki, [("fe1.corp.test", 1)])
    async with trio.open_nursery() as nursery:
        edge = await start_edge(nursery, config)
        for _ in range(3):
            probe = await trio.open_tcp_stream(*edge.address)
            await probe.aclose()
        async with httpx.AsyncClient() as client:
            with trio.fail_after(10):
                while True:  # bounded by fail_after: the three probes are counted
                    text = (await client.get(f"http://{edge.metrics_address}/metrics")).text
                    if 'edge_tcp_probes_total{listener="federation"} 3.0' in text:
                        break
                    await trio.sleep(0.05)
        await stop_edge(edge)
    assert not [e for e in edge.events if e["event"] == "connection_rejected"]


# --- 7. readiness -------------------------------------------------------------------


def test_readiness_decision_per_pool() -> None:
    both = {"frontend": True, "archive": True}
    one = {"frontend": True, "archive": False}
    none = {"frontend": False, "archive": False}
    assert decide_readiness(True, both) == (True, "ready")
    assert decide_readiness(True, one) == (True, "ready; pools with no member up: archive")
    assert decide_readiness(True, one, "all_pools") == (
        False,
        "pools with no member up: archive (ready_requires = all_pools)",
    )
    assert decide_readiness(True, none)[0] is False
    assert decide_readiness(True, none, "all_pools")[0] is False
    assert decide_readiness(False, both)[0] is False
    assert decide_readiness(True, {})[0] is False


def test_ready_requires_config_key(site: Path) -> None:
    config = load_config(site)
    assert config.metrics is not None and config.metrics.ready_requires == "any_pool"
    text = site.read_text().replace(
        'address = "127.0.0.1:0"\n\n[limits]',
        'address = "127.0.0.1:0"\nready_requires = "all_pools"\n\n[limits]',
    )
    site.write_text(text)
    config = load_config(site)
    assert config.metrics is not None and config.metrics.ready_requires == "all_pools"
    site.write_text(text.replace('"all_pools"', '"most"'))
    with pytest.raises(ConfigError) as info:
        load_config(site)
    assert info.value.problems == (
        f'{site}: metrics.ready_requires: must be "any_pool" or "all_pools", not a string \'most\'',
    )


# --- 8. bind errors, listener/metrics clash, infinite timeouts, key modes -----------


def test_bind_error_names_address_and_purpose() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with socket.socket() as second, pytest.raises(OSError) as info:
            second.bind(("127.0.0.1", port))
    message = bind_error("127.0.0.1", port, "listener federation", info.value)
    assert message == f"cannot listen on 127.0.0.1:{port} (listener federation): " + (
        os.strerror(info.value.errno or 0)
    )
    assert bind_error("::1", 9464, "metrics", info.value).startswith(
        "cannot listen on [::1]:9464 (metrics): "
    )


@pytest.mark.parametrize("which", ["listener", "metrics"])
def test_edge_run_bind_error_names_the_address(site: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = site.read_text()
        old = (
            'address = "127.0.0.1:0"\nmode'
            if which == "listener"
            else 'address = "127.0.0.1:0"\n\n'
        )
        site.write_text(text.replace(old, old.replace(":0", f":{port}"), 1))
        result = subprocess.run(
            [sys.executable, "-m", "edge.cli", "run", "--config", str(site)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    what = "listener federation" if which == "listener" else "metrics"
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} ({what}): " in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("listener", "metrics", "clash"),
    [
        ("127.0.0.1:5061", "127.0.0.1:5061", True),
        ("0.0.0.0:5061", "127.0.0.1:5061", True),
        ("127.0.0.1:5061", "[::]:5061", True),
        ("127.0.0.1:5061", "127.0.0.1:9464", False),
        ("127.0.0.1:5061", "[::1]:5061", False),
        ("127.0.0.1:0", "127.0.0.1:0", False),
    ],
)
def test_metrics_on_a_listener_address_is_refused(
    site: Path, listener: str, metrics: str, clash: bool
) -> None:
    text = site.read_text()
    text = text.replace('address = "127.0.0.1:0"\nmode', f'address = "{listener}"\nmode', 1)
    text = text.replace('address = "127.0.0.1:0"\n\n[limits]', f'address = "{metrics}"\n\n[limits]')
    site.write_text(text)
    # One cross-check for `edge check` and `edge run` alike: the snapshot's.
    problems = build_snapshot(load_config(site), {}).problems
    if not clash:
        assert problems == ()
        return
    (problem,) = problems
    assert problem.startswith(f"{site}: metrics address "), problem
    assert "clashes with listener 'federation'" in problem


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "+inf"])
def test_infinite_or_negative_timeouts_are_refused(site: Path, value: str) -> None:
    site.write_text(
        site.read_text().replace("handshake_timeout_s = 5", f"handshake_timeout_s = {value}")
    )
    with pytest.raises(ConfigError) as info:
        load_config(site)
    (problem,) = info.value.problems
    assert problem.startswith(
        f"{site}: limits.handshake_timeout_s: must be a number > 0 and finite"
    )
    assert not math.isfinite(float(value)) or float(value) <= 0


def test_world_readable_private_key_is_a_warning(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = site.parent / "certs" / "edge-public.key"
    key.chmod(0o644)
    config = load_config(site)  # a warning, not an error: the gateway still starts
    (warning,) = config.warnings
    assert warning.startswith(f"{key}: private key file is open to other users (mode 0644)")
    assert main(["check", "--config", str(site)]) == 1
    assert f"warning: {warning}" in capsys.readouterr().out
    key.chmod(0o640)  # group read: allowed (a dedicated group, a Kubernetes fsGroup)
    assert load_config(site).warnings == ()


# --- 9. --workers: a removed partner's expiry series leaves the scrape --------------

_WORKER = """
import sys
from edge.metrics import Metrics
m = Metrics()
both = {("partner_root", "fabrikam.com", "CN=F"): 2e9, ("partner_root", "litware.com", "CN=L"): 2e9}
m.replace_series(m.certificate_expiry, both)
m.replace_series(m.certificate_expiry, {("partner_root", "fabrikam.com", "CN=F"): 2e9})
"""


def test_workers_removed_partner_series_leaves_the_scrape(tmp_path: Path) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from edge.metrics import LiveSeriesCollector, forget_process

    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-W", "ignore", "-c", _WORKER], env=env, check=True, timeout=60)
    raw = CollectorRegistry()
    MultiProcessCollector(raw, path=str(tmp_path))  # type: ignore[no-untyped-call]
    assert b'partner="litware.com"' in generate_latest(raw)  # what prometheus-client keeps
    filtered = CollectorRegistry()
    LiveSeriesCollector(tmp_path, filtered)
    text = generate_latest(filtered)
    assert b'partner="litware.com"' not in text
    assert b'partner="fabrikam.com"' in text
    assert b"edge_build_info{" in text  # other metrics untouched
    (live,) = tmp_path.glob("live_series_*.json")
    forget_process(int(live.stem.rsplit("_", 1)[1]), tmp_path)
    assert not list(tmp_path.glob("live_series_*.json"))


# --- 10. deploy/edge.toml documents every key ---------------------------------------


def test_example_config_documents_every_key() -> None:
    example = REPO / "deploy/edge.toml"
    tomllib.loads(example.read_text())  # the uncommented part is valid TOML
    sections: dict[str, set[str]] = {"": set()}
    current = ""
    for line in example.read_text().splitlines():
        header = re.match(r"^#?\s*\[\[?([a-z_]+)\]\]?\s*$", line)
        if header:
            current = header[1]
            sections.setdefault(current, set())
            continue
        sections[current].update(re.findall(r"\b([a-z_0-9]+)\s*=", line))
    schema = {
        "identity": config_module._IDENTITY_KEYS,
        "listeners": config_module._LISTENER_KEYS,
        "pools": config_module._POOL_KEYS + config_module._MEMBER_KEYS,
        "metrics": config_module._METRICS_KEYS,
        "limits": config_module._FLOAT_LIMITS + config_module._INT_LIMITS,
        "policies": config_module._POLICY_SETTINGS_KEYS,
        "dns": config_module._DNS_KEYS,
        "revocation": config_module._REVOCATION_KEYS,
        "sip": config_module._SIP_KEYS,
        "tls": config_module._TLS_KEYS,
    }
    assert set(schema) == set(config_module._TOP_KEYS)
    known_tuples = {n for n in dir(config_module) if re.fullmatch(r"_[A-Z_]+_KEYS", n)}
    assert known_tuples == {
        "_TOP_KEYS",
        "_IDENTITY_KEYS",
        "_LISTENER_KEYS",
        "_POOL_KEYS",
        "_MEMBER_KEYS",
        "_METRICS_KEYS",
        "_POLICY_SETTINGS_KEYS",
        "_DNS_KEYS",
        "_REVOCATION_KEYS",
        "_SIP_KEYS",
        "_TLS_KEYS",
    }, "a new _*_KEYS tuple: add it to this test's schema"
    for table, keys in schema.items():
        missing = set(keys) - sections.get(table, set())
        assert not missing, f"deploy/edge.toml [{table}] does not document {sorted(missing)}"
