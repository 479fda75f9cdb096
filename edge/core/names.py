"""How a certificate's subject is named in a message (problems, verdict details).

Owns the one rendering of a subject for people: its common name, or with
``full`` the whole RFC 4514 name, and ``(empty subject)`` when there is none.
Used by ``edge.core.trust`` (verdict details) and ``edge.core.policies``
(partner folder problems).

Must never: decide anything from a name (``edge.core.trust`` does), or do I/O.
The text is peer-controlled: callers clip it and the logger escapes it.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["subject"]


def subject(cert: x509.Certificate, *, full: bool = False) -> str:
    """``CN=...`` when the subject has a common name (else, or with ``full``, the
    whole RFC 4514 name); ``(empty subject)`` for an empty one."""
    if not full:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if cns:
            return f"CN={cns[0].value!s}"
    return cert.subject.rfc4514_string() or "(empty subject)"
