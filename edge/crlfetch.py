"""Fetching partners' CRLs from their certificates' distribution points.

Owns: which CRL distribution points the edge fetches, when, from where, and
which fetched bodies may replace the CRL it holds (with ``[revocation] fetch
= true``). Must never: fetch a URL only because a certificate names it, let a
fetched body undo a revocation, let one partner's fetch delay another's, let
a fetch failure reach a connection, or put peer bytes unchecked in a log line.

Theory of operation
-------------------
*What is fetched.* Only the http:// distribution points of certificates in a
path that *verified* against a partner (the gateway hands over the verdict:
`note_verdict`), below the trust anchor, for partners whose revocation is not
``off`` (`update_partners`, called with every policy snapshot). A partner
removed, or switched to ``off``, is forgotten at once, and its running fetch
cancelled; `configure` with ``fetch = false`` forgets everything. A certificate
nobody trusts cannot make the edge fetch anything.

*Where from.* The host is resolved first and every resolved address checked:
private, loopback, link-local, shared, reserved, multicast (anything not
globally routable, IPv4-mapped IPv6 included) is refused unless
``allow_private_networks = true``; the edge then connects to the address it
checked (no second resolution to be rebound), http:// only, no redirects, no
proxies from the environment, at most ``_MAX_CRL_BYTES``.

*How long.* Each fetch, resolution to last byte, runs under one total
deadline of ``timeout_s`` (a server trickling a byte a second is cut off).
Each partner's fetches run in their own task of a nursery (at most
``_PARALLEL_PARTNERS`` partners at once), so a slow partner never delays
another's CRL.

*What is accepted* (why plain HTTP is safe). A body replaces the CRL held for
that distribution point only if `edge.core.revocation.fetched_crl_problem`
finds nothing against it: a complete (not delta) CRL of the certificate's
issuer, whose signature that issuer's key verifies, with cRLSign, current, no
unknown critical extension, in scope for the certificate that named the URL,
and strictly newer (CRLNumber, then thisUpdate) than the one held. So another
key's CRL, an older genuine CRL replayed by anyone on the path, or a delta
served as a full CRL are refused (``crl_fetch_refused``) and the last good CRL
stays. A network attacker can only withhold a CRL; then the held one goes
stale and the chains it covers fail closed (``crl_unavailable``).

*How often.* A CRL is refetched at 3/4 of its lifetime or every
``refresh_interval_s``, never sooner than ``min_rebuild_interval_s``; new
CRLs are handed to the gateway (``on_change``: rebuild verifiers, re-check
live connections) at most once per ``min_rebuild_interval_s``, changes in
between are applied together. A failed fetch is retried after 5 s, doubling
up to ``refresh_interval_s``.

Fetched CRLs are kept on disk (``cache_dir/<partner>/``) so a restart does not
forget them; they count again for partners the gateway still lists.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from edge.core.config import RevocationSettings
from edge.core.pem import load_crls
from edge.core.policies import PolicySnapshot
from edge.core.reasons import Reason
from edge.core.revocation import fetched_crl_problem
from edge.core.trust import Verdict
from edge.logs import EventLog

__all__ = ["CrlFetcher", "FetchRefused", "destination_problem", "distribution_points"]

_MAX_URLS_PER_PARTNER = 16
_MAX_URL_LENGTH = 1024
_MAX_CRL_BYTES = 10 * 1024 * 1024
_PARALLEL_PARTNERS = 8
# Refresh this share of the way from this update to next update, at the latest.
_REFRESH_AT = 0.75
# After a failed fetch, try again after this long (doubling up to the interval).
_RETRY_AFTER_S = 5.0
_SHA256 = hashes.SHA256()


def distribution_points(cert: x509.Certificate) -> list[str]:
    """The http:// CRL distribution point URLs of one certificate (bounded, printable)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    urls = []
    for point in ext:
        for name in point.full_name or ():
            if not isinstance(name, x509.UniformResourceIdentifier):
                continue
            url = name.value
            if (
                url.startswith("http://")
                and len(url) <= _MAX_URL_LENGTH
                and url.isascii()
                and url.isprintable()
                and " " not in url
            ):
                urls.append(url)
    return urls


class FetchRefused(Exception):
    """A fetch we will not make, or a body we will not use (the message says why)."""


