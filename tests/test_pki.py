"""The throwaway PKI builds what it claims: checked with cryptography and OpenSSL."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto

from edge.pki import CA


def _openssl_verify(root: x509.Certificate, chain: tuple[x509.Certificate, ...]) -> None:
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(root))
    untrusted = [crypto.X509.from_cryptography(c) for c in chain[1:]]
    ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(chain[0]), untrusted)
    ctx.verify_certificate()


def test_root_intermediate_leaf_chain_verifies() -> None:
    root = CA.root("Test Root")
    inter = root.intermediate("Test Issuing CA", path_length=0)
    leaf = inter.issue(dns=["sip.fabrikam.com"])
    assert root.chain == ()
    assert inter.chain == (inter.cert,)
    assert leaf.chain == (leaf.cert, inter.cert)
    assert inter.root_cert == root.cert
    _openssl_verify(root.cert, leaf.chain)
    bc = inter.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0


def test_leaf_options() -> None:
    root = CA.root("R")
    leaf = root.issue(
        dns=["a.example"], ips=["10.0.0.1"], uris=["sip:example.com"], eku=("server",)
    )
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example"]
    assert len(san.get_values_for_type(x509.IPAddress)) == 1
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["sip:example.com"]
    eku = leaf.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    bare = root.issue(common_name="cn.example", eku=None, san=False, dns=["x.example"])
    assert not any(
        isinstance(e.value, (x509.SubjectAlternativeName, x509.ExtendedKeyUsage))
        for e in bare.cert.extensions
    )


def test_validity_and_crl() -> None:
    root = CA.root("R")
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    end = dt.datetime(2021, 1, 1, tzinfo=dt.UTC)
    leaf = root.issue(dns=["a.example"], not_before=start, not_after=end)
    assert leaf.cert.not_valid_before_utc == start
    assert leaf.cert.not_valid_after_utc == end
    crl = root.crl([leaf.cert.serial_number])
    assert crl.is_signature_valid(root.key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(leaf.cert.serial_number) is not None


def test_not_a_ca_intermediate() -> None:
    fake = CA.root("R").intermediate("Not a CA", is_ca=False)
    bc = fake.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not bc.ca


def test_write(tmp_path: Path) -> None:
    inter = CA.root("R").intermediate("I")
    leaf = inter.issue(dns=["a.example"])
    cert_path, key_path = leaf.write(tmp_path / "out", "edge")
    assert x509.load_pem_x509_certificates(cert_path.read_bytes()) == list(leaf.chain)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key() == leaf.cert.public_key()
