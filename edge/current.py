"""The one current snapshot, and the TLS contexts the shell builds from it.

Owns ``Current`` (an ``edge.core.snapshot.Snapshot`` plus the OpenSSL
contexts derived from it: one server context per listener, the client
context for the pool) and ``build_current``, which builds the contexts for a
new snapshot, reusing the previous ones where their inputs did not change.
The gateway holds exactly one ``Current`` and replaces it in one assignment;
admission, pools, reload and metrics read the value they are handed at the
moment they need it, never a copy taken at startup.

An mtls listener's context carries its folder's verifier
(``server_context(partner_trust=...)``): the core judges the partner's chain
inside the handshake, so a refused partner gets the TLS alert that says why,
and the verdict rides on ``TLSStream.handshake_verdict``. Every context, server
and client, follows ``[tls] profile``. A context is reused only while its
inputs are the same objects/values: the folder's verifier (a new verifier is a
new context), the identity and the profile.

Must never: decide trust itself (the verifier in the context does; the client
context lets OpenSSL build the member's chain, ``ServerTrust`` decides),
mutate a context after a connection used it (pyOpenSSL 26 refuses; build new
ones), or do I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from cryptography import x509
from OpenSSL import SSL

from edge.core.config import Listener
from edge.core.snapshot import Snapshot
from edge.tls import client_context, server_context

__all__ = ["Current", "build_current"]


@dataclass(frozen=True)
class Current:
    """What every new connection uses: the snapshot and its TLS contexts."""

    snapshot: Snapshot
    server_contexts: Mapping[str, SSL.Context]  # by listener name
    client_context: SSL.Context  # to pool members (resumes sessions per member host)


def build_current(snapshot: Snapshot, previous: Current | None = None) -> Current:
    """Contexts for ``snapshot``; unchanged ones are taken from ``previous``."""
    config = snapshot.config
    ident = config.identity
    profile = config.tls.profile
    old = previous.snapshot if previous is not None else None
    same_identity = (
        old is not None and old.config.identity == ident and old.config.tls.profile == profile
    )
    if previous is not None and same_identity:
        client = previous.client_context  # keeps its resumable sessions
    else:
        # The pool is ours: the edge -> pool leg resumes TLS sessions per
        # member host (never the partner side; see edge.tls).
        client = client_context(
            ident.internal_root_certs,
            ident.internal_chain,
            ident.internal_private_key,
            resume_sessions=True,
            profile=profile,
            ml_kem_share=False,  # many long-lived connections (see client_context)
        )
    contexts: dict[str, SSL.Context] = {}
    for listener in config.listeners:
        if (
            previous is not None
            and old is not None
            and same_identity
            and listener.name in previous.server_contexts
            and _same_listener(old, snapshot, listener)
        ):
            contexts[listener.name] = previous.server_contexts[listener.name]
        elif listener.mode == "mtls":
            trust = snapshot.folder_of(listener)
            # Without its folder (never for a checked config) no judge runs and
            # admission refuses every connection (fails closed).
            contexts[listener.name] = server_context(
                ident.public_chain,
                ident.public_private_key,
                require_client_cert=True,
                client_ca_names=_client_ca_roots(snapshot, listener.name),
                partner_trust=trust.verifier if trust is not None else None,
                profile=profile,
            )
        else:
            contexts[listener.name] = server_context(
                ident.public_chain,
                ident.public_private_key,
                require_client_cert=False,
                profile=profile,
            )
    return Current(snapshot, MappingProxyType(contexts), client)


def _same_listener(old: Snapshot, new: Snapshot, listener: Listener) -> bool:
    """Whether ``listener``'s context built for ``old`` serves ``new`` unchanged: same
    listener settings and, for mtls, the very same verifier (a snapshot reuses the
    verifier of an unchanged folder; a changed folder gets a new one)."""
    before = next((x for x in old.config.listeners if x.name == listener.name), None)
    if before != listener:
        return False
    if listener.mode != "mtls":
        return True
    a, b = old.folder_of(listener), new.folder_of(listener)
    if a is None or b is None:
        return a is b
    return a.verifier is b.verifier


def _client_ca_roots(snapshot: Snapshot, listener_name: str) -> list[x509.Certificate]:
    """The CA names an mtls listener sends in its CertificateRequest (enabled partners')."""
    for listener in snapshot.config.listeners:
        if listener.name != listener_name:
            continue
        trust = snapshot.folder_of(listener)
        if listener.mode != "mtls" or trust is None:
            return []
        roots = [
            root
            for policy in trust.policies.partners.values()
            if policy.enabled
            for root in policy.roots
        ]
        return _unique_subjects(roots)
    return []


def _unique_subjects(certs: list[x509.Certificate]) -> list[x509.Certificate]:
    seen: set[bytes] = set()
    out = []
    for cert in certs:
        key = cert.subject.public_bytes()
        if key not in seen:
            seen.add(key)
            out.append(cert)
    return out
