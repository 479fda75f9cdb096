"""The snapshot: one immutable value, every cross-check, a diff that forgets no field.

The first half is pure (``edge.core.snapshot``). The second half runs the
gateway in this process on loopback and checks the four behaviours of issue
14 that the snapshot fixed: each of those tests fails on the code before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.core.config import Dns, MetricsSettings, RevocationSettings, load_config
from edge.core.policies import load_policies
from edge.core.reasons import Reason
from edge.core.snapshot import (
    Snapshot,
    build_snapshot,
    carry_running,
    classify,
    diff,
    policy_folders,
)
from edge.demo import EchoMember
from edge.pki import Leaf
from tests.gateway_harness import (
    Pki,
    echo_roundtrip,
    partner_stream,
    start_gateway,
    write_federation,
)

# ----------------------------------------------------------------------
# Pure


def _leaf_paths(tp: Any, path: str) -> list[str]:
    """Every leaf field path under type ``tp`` ("*" for mapping keys and items)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp)
        out: list[str] = []
        for f in dataclasses.fields(tp):
            out += _leaf_paths(hints[f.name], f"{path}.{f.name}" if path else f.name)
        return out
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return _leaf_paths(args[1], f"{path}.*")
    if origin is tuple and args and args[-1] is not Ellipsis and len(args) == 1:
        return _leaf_paths(args[0], f"{path}.*")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _leaf_paths(args[0], f"{path}.*")
    if origin in (types.UnionType, typing.Union):
        out = []
        for arg in args:
            if arg is not type(None):
                out += _leaf_paths(arg, path)
        return out or [path]
    return [path]


def test_diff_classifies_every_field_recursively() -> None:
    paths = set(_leaf_paths(Snapshot, ""))
    # The walk reached the leaves (a sanity check on the walker itself).
    assert "config.limits.handshake_timeout_s" in paths
    assert "config.dns.nameservers.*.*" in paths or "config.dns.nameservers.*" in paths
    assert any(p.startswith("folders.*.policies.partners.*.") for p in paths)
    unclassified = sorted(p for p in paths if classify(p) is None)
    assert unclassified == [], f"add these to edge.core.snapshot._EFFECTS: {unclassified}"


def _site(tmp_path: Path, pki: Pki, **kwargs: Any) -> Path:
    return write_federation(tmp_path, pki, [("fe1.corp.test", 1)], **kwargs)


def _snapshot(config_path: Path) -> Snapshot:
    config = load_config(config_path)
    loaded = {f: load_policies(f) for f in policy_folders(config)}
    return build_snapshot(config, loaded)


def test_diff_reports_every_top_level_config_field(tmp_path: Path, pki: Pki) -> None:
    old = _snapshot(_site(tmp_path, pki))
    cfg = old.config
    dns = dataclasses.replace(cfg, dns=Dns(nameservers=(("127.0.0.1", 53),)))
    rev = dataclasses.replace(cfg, revocation=RevocationSettings(fetch=True))
    met = dataclasses.replace(cfg, metrics=MetricsSettings("127.0.0.1", 1))
    assert diff(old, dataclasses.replace(old, config=dns)).applied == ("dns",)
    # [revocation] goes to the CRL fetcher live (CrlFetcher.configure).
    assert diff(old, dataclasses.replace(old, config=rev)).applied == ("revocation",)
    assert diff(old, dataclasses.replace(old, config=met)).needs_restart == ("metrics",)
    assert not diff(old, old)
    # A reload of the same files: nothing changed (keys compare by their public half).
    again = _snapshot(cfg.path)
    assert not diff(old, again), diff(old, again)
    # Restart-only fields keep their running value in the snapshot taken into use.
    carried = carry_running(
        cfg, dataclasses.replace(cfg, dns=dns.dns, revocation=rev.revocation, metrics=met.metrics)
    )
    assert carried.dns == dns.dns and carried.revocation == rev.revocation
    assert carried.metrics == cfg.metrics


def test_unknown_pool_makes_the_partner_broken(tmp_path: Path, pki: Pki) -> None:
    site = _site(
        tmp_path,
        pki,
        policies={
            "fabrikam.com": 'domains = ["fabrikam.com"]\npool = "backend"\n',
            "litware.com": 'domains = ["litware.com"]\n',
        },
    )
    snap = _snapshot(site)
    (trust,) = snap.folders.values()
    assert "fabrikam.com" in trust.policies.broken
    assert "fabrikam.com" not in trust.policies.partners
    assert "fabrikam.com" in trust.loaded.partners  # the folder itself loaded it
    assert [p.message for p in trust.policies.problems_of("fabrikam.com")] == [
        "pool: no pool named 'backend' in the configuration (pools: frontend)"
    ]
    assert snap.partner_summary() == {"enabled": 1, "disabled": 0, "broken": 1}


def test_domain_claimed_by_two_partners_of_one_folder_keeps_its_first_owner(
    tmp_path: Path, pki: Pki
) -> None:
    site = _site(
        tmp_path,
        pki,
        policies={
            "fabrikam.com": 'domains = ["fabrikam.com", "shared.example"]\n',
            "litware.com": 'domains = ["litware.com", "shared.example"]\n',
        },
    )
    (trust,) = _snapshot(site).folders.values()
    fatal = [p for p in trust.policies.problems if p.fatal]
    assert [p.partner for p in fatal] == ["litware.com"]
    assert "shared.example" in fatal[0].message and "fabrikam.com" in fatal[0].message
    assert set(trust.policies.partners) == {"fabrikam.com"}
    assert "litware.com" in trust.policies.broken


