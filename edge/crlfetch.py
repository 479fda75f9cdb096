"""Fetching partners' CRLs from their certificates' distribution points.

With ``[revocation] fetch = true`` the gateway learns, from every chain a
partner presents, the HTTP CRL distribution points of the certificates below
the trust anchor (a leaf's CRL is published by its issuing CA), fetches those
CRLs in the background, keeps them on disk (``cache_dir/<partner>/``, so a
restart does not forget them) and refreshes each one before its next update.
The gateway then merges them into the partner's policy exactly as if the
operator had dropped them into the partner's folder, re-authorizes live
connections, and a revoked certificate is cut off.

Why this is safe with plain HTTP: a CRL is signed. The verification core only
uses a CRL whose issuer is the certificate's issuer and whose signature that
issuer's key verifies; anything else fetched here is inert. A fetch that fails
keeps the last good CRL; under ``revocation = "require-crl"`` a partner whose
CRL cannot be had fails closed (``crl_unavailable``), and the distribution
point of a chain refused that way is still learned, so the next attempt can
succeed once the CRL arrived.

Bounds: at most ``_MAX_URLS_PER_PARTNER`` distribution points per partner (a
hostile chain cannot make us fetch the world), ``_MAX_CRL_BYTES`` per CRL, one
fetch at a time, ``timeout_s`` per fetch, no redirects, http:// only.

Must never let a fetch failure reach a connection: fetching runs in its own
task and only ever changes which CRLs the next snapshot holds.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from edge.core.config import RevocationSettings
from edge.logs import EventLog

__all__ = ["CrlFetcher", "distribution_points"]

_MAX_URLS_PER_PARTNER = 16
_MAX_CRL_BYTES = 10 * 1024 * 1024
# Refresh this share of the way from this update to next update, at the latest.
_REFRESH_AT = 0.75
# After a failed fetch, try again after this long (doubling up to the interval).
_RETRY_AFTER_S = 5.0
_SHA256 = hashes.SHA256()


def distribution_points(cert: x509.Certificate) -> list[str]:
    """The http:// CRL distribution point URLs of one certificate."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    urls = []
    for point in ext:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.startswith(
                "http://"
            ):
                urls.append(name.value)
    return urls


def _parse_crl(data: bytes) -> x509.CertificateRevocationList:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


@dataclass
class _Source:
    partner: str
    url: str
    path: Path
    crl: x509.CertificateRevocationList | None = None
    due: float = 0.0  # wall-clock time of the next fetch
    failures: int = 0


class CrlFetcher:
    """Learns distribution points, fetches and caches CRLs, reports changes."""

    def __init__(self, settings: RevocationSettings, log: EventLog) -> None:
        assert settings.cache_dir is not None
        self.settings = settings
        self.cache_dir = settings.cache_dir
        self.log = log
        self._sources: dict[tuple[str, str], _Source] = {}
        self._wake = trio.Event()
        self._load_cache()

    # -- what the gateway calls --------------------------------------------

    def note_chain(self, partner: str, chain: Sequence[x509.Certificate]) -> None:
        """Learn the distribution points of a chain presented by ``partner``.

        ``chain`` is leaf first; its last certificate (the trust anchor, when
        the chain is a verified path) has no CRL of interest.
        """
        known = sum(1 for p, _ in self._sources if p == partner)
        for cert in chain[:-1] if len(chain) > 1 else chain:
            for url in distribution_points(cert):
                key = (partner, url)
                if key in self._sources:
                    continue
                if known >= _MAX_URLS_PER_PARTNER:
                    return
                known += 1
                path = self._path(partner, url)
                source = _Source(partner, url, path)
                cached = self._sources.pop((partner, f"cache:{path.name}"), None)
                if cached is not None:  # fetched before a restart: keep it meanwhile
                    source.crl = cached.crl
                self._sources[key] = source
                self._wake.set()

    def crls(self) -> dict[str, list[tuple[x509.CertificateRevocationList, Path]]]:
        """The CRLs fetched so far, per partner, with the cache file of each."""
        out: dict[str, list[tuple[x509.CertificateRevocationList, Path]]] = {}
        for source in self._sources.values():
            if source.crl is not None:
                out.setdefault(source.partner, []).append((source.crl, source.path))
        return out

    async def run(self, on_change: Callable[[], Awaitable[None]]) -> None:
        """Fetch whatever is due, forever; call ``on_change`` after new CRLs."""
        async with httpx.AsyncClient(
            timeout=self.settings.timeout_s, follow_redirects=False, trust_env=False
        ) as client:
            while True:
                changed = False
                for source in list(self._sources.values()):
                    if source.due <= time.time():
                        changed |= await self._fetch(client, source)
                if changed:
                    await on_change()
                self._wake = trio.Event()
                due = min((s.due for s in self._sources.values()), default=math.inf)
                with trio.move_on_after(max(0.05, min(due - time.time(), 3600))):
                    await self._wake.wait()

    # -- the work ------------------------------------------------------------

    def _path(self, partner: str, url: str) -> Path:
        name = hashlib.sha256(url.encode()).hexdigest()[:24]
        return self.cache_dir / partner / f"{name}.crl"

    def _schedule(self, source: _Source) -> None:
        interval = self.settings.refresh_interval_s
        due = time.time() + interval
        crl = source.crl
        if crl is not None and crl.next_update_utc is not None:
            this = crl.last_update_utc.timestamp()
            nxt = crl.next_update_utc.timestamp()
            due = min(due, this + (nxt - this) * _REFRESH_AT)
        source.due = max(due, time.time() + 1.0)

    async def _fetch(self, client: httpx.AsyncClient, source: _Source) -> bool:
        try:
            data = await self._download(client, source.url)
            crl = _parse_crl(data)
        except (httpx.HTTPError, ValueError, OSError) as exc:
            source.failures += 1
            retry = min(
                _RETRY_AFTER_S * 2 ** (source.failures - 1), self.settings.refresh_interval_s
            )
            source.due = time.time() + retry
            self.log.event(
                "crl_fetch_failed",
                partner=source.partner,
                url=source.url,
                error=f"{type(exc).__name__}: {exc}",
                retry_in_s=round(retry, 1),
                kept_last_good=source.crl is not None,
            )
            return False
        source.failures = 0
        changed = source.crl is None or source.crl.fingerprint(_SHA256) != crl.fingerprint(_SHA256)
        source.crl = crl
        self._schedule(source)
        if changed:
            await trio.to_thread.run_sync(self._store, source.path, data)
            self.log.event(
                "crl_fetched",
                partner=source.partner,
                url=source.url,
                issuer=crl.issuer.rfc4514_string(),
                next_update=crl.next_update_utc.isoformat() if crl.next_update_utc else None,
                revoked=len(crl),
            )
        return changed

    async def _download(self, client: httpx.AsyncClient, url: str) -> bytes:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
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
            # Keyed by file until traffic tells us its URL again.
            source = _Source(partner, f"cache:{path.name}", path, crl=crl, due=math.inf)
            self._sources[(partner, source.url)] = source
