"""The TLS alert for a refusal only the core sees (name outside the partner's domains, ...).

Owns: installing a partner-facing context's verify callback so that, when the core
refuses a chain OpenSSL itself found good, OpenSSL's verify error is set to a code
whose alert says why (OpenSSL turns the error into the alert, ``ssl_x509err2alert``):

=====================================  ===================  ===========================
core reason                            X509_V_ERR code      alert the partner sees
=====================================  ===================  ===========================
``name_mismatch``, ``weak_crypto``,    28 CERT_REJECTED     ``bad_certificate`` (42)
``invalid_chain``, ``not_yet_valid``
``unknown_ca``                         20                   ``unknown_ca`` (48)
``expired``                            10                   ``certificate_expired`` (45)
``revoked``                            23                   ``certificate_revoked`` (44)
``bad_purpose``                        26                   ``unsupported_certificate``
anything else (``partner_disabled``,   50 APPLICATION_      ``handshake_failure`` (40)
``ambiguous_partner``,                 VERIFICATION
``crl_unavailable``, ...)
=====================================  ===================  ===========================

OpenSSL has no verify error that maps to ``access_denied``; ``bad_certificate`` is
the nearest it sends for a certificate refused by policy.

Why private bindings: pyOpenSSL's public verify callback returns a bool and its
wrapper never lets the callback set ``X509_STORE_CTX_set_error``; refusing with the
error still ``X509_V_OK`` makes OpenSSL 3+ report ``X509_V_ERR_UNSPECIFIED``, alert
``internal_error``, which tells the partner's admin nothing. So this module
registers its own C callback (``SSL_CTX_set_verify`` through pyOpenSSL's cffi
binding, ``OpenSSL._util``) that does what pyOpenSSL's ``_VerifyHelper`` does
(current certificate, error, depth, the ``Connection``) plus setting the error on
a refusal. pyOpenSSL is pinned (``26.4.*``); if any private name it needs is
missing, it falls back to the public ``set_verify`` (same verdicts, only the alert
is ``internal_error`` again) and ``install`` returns False; tests/test_alerts.py
fails then, so an upgrade cannot silently lose the alerts.

Must never: decide anything (the judge decides; this only picks the error code for
a refusal the judge already made), accept what the judge refused, raise into
OpenSSL (every exception is a refusal), or change an error OpenSSL set itself
(its code is a fact about the path and already picks the right alert).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from OpenSSL.crypto import X509

from edge.core.reasons import Reason

__all__ = ["error_code_for", "install"]

_X509_V_OK = 0
_CERT_REJECTED = 28
_APPLICATION_VERIFICATION = 50

_CODES: dict[Reason, int] = {
    Reason.NAME_MISMATCH: _CERT_REJECTED,
    Reason.WEAK_CRYPTO: _CERT_REJECTED,
    Reason.INVALID_CHAIN: _CERT_REJECTED,
    Reason.NOT_YET_VALID: _CERT_REJECTED,
    Reason.UNKNOWN_CA: 20,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    Reason.EXPIRED: 10,  # X509_V_ERR_CERT_HAS_EXPIRED
    Reason.REVOKED: 23,  # X509_V_ERR_CERT_REVOKED
    Reason.BAD_PURPOSE: 26,  # X509_V_ERR_INVALID_PURPOSE
}

Judge = Callable[[SSL.Connection, X509, int, int, int], bool]
# The verdict reason the judge reached for a connection (None: no verdict yet).
ReasonOf = Callable[[SSL.Connection], Reason | None]


def error_code_for(reason: Reason | None) -> int:
    """The X509_V_ERR code whose alert says why the core refused (module table)."""
    if reason is None:
        return _APPLICATION_VERIFICATION
    return _CODES.get(reason, _APPLICATION_VERIFICATION)


def install(ctx: SSL.Context, mode: int, judge: Judge, reason_of: ReasonOf) -> bool:
    """Make `judge` `ctx`'s verify callback; True if refusals get their own alert
    (False: the public fallback, alert ``internal_error``)."""
    try:
        from OpenSSL._util import ffi, lib

        ctx_ptr = ctx._context
        connections = SSL.Connection._reverse_mapping
        from_raw = X509._from_raw_x509_ptr
        calls = (
            lib.X509_STORE_CTX_get_current_cert,
            lib.X509_STORE_CTX_get_error,
            lib.X509_STORE_CTX_get_error_depth,
            lib.X509_STORE_CTX_set_error,
            lib.X509_STORE_CTX_get_ex_data,
            lib.SSL_get_ex_data_X509_STORE_CTX_idx,
            lib.X509_up_ref,
            lib.SSL_CTX_set_verify,
        )
    except (ImportError, AttributeError):
        ctx.set_verify(mode, judge)
        return False
    (get_cert, get_error, get_depth, set_error, get_ex_data, ssl_idx, up_ref, set_verify) = calls

    def verify(ok: int, store_ctx: Any) -> int:
        try:
            raw = get_cert(store_ctx)
            if raw == ffi.NULL:
                return 0  # no certificate to judge (OpenSSL's policy pass): refuse
            up_ref(raw)
            cert = from_raw(raw)
            err = int(get_error(store_ctx))
            depth = int(get_depth(store_ctx))
            conn = connections[get_ex_data(store_ctx, ssl_idx())]
            if judge(conn, cert, err, depth, ok):
                set_error(store_ctx, _X509_V_OK)
                return 1
            if err == _X509_V_OK:
                set_error(store_ctx, error_code_for(reason_of(conn)))
            return 0
        except Exception:  # fail closed: never raise into OpenSSL
            return 0

    callback = ffi.callback("int (*)(int, X509_STORE_CTX *)", verify)
    set_verify(ctx_ptr, mode, callback)
    # Keep the C callback alive as long as the context, where pyOpenSSL keeps its own.
    ctx._verify_helper = None
    ctx._verify_callback = callback
    return True
