"""CRLs fetched from distribution points, through a running `edge run`.

The test serves the partner's CRL over HTTP on 127.0.0.1 itself (h11 on trio)
and changes what it serves; the gateway must fetch, cache, refresh, and act.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from edge.core.config import ConfigError, RevocationSettings, load_config
from edge.core.policies import PolicySnapshot, load_policies
from edge.core.revocation import CrlSet
from edge.core.trust import PartnerTrust
from edge.crlfetch import (
    CrlFetcher,
    FetchRefused,
    destination_problem,
    distribution_points,
    resolve_destination,
)
from edge.logs import EventLog
from edge.pki import CA, Leaf
from tests.gateway_harness import (
    Pki,
    echo_roundtrip,
    partner_stream,
    start_edge,
    start_pool,
    write_federation,
)


def test_distribution_points_are_read_from_the_certificate(pki: Pki) -> None:
    leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"], crl_url="http://127.0.0.1:9/x.crl")
    assert distribution_points(leaf.cert) == ["http://127.0.0.1:9/x.crl"]
    assert distribution_points(pki.fabrikam.issue(dns=["a.fabrikam.com"]).cert) == []
    ldap = pki.fabrikam.issue(dns=["b.fabrikam.com"], crl_url="ldap://dir.example/cn=crl")
    assert distribution_points(ldap.cert) == []  # only http:// is fetched


class CrlServer:
    """Serves ``files[path]`` over HTTP/1.1 on 127.0.0.1; counts connections and
    requests per path. ``trickle[path]``: seconds between single body bytes;
    ``hold[path]``: answer only once that event is set; ``make[path]``: a fresh
    body for each request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.make: dict[str, Callable[[], bytes]] = {}
        self.requests: dict[str, int] = {}
        self.connections = 0
        self.trickle: dict[str, float] = {}
        self.hold: dict[str, trio.Event] = {}
        self.waiting: dict[str, int] = {}  # requests held right now
        self.body_bytes_sent: dict[str, int] = {}

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            with trio.move_on_after(30):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(4096))
                        continue
                    break
                if not isinstance(event, h11.Request):
                    return
                path = event.target.decode()
                self.requests[path] = self.requests.get(path, 0) + 1
                if path in self.hold:
                    self.waiting[path] = self.waiting.get(path, 0) + 1
                    try:
                        await self.hold[path].wait()
                    finally:
                        self.waiting[path] -= 1
                body = self.make[path]() if path in self.make else self.files.get(path)
                status = 200 if body is not None else 404
                body = body if body is not None else b"not found"
                headers = [("content-length", str(len(body))), ("connection", "close")]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                if path in self.trickle:
                    for i in range(len(body)):  # bounded by the body
                        await stream.send_all(conn.send(h11.Data(data=body[i : i + 1])))
                        self.body_bytes_sent[path] = self.body_bytes_sent.get(path, 0) + 1
                        await trio.sleep(self.trickle[path])
                else:
                    await stream.send_all(conn.send(h11.Data(data=body)))
                    self.body_bytes_sent[path] = self.body_bytes_sent.get(path, 0) + len(body)
                await stream.send_all(conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await stream.aclose()


async def test_fetched_crl_admits_then_revokes_a_live_connection(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = CrlServer()
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, server.handle, listeners)
            url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/fabrikam.crl"
            pool = await start_pool(nursery, pki, ("fe1.corp.test",))
            config = write_federation(
                tmp_path,
                pki,
                [(h, p) for h, p, _ in pool],
                policies={
                    "fabrikam.com": 'domains = ["fabrikam.com"]\nrevocation = "require-crl"\n'
                },
                extra='[revocation]\nfetch = true\ncache_dir = "crls"\nrefresh_interval_s = 1\n'
                "allow_private_networks = true\nmin_rebuild_interval_s = 1\n",
            )
            edge = await start_edge(nursery, config)
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"], crl_url=url)

            # No CRL yet: require-crl fails closed, and the gateway learns the URL.
            server.files["/fabrikam.crl"] = pki.fabrikam.crl().public_bytes(Encoding.DER)
            stream, port = await partner_stream(edge, pki, leaf)
            await stream.aclose()
            rejected = await edge.event_for_port(port, "connection_rejected")
            assert rejected["reason"] == "crl_unavailable"
            fetched = await edge.wait_for(lambda e: e["event"] == "crl_fetched")
            assert fetched["url"] == url and fetched["revoked"] == 0
            applied = await edge.wait_for(lambda e: e["event"] == "crls_applied")
            assert applied["partners"] == {"fabrikam.com": 1}

            # With the fetched CRL the partner is relayed.
            live, live_port = await partner_stream(edge, pki, leaf)
            assert await echo_roundtrip(live, b"with crl") == b"with crl"
            assert list((tmp_path / "crls" / "fabrikam.com").glob("*.crl"))

            # The CA revokes the certificate; the refresh closes the live connection.
            # (A later thisUpdate: a CRL no newer than the one held is refused.)
            revoking = pki.fabrikam.crl(
                [leaf.cert.serial_number],
                last_update=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1),
            )
            server.files["/fabrikam.crl"] = revoking.public_bytes(Encoding.PEM)
            closed = await edge.event_for_port(live_port, "connection_closed", timeout=15)
            assert closed["end"] == "trust_withdrawn"
            assert closed["reason"] == "revoked"
            await live.aclose()

            # A failed refresh keeps the last good CRL.
            del server.files["/fabrikam.crl"]
            failed = await edge.wait_for(lambda e: e["event"] == "crl_fetch_failed", timeout=15)
            assert failed["kept_last_good"] is True
            stream, port = await partner_stream(edge, pki, leaf)
            await stream.aclose()
            assert (await edge.event_for_port(port, "connection_rejected"))["reason"] == "revoked"
            edge.terminate()
            with trio.fail_after(15):
                assert await edge.process.wait() == 0
            nursery.cancel_scope.cancel()


