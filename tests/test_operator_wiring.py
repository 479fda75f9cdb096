"""Issue 16's operator tools wired into the running gateway (in process, real sockets):
/readyz per pool under `ready_requires`, `config_warning` at start and after a reload,
`partner_notice` said once per ignored entry, and the bind error of `edge run --workers`."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import trio

from tests.gateway_harness import (
    Pki,
    http_get,
    start_gateway,
    start_pool,
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
