"""Shared fixtures. Add fixtures; never remove or rename one (other suites use them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

if TYPE_CHECKING:
    from tests.gateway_harness import Pki


@dataclass(frozen=True)
class TLSIdentity:
    """A leaf certificate as a TLS peer presents it: chain (leaf first) and key."""

    chain: list[x509.Certificate]
    key: ec.EllipticCurvePrivateKey
    chain_file: Path
    key_file: Path


@dataclass(frozen=True)
class TLSPKI:
    """trustme material: root -> intermediate -> server and client leaves.

    The server leaf names localhost, 127.0.0.1 and ::1; the client leaf names
    client.partner.example. ``root_file`` is the root in PEM for openssl and ssl.
    """

    root: x509.Certificate
    root_file: Path
    ca: trustme.CA
    server: TLSIdentity
    client: TLSIdentity


def _identity(leaf: trustme.LeafCert, directory: Path, stem: str) -> TLSIdentity:
    chain = [x509.load_pem_x509_certificate(blob.bytes()) for blob in leaf.cert_chain_pems]
    key = load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    chain_file = directory / f"{stem}.pem"
    key_file = directory / f"{stem}.key"
    chain_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_file.write_bytes(leaf.private_key_pem.bytes())
    key_file.chmod(0o600)
    return TLSIdentity(chain, key, chain_file, key_file)


@pytest.fixture(scope="session")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> TLSPKI:
    directory = tmp_path_factory.mktemp("tls-pki")
    ca = trustme.CA()
    issuing = ca.create_child_ca()
    server = issuing.issue_cert("localhost", "127.0.0.1", "::1")
    client = issuing.issue_cert("client.partner.example")
    root_file = directory / "root.pem"
    root_file.write_bytes(ca.cert_pem.bytes())
    return TLSPKI(
        root=x509.load_pem_x509_certificate(ca.cert_pem.bytes()),
        root_file=root_file,
        ca=ca,
        server=_identity(server, directory, "server"),
        client=_identity(client, directory, "client"),
    )


@pytest.fixture(scope="module")
def pki() -> Pki:
    """A federation's PKI for end-to-end tests (edge, enterprise, partners, a stranger)."""
    from tests.gateway_harness import Pki

    return Pki.make()
