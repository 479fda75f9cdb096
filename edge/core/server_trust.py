"""Server-purpose verification: may the edge talk to this server under this name?

Owns: `ServerTrust.verify_server`, the verdict on a pool member's (or a
partner's edge's) chain: pyca's `ServerVerifier` (webpki, SAN-only RFC 6125
matching, no CN) on our roots, EKU serverAuth or none, the cryptographic floor,
and the reason code of a refusal (`_diagnose`, then service_identity for
`name_mismatch`).

Must never: fall back to the CN for a server name, do I/O, import trio, sockets
or any shell module, put key material in a detail string, or trust a name the
caller did not ask for.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509 import verification as pyca
from cryptography.x509.oid import ExtendedKeyUsageOID
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

from edge.core.names import subject as _subject
from edge.core.reasons import Reason
from edge.core.trust_floor import (
    _CA_POLICY,
    _SERVER_EE_POLICY,
    _build_store,
    _clip,
    _diagnose,
    _malformed_extensions,
    _purpose_problem,
    _verify_chain,
    _X509Cache,
    crypto_floor_problem,
)
from edge.core.trust_names import _norm
from edge.core.trust_verdict import MAX_CHAIN_LENGTH, Verdict, _accept, _reject
from edge.core.verdict_cache import VerdictCache


class ServerTrust:
    """Server-purpose verification: a pool member (or a partner's edge) we connect to."""

    def __init__(self, roots: Sequence[x509.Certificate]) -> None:
        self.roots = tuple(roots)
        self._cache = _X509Cache()
        self._store = _build_store(self.roots, self._cache, None)
        self._pyca_store = pyca.Store(list(self.roots)) if self.roots else None
        # (name, chain) -> accepted verdict, briefly (edge.core.verdict_cache): a
        # pool member presents the same chain on every connection. Only the
        # roots' validity bounds it beyond the verified path's own.
        self._verdicts = VerdictCache(
            [r.not_valid_before_utc for r in self.roots]
            + [r.not_valid_after_utc for r in self.roots]
        )

    def verify_server(
        self,
        chain: Sequence[x509.Certificate],
        name: str,
        *,
        at: _dt.datetime | None = None,
    ) -> Verdict:
        """Chain to our roots, serverAuth (or no EKU), RFC 6125 match of `name` against
        DNS or IP SANs. No SAN never matches; there is no CN fallback."""
        if not chain:
            return _reject(Reason.TLS_ERROR, "the server presented no certificate")
        if not self.roots:
            return _reject(Reason.UNKNOWN_CA, "no roots configured to verify servers")
        when = at if at is not None else _dt.datetime.now(_dt.UTC)
        key = (name, *chain)
        cached = self._verdicts.get(key, when)
        if cached is not None:
            return cached
        verdict = self._verify_server(chain, name, when, at)
        self._verdicts.put(key, verdict, when)
        return verdict

    def _verify_server(
        self,
        chain: Sequence[x509.Certificate],
        name: str,
        when: _dt.datetime,
        at: _dt.datetime | None,
    ) -> Verdict:
        malformed = _malformed_extensions(chain)
        if malformed is not None:
            return _reject(Reason.INVALID_CHAIN, malformed)
        store = self._store if at is None else _build_store(self.roots, self._cache, at)
        wanted = _norm(name)
        assert self._pyca_store is not None
        found = _pyca_server_path(self._pyca_store, chain, wanted, when)
        if isinstance(found, str):
            # Names are matched below with a reason of their own; whatever else
            # pyca refused gets its reason code from `_diagnose`.
            result = _diagnose(
                store,
                chain,
                self._cache,
                when,
                found,
                (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
            )
            if (
                result.reason is Reason.INVALID_CHAIN
                and _server_name_problem(chain[0], wanted) is not None
            ):
                path = _verify_chain(store, chain, self._cache, when).path or tuple(chain)
            else:
                assert result.reason is not None
                return _reject(result.reason, result.detail)
        else:
            path = found
        weak = crypto_floor_problem(path)
        if weak is not None:
            return _reject(Reason.WEAK_CRYPTO, weak, chain=path)
        problem = _purpose_problem(path, ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth")
        if problem is not None:
            return _reject(Reason.BAD_PURPOSE, problem, chain=path)
        leaf = path[0]
        mismatch = _server_name_problem(leaf, wanted)
        if mismatch is not None:
            return _reject(
                Reason.NAME_MISMATCH,
                f"server certificate {_subject(leaf)} is not valid for {name!r}: "
                f"{_san_summary(leaf)} ({mismatch})",
                chain=path,
            )
        return _accept(f"{_subject(leaf)} valid for {wanted} via {_subject(path[-1])}", None, path)


def _pyca_server_path(
    store: pyca.Store, chain: Sequence[x509.Certificate], name: str, at: _dt.datetime
) -> tuple[x509.Certificate, ...] | str:
    """pyca's server verifier (webpki: SAN-only RFC 6125 matching) or its message."""
    try:
        try:
            subject: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            subject = x509.DNSName(name)
        verifier = (
            pyca.PolicyBuilder()
            .store(store)
            .time(at)
            .max_chain_depth(MAX_CHAIN_LENGTH)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_SERVER_EE_POLICY)
            .build_server_verifier(subject)  # type: ignore[arg-type]
        )
        verified = verifier.verify(chain[0], list(chain[1:]))
    except (pyca.VerificationError, ValueError) as exc:
        return _clip(str(exc))
    known = {c: c for c in chain}
    return tuple(known.get(c, c) for c in verified)


def _server_name_problem(leaf: x509.Certificate, wanted: str) -> str | None:
    """None if `leaf` is valid for the host name or IP `wanted`, else the kind of failure."""
    try:
        try:
            ipaddress.ip_address(wanted)
        except ValueError:
            verify_certificate_hostname(leaf, wanted)
        else:
            verify_certificate_ip_address(leaf, wanted)
    except (VerificationError, CertificateError, ValueError) as exc:
        return type(exc).__name__
    return None


def _san_summary(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "it has no subjectAltName (the CN is not used for servers)"
    names = [*san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return "its names are " + (", ".join(names[:8]) if names else "none usable")
