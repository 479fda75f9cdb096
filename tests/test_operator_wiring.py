"""Issue 16's operator tools wired into the running gateway (in process, real sockets):
/readyz per pool under `ready_requires`, `config_warning` at start and after a reload,
`partner_notice` said once per ignored entry, the bind error of `edge run --workers`,
sd_notify (READY, RELOADING, STOPPING) from the gateway or only the supervisor, and
passphrase files watched like the keys they open."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization

from edge.pki import write_private
from tests.gateway_harness import (
    Pki,
    http_get,
    start_edge,
    start_gateway,
    start_pool,
    stop_edge,
    write_federation,
)

_ARCHIVE_POOL = """
[[pools]]
name = "archive"
health_interval_s = 0.2
unhealthy_after = 1
members = [{ host = "archive.corp.test", address = "127.0.0.1", port = 1 }]
"""


def _two_pools(folder: Path, pki: Pki, port: int, requires: str) -> Path:
    """A site whose frontend pool is up and whose archive pool (litware's) cannot be."""
    config = write_federation(
        folder,
        pki,
        [("fe1.corp.test", port)],
        policies={
            "fabrikam.com": 'domains = ["fabrikam.com"]\n',
            "litware.com": 'domains = ["litware.com"]\npool = "archive"\n',
        },
        extra=_ARCHIVE_POOL,
    )
    text = config.read_text()
    old = 'address = "127.0.0.1:0"\n\n[limits]'
    assert old in text
    config.write_text(
        text.replace(old, f'address = "127.0.0.1:0"\nready_requires = "{requires}"\n\n[limits]')
    )
    return config


async def test_readyz_with_one_of_two_pools_down_follows_ready_requires(
    tmp_path: Path, pki: Pki
) -> None:
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            ((_, port, _),) = await start_pool(nursery, pki, ("fe1.corp.test",))
            answers: dict[str, tuple[int, str]] = {}
            for requires in ("any_pool", "all_pools"):
                config = _two_pools(tmp_path / requires, pki, port, requires)
                async with trio.open_nursery() as inner:
                    edge = await start_gateway(inner, config)
                    pools = edge.gateway._pools
                    while pools.pools_up() != {"frontend": True, "archive": False}:
                        await trio.sleep(0.05)  # bounded by fail_after
                    answers[requires] = await http_get(edge.metrics_address, "/readyz")
                    await edge.stop()
                    inner.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    assert answers["any_pool"] == (200, "ready\n")
    status, body = answers["all_pools"]
    assert status == 503
    assert body == "pool archive has no member up (ready_requires = all_pools)\n"


async def test_config_warning_at_start_and_after_a_reload(tmp_path: Path, pki: Pki) -> None:
    config = write_federation(tmp_path, pki, [("fe1.corp.test", 1)])
    key = tmp_path / "certs" / "edge-public.key"
    key.chmod(0o644)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            edge = await start_gateway(nursery, config)
            first = [e for e in edge.events if e["event"] == "config_warning"]
            assert len(first) == 1
            assert first[0]["warning"].startswith(f"{key}: private key file is open to other")
            assert first[0]["config"] == str(config)
            await edge.gateway.poll_once(forced=True)
            await edge.wait_for(lambda e: e["event"] == "config_reloaded")
            again = [e for e in edge.events if e["event"] == "config_warning"]
            assert again == [first[0], first[0] | {"ts": again[1]["ts"]}]
            await edge.stop()
            nursery.cancel_scope.cancel()


async def test_partner_notices_are_said_once_each(tmp_path: Path, pki: Pki) -> None:
    config = write_federation(tmp_path, pki, [("fe1.corp.test", 1)])
    policies = tmp_path / "federation_policies"
    shutil.copytree(policies / "fabrikam.com", policies / "fabrikam.com.bak")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            edge = await start_gateway(nursery, config)

            def notices() -> list[tuple[str, str]]:
                return [
                    (e["partner"], e["file"]) for e in edge.events if e["event"] == "partner_notice"
                ]

            assert notices() == [("", str(policies / "fabrikam.com.bak"))]
            # The backup copy is ignored, not a second claimant of fabrikam.com.
            assert not [e for e in edge.events if e["event"] == "partner_problem"]
            await edge.gateway.poll_once(forced=True)  # nothing new: nothing said
            assert notices() == [("", str(policies / "fabrikam.com.bak"))]
            (policies / "litware.com" / "root.pem~").write_bytes(b"an editor's backup")
            await edge.gateway.poll_once(forced=True)
            said = [e for e in edge.events if e["event"] == "partner_notice"]
            assert notices() == [
                ("", str(policies / "fabrikam.com.bak")),
                ("litware.com", str(policies / "litware.com" / "root.pem~")),
            ]
            assert said[-1]["notice"] == "ignored: hidden or backup-looking name, never read"
            await edge.stop()
            nursery.cancel_scope.cancel()


def test_workers_bind_error_names_the_address(tmp_path: Path, pki: Pki) -> None:
    config = write_federation(tmp_path, pki, [("fe1.corp.test", 1)])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = config.read_text().replace(
            'address = "127.0.0.1:0"\n\n', f'address = "127.0.0.1:{port}"\n\n', 1
        )
        config.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "edge.cli", "run", "--workers", "2", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (metrics): " in result.stderr, result.stderr


class _NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="edge-notify-")  # short: AF_UNIX path limit
        self.path = os.path.join(self.folder, "notify")
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    async def bind(self) -> None:
        await self.sock.bind(self.path)

    async def next_state(self) -> str:
        """The state key (READY, RELOADING, STOPPING) of the next datagram."""
        with trio.fail_after(60):
            fields = (await self.sock.recv(4096)).split(b"\n")
        states = [f.split(b"=")[0].decode() for f in fields if f.endswith(b"=1")]
        assert len(states) == 1, fields
        return states[0]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.folder)


