"""PEM or DER: the one place that tells them apart and reads certificates, CRLs and keys.

Owns recognising PEM (text with ``-----BEGIN`` armour) versus DER (binary)
and reading certificates, CRLs and private keys in either form with
``cryptography``. Every reader of such files (edge.toml's identity, partner
folders, fetched CRLs, ``edge verify``'s chain) calls these.

Must never: read a file (callers pass bytes), echo parser messages about a
private key (they could quote key bytes), or accept anything but what the
caller asked for (a PEM certificate file with a key in it is the caller's
problem to report; ``has_private_key`` tells it).
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = [
    "NO_CRL_BLOCK",
    "has_private_key",
    "is_pem",
    "load_certificates",
    "load_crls",
    "load_private_key",
]

# load_crls' message for PEM text without a complete CRL block (callers report it as is).
NO_CRL_BLOCK = "PEM file without an 'X509 CRL' block"
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def is_pem(data: bytes) -> bool:
    """True for PEM armour (leading whitespace allowed), False for DER."""
    return data.lstrip().startswith(b"-----BEGIN")


def has_private_key(data: bytes) -> bool:
    """Do these bytes carry a PEM private key block (of any kind), anywhere?

    Anywhere, not only at the start: a key pasted below notes or a
    certificate is still a key that must not sit in a partner folder.
    """
    return b"PRIVATE KEY-----" in data


def load_certificates(data: bytes) -> tuple[x509.Certificate, ...]:
    """Every certificate of a PEM file (in order), or the one DER certificate.

    Raises ValueError when there is none readable.
    """
    if is_pem(data):
        return tuple(x509.load_pem_x509_certificates(data))
    return (x509.load_der_x509_certificate(data),)


def load_crls(data: bytes) -> tuple[x509.CertificateRevocationList, ...]:
    """Every ``X509 CRL`` block of a PEM file, or the one DER CRL.

    Raises ValueError when there is none readable (a PEM file without a CRL block too).
    """
    if is_pem(data):
        blocks = _PEM_CRL.findall(data)
        if not blocks:
            raise ValueError(NO_CRL_BLOCK)
        return tuple(x509.load_pem_x509_crl(b) for b in blocks)
    return (x509.load_der_x509_crl(data),)


def load_private_key(data: bytes, password: bytes | None = None) -> PrivateKeyTypes:
    """A private key, PEM or DER, decrypted with `password` when given.

    Raises TypeError for an encrypted key without a password (or a password
    for a plain key), ValueError or UnsupportedAlgorithm for anything
    unreadable or a wrong password (callers must not echo the message).
    """
    if is_pem(data):
        return serialization.load_pem_private_key(data, password=password)
    return serialization.load_der_private_key(data, password=password)