# --- the fetcher itself (issue 15): a real HTTP server on 127.0.0.1, real CRLs --------------

NOW = dt.datetime.now(dt.UTC)


@dataclass(eq=False)
class Partner:
    """A partner CA (root -> issuing) whose leaves name ``/<name>.crl`` on the server."""

    name: str
    root: CA
    issuing: CA
    leaf: Leaf
    url: str

    @property
    def path(self) -> tuple[x509.Certificate, ...]:
        return (self.leaf.cert, self.issuing.cert, self.root.cert)

    def crl(
        self,
        revoked: tuple[int, ...] = (),
        *,
        number: int = 1,
        lifetime: dt.timedelta = dt.timedelta(days=7),
        key: ec.EllipticCurvePrivateKey | None = None,
        delta_of: int | None = None,
    ) -> bytes:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.issuing.cert.subject)
            .last_update(now - dt.timedelta(seconds=1))
            .next_update(now + lifetime)
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        if delta_of is not None:
            builder = builder.add_extension(x509.DeltaCRLIndicator(delta_of), critical=True)
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        signer = key if key is not None else self.issuing.key
        return builder.sign(signer, hashes.SHA256()).public_bytes(Encoding.DER)  # type: ignore[arg-type]


def make_partner(name: str, port: int) -> Partner:
    root = CA.root(f"{name} Root")
    issuing = root.intermediate(f"{name} Issuing")
    url = f"http://127.0.0.1:{port}/{name}.crl"
    return Partner(name, root, issuing, issuing.issue(dns=[f"sip.{name}"], crl_url=url), url)


def snapshot(tmp_path: Path, partners: dict[Partner, str]) -> PolicySnapshot:
    """A policies folder with each partner and its revocation mode, loaded."""
    folder = tmp_path / f"policies-{len(list(tmp_path.glob('policies-*')))}"
    for partner, mode in partners.items():
        (folder / partner.name).mkdir(parents=True)
        (folder / partner.name / "root.pem").write_bytes(partner.root.cert_pem())
        (folder / partner.name / "policy.toml").write_text(f'revocation = "{mode}"\n')
    return load_policies(folder)