def test_metrics_on_a_listener_address_is_a_problem(tmp_path: Path, pki: Pki) -> None:
    site = _site(tmp_path, pki)
    text = site.read_text().replace('address = "127.0.0.1:0"', 'address = "127.0.0.1:9443"')
    site.write_text(
        text.replace('[metrics]\naddress = "127.0.0.1:9443"', '[metrics]\naddress = "0.0.0.0:9443"')
    )
    (problem,) = _snapshot(site).problems
    assert "metrics address 0.0.0.0:9443 clashes with listener 'federation'" in problem


# ----------------------------------------------------------------------
# The gateway in process: the four behaviours of issue 14


async def _start_pool(nursery: trio.Nursery, pki: Pki, leaf: Leaf) -> int:
    member = EchoMember(leaf.chain, leaf.key, [pki.enterprise.cert])
    port: int = await nursery.start(member.serve)
    return port


async def test_partner_with_unknown_pool_is_broken_not_internal_error(
    tmp_path: Path, pki: Pki
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await _start_pool(nursery, pki, pki.member_leaf("fe1.corp.test"))
            config = write_federation(
                tmp_path,
                pki,
                [("fe1.corp.test", port)],
                policies={"fabrikam.com": 'domains = ["fabrikam.com"]\npool = "backend"\n'},
            )
            edge = await start_gateway(nursery, config)
            problem = await edge.wait_for(lambda e: e["event"] == "partner_problem")
            assert problem["partner"] == "fabrikam.com"
            assert "no pool named 'backend'" in problem["problem"]
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            stream, local = await partner_stream(edge, pki, leaf)
            with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError):
                await echo_roundtrip(stream, b"x")
            rejected = await edge.event_for_port(local, "connection_rejected")
            assert rejected["reason"] == Reason.UNKNOWN_CA.value
            assert not any(e["event"] == "internal_error" for e in edge.events)
            nursery.cancel_scope.cancel()


async def test_config_reload_applies_dns_and_revocation(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await _start_pool(nursery, pki, pki.member_leaf("fe1.corp.test"))
            config = write_federation(tmp_path, pki, [("fe1.corp.test", port)])
            edge = await start_gateway(nursery, config)
            running = edge.gateway.snapshot.config.revocation
            text = config.read_text()
            config.write_text(
                text
                + '\n[dns]\nnameservers = ["127.0.0.1:5353"]\n'
                + f'\n[revocation]\nfetch = true\ncache_dir = "{tmp_path / "crl"}"\n'
            )
            await edge.gateway.poll_once(forced=True)
            reloaded = await edge.wait_for(lambda e: e["event"] == "config_reloaded")
            assert reloaded["applied"] == ["dns", "revocation"]
            assert reloaded["needs_restart"] == []
            current = edge.gateway.snapshot.config
            assert current.dns.nameservers == (("127.0.0.1", 5353),)
            assert not running.fetch and current.revocation.fetch  # applied live
            nursery.cancel_scope.cancel()


async def test_reloaded_handshake_timeout_reaches_upstream_dials(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            # A member that accepts TCP and never answers the handshake.
            silent = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            held: list[trio.SocketStream] = []

            async def hold() -> None:
                while True:
                    held.append(await silent.accept())

            nursery.start_soon(hold)
            port = silent.socket.getsockname()[1]
            config = write_federation(
                tmp_path, pki, [("fe1.corp.test", port)], limits="handshake_timeout_s = 60"
            )
            edge = await start_gateway(nursery, config)
            config.write_text(
                config.read_text().replace("handshake_timeout_s = 60", "handshake_timeout_s = 0.5")
            )
            await edge.gateway.poll_once(forced=True)
            reloaded = await edge.wait_for(lambda e: e["event"] == "config_reloaded")
            assert reloaded["applied"] == ["limits"]
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            _, local = await partner_stream(edge, pki, leaf)
            rejected = await edge.event_for_port(local, "connection_rejected", timeout=15)
            assert rejected["reason"] == Reason.NO_UPSTREAM.value
            assert "no connection within 0.5s" in rejected["detail"]
            nursery.cancel_scope.cancel()


def _ca_true_member_leaf(pki: Pki, host: str) -> Leaf:
    """A pool member certificate that is valid in every way but says CA:TRUE."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.UTC)
    issuer = pki.enterprise
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(hours=1))
        .not_valid_after(now + _dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    return Leaf(cert, key, (cert, *issuer.chain))


async def test_upstream_dial_takes_the_server_trust_decision(tmp_path: Path, pki: Pki) -> None:
    """`edge verify --purpose server` and the real dial agree: a CA:TRUE leaf is refused."""
    from edge.core.trust import ServerTrust

    leaf = _ca_true_member_leaf(pki, "fe1.corp.test")
    verdict = ServerTrust([pki.enterprise.cert]).verify_server(list(leaf.chain), "fe1.corp.test")
    assert verdict.reason == Reason.BAD_PURPOSE
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            member = EchoMember(leaf.chain, leaf.key, [pki.enterprise.cert])
            port = await nursery.start(member.serve)
            config = write_federation(tmp_path, pki, [("fe1.corp.test", port)])
            edge = await start_gateway(nursery, config)
            partner = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            stream, local = await partner_stream(edge, pki, partner)
            with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError):
                await echo_roundtrip(stream, b"never relayed")
            rejected = await edge.event_for_port(local, "connection_rejected")
            assert rejected["reason"] == Reason.UPSTREAM_UNTRUSTED.value
            assert "bad_purpose" in rejected["detail"]
            nursery.cancel_scope.cancel()
