"""Live trust changes through a running gateway: real files, real connections.

The gateway runs in the test's process (``start_gateway``); only the SIGHUP
test runs `edge run` as a subprocess, for the signal itself. It polls every
0.2 s here (reload-request tests poll once an hour, so only the request can
explain the change). Every assertion on a closed or refused
connection is on the exact reason the gateway logged for that connection.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import trio

from tests.gateway_harness import (
    EdgeProcess,
    InProcessEdge,
    Pki,
    echo_roundtrip,
    partner_stream,
    sample,
    scrape,
    start_edge,
    start_gateway,
    start_pool,
    stop_edge,
    write_federation,
)

FAST_POLL = "[policies]\npoll_interval_s = 0.2\n"
NO_POLL = "[policies]\npoll_interval_s = 3600\n"
POOL = ("fe1.corp.test",)
Edge = EdgeProcess | InProcessEdge


async def _start(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: Pki,
    *,
    extra: str = FAST_POLL,
    policies: dict[str, str] | None = None,
) -> InProcessEdge:
    pool = await start_pool(nursery, pki, POOL)
    config = write_federation(
        tmp_path,
        pki,
        [(h, p) for h, p, _ in pool],
        extra=extra,
        policies=policies or {"fabrikam.com": 'domains = ["fabrikam.com"]\n'},
    )
    return await start_gateway(nursery, config)


def _reloads(edge: Edge) -> list[dict[str, object]]:
    return [e for e in edge.events if e["event"] == "policies_reloaded"]


async def _next_reload(edge: Edge, **match: object) -> dict[str, object]:
    seen = len(_reloads(edge))
    return await edge.wait_for(
        lambda e: (
            e["event"] == "policies_reloaded"
            and _reloads(edge).index(e) >= seen
            and all(e.get(k) == v for k, v in match.items())
        )
    )


async def _refused_reason(edge: Edge, pki: Pki, leaf: object) -> str:
    from edge.pki import Leaf

    assert isinstance(leaf, Leaf)
    stream, port = await partner_stream(edge, pki, leaf)
    try:
        await stream.send_all(b"x")
        with trio.move_on_after(5):
            assert await stream.receive_some(10) == b""
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    await stream.aclose()
    event = await edge.event_for_port(port, "connection_rejected")
    return str(event["reason"])


async def test_new_partner_is_relayed_without_restart(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            edge = await _start(nursery, tmp_path, pki)
            litware_leaf = pki.litware.issue(dns=["sip.litware.com"])
            assert await _refused_reason(edge, pki, litware_leaf) == "unknown_ca"
            folder = tmp_path / "federation_policies" / "litware.com"
            folder.mkdir()
            (folder / "litware-root.cer").write_bytes(pki.litware_root.cert_pem())
            await _next_reload(edge, added=["litware.com"])
            stream, port = await partner_stream(edge, pki, litware_leaf)
            assert await echo_roundtrip(stream, b"new partner") == b"new partner"
            await stream.aclose()
            closed = await edge.event_for_port(port, "connection_closed")
            assert closed["partner"] == "litware.com"
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_broken_edit_keeps_last_good_trust(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            edge = await _start(nursery, tmp_path, pki)
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            # A live connection survives the broken edit too.
            live, _ = await partner_stream(edge, pki, leaf)
            assert await echo_roundtrip(live, b"before") == b"before"
            # A new root half-copied: it adds nothing, the partner keeps its root.
            # (A broken policy.toml withdraws the partner instead: test_odd_files.)
            half = tmp_path / "federation_policies" / "fabrikam.com" / "new-root.pem"
            half.write_bytes(pki.litware_root.cert_pem()[:200])
            reload = await _next_reload(edge, broken=["fabrikam.com"])
            assert reload["result"] == "error"
            problem = await edge.wait_for(
                lambda e: e["event"] == "partner_problem" and e.get("kept_last_good") is True
            )
            assert problem["file"].endswith("new-root.pem")
            stream, _ = await partner_stream(edge, pki, leaf)
            assert await echo_roundtrip(stream, b"still trusted") == b"still trusted"
            await stream.aclose()
            assert await echo_roundtrip(live, b"still relayed") == b"still relayed"
            samples = await scrape(edge)
            assert sample(samples, "edge_partners", state="broken") == 1
            # The per-partner gauge names it (the broken-partner alert says which).
            broken = {"partner": "fabrikam.com", "state": "broken"}
            assert sample(samples, "edge_partner_state", **broken) == 1
            assert (
                sample(samples, "edge_partner_state", partner="fabrikam.com", state="enabled")
                is None
            )
            assert (sample(samples, "edge_policy_reloads_total", result="error") or 0) >= 1
            # Fixing the file is picked up as the next change.
            half.unlink()
            await _next_reload(edge, broken=[], result="ok")
            samples = await scrape(edge)
            assert sample(samples, "edge_partner_state", **broken) is None
            assert (
                sample(samples, "edge_partner_state", partner="fabrikam.com", state="enabled") == 1
            )
            await live.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_removed_partner_is_closed_and_refused(tmp_path: Path, pki: Pki) -> None:
    policies = {
        "fabrikam.com": 'domains = ["fabrikam.com"]\n',
        "litware.com": 'domains = ["litware.com"]\n',
    }
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            edge = await _start(nursery, tmp_path, pki, policies=policies)
            fab_leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            fab, fab_port = await partner_stream(edge, pki, fab_leaf)
            lit, lit_port = await partner_stream(
                edge, pki, pki.litware.issue(dns=["sip.litware.com"])
            )
            assert await echo_roundtrip(fab, b"a") == b"a"
            assert await echo_roundtrip(lit, b"b") == b"b"
            shutil.rmtree(tmp_path / "federation_policies" / "fabrikam.com")
            closed = await edge.event_for_port(fab_port, "connection_closed", timeout=5)
            assert closed["end"] == "trust_withdrawn"
            assert closed["reason"] == "unknown_ca"
            assert closed["partner"] == "fabrikam.com"
            # The partner sees its connection end.
            with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
                assert await fab.receive_some(10) == b""
            await fab.aclose()
            assert await _refused_reason(edge, pki, fab_leaf) == "unknown_ca"
            # The other partner's live connection is untouched.
            assert await echo_roundtrip(lit, b"still here") == b"still here"
            assert not any(
                e["event"] == "connection_closed" and e["peer"].endswith(f":{lit_port}")
                for e in edge.events
            )
            await lit.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_crl_dropped_in_closes_the_revoked_live_connection(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            edge = await _start(nursery, tmp_path, pki)
            revoked_leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            good_leaf = pki.fabrikam.issue(dns=["sip2.fabrikam.com"])
            bad, bad_port = await partner_stream(edge, pki, revoked_leaf)
            good, _ = await partner_stream(edge, pki, good_leaf)
            assert await echo_roundtrip(bad, b"1") == b"1"
            assert await echo_roundtrip(good, b"2") == b"2"
            crl = pki.fabrikam.crl([revoked_leaf.cert.serial_number])
            from cryptography.hazmat.primitives.serialization import Encoding

            path = tmp_path / "federation_policies" / "fabrikam.com" / "fabrikam.crl"
            path.write_bytes(crl.public_bytes(Encoding.PEM))
            closed = await edge.event_for_port(bad_port, "connection_closed", timeout=5)
            assert closed["end"] == "trust_withdrawn"
            assert closed["reason"] == "revoked"
            await bad.aclose()
            assert await echo_roundtrip(good, b"unrevoked") == b"unrevoked"
            assert await _refused_reason(edge, pki, revoked_leaf) == "revoked"
            await good.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_sighup_reloads_at_once(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            pool = await start_pool(nursery, pki, POOL)
            config = write_federation(
                tmp_path,
                pki,
                [(h, p) for h, p, _ in pool],
                extra=NO_POLL,
                policies={"fabrikam.com": 'domains = ["fabrikam.com"]\n'},
            )
            edge = await start_edge(nursery, config)
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            live, live_port = await partner_stream(edge, pki, leaf)
            assert await echo_roundtrip(live, b"x") == b"x"
            folder = tmp_path / "federation_policies" / "fabrikam.com"
            (folder / "policy.toml").write_text('domains = ["fabrikam.com"]\nenabled = false\n')
            await trio.sleep(0.5)  # nothing happens without the signal (poll: 1 hour)
            assert _reloads(edge) == []
            edge.process.send_signal(signal.SIGHUP)
            reload = await _next_reload(edge, changed=["fabrikam.com"])
            assert reload["result"] == "ok"
            closed = await edge.event_for_port(live_port, "connection_closed", timeout=5)
            assert closed["end"] == "trust_withdrawn"
            assert closed["reason"] == "partner_disabled"
            await live.aclose()
            assert await _refused_reason(edge, pki, leaf) == "partner_disabled"
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_own_certificate_rotation_without_restart(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            edge = await _start(nursery, tmp_path, pki, extra=NO_POLL)
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            before, _ = await partner_stream(edge, pki, leaf)
            old_serial = before.peer_chain[0].serial_number
            assert old_serial == pki.public.cert.serial_number
            # A wrong key for the new certificate is refused and the old pair kept.
            from tests.gateway_harness import EDGE_NAME

            rotated = pki.edge_ca.issue(dns=[EDGE_NAME], eku=["server"])
            certs = tmp_path / "certs"
            (certs / "edge-public.pem").write_bytes(rotated.chain_pem())
            edge.gateway.request_reload()
            failed = await edge.wait_for(lambda e: e["event"] == "config_reload_failed")
            assert any("public_key" in p for p in failed["problems"]), failed
            still_old, _ = await partner_stream(edge, pki, leaf)
            assert still_old.peer_chain[0].serial_number == old_serial
            await still_old.aclose()
            # The matching key completes the rotation.
            rotated.write(certs, "edge-public")
            edge.gateway.request_reload()
            reloaded = await edge.wait_for(lambda e: e["event"] == "config_reloaded")
            assert reloaded["applied"] == ["identity"]
            after, _ = await partner_stream(edge, pki, leaf)
            assert after.peer_chain[0].serial_number == rotated.cert.serial_number
            assert await echo_roundtrip(after, b"rotated") == b"rotated"
            await after.aclose()
            # The connection opened before the rotation still relays.
            assert await echo_roundtrip(before, b"old") == b"old"
            await before.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


class KubeletVolume:
    """A ConfigMap volume as the kubelet lays it out, updated as it updates it.

    Each version is a hidden `..VERSION/` folder; every visible top-level name
    is a symlink through `..data`, and an update writes a new version, adds the
    symlinks of new names, then renames a new `..data` over the old one.
    """

    def __init__(self, root: Path) -> None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        self.root = root
        self.versions = 0

    def publish(self, entries: dict[str, dict[str, str]]) -> None:
        """``entries``: top-level name -> {file inside it, or "" for the name itself: text}."""
        self.versions += 1
        version = self.root / f"..2026_11_27_v{self.versions}"
        for top, files in entries.items():
            for inner, text in files.items():
                path = version / top / inner if inner else version / top
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            if not (self.root / top).is_symlink():
                os.symlink(f"..data/{top}", self.root / top)
        os.symlink(version.name, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", self.root / "..data")  # atomic


async def _kubelet_adds_litware(
    tmp_path: Path, pki: Pki, layout: Callable[[str, bytes], tuple[str, dict[str, str]]]
) -> None:
    """fabrikam.com mounted first; litware.com added by one ConfigMap update, live."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            pool = await start_pool(nursery, pki, POOL)
            config = write_federation(
                tmp_path, pki, [(h, p) for h, p, _ in pool], extra=FAST_POLL, policies={}
            )
            volume = KubeletVolume(tmp_path / "federation_policies")
            fabrikam = layout("fabrikam.com", pki.fabrikam.cert_pem())
            volume.publish(dict([fabrikam]))
            edge = await start_gateway(nursery, config)
            litware_leaf = pki.litware.issue(dns=["sip.litware.com"])
            assert await _refused_reason(edge, pki, litware_leaf) == "unknown_ca"
            volume.publish(dict([fabrikam, layout("litware.com", pki.litware_root.cert_pem())]))
            await _next_reload(edge, added=["litware.com"])
            stream, _ = await partner_stream(edge, pki, litware_leaf)
            assert await echo_roundtrip(stream, b"k8s") == b"k8s"
            await stream.aclose()
            fab, _ = await partner_stream(edge, pki, pki.fabrikam.issue(dns=["sip.fabrikam.com"]))
            assert await echo_roundtrip(fab, b"still") == b"still"
            await fab.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_configmap_style_data_symlink_swap(tmp_path: Path, pki: Pki) -> None:
    """Partner folders as symlinks through `..data` (a projected volume)."""
    await _kubelet_adds_litware(tmp_path, pki, lambda pid, root: (pid, {"root.pem": root.decode()}))


async def test_configmap_of_single_file_partners_adds_one_live(tmp_path: Path, pki: Pki) -> None:
    """One ConfigMap holds every partner as `ID.toml`; `kubectl apply` is a ..data swap."""
    await _kubelet_adds_litware(
        tmp_path,
        pki,
        lambda pid, root: (f"{pid}.toml", {"": f'roots = """\n{root.decode()}"""\n'}),
    )
