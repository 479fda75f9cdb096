"""The rejection vocabulary: one reason code per distinct cause.

Owns: the closed set of reason codes that appear in logs, in the `result` and
`reason` metric labels and in `edge verify` output (docs/reference/reason-codes.md).

Must never: reuse one code for two meanings, or change a code's string value
(dashboards and alerts key on it). Add a new member instead.
"""

from __future__ import annotations

import enum

__all__ = ["Reason"]


class Reason(enum.StrEnum):
    """Why a connection or a certificate chain was refused."""

    # The partner completed (or tried) a handshake without presenting a certificate.
    NO_CLIENT_CERT = "no_client_cert"
    # The chain does not reach any root the operator trusts (for that partner).
    UNKNOWN_CA = "unknown_ca"
    # A certificate in the chain (leaf or issuer) is past its notAfter.
    EXPIRED = "expired"
    # A certificate in the chain (leaf or issuer) is before its notBefore.
    NOT_YET_VALID = "not_yet_valid"
    # A certificate in the chain is listed on its issuer's CRL.
    REVOKED = "revoked"
    # Revocation status was required but no current CRL for an issuer is available.
    CRL_UNAVAILABLE = "crl_unavailable"
    # The leaf's extended key usage does not allow this purpose (clientAuth / serverAuth).
    BAD_PURPOSE = "bad_purpose"
    # The chain reaches a trusted root but is malformed: bad signature, not a CA, path length...
    INVALID_CHAIN = "invalid_chain"
    # The chain is trusted but the leaf names no host of the partner (or not the expected host).
    NAME_MISMATCH = "name_mismatch"
    # The chain and names fit more than one partner; we refuse to guess.
    AMBIGUOUS_PARTNER = "ambiguous_partner"
    # The chain and names identify a partner the operator has disabled.
    PARTNER_DISABLED = "partner_disabled"
    # The partner (or the gateway as a whole) is at its connection limit.
    OVER_LIMIT = "over_limit"
    # The TLS handshake did not complete within handshake_timeout_s.
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    # The TLS handshake failed for a protocol reason (no shared cipher, bad record, EOF...).
    TLS_ERROR = "tls_error"
    # No pool member could be connected to and verified.
    NO_UPSTREAM = "no_upstream"
    # A pool member presented a certificate that failed verification or names another host.
    UPSTREAM_UNTRUSTED = "upstream_untrusted"
    # The gateway shut down (drain deadline) before the connection was admitted.
    SHUTTING_DOWN = "shutting_down"
    # A bug in the gateway ended this connection; it is logged with its traceback
    # summary and costs this one connection only, never the process.
    INTERNAL_ERROR = "internal_error"
    # A live connection's chain, re-checked after a policy reload, now identifies
    # a different partner than the one it was admitted as (a folder renamed).
    PARTNER_CHANGED = "partner_changed"
    # Outbound: the pool member's certificate names no topology host of the
    # outbound listener's pools (or does not chain to internal_roots).
    NOT_IN_TOPOLOGY = "not_in_topology"
    # Outbound: no SNI, or an SNI inside no enabled partner's domains.
    UNKNOWN_DESTINATION = "unknown_destination"
    # Outbound: no static edge and no SRV answer, or no target could be connected to.
    PARTNER_UNREACHABLE = "partner_unreachable"
    # Outbound: the partner's edge presented a certificate its policy does not accept
    # (the core's reason code is in the detail).
    PARTNER_UNTRUSTED = "partner_untrusted"
    # SIP listeners: a request's From or P-Asserted-Identity names a domain
    # outside the sender's (a partner's domains inbound, `[sip] domains` outbound).
    SIP_DOMAIN_MISMATCH = "sip_domain_mismatch"
    # SIP listeners: the stream cannot be framed or read as SIP (bad start line,
    # header without a name, no or two Content-Length, bare CR/LF).
    SIP_MALFORMED = "sip_malformed"
    # SIP listeners: a message over `[sip] max_message_bytes` or `max_headers`.
    SIP_TOO_LARGE = "sip_too_large"
    # A signature or key in the chain is below the cryptographic floor:
    # MD5/SHA-1 below the trust anchor, RSA under 2048 bits, EC other than P-256/384/521.
    WEAK_CRYPTO = "weak_crypto"