async def test_gateway_notifies_ready_reloading_and_stopping(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = _NotifySocket()
    try:
        await notify.bind()
        monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
        config = write_federation(tmp_path, pki, [("fe1.corp.test", 1)])
        async with trio.open_nursery() as nursery:
            edge = await start_gateway(nursery, config)
            assert await notify.next_state() == "READY"
            edge.gateway.request_reload()  # what SIGHUP does
            assert await notify.next_state() == "RELOADING"
            assert await notify.next_state() == "READY"  # once that reload finished
            assert [e for e in edge.events if e["event"] == "config_reloaded"]
            await edge.stop()
            assert await notify.next_state() == "STOPPING"
            nursery.cancel_scope.cancel()
    finally:
        notify.close()


async def test_with_workers_only_the_supervisor_notifies(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = _NotifySocket()
    try:
        await notify.bind()
        monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                config = write_federation(tmp_path, pki, [("fe1.corp.test", 1)])
                edge = await start_edge(nursery, config, ["--workers", "2"])
                assert await notify.next_state() == "READY"
                edge.process.send_signal(signal.SIGHUP)
                assert await notify.next_state() == "RELOADING"
                assert await notify.next_state() == "READY"
                # Both workers reported their reload (written before READY was sent).
                for worker in (0, 1):
                    await edge.wait_for(
                        lambda e, w=worker: e["event"] == "config_reloaded" and e["worker"] == w
                    )
                assert await stop_edge(edge, timeout=60) == 0
                assert await notify.next_state() == "STOPPING"
                # Nothing else: no worker spoke to systemd.
                with trio.move_on_after(0.5):
                    extra = await notify.sock.recv(4096)
                    raise AssertionError(f"unexpected notification {extra!r}")
                nursery.cancel_scope.cancel()
    finally:
        notify.close()


async def test_a_changed_passphrase_file_is_noticed_like_the_key(tmp_path: Path, pki: Pki) -> None:
    config = write_federation(tmp_path, pki, [("fe1.corp.test", 1)])
    secret = b"Corr3ct horse!"
    key = tmp_path / "certs" / "edge-internal.key"
    write_private(
        key,
        pki.internal.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(secret),
        ),
    )
    passphrase = tmp_path / "certs" / "internal.pass"
    write_private(passphrase, secret + b"\n")
    text = config.read_text()
    old = 'internal_key = "certs/edge-internal.key"\n'
    assert old in text
    config.write_text(
        text.replace(old, old + 'internal_key_passphrase_file = "certs/internal.pass"\n')
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            edge = await start_gateway(nursery, config)
            write_private(passphrase, b"not the passphrase\n")
            await edge.gateway.poll_once()  # not forced: only a change reloads
            failed = await edge.wait_for(lambda e: e["event"] == "config_reload_failed")
            assert any(
                "wrong passphrase in identity.internal_key_passphrase_file" in p
                for p in failed["problems"]
            )
            await edge.stop()
            nursery.cancel_scope.cancel()
