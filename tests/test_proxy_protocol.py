"""PROXY v2 headers: our encoder, read back by an independent decoder.

The decoder is the ``proxy-protocol`` package from PyPI (``proxyprotocol``),
which knows the specification's TLV types, including PP2_TYPE_SSL with its
client/verify prefix and sub-TLVs; every field is checked one by one.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal
from proxyprotocol.tlv import ProxyProtocolSSLTLV
from proxyprotocol.v2 import ProxyProtocolV2

from edge.core.policies import load_policies
from edge.core.proxy_protocol import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_EDGE_PARTNER,
    PP2_TYPE_SSL,
    SIGNATURE,
    ProxyInfo,
    authorized_identity,
    encode_local,
    encode_v2,
    host_name_or_none,
)
from edge.core.reasons import Reason
from edge.core.trust import PartnerTrust, Verdict
from edge.pki import CA, Leaf

INFO = ProxyInfo(
    source=("192.0.2.10", 40123),
    destination=("198.51.100.7", 5061),
    sni="edge.contoso.example",
    tls_version="TLSv1.3",
    client_cn="sip.fabrikam.com",
    partner="fabrikam.com",
    client_cert=True,
    cert_verified=True,
)


def test_ipv4_header_decoded_field_by_field() -> None:
    header = encode_v2(INFO)
    assert header.startswith(SIGNATURE)
    assert header[12] == 0x21  # version 2, PROXY
    assert header[13] == 0x11  # TCP over IPv4
    assert struct.unpack("!H", header[14:16])[0] == len(header) - 16
    result = ProxyProtocolV2().unpack(header)
    assert isinstance(result, ProxyResultIPv4)
    assert result.proxied
    assert result.protocol == socket.SOCK_STREAM
    assert result.source == (IPv4Address("192.0.2.10"), 40123)
    assert result.dest == (IPv4Address("198.51.100.7"), 5061)
    tlv = result.tlv
    assert set(tlv) == {PP2_TYPE_AUTHORITY, PP2_TYPE_SSL, PP2_TYPE_EDGE_PARTNER}
    assert tlv.authority == "edge.contoso.example"
    assert tlv[PP2_TYPE_EDGE_PARTNER] == b"fabrikam.com"
    ssl = tlv.ssl
    assert ssl.client == PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN
    assert ssl.has_ssl and ssl.has_cert_conn and not ssl.has_cert_sess
    assert ssl.verify == 0 and ssl.verified
    assert ssl.version == "TLSv1.3"
    assert ssl.cn == "sip.fabrikam.com"
    assert set(ssl) == {PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CN}


def test_ipv6_and_mixed_families() -> None:
    info = ProxyInfo(source=("2001:db8::1", 1), destination=("2001:db8::2", 65535))
    result = ProxyProtocolV2().unpack(encode_v2(info))
    assert isinstance(result, ProxyResultIPv6)
    assert result.source == (IPv6Address("2001:db8::1"), 1)
    assert result.dest == (IPv6Address("2001:db8::2"), 65535)
    # A dual-stack listener: IPv4 partner, IPv6 local address -> v4-mapped.
    mixed = ProxyInfo(source=("192.0.2.1", 7), destination=("::1", 8))
    result = ProxyProtocolV2().unpack(encode_v2(mixed))
    assert isinstance(result, ProxyResultIPv6)
    assert result.source == (IPv6Address("::ffff:192.0.2.1"), 7)


def test_tls_listener_without_client_certificate() -> None:
    info = ProxyInfo(source=("127.0.0.1", 1), destination=("127.0.0.1", 2), tls_version="TLSv1.2")
    result = ProxyProtocolV2().unpack(encode_v2(info))
    tlv = result.tlv
    assert tlv.authority is None  # no SNI sent: no AUTHORITY TLV
    assert PP2_TYPE_EDGE_PARTNER not in tlv
    ssl = tlv.ssl
    assert ssl.has_ssl and not ssl.has_cert_conn
    assert ssl.verify == 1 and not ssl.verified  # no certificate: nothing verified
    assert ssl.version == "TLSv1.2"
    assert ssl.cn is None


def test_local_header_for_health_checks() -> None:
    header = encode_local()
    assert header == SIGNATURE + b"\x20\x00\x00\x00"
    result = ProxyProtocolV2().unpack(header)
    assert isinstance(result, ProxyResultLocal)
    assert not result.proxied


def test_utf8_partner_but_only_host_names_as_cn() -> None:
    info = ProxyInfo(
        source=("127.0.0.1", 1),
        destination=("127.0.0.1", 2),
        client_cn="Zürich Gateway",
        partner="bücher.example",
        client_cert=True,
        cert_verified=True,
    )
    tlv = ProxyProtocolV2().unpack(encode_v2(info)).tlv
    assert tlv[PP2_TYPE_EDGE_PARTNER].decode() == "bücher.example"
    ssl = ProxyProtocolSSLTLV(tlv[PP2_TYPE_SSL])
    assert ssl.cn is None and ssl.verified  # not a host name: left out, not repaired


@pytest.mark.parametrize(
    "hostile",
    [
        "sip.fabrikam.com\x00.evil",
        "sip.fabrikam.com\r\nX-Injected: 1",
        "a" * 65_500,
        ("a" * 63 + ".") * 4 + "com",  # 256 bytes: longer than a DNS name can be
        "-sip.fabrikam.com",
        "sip..fabrikam.com",
        "sip fabrikam com",
        "bücher.example",  # U-label: SNI carries A-labels (RFC 6066)
    ],
)
def test_peer_strings_are_bounded_and_clean(hostile: str) -> None:
    info = ProxyInfo(
        source=("127.0.0.1", 1),
        destination=("127.0.0.1", 2),
        sni=hostile,
        client_cn=hostile,
        client_cert=True,
        cert_verified=True,
    )
    header = encode_v2(info)  # never an exception (the 65,500-byte CN overflowed)
    assert len(header) < 100
    tlv = ProxyProtocolV2().unpack(header).tlv
    assert tlv.authority is None
    assert tlv.ssl.cn is None


def test_host_names_normalized() -> None:
    assert host_name_or_none("SIP.Fabrikam.COM.") == "sip.fabrikam.com"
    assert host_name_or_none("*.fabrikam.com") is None
    assert host_name_or_none("*.fabrikam.com", wildcard=True) == "*.fabrikam.com"
    assert host_name_or_none("a" * 63 + ".example") == "a" * 63 + ".example"
    assert host_name_or_none("a" * 64 + ".example") is None
    assert host_name_or_none(None) is None


def _partner_verdict(tmp_path: Path, leaf: Leaf, root: CA) -> Verdict:
    folder = tmp_path / "fabrikam.com"
    folder.mkdir()
    (folder / "root.pem").write_bytes(root.cert_pem())
    return PartnerTrust(load_policies(tmp_path)).verify_client(leaf.chain)


def test_ssl_cn_is_the_authorized_san_not_the_raw_cn(tmp_path: Path) -> None:
    root = CA.root("Fabrikam Root")
    # The partner CA put another company's name in the CN (issue 15).
    leaf = root.issue(dns=["sip.fabrikam.com"], common_name="sip.litware.com")
    verdict = _partner_verdict(tmp_path, leaf, root)
    assert verdict.accepted, verdict.line
    cn, authority = authorized_identity(verdict, "Edge.Contoso.Example")
    assert (cn, authority) == ("sip.fabrikam.com", "edge.contoso.example")
    info = ProxyInfo(
        source=("127.0.0.1", 1),
        destination=("127.0.0.1", 2),
        sni=authority,
        client_cn=cn,
        partner=verdict.partner,
        client_cert=True,
        cert_verified=True,
    )
    ssl = ProxyProtocolV2().unpack(encode_v2(info)).tlv.ssl
    assert ssl.cn == "sip.fabrikam.com" and ssl.verified


def test_ssl_cn_from_a_sip_uri_san(tmp_path: Path) -> None:
    root = CA.root("Fabrikam Root")
    leaf = root.issue(uris=["sip:Fabrikam.com"], common_name="whatever\r\n")
    verdict = _partner_verdict(tmp_path, leaf, root)
    assert verdict.accepted, verdict.line
    assert authorized_identity(verdict, None) == ("fabrikam.com", None)


def test_rejected_verdict_carries_no_identity(tmp_path: Path) -> None:
    root = CA.root("Fabrikam Root")
    leaf = root.issue(dns=["sip.litware.com"])
    verdict = _partner_verdict(tmp_path, leaf, root)
    assert verdict.reason is Reason.NAME_MISMATCH
    assert authorized_identity(verdict, "sip\x00bad") == (None, None)


def test_oversized_values_are_refused_not_truncated() -> None:
    with pytest.raises(ValueError, match="partner id"):
        encode_v2(
            ProxyInfo(source=("127.0.0.1", 1), destination=("127.0.0.1", 2), partner="p" * 300)
        )
    with pytest.raises(ValueError, match="port"):
        encode_v2(ProxyInfo(source=("127.0.0.1", 70000), destination=("127.0.0.1", 2)))


def test_unparsable_addresses_become_unspec() -> None:
    header = encode_v2(ProxyInfo(source=("", 0), destination=("", 0), partner="p"))
    assert header[13] == 0x00
    # UNSPEC family: receivers ignore the (absent) address block; TLVs follow.
    assert header[16:19] == bytes([PP2_TYPE_SSL]) + struct.pack("!H", 5)