def destination_problem(address: str, allow_private: bool) -> str | None:
    """Why the edge must not connect to ``address`` (an IP literal) for a CRL."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_multicast or ip.is_unspecified:
        return f"{ip} is a multicast or unspecified address"
    if not allow_private and not ip.is_global:
        return (
            f"{ip} is a private, loopback, link-local or reserved address "
            "([revocation] allow_private_networks = false)"
        )
    return None


async def resolve_destination(url: str, allow_private: bool) -> tuple[str, int, str]:
    """The checked (address, port, Host header) to fetch ``url`` from, or FetchRefused.
    Every address the name resolves to must pass: a name that mixes a public and an
    internal address is refused rather than raced."""
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError as exc:
        raise FetchRefused(f"malformed URL ({exc})") from None
    host = parts.hostname
    if parts.scheme != "http" or not host or parts.username or parts.password:
        raise FetchRefused("only http://host[:port]/path URLs are fetched")
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
        except OSError as exc:
            raise FetchRefused(f"cannot resolve {host}: {exc.strerror or exc}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise FetchRefused(f"{host} resolves to no address")
    for address in addresses:
        problem = destination_problem(address, allow_private)
        if problem is not None:
            raise FetchRefused(f"refused destination: {problem}")
    host_header = host if parts.port is None else f"{host}:{port}"
    if ":" in host and parts.port is None:
        host_header = f"[{host}]"
    elif ":" in host:
        host_header = f"[{host}]:{port}"
    return addresses[0], port, host_header


def _parse_crl(data: bytes) -> x509.CertificateRevocationList:
    """The (first) CRL of a fetched body or cache file, PEM or DER; ValueError if none."""
    return load_crls(data)[0]


@dataclass
class _Source:
    partner: str
    url: str
    path: Path
    cert: x509.Certificate | None  # the certificate that named the URL (None: from cache)
    issuer: x509.Certificate | None  # its issuer in the verified path
    crl: x509.CertificateRevocationList | None = None
    due: float = 0.0  # wall-clock time of the next fetch
    failures: int = 0


class CrlFetcher:
    """Learns distribution points, fetches and caches CRLs, reports changes."""

    def __init__(self, settings: RevocationSettings, log: EventLog) -> None:
        self.settings = settings
        self.cache_dir = settings.cache_dir if settings.cache_dir is not None else Path("crl-cache")
        self.log = log
        self._sources: dict[tuple[str, str], _Source] = {}
        # Partner id -> revocation mode, from the gateway's snapshots. None until the
        # gateway first calls `update_partners`: until then every partner the
        # gateway names in `note_chain` counts (the behaviour before issue 15).
        self._partners: dict[str, str] | None = None
        self._busy: dict[str, trio.CancelScope] = {}
        self._wake = trio.Event()
        self._dirty = trio.Event()
        self.rebuilds = 0  # on_change calls so far (tests, diagnostics)
        self._load_cache()

    # -- what the gateway calls --------------------------------------------

    def configure(self, settings: RevocationSettings) -> None:
        """A reloaded ``[revocation]`` table. ``fetch = false`` stops every fetch and
        withdraws the fetched CRLs (the next ``on_change`` applies that)."""
        was_fetching = self.settings.fetch
        self.settings = settings
        if settings.cache_dir is not None:
            self.cache_dir = settings.cache_dir
        if not settings.fetch and was_fetching:
            had_crls = any(s.crl is not None for s in self._sources.values())
            for scope in self._busy.values():
                scope.cancel()
            self._sources.clear()
            if had_crls:
                self._dirty.set()
        self._wake.set()

    def update_partners(self, snapshots: Iterable[PolicySnapshot]) -> None:
        """The partners now loaded (every policies folder). Sources of partners that
        are gone, or whose revocation is ``off``, are dropped and their fetch stopped."""
        partners: dict[str, str] = {}
        for snapshot in snapshots:
            for pid, policy in snapshot.partners.items():
                if partners.get(pid, "off") == "off":
                    partners[pid] = str(policy.revocation)
        self._partners = partners
        dropped = [key for key in self._sources if not self._wanted(key[0])]
        had_crls = False
        for key in dropped:
            had_crls |= self._sources.pop(key).crl is not None
        for pid, scope in list(self._busy.items()):
            if not self._wanted(pid):
                scope.cancel()
        if had_crls:
            self._dirty.set()
        self._wake.set()

    def note_verdict(self, verdict: Verdict) -> None:
        """Learn distribution points from a verification verdict: only a path that
        verified against a partner (accepted, or refused for revocation)."""
        if verdict.partner is None or not verdict.chain:
            return
        if verdict.accepted or verdict.reason in (Reason.CRL_UNAVAILABLE, Reason.REVOKED):
            self.note_chain(verdict.partner, verdict.chain)

    def note_chain(self, partner: str, path: Sequence[x509.Certificate]) -> None:
        """Learn the distribution points of ``path``, a path that verified against
        ``partner`` (leaf first, anchor last; the anchor's own CRL is not fetched)."""
        if not self.settings.fetch or not self._wanted(partner):
            return
        known = sum(1 for p, _ in self._sources if p == partner)
        for index in range(len(path) - 1):
            cert, issuer = path[index], path[index + 1]
            for url in distribution_points(cert):
                key = (partner, url)
                if key in self._sources:
                    continue
                if known >= _MAX_URLS_PER_PARTNER:
                    return
                known += 1
                file = self._path(partner, url)
                source = _Source(partner, url, file, cert, issuer)
                cached = self._sources.pop((partner, f"cache:{file.name}"), None)
                if cached is not None:  # fetched before a restart: keep it meanwhile
                    source.crl = cached.crl
                self._sources[key] = source
                self._wake.set()

    def crls(self) -> dict[str, list[tuple[x509.CertificateRevocationList, Path]]]:
        """The CRLs fetched so far, per partner still wanted, with the cache file of each."""
        out: dict[str, list[tuple[x509.CertificateRevocationList, Path]]] = {}
        if not self.settings.fetch:
            return out
        for source in self._sources.values():
            if source.crl is not None and self._wanted(source.partner):
                out.setdefault(source.partner, []).append((source.crl, source.path))
        return out

    async def run(self, on_change: Callable[[], Awaitable[None]]) -> None:
        """Fetch whatever is due, forever; call ``on_change`` after new CRLs (at most
        once per ``min_rebuild_interval_s``)."""
        async with (
            httpx.AsyncClient(
                timeout=self.settings.timeout_s, follow_redirects=False, trust_env=False
            ) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._apply_changes, on_change)
            limiter = trio.CapacityLimiter(_PARALLEL_PARTNERS)
            while True:
                self._wake = trio.Event()
                due = math.inf
                if self.settings.fetch:
                    now = time.time()
                    for source in list(self._sources.values()):
                        if source.cert is None or source.partner in self._busy:
                            continue
                        if source.due <= now:
                            scope = trio.CancelScope()
                            self._busy[source.partner] = scope
                            nursery.start_soon(
                                self._partner_round, client, source.partner, scope, limiter
                            )
                        else:
                            due = min(due, source.due)
                with trio.move_on_after(max(0.05, min(due - time.time(), 3600))):
                    await self._wake.wait()

    # -- the work ------------------------------------------------------------

    def _wanted(self, partner: str) -> bool:
        return self._partners is None or self._partners.get(partner, "off") != "off"

    async def _apply_changes(self, on_change: Callable[[], Awaitable[None]]) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            self.rebuilds += 1
            await on_change()
            # Whatever changes meanwhile waits: one rebuild per interval at most.
            await trio.sleep(self.settings.min_rebuild_interval_s)

    async def _partner_round(
        self,
        client: httpx.AsyncClient,
        partner: str,
        scope: trio.CancelScope,
        limiter: trio.CapacityLimiter,
    ) -> None:
        """Fetch this partner's due sources one after the other (its own task)."""
        try:
            with scope:
                async with limiter:
                    for key, source in list(self._sources.items()):
                        if (
                            key[0] == partner
                            and source.cert is not None
                            and source.due <= time.time()
                            and self._sources.get(key) is source
                        ):
                            await self._fetch(client, source)
        finally:
            if self._busy.get(partner) is scope:
                del self._busy[partner]
            self._wake.set()

    def _path(self, partner: str, url: str) -> Path:
        name = hashlib.sha256(url.encode()).hexdigest()[:24]
        return self.cache_dir / partner / f"{name}.crl"

    def _schedule(self, source: _Source) -> None:
        now = time.time()
        due = now + self.settings.refresh_interval_s
        crl = source.crl
        if crl is not None and crl.next_update_utc is not None:
            this = crl.last_update_utc.timestamp()
            nxt = crl.next_update_utc.timestamp()
            due = min(due, this + (nxt - this) * _REFRESH_AT)
        # Refetching sooner than we may apply is pointless and makes us a poller.
        source.due = max(due, now + max(1.0, self.settings.min_rebuild_interval_s))

    def _retry(self, source: _Source) -> float:
        source.failures += 1
        backoff: float = _RETRY_AFTER_S * 2.0 ** min(source.failures - 1, 20)
        retry = max(min(backoff, self.settings.refresh_interval_s), 1.0)
        source.due = time.time() + retry
        return retry

    async def _fetch(self, client: httpx.AsyncClient, source: _Source) -> None:
        assert source.cert is not None and source.issuer is not None
        timeout = self.settings.timeout_s
        data = b""
        error: str | None = None
        refused: str | None = None
        crl: x509.CertificateRevocationList | None = None
        with trio.move_on_after(timeout) as deadline:
            try:
                data = await self._download(client, source.url)
                crl = _parse_crl(data)
            except FetchRefused as exc:
                refused = str(exc)
            except (httpx.HTTPError, ValueError, OSError) as exc:
                error = f"{type(exc).__name__}: {str(exc)[:200]}"
        if deadline.cancelled_caught:
            error = f"no complete response within timeout_s={timeout:g}"
        if self._sources.get((source.partner, source.url)) is not source:
            return  # forgotten meanwhile (partner removed, fetch turned off)
        if crl is not None and error is None:
            refused = fetched_crl_problem(
                crl, source.cert, source.issuer, source.crl, _dt.datetime.now(_dt.UTC)
            )
        if error is not None or refused is not None or crl is None:
            retry = self._retry(source)
            kept = source.crl is not None
            if refused is not None:
                self.log.event(
                    "crl_fetch_refused",
                    partner=source.partner,
                    url=source.url,
                    why=refused,
                    retry_in_s=round(retry, 1),
                    kept_last_good=kept,
                )
            else:
                self.log.event(
                    "crl_fetch_failed",
                    partner=source.partner,
                    url=source.url,
                    error=error,
                    retry_in_s=round(retry, 1),
                    kept_last_good=kept,
                )
            return
        source.failures = 0
        changed = source.crl is None or source.crl.fingerprint(_SHA256) != crl.fingerprint(_SHA256)
        source.crl = crl
        self._schedule(source)
        if not changed:
            return
        with trio.CancelScope(shield=True):  # never leave half a file behind a cancel
            await trio.to_thread.run_sync(self._store, source.path, data)
        self.log.event(
            "crl_fetched",
            partner=source.partner,
            url=source.url,
            issuer=crl.issuer.rfc4514_string()[:200],
            next_update=crl.next_update_utc.isoformat() if crl.next_update_utc else None,
            revoked=len(crl),
        )
        self._dirty.set()

    async def _download(self, client: httpx.AsyncClient, url: str) -> bytes:
        address, port, host_header = await resolve_destination(
            url, self.settings.allow_private_networks
        )
        target = httpx.URL(url).copy_with(host=address, port=port)
        # identity: the size cap counts the bytes we keep (no decompression bomb).
        headers = {"Host": host_header, "Accept-Encoding": "identity"}
        # The timeout of the settings now ([revocation] is reloaded live).
        timeout = self.settings.timeout_s
        async with client.stream("GET", target, headers=headers, timeout=timeout) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > _MAX_CRL_BYTES:
                raise ValueError(f"larger than {_MAX_CRL_BYTES} bytes")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > _MAX_CRL_BYTES:
                    raise ValueError(f"larger than {_MAX_CRL_BYTES} bytes")
                chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _store(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: a reader never sees half a CRL

    def _load_cache(self) -> None:
        """CRLs fetched before a restart (their URLs are re-learned from traffic)."""
        if not self.cache_dir.is_dir():
            return
        for path in sorted(self.cache_dir.glob("*/*.crl")):
            try:
                crl = _parse_crl(path.read_bytes())
            except (ValueError, OSError):
                continue
            partner = path.parent.name
            # Keyed by file until traffic tells us its URL again; never fetched itself.
            source = _Source(partner, f"cache:{path.name}", path, None, None, crl=crl, due=math.inf)
            self._sources[(partner, source.url)] = source
