"""Accepted verdicts of one verifier, remembered for a few seconds (issue 19).

Owns: `VerdictCache`, which lets `PartnerTrust.verify_client` and
`ServerTrust.verify_server` answer a chain they accepted moments ago without
running pyca's path building, the floor, the names, the purpose and the CRLs
again. Peers present the same chain on every connection, so this removes most
of the per-handshake Python work of the decision.

Why it stays correct (a cached answer must be the answer a fresh verification
would give at that moment):
- One cache per verifier object. A verifier is built from one immutable policy
  set (roots, domains, enabled, CRLs, fetched CRLs included); any change to
  them builds a new verifier (`edge.core.snapshot.build_snapshot` reuses one
  only when the effective policies are equal), whose cache starts empty. The
  verifier *is* the snapshot generation of the key.
- The key is the chain as presented (certificates compare by their DER) plus
  whatever else the verifier was asked (the server name). Another partner's
  chain is another key; the verdict names the partner it was computed for.
- Given the policies, a verdict changes only with the moment of verification,
  and only at known instants: a certificate's notBefore/notAfter on the
  verified path (the verdict's `not_after`; every notBefore on it has passed
  when it was accepted), an anchor's or CRL signer's validity, a CRL's
  thisUpdate/nextUpdate. An entry is served only from the moment it was
  computed (never for an earlier moment) until the first such instant after
  it (`boundaries`), and never longer than `ttl_s` seconds (a belt for any
  time rule added later without its instant listed here).
- Only acceptances are kept: a refusal is rare, cheap to repeat, and its
  detail may depend on more than the key.
- Bounded: at most `size` entries; the oldest goes first.

Must never: serve an entry outside its window, outlive its verifier, do I/O,
import trio, sockets or any shell module, or grow without bound.
"""

from __future__ import annotations

import bisect
import datetime as _dt
from collections.abc import Hashable, Iterable

from edge.core.trust_verdict import Verdict

__all__ = ["DEFAULT_TTL_S", "VerdictCache"]

# How long an accepted verdict may be served at most (seconds of the
# verification clock); the instants above usually end it sooner or never matter.
DEFAULT_TTL_S = 5.0
# Most chains remembered per verifier (a federation has tens to hundreds of
# partner certificates; each entry holds references to certificates the
# verifier's caches and live connections hold anyway).
DEFAULT_SIZE = 4096


class VerdictCache:
    """Accepted verdicts by key, each valid from its moment to its end."""

    def __init__(
        self,
        boundaries: Iterable[_dt.datetime] = (),
        *,
        ttl_s: float = DEFAULT_TTL_S,
        size: int = DEFAULT_SIZE,
    ) -> None:
        self._boundaries = sorted(set(boundaries))
        self._ttl = _dt.timedelta(seconds=ttl_s)
        self._size = size
        self._items: dict[Hashable, tuple[Verdict, _dt.datetime, _dt.datetime]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, when: _dt.datetime) -> Verdict | None:
        """The verdict accepted for `key`, if `when` lies in its window."""
        hit = self._items.get(key)
        if hit is None:
            return None
        verdict, start, end = hit
        if start <= when < end:
            return verdict
        if when >= end:
            self._items.pop(key, None)
        return None

    def put(self, key: Hashable, verdict: Verdict, when: _dt.datetime) -> None:
        """Remember `verdict`, computed for the moment `when` (acceptances only)."""
        if not verdict.accepted or not verdict.chain:
            return
        end = when + self._ttl
        not_after = verdict.not_after
        if not_after is not None and not_after < end:
            end = not_after
        # The first instant after `when` at which a time rule may flip.
        index = bisect.bisect_right(self._boundaries, when)
        if index < len(self._boundaries) and self._boundaries[index] < end:
            end = self._boundaries[index]
        # The path's own notBefore instants have passed (it verified at `when`).
        if end <= when:
            return
        if key not in self._items and len(self._items) >= self._size:
            del self._items[next(iter(self._items))]
        self._items[key] = (verdict, when, end)

    def clear(self) -> None:
        self._items.clear()