class Harness:
    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.events: list[dict[str, Any]] = []
        log = EventLog(stream=io.StringIO(), sink=self.events.append)
        defaults: dict[str, Any] = {
            "fetch": True,
            "cache_dir": tmp_path / "cache",
            "refresh_interval_s": 1.0,
            "timeout_s": 5.0,
            "allow_private_networks": True,
            "min_rebuild_interval_s": 1.0,
        }
        self.fetcher = CrlFetcher(RevocationSettings(**{**defaults, **settings}), log)
        self.applied = 0

    async def on_change(self) -> None:
        self.applied += 1

    async def wait_for(self, what: Callable[[dict[str, Any]], bool], timeout: float = 10) -> Any:
        with trio.fail_after(timeout):
            while True:  # bounded by the deadline
                for event in self.events:
                    if what(event):
                        return event
                await trio.sleep(0.02)

    def fetched(self, url: str) -> Callable[[dict[str, Any]], bool]:
        return lambda e: e["event"] == "crl_fetched" and e["url"] == url

    def held(self, partner: str) -> bytes | None:
        crls = self.fetcher.crls().get(partner, [])
        assert len(crls) <= 1
        return crls[0][0].public_bytes(Encoding.DER) if crls else None


async def start_server(nursery: trio.Nursery) -> tuple[CrlServer, int]:
    server = CrlServer()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, server.handle, listeners)
    return server, listeners[0].socket.getsockname()[1]


