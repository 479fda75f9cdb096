"""Certificate verification and partner authorization: who is this peer, and may it in?

Owns: the single decision "is this certificate chain accepted, for which
partner, and if not, why" (docs/partners.md, "The verifier's rules"),
for partners connecting in (`PartnerTrust.verify_client`) and for servers the
edge connects to (`ServerTrust.verify_server`, defined in
`edge.core.server_trust` and re-exported here). A reader looking for why a
partner was rejected starts here: the client-purpose decision is this module's,
and "Where each step lives" below names the module holding each rule.

Must never: do I/O, import trio or sockets, read files (policies arrive as an
immutable `PolicySnapshot`), put key material in a detail string, or trust SNI.
It must never verify a chain against the union of all partners' roots: partner
A's CA must not be able to vouch for partner B.

Theory of operation (client purpose)
------------------------------------
1. *Candidates.* Every trust anchor of every partner is indexed by subject
   name. The partners whose anchors are named as the subject or issuer of any
   certificate the peer sent are the only candidates; with 50 partners a
   verification touches one or two stores, not 50.
2. *Chain.* For each candidate, pyca/cryptography's webpki verifier
   (`cryptography.x509.verification`, a `ClientVerifier` on a `Store` of that
   partner's anchors alone) builds and checks the path: signatures, validity
   at the given time (the anchor's too), basicConstraints, path length, name
   constraints on DNS SANs, and the CA/Browser-Forum profile (AKI/SKI, key
   usage, no v1 CAs, no name constraints on a leaf, well-formed names...).
   Every certificate in a partner folder is an anchor, root or not (pinning).
   Two deliberate exceptions to webpki for end entities (`_EE_POLICY`): the
   subjectAltName may be absent (then the CN names the partner) and
   extendedKeyUsage may be absent (clientAuth or none, step 4).
   pyca reports a failure only as English text, so the *reason code* of a
   failed chain comes from structure (`_diagnose`): OpenSSL's X509_V_ERR code
   for the same chain against the same anchors (`X509StoreContext`:
   `unknown_ca`, `expired`, `not_yet_valid`, `invalid_chain`), else our floor
   and purpose checks, else it is a profile violation only pyca makes
   (`invalid_chain`, pyca's message as detail). No text is ever parsed.
   On the verified path, our own checks: the cryptographic floor
   (`crypto_floor_problem`, `weak_crypto`: no MD5/SHA-1 signature below the
   anchor, RSA >= 2048 bits, EC only P-256/384/521, by OID and key type), and
   name constraints applied to the names the partner rules use beyond DNS
   SANs (`sip:` URI SANs, a SAN-less CN; `_constraint_problem`). A verified
   path is cached per (partner, chain) with its validity window: signatures
   never change, only time does.
3. *Names.* Among the partners whose chain verified, keep those with a leaf
   name inside one of their domains (DNS SANs, `sip:` URI SANs, the CN only
   when there is no SAN extension). The name that matched is the verdict's
   `name`: the identity passed on (PROXY v2 SSL_CN), never the raw CN.
4. *Purpose* (ours, with a reason code): on each named partner's own path, the
   leaf's extendedKeyUsage must include clientAuth, or be absent; every CA on
   that path with an EKU, the anchor included, must allow it too (an
   intermediate another partner pinned as its anchor is still checked); the
   leaf must not itself be a CA. Then more than one named partner is
   `ambiguous_partner` (a configuration overlap the operator must fix;
   disabled partners count, so disabling one never silently re-routes a
   certificate to another).
5. *Authorization* of the one partner: disabled is `partner_disabled`; then
   revocation by that partner's CRLs, checked here in Python over the verified
   path (see `_revocation_problem`).
When nothing is accepted the most specific failure wins: a candidate whose
names match explains its own failure (an expired chain to the right root is
`expired`), otherwise a chain that verified but matched no name is
`name_mismatch`, otherwise the most specific chain error (`revoked`,
`expired`, `not_yet_valid`, `weak_crypto`, `invalid_chain` over `unknown_ca`).
A peer's certificate that cannot be parsed (malformed or duplicate
extension) is `invalid_chain` before any of this.
`Verdict.not_after` is the earliest notAfter over the verified path, anchor
included: an admitted connection must be closed then.
An accepted verdict is remembered for the same chain by this verifier
(`edge.core.verdict_cache`): a few seconds at most, and never past the first
instant at which a time rule could change it (a notAfter on the path, an
anchor's validity, a CRL's thisUpdate/nextUpdate); a policy change builds a
new verifier, whose cache starts empty.

Servers (`ServerTrust`): pyca's `ServerVerifier` (webpki, SAN-only RFC 6125
matching, no CN) on our roots, EKU serverAuth or none; failures get their
reason code the same way (`_diagnose`, then service_identity for
`name_mismatch`), and the same floor.

Where each step lives (issue 14 split this module by concern; every public name
is still importable from `edge.core.trust`):
  edge.core.trust (here): candidates (step 1), pyca's client path (step 2,
      `_pyca_path`), the verified-path cache, name matching and ambiguity
      (steps 3-4), disabled and revocation (step 5), choosing the most
      specific failure; `PartnerTrust`.
  edge.core.trust_verdict: `Verdict` and `MAX_CHAIN_LENGTH`.
  edge.core.trust_floor: the cryptographic floor (`crypto_floor_problem`),
      the purpose check (`_purpose_problem`), OpenSSL error -> reason code
      (`reason_for_openssl_error`, `_diagnose`), webpki extension policies,
      malformed/duplicate extensions.
  edge.core.trust_names: leaf names (DNS, `sip:` URI SANs, CN only without a
      SAN), `name_in_domains`, name constraints over `sip:`/CN names.
  edge.core.server_trust: `ServerTrust`, the server-purpose verifier.
  edge.core.verdict_cache: accepted verdicts remembered (both purposes).

Which check comes from which library:
  pyca/cryptography verifier: path building, signatures, validity times,
      basicConstraints/pathLen, DNS name constraints, webpki profile.
  OpenSSL (X509StoreContext): only the reason code of a chain pyca refused.
  these modules: candidates, partner names (incl. `sip:` and CN rules), purpose,
      the cryptographic floor, name constraints over `sip:`/CN names,
      malformed/duplicate extensions, disabled, ambiguity, revocation.
  service_identity: the server name match used to explain `name_mismatch`.
In TLS (edge/tls.py) OpenSSL checks the same chain once more with every
partner's anchors, only to choose the alert; the verdict is this module's.

Thread safety: the stores and caches are only read, or updated with single
dict operations, so repeated calls from one thread (the trio thread) are safe.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence

from cryptography import x509
from cryptography.x509 import verification as pyca
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto

from edge.core.names import subject as _subject
from edge.core.policies import PartnerPolicy, PolicySnapshot
from edge.core.reasons import Reason
from edge.core.revocation import CrlSet
from edge.core.server_trust import ServerTrust
from edge.core.trust_floor import (
    _CA_POLICY,
    _EE_POLICY,
    _SPECIFICITY,
    _X509_CACHE_SIZE,
    _build_store,
    _ChainResult,
    _clip,
    _diagnose,
    _malformed_extensions,
    _purpose_problem,
    _X509Cache,
    crypto_floor_problem,
    reason_for_openssl_error,
)
from edge.core.trust_floor import (
    MIN_RSA_BITS as MIN_RSA_BITS,
)
from edge.core.trust_names import _constraint_problem, _names_match, leaf_names, name_in_domains
from edge.core.trust_verdict import MAX_CHAIN_LENGTH, Verdict, _reject
from edge.core.verdict_cache import VerdictCache

__all__ = [
    "MAX_CHAIN_LENGTH",
    "PartnerTrust",
    "ServerTrust",
    "Verdict",
    "crypto_floor_problem",
    "leaf_names",
    "name_in_domains",
    "reason_for_openssl_error",
]


def _pyca_path(
    store: pyca.Store, chain: Sequence[x509.Certificate], at: _dt.datetime
) -> tuple[x509.Certificate, ...] | str:
    """The path pyca's client verifier builds (leaf first, anchor last), or its
    message. The message is only ever shown, never parsed: the reason code of a
    failure comes from OpenSSL's error code (see `_diagnose`)."""
    verifier = (
        pyca.PolicyBuilder()
        .store(store)
        .time(at)
        .max_chain_depth(MAX_CHAIN_LENGTH)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(chain[0], list(chain[1:]))
    except pyca.VerificationError as exc:
        return _clip(str(exc))
    known = {c: c for c in chain}
    return tuple(known.get(c, c) for c in verified.chain)


# --- revocation ----------------------------------------------------------------------


class _PartnerEntry:
    """One partner's prebuilt verification state."""

    def __init__(self, policy: PartnerPolicy, cache: _X509Cache) -> None:
        self.policy = policy
        self.store = _build_store(policy.roots, cache, None)
        self.pyca_store = pyca.Store(list(policy.roots)) if policy.roots else None
        self.root_labels = {root: _subject(root) for root in policy.roots}
        # Prepared once per policy: CRL signature checks are expensive and never change.
        self.crls = CrlSet(
            policy.crls, [p.name for p in policy.crl_files], extra_signers=policy.roots
        )

    def store_at(self, at: _dt.datetime | None, cache: _X509Cache) -> crypto.X509Store:
        # A store's time is a property of the store; asking about another moment
        # (`edge verify --at`) gets a private store rather than mutating the shared one.
        return self.store if at is None else _build_store(self.policy.roots, cache, at)

    def time_boundaries(self) -> list[_dt.datetime]:
        """The instants at which this partner's verdicts may change by time alone,
        beyond the verified path's own: its anchors' (and CRL signers') validity
        and its CRLs' thisUpdate / nextUpdate."""
        moments = [r.not_valid_before_utc for r in self.policy.roots]
        moments += [r.not_valid_after_utc for r in self.policy.roots]
        for crl in self.policy.crls:
            moments.append(crl.last_update_utc)
            if crl.next_update_utc is not None:
                moments.append(crl.next_update_utc)
        return moments

    def revocation_problem(
        self, path: tuple[x509.Certificate, ...], at: _dt.datetime
    ) -> tuple[Reason, str] | None:
        """Check each non-anchor certificate of the verified path against this
        partner's CRLs, as `edge.core.revocation` defines it (RFC 5280 6.3: issuer
        and signer, time, critical extensions, scope, newest per scope, deltas).
        A CRL that claims a certificate but cannot be used fails closed."""
        return self.crls.check(path, self.policy.revocation, at)


class PartnerTrust:
    """Client-purpose verification against one `PolicySnapshot`. Build once per
    snapshot; a policy reload builds a new one (stores are never mutated)."""

    def __init__(self, snapshot: PolicySnapshot) -> None:
        self.snapshot = snapshot
        self._cache = _X509Cache()
        self._entries: dict[str, _PartnerEntry] = {
            pid: _PartnerEntry(policy, self._cache)
            for pid, policy in sorted(snapshot.partners.items())
        }
        # (partner, chain) -> (verified path, its validity window): signatures and
        # profile never change, only time does (see `_check_chain`).
        self._paths: dict[
            tuple[str, tuple[x509.Certificate, ...]],
            tuple[tuple[x509.Certificate, ...], _dt.datetime, _dt.datetime],
        ] = {}
        # Chain -> accepted verdict, for a few seconds at most and never past an
        # instant where a time rule could flip it (edge.core.verdict_cache).
        self._verdicts = VerdictCache(
            moment for entry in self._entries.values() for moment in entry.time_boundaries()
        )
        # Anchor subject -> partner ids, in sorted order (deterministic reporting).
        self._by_subject: dict[x509.Name, tuple[str, ...]] = {}
        for pid, entry in self._entries.items():
            for root in entry.policy.roots:
                ids = self._by_subject.get(root.subject, ())
                if pid not in ids:
                    self._by_subject[root.subject] = (*ids, pid)

    def clear_verified_paths(self) -> None:
        """Forget every cached verified path and verdict (benchmarks: a new chain)."""
        self._paths.clear()
        self._verdicts.clear()

    @property
    def all_roots(self) -> tuple[x509.Certificate, ...]:
        """Every partner's anchors once each (e.g. for the TLS CertificateRequest CA list)."""
        seen: dict[x509.Certificate, None] = {}
        for entry in self._entries.values():
            for root in entry.policy.roots:
                seen.setdefault(root, None)
        return tuple(seen)

    def _candidates(self, chain: Sequence[x509.Certificate]) -> list[str]:
        found: list[str] = []
        for cert in chain:
            for name in (cert.issuer, cert.subject):
                for pid in self._by_subject.get(name, ()):
                    if pid not in found:
                        found.append(pid)
        return found

    def verify_client(
        self, chain: Sequence[x509.Certificate], *, at: _dt.datetime | None = None
    ) -> Verdict:
        """Accept or reject a partner's chain (leaf first, then what the peer sent)."""
        if not chain:
            return _reject(Reason.NO_CLIENT_CERT, "the peer presented no certificate")
        if len(chain) > MAX_CHAIN_LENGTH:
            # Each certificate may name another partner's root and cost one more
            # verification: bound the work a peer can make us do.
            return _reject(
                Reason.INVALID_CHAIN,
                f"the peer sent {len(chain)} certificates; at most {MAX_CHAIN_LENGTH} are accepted",
            )
        when = at if at is not None else _dt.datetime.now(_dt.UTC)
        key = tuple(chain)
        cached = self._verdicts.get(key, when)
        if cached is not None:
            return cached
        verdict = self._verify_client(chain, when, at)
        self._verdicts.put(key, verdict, when)
        return verdict

    def _verify_client(
        self, chain: Sequence[x509.Certificate], when: _dt.datetime, at: _dt.datetime | None
    ) -> Verdict:
        malformed = _malformed_extensions(chain)
        if malformed is not None:
            return _reject(Reason.INVALID_CHAIN, malformed)
        leaf = chain[0]
        candidates = self._candidates(chain)
        if not candidates:
            top = chain[-1]
            return _reject(
                Reason.UNKNOWN_CA,
                f"no partner trusts {top.issuer.rfc4514_string()} "
                f"(issuer of {_subject(top)}); leaf {_subject(leaf)}",
            )
        names = leaf_names(leaf)
        verified: dict[str, tuple[x509.Certificate, ...]] = {}
        failures: list[tuple[str, _ChainResult]] = []
        for pid in candidates:
            result = self._check_chain(pid, chain, names, when, at)
            if result.ok:
                verified[pid] = result.path
            else:
                failures.append((pid, result))

        matched = [
            (pid, how)
            for pid in verified
            if (how := _names_match(names, self._entries[pid].policy)) is not None
        ]
        if not verified or not matched:
            # The partner the leaf names explains its own failure best.
            named_failures = [
                (pid, r) for pid, r in failures if _names_match(names, self._entries[pid].policy)
            ]
            if named_failures:
                return self._best_chain_failure(named_failures)
            if verified:
                return self._name_mismatch(leaf, names, verified)
            return self._best_chain_failure(failures)

        # Each named partner's own path: the EKU of every CA on it counts (a path
        # through an intermediate another partner pinned must not skip it).
        for pid, _ in matched:
            problem = _purpose_problem(verified[pid], ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")
            if problem is not None:
                return _reject(Reason.BAD_PURPOSE, problem, pid, verified[pid])
        any_path = verified[matched[0][0]]

        if len(matched) > 1:
            ids = ", ".join(pid for pid, _ in matched)
            return _reject(
                Reason.AMBIGUOUS_PARTNER,
                f"leaf {_subject(leaf)} verifies and matches the domains of several partners "
                f"({ids}); give them distinct domains or roots",
                chain=any_path,
            )
        pid, how = matched[0]
        entry = self._entries[pid]
        path = verified[pid]
        if not entry.policy.enabled:
            return _reject(
                Reason.PARTNER_DISABLED,
                f"partner {pid} is disabled in {entry.policy.folder}/policy.toml",
                pid,
                path,
            )
        revoked = entry.revocation_problem(path, when)
        if revoked is not None:
            return _reject(revoked[0], revoked[1], pid, path)
        # Labels precomputed per anchor: formatting names costs as much as a lookup.
        anchor = entry.root_labels.get(path[-1]) or _subject(path[-1])
        return Verdict(True, None, f"{how[0]} in {how[1]}; anchor {anchor}", pid, path, how[0])

    def _check_chain(
        self,
        pid: str,
        chain: Sequence[x509.Certificate],
        names: Sequence[str],
        when: _dt.datetime,
        at: _dt.datetime | None,
    ) -> _ChainResult:
        """One partner's judgement of the chain: path, floor, name constraints.

        A chain that verified once for a partner verifies again as long as the
        moment lies inside its path's validity window (signatures, extensions and
        the partner's anchors are fixed for this snapshot), so successes are
        cached: peers present the same chains again and again."""
        key = (pid, tuple(chain))
        hit = self._paths.get(key)
        if hit is not None and hit[1] <= when <= hit[2]:
            return _ChainResult(True, hit[0])
        entry = self._entries[pid]
        found = (
            _pyca_path(entry.pyca_store, chain, when)
            if entry.pyca_store is not None
            else "no trust anchors"
        )
        if isinstance(found, str):
            return _diagnose(
                entry.store_at(at, self._cache),
                chain,
                self._cache,
                when,
                found,
                (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
            )
        problem = crypto_floor_problem(found)
        if problem is not None:
            return _ChainResult(False, reason=Reason.WEAK_CRYPTO, detail=problem)
        problem = _constraint_problem(found, names)
        if problem is not None:
            return _ChainResult(False, reason=Reason.INVALID_CHAIN, detail=problem)
        if len(self._paths) >= _X509_CACHE_SIZE:
            del self._paths[next(iter(self._paths))]
        start = max(c.not_valid_before_utc for c in found)
        end = min(c.not_valid_after_utc for c in found)
        self._paths[key] = (found, start, end)
        return _ChainResult(True, found)

    def _best_chain_failure(self, failures: list[tuple[str, _ChainResult]]) -> Verdict:
        pid, result = max(
            failures,
            key=lambda f: _SPECIFICITY.get(f[1].reason or Reason.INVALID_CHAIN, 1),
        )
        assert result.reason is not None
        detail = result.detail
        if result.reason is not Reason.UNKNOWN_CA:
            # The path reached this partner's own roots: the refusal is its (logs
            # and metrics name the partner whose certificate expired, ...).
            return _reject(result.reason, f"{detail} (against partner {pid}'s roots)", pid)
        return _reject(result.reason, f"{detail}; not trusted by partner {pid}'s roots")

    def _name_mismatch(
        self,
        leaf: x509.Certificate,
        names: Sequence[str],
        verified: Mapping[str, tuple[x509.Certificate, ...]],
    ) -> Verdict:
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "") if names else "none"
        parts = []
        for pid in verified:
            domains = ", ".join(self._entries[pid].policy.domains)
            parts.append(f"{pid} ({domains})")
        # One partner's root verified it: that partner is identified (its admins
        # issued a name outside their domains); several: none is.
        only = next(iter(verified)) if len(verified) == 1 else None
        return _reject(
            Reason.NAME_MISMATCH,
            f"leaf {_subject(leaf)} names [{shown}], none inside the domains of the "
            f"partner(s) whose root verified it: {'; '.join(parts)}",
            only,
            next(iter(verified.values())),
        )
