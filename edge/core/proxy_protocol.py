"""PROXY protocol v2 headers, as the edge sends them to a pool member.

Owns the bytes of the binary PROXY protocol header (HAProxy's
``proxy-protocol.txt``, section 2.2) that tell a pool member who the partner
really is: the partner's source address and the address it dialled, and
TLVs for what only the edge saw, because the member never sees the partner's
TLS session: the client-certificate result, TLS version and leaf CN
(``PP2_TYPE_SSL``, the layout of HAProxy's ``send-proxy-v2-ssl-cn``), the SNI
(``PP2_TYPE_AUTHORITY``) and the partner id (``PP2_TYPE_EDGE_PARTNER``, ours,
from the range the specification reserves for custom use).

Sans-I/O: pure functions from values to bytes. Must never import trio or
sockets, never decide anything about trust (it writes down a verdict the core
already reached), and never emit a header a receiver could mis-parse: every
length is checked and an oversized value is an error, not a truncation.

Layout written (all integers big-endian)::

    12  signature  \\r\\n\\r\\n\\0\\r\\nQUIT\\n
     1  0x21       version 2, command PROXY     (0x20 LOCAL: health checks)
     1  0x11/0x21  TCP over IPv4 / IPv6         (0x00 UNSPEC: LOCAL, or unknown)
     2  length of everything after these 16 bytes
    12|36          src addr, dst addr, src port, dst port
    TLVs, each: 1 type, 2 length, value:
      0x02 PP2_TYPE_AUTHORITY   the SNI the partner sent, only if it is a valid
                                host name (omitted otherwise)
      0x20 PP2_TYPE_SSL         client (1) + verify (4) + sub-TLVs:
           0x21 PP2_SUBTYPE_SSL_VERSION  e.g. "TLSv1.3"
           0x22 PP2_SUBTYPE_SSL_CN       the *authorized* name: the SAN or `sip:`
                                         domain that matched the partner (see
                                         `authorized_identity`), never a raw CN
      0xE0 PP2_TYPE_EDGE_PARTNER the partner id (its policy folder name), UTF-8
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

from edge.core.trust import Verdict

__all__ = [
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_EDGE_PARTNER",
    "PP2_TYPE_SSL",
    "SIGNATURE",
    "ProxyInfo",
    "authorized_identity",
    "encode_local",
    "encode_v2",
    "host_name_or_none",
]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_VERSION_2 = 0x20
_CMD_LOCAL = 0x00
_CMD_PROXY = 0x01
_AF_UNSPEC = 0x00
_TCP_OVER_IPV4 = 0x11
_TCP_OVER_IPV6 = 0x21

PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
# Ours, from the custom range 0xE0-0xEF: the partner id the core authorized.
PP2_TYPE_EDGE_PARTNER = 0xE0

# PP2_TYPE_SSL "client" bits.
PP2_CLIENT_SSL = 0x01  # the client connected over TLS
PP2_CLIENT_CERT_CONN = 0x02  # it presented a certificate on this connection
PP2_CLIENT_CERT_SESS = 0x04  # ... on this session (resumption: never, ours is off)

_MAX_U16 = 0xFFFF
# RFC 1035 2.3.4 / RFC 1123 2.1: a host name in presentation form, A-labels only.
_MAX_HOST_NAME = 253
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Partner ids are folder names the operator chose; still, bound what goes on the wire.
_MAX_PARTNER_ID = 255


def host_name_or_none(value: str | None, *, wildcard: bool = False) -> str | None:
    """`value` lower-cased without a trailing dot if it is a valid DNS host name
    (ASCII letters, digits, hyphens; labels of 1-63, at most 253 in all), else None.
    `wildcard` admits one leading ``*.`` label (a matched wildcard SAN). Anything
    else (NUL, CR/LF, spaces, U-labels, 65,000 bytes) is dropped, not repaired."""
    if not value or len(value) > _MAX_HOST_NAME + 1:
        return None
    name = value.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if wildcard and len(labels) > 1 and labels[0] == "*":
        labels = labels[1:]
    if not name or len(name) > _MAX_HOST_NAME:
        return None
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return name


def authorized_identity(verdict: Verdict, sni: str | None) -> tuple[str | None, str | None]:
    """(SSL_CN, AUTHORITY) for the PROXY header of one admitted connection.

    SSL_CN is the name the core authorized (``Verdict.name``: the DNS SAN or
    `sip:` domain that lies in the partner's domains), never the leaf's raw
    subject CN, which a partner CA may set to anything (issue 15: SAN
    sip.fabrikam.com with CN sip.litware.com). None unless the verdict accepted.
    AUTHORITY is the client's SNI only if it is a valid host name."""
    cn = host_name_or_none(verdict.name, wildcard=True) if verdict.accepted else None
    return cn, host_name_or_none(sni)


@dataclass(frozen=True, kw_only=True)
class ProxyInfo:
    """What the pool should learn about one admitted partner connection.

    ``source``/``destination`` are (IP literal, port) as the edge's listening
    socket saw them: the partner's address and the edge address it dialled.
    ``cert_verified`` is true only when a client certificate was presented and
    the core accepted it (what PP2_TYPE_SSL's ``verify`` field = 0 promises).
    """

    source: tuple[str, int]
    destination: tuple[str, int]
    sni: str | None = None
    tls_version: str | None = None
    client_cn: str | None = None  # the authorized name (`authorized_identity`), not a raw CN
    partner: str | None = None
    client_cert: bool = False
    cert_verified: bool = False


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > _MAX_U16:
        raise ValueError(f"PROXY v2 TLV 0x{kind:02X} value is {len(value)} bytes (max 65535)")
    return struct.pack("!BH", kind, len(value)) + value


def _addresses(source: tuple[str, int], destination: tuple[str, int]) -> tuple[int, bytes]:
    """(family byte, address block); UNSPEC with no block when not both IP."""
    try:
        src = ipaddress.ip_address(source[0].strip("[]").split("%", 1)[0])
        dst = ipaddress.ip_address(destination[0].strip("[]").split("%", 1)[0])
    except ValueError:
        return _AF_UNSPEC, b""
    for port in (source[1], destination[1]):
        if not 0 <= port <= _MAX_U16:
            raise ValueError(f"port {port} out of range")
    if isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address):
        return _TCP_OVER_IPV4, struct.pack(
            "!4s4sHH", src.packed, dst.packed, source[1], destination[1]
        )
    # Mixed families (a dual-stack socket) go as IPv6, IPv4 as v4-mapped.
    src6 = src if isinstance(src, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{src}")
    dst6 = dst if isinstance(dst, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{dst}")
    return _TCP_OVER_IPV6, struct.pack(
        "!16s16sHH", src6.packed, dst6.packed, source[1], destination[1]
    )


def encode_v2(info: ProxyInfo) -> bytes:
    """The PROXY v2 header (command PROXY) for one partner connection."""
    family, block = _addresses(info.source, info.destination)
    tlvs = b""
    # Peer-controlled strings are admitted only as valid host names, so every
    # TLV is bounded (<= 253 bytes) and no odd byte reaches the pool.
    sni = host_name_or_none(info.sni)
    if sni:
        tlvs += _tlv(PP2_TYPE_AUTHORITY, sni.encode("ascii"))
    client = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN if info.client_cert else 0)
    # verify: 0 means "the client presented a certificate and it was verified".
    verify = 0 if (info.client_cert and info.cert_verified) else 1
    ssl = struct.pack("!BI", client, verify)
    if info.tls_version:
        ssl += _tlv(PP2_SUBTYPE_SSL_VERSION, info.tls_version.encode("ascii"))
    cn = host_name_or_none(info.client_cn, wildcard=True)
    if cn:
        ssl += _tlv(PP2_SUBTYPE_SSL_CN, cn.encode("ascii"))
    tlvs += _tlv(PP2_TYPE_SSL, ssl)
    if info.partner:
        partner = info.partner.encode("utf-8")
        if len(partner) > _MAX_PARTNER_ID or not info.partner.isprintable():
            raise ValueError(f"partner id of {len(partner)} bytes is not a printable folder name")
        tlvs += _tlv(PP2_TYPE_EDGE_PARTNER, partner)
    body = block + tlvs
    if len(body) > _MAX_U16:
        raise ValueError(f"PROXY v2 header body is {len(body)} bytes (max 65535)")
    return SIGNATURE + struct.pack("!BBH", _VERSION_2 | _CMD_PROXY, family, len(body)) + body


def encode_local() -> bytes:
    """A LOCAL header: "this connection is the edge's own" (health checks).

    A member that requires the PROXY protocol on every connection accepts it
    and uses the real connection addresses, as HAProxy's health checks do.
    """
    return SIGNATURE + struct.pack("!BBH", _VERSION_2 | _CMD_LOCAL, _AF_UNSPEC, 0)