async def test_older_foreign_or_delta_crl_never_replaces_the_held_one(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server, port = await start_server(nursery)
            fab = make_partner("fabrikam.com", port)
            h = Harness(tmp_path)
            revoking = fab.crl((fab.leaf.cert.serial_number,), number=2)
            server.files["/fabrikam.com.crl"] = revoking
            h.fetcher.update_partners([snapshot(tmp_path, {fab: "crl-if-present"})])
            h.fetcher.note_chain(fab.name, fab.path)
            nursery.start_soon(h.fetcher.run, h.on_change)
            await h.wait_for(h.fetched(fab.url))
            assert h.held(fab.name) == revoking
            # Each of these made the revoked leaf acceptable again before issue 15.
            attacks = [
                (fab.crl((), number=1), "is not newer than the CRL held"),
                (fab.crl((), number=3, key=ec.generate_private_key(ec.SECP256R1())), "signature"),
                (fab.crl((), number=4, delta_of=2), "is a delta CRL, served where a complete"),
            ]
            for body, why in attacks:
                h.events.clear()
                server.files["/fabrikam.com.crl"] = body
                refused = await h.wait_for(lambda e: e["event"] == "crl_fetch_refused")
                assert refused["url"] == fab.url and refused["kept_last_good"] is True
                assert refused["why"].startswith(why) or why in refused["why"]
                assert h.held(fab.name) == revoking
            crls = h.fetcher.crls()[fab.name]
            problem = CrlSet([c for c, _ in crls], ["fetched"]).check(
                fab.path, "crl-if-present", dt.datetime.now(dt.UTC)
            )
            assert problem is not None and problem[0] == "revoked"
            nursery.cancel_scope.cancel()


async def test_a_slow_trickle_is_cut_at_the_total_deadline(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server, port = await start_server(nursery)
            fab = make_partner("fabrikam.com", port)
            body = fab.crl()
            server.files["/fabrikam.com.crl"] = body
            server.trickle["/fabrikam.com.crl"] = 0.1  # each byte well inside timeout_s
            h = Harness(tmp_path, timeout_s=1.0, refresh_interval_s=3600.0)
            h.fetcher.note_chain(fab.name, fab.path)
            nursery.start_soon(h.fetcher.run, h.on_change)
            failed = await h.wait_for(lambda e: e["event"] == "crl_fetch_failed", timeout=30)
            assert failed["error"] == "no complete response within timeout_s=1"
            # The edge hung up long before the body was complete.
            assert server.body_bytes_sent["/fabrikam.com.crl"] < len(body)
            assert h.fetcher.crls() == {}
            nursery.cancel_scope.cancel()


def test_private_loopback_and_link_local_destinations_are_refused() -> None:
    suffix = " is a private, loopback, link-local or reserved address"
    for address in (
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fd00::1",
        "::ffff:10.0.0.1",
    ):
        shown = address.removeprefix("::ffff:")
        assert destination_problem(address, False) == (
            f"{shown}{suffix} ([revocation] allow_private_networks = false)"
        ), address
        assert destination_problem(address, True) is None
    assert destination_problem("192.0.2.10", False) is not None  # documentation range
    assert (
        destination_problem("224.0.0.1", True) == "224.0.0.1 is a multicast or unspecified address"
    )
    assert destination_problem("8.8.8.8", False) is None  # a decision only: nothing is sent


async def test_resolved_addresses_are_checked_before_connecting(tmp_path: Path) -> None:
    with trio.fail_after(30):
        # A name is judged by what it resolves to (no traffic is sent).
        with pytest.raises(FetchRefused, match="loopback"):
            await resolve_destination("http://localhost:9/x.crl", False)
        assert (await resolve_destination("http://127.0.0.1:9/x.crl", True))[:2] == (
            "127.0.0.1",
            9,
        )
        async with trio.open_nursery() as nursery:
            server, port = await start_server(nursery)
            fab = make_partner("fabrikam.com", port)
            server.files["/fabrikam.com.crl"] = fab.crl()
            h = Harness(tmp_path, allow_private_networks=False)
            h.fetcher.note_chain(fab.name, fab.path)
            nursery.start_soon(h.fetcher.run, h.on_change)
            refused = await h.wait_for(lambda e: e["event"] == "crl_fetch_refused")
            assert refused["why"] == (
                "refused destination: 127.0.0.1 is a private, loopback, link-local or "
                "reserved address ([revocation] allow_private_networks = false)"
            )
            assert server.connections == 0 and server.requests == {}
            nursery.cancel_scope.cancel()


async def test_fetching_stops_for_removed_and_off_partners_and_fetch_false(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server, port = await start_server(nursery)
            fab, con, off = (make_partner(n, port) for n in ("fab.test", "con.test", "off.test"))
            for p in (fab, con, off):
                server.make[f"/{p.name}.crl"] = p.crl
            h = Harness(tmp_path)
            both = snapshot(tmp_path, {fab: "crl-if-present", con: "require-crl", off: "off"})
            h.fetcher.update_partners([both])
            # An unverified chain (unknown CA) teaches nothing, nor does a partner set to off.
            stranger = make_partner("stranger.test", port)
            h.fetcher.note_verdict(PartnerTrust(both).verify_client(stranger.leaf.chain))
            for verdict in (
                PartnerTrust(both).verify_client(p.leaf.chain) for p in (fab, con, off)
            ):
                assert verdict.accepted or verdict.reason == "crl_unavailable"
                h.fetcher.note_verdict(verdict)
            nursery.start_soon(h.fetcher.run, h.on_change)
            await h.wait_for(h.fetched(fab.url))
            await h.wait_for(h.fetched(con.url))

            # fab.test is removed from the folder: its fetching stops, its CRL is withdrawn.
            h.fetcher.update_partners([snapshot(tmp_path, {con: "require-crl"})])
            fab_requests = server.requests["/fab.test.crl"]
            con_requests = server.requests["/con.test.crl"]
            with trio.fail_after(20):
                while server.requests["/con.test.crl"] < con_requests + 2:  # bounded by deadline
                    await trio.sleep(0.05)
            assert server.requests["/fab.test.crl"] == fab_requests
            assert set(h.fetcher.crls()) == {"con.test"}
            assert "/off.test.crl" not in server.requests
            assert "/stranger.test.crl" not in server.requests

            # fetch = false reloaded: nothing more is fetched and fetched CRLs are withdrawn.
            applied = h.applied
            h.fetcher.configure(RevocationSettings(fetch=False, cache_dir=tmp_path / "cache"))
            con_requests = server.requests["/con.test.crl"]
            await trio.sleep(3)  # three refresh intervals
            assert server.requests["/con.test.crl"] <= con_requests + 1  # one in flight at most
            assert h.fetcher.crls() == {}
            assert h.applied == applied + 1  # the withdrawal is applied
            nursery.cancel_scope.cancel()


async def test_a_slow_partner_does_not_delay_another(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server, port = await start_server(nursery)
            slow, fast = make_partner("slow.test", port), make_partner("fast.test", port)
            server.files["/slow.test.crl"] = slow.crl()
            server.files["/fast.test.crl"] = fast.crl()
            release = server.hold["/slow.test.crl"] = trio.Event()
            h = Harness(tmp_path, timeout_s=30.0)
            h.fetcher.note_chain(slow.name, slow.path)  # first in line
            h.fetcher.note_chain(fast.name, fast.path)
            nursery.start_soon(h.fetcher.run, h.on_change)
            await h.wait_for(h.fetched(fast.url), timeout=15)
            # The slow partner's fetch is still waiting on its server meanwhile.
            assert server.waiting["/slow.test.crl"] == 1
            release.set()
            await h.wait_for(h.fetched(slow.url))
            nursery.cancel_scope.cancel()


async def test_short_lived_crls_cannot_make_the_edge_churn(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server, port = await start_server(nursery)
            fab, con = make_partner("fab.test", port), make_partner("con.test", port)
            numbers = iter(range(1, 1000))
            # A fresh CRL with a 2 s lifetime on every request.
            server.make["/fab.test.crl"] = lambda: fab.crl(
                number=next(numbers), lifetime=dt.timedelta(seconds=2)
            )
            server.files["/con.test.crl"] = con.crl()
            h = Harness(tmp_path, min_rebuild_interval_s=3600.0)
            h.fetcher.note_chain(fab.name, fab.path)
            nursery.start_soon(h.fetcher.run, h.on_change)
            await h.wait_for(h.fetched(fab.url))
            with trio.fail_after(10):
                while h.applied == 0:  # bounded by the deadline
                    await trio.sleep(0.02)
            # Another partner's new CRL arrives inside the interval: it waits.
            h.fetcher.note_chain(con.name, con.path)
            await h.wait_for(h.fetched(con.url))
            await trio.sleep(3)  # the first CRL's lifetime, and more
            assert server.requests["/fab.test.crl"] == 1
            assert h.applied == 1
            assert h.fetcher.rebuilds == 1
            nursery.cancel_scope.cancel()


def test_revocation_keys_are_parsed_and_checked(tmp_path: Path) -> None:
    from tests.test_config import GOOD  # a complete edge.toml; the keys under test come last

    pki_dir = tmp_path / "certs"
    pki_dir.mkdir()
    enterprise = CA.root("Enterprise Root")
    for stem, leaf in (
        ("edge-public", enterprise.issue(dns=["edge.contoso.com"])),
        ("edge-internal", enterprise.issue(dns=["edge.corp.example"])),
    ):
        leaf.write(pki_dir, stem)
    (pki_dir / "enterprise-root.pem").write_bytes(enterprise.cert_pem())
    (tmp_path / "federation_policies").mkdir()
    config = tmp_path / "edge.toml"
    config.write_text(GOOD)
    assert load_config(config).revocation.allow_private_networks is False
    assert load_config(config).revocation.min_rebuild_interval_s == 30.0
    keys = "[revocation]\nallow_private_networks = true\nmin_rebuild_interval_s = 5\n"
    config.write_text(GOOD + keys)
    settings = load_config(config).revocation
    assert settings.allow_private_networks is True and settings.min_rebuild_interval_s == 5.0
    config.write_text(
        GOOD + '[revocation]\nallow_private_networks = "yes"\nmin_rebuild_interval_s = 0\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert any(
        "revocation.allow_private_networks: must be true or false" in p
        for p in caught.value.problems
    )
    assert any(
        "revocation.min_rebuild_interval_s: must be a number > 0" in p
        for p in caught.value.problems
    )
