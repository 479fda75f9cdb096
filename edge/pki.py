"""A throwaway PKI: root and intermediate CAs, leaf certificates and CRLs.

Owns: building real X.509 material with `cryptography` for tests, `edge demo`
and the benchmarks (ECDSA P-256, SHA-256 signatures), so that every test
exercises genuine certificates rather than mocks.

Must never: be used to issue production certificates (keys live only in
memory or in files the caller chose, with no protection beyond mode 0600), do
network or socket I/O, or import trio. Nothing in the gateway's decision path
imports this module.

Shapes:
- `CA.root(...)` makes a self-signed root; `ca.intermediate(...)` a sub-CA.
- `ca.issue(...)` makes a `Leaf` whose `chain` is leaf first, then the
  intermediates, never the root: exactly what a TLS peer sends.
- `ca.crl(...)` makes a CRL signed by that CA.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA", "Leaf", "PrivateKey", "certs_pem", "write_private"]

PrivateKey = ec.EllipticCurvePrivateKey

_DEFAULT_BACKDATE = _dt.timedelta(hours=1)
_DEFAULT_LIFETIME = _dt.timedelta(days=365)

_EKU_NAMES: dict[str, x509.ObjectIdentifier] = {
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
}


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _validity(
    not_before: _dt.datetime | None, not_after: _dt.datetime | None
) -> tuple[_dt.datetime, _dt.datetime]:
    """Defaults: now-1h .. now+365d; a default never contradicts the explicit bound
    (an expired certificate asked for with only `not_after` still has a valid range)."""
    now = _now()
    if not_before is None:
        not_before = now - _DEFAULT_BACKDATE
        if not_after is not None and not_after <= not_before:
            not_before = not_after - _DEFAULT_LIFETIME
    if not_after is None:
        not_after = now + _DEFAULT_LIFETIME
        if not_after <= not_before:
            not_after = not_before + _DEFAULT_LIFETIME
    return not_before, not_after


def _new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge throwaway PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def certs_pem(certs: Sequence[x509.Certificate]) -> bytes:
    """Concatenated PEM of `certs`, in order."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path`, created with mode 0600 from the start (no window
    in which another user could read a freshly written key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


class Leaf:
    """An end-entity certificate, its private key and the chain a peer would send."""

    def __init__(
        self, cert: x509.Certificate, key: PrivateKey, chain: tuple[x509.Certificate, ...]
    ) -> None:
        self.cert = cert
        self.key = key
        # Leaf first, then intermediates; never the root.
        self.chain = chain

    def __repr__(self) -> str:
        return f"Leaf(subject={self.cert.subject.rfc4514_string()!r})"

    def chain_pem(self) -> bytes:
        """Leaf then intermediates, PEM."""
        return certs_pem(self.chain)

    def key_pem(self) -> bytes:
        """The private key, PKCS#8 PEM, unencrypted."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write `STEM.pem` (chain) and `STEM.key` (mode 0600); return both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"{stem}.pem"
        key_path = directory / f"{stem}.key"
        cert_path.write_bytes(self.chain_pem())
        write_private(key_path, self.key_pem())
        return cert_path, key_path


class CA:
    """A certificate authority that can issue sub-CAs, leaves and CRLs."""

    def __init__(
        self,
        cert: x509.Certificate,
        key: PrivateKey,
        chain: tuple[x509.Certificate, ...],
        root: x509.Certificate,
    ) -> None:
        self.cert = cert
        self.key = key
        # This CA then its issuing intermediates, root excluded (empty for a root).
        self.chain = chain
        # The self-signed trust anchor at the top of this CA's path.
        self.root_cert = root

    def __repr__(self) -> str:
        return f"CA(subject={self.cert.subject.rfc4514_string()!r})"

    @classmethod
    def root(
        cls,
        common_name: str,
        *,
        not_before: _dt.datetime | None = None,
        not_after: _dt.datetime | None = None,
        path_length: int | None = None,
    ) -> CA:
        """A self-signed root CA."""
        key = _new_key()
        start, end = _validity(not_before, not_after)
        name = _name(common_name)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, (), cert)

    def _builder(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        not_before: _dt.datetime | None,
        not_after: _dt.datetime | None,
    ) -> x509.CertificateBuilder:
        start, end = _validity(not_before, not_after)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )

    def intermediate(
        self,
        common_name: str,
        *,
        not_before: _dt.datetime | None = None,
        not_after: _dt.datetime | None = None,
        path_length: int | None = None,
        is_ca: bool = True,
    ) -> CA:
        """A sub-CA signed by this CA. `is_ca=False` builds a broken "intermediate"
        whose basicConstraints say it is not a CA (for negative tests)."""
        key = _new_key()
        builder = self._builder(_name(common_name), key.public_key(), not_before, not_after)
        builder = builder.add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=path_length if is_ca else None),
            critical=True,
        )
        if is_ca:
            builder = builder.add_extension(_ca_key_usage(), critical=True)
        cert = builder.sign(self.key, hashes.SHA256())
        return CA(cert, key, (cert, *self.chain), self.root_cert)

    def issue(
        self,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        uris: Sequence[str] = (),
        common_name: str | None = None,
        eku: Sequence[str] | None = ("client", "server"),
        not_before: _dt.datetime | None = None,
        not_after: _dt.datetime | None = None,
        san: bool = True,
        crl_url: str | None = None,
    ) -> Leaf:
        """An end-entity certificate.

        `eku` names purposes ("client", "server"); None leaves the extension out.
        `san=False` leaves the subjectAltName extension out even if names are
        given (a CN-only certificate); with no names at all there is no SAN either.
        `crl_url` adds a CRL distribution point (the issuer's CRL, over HTTP).
        """
        key = _new_key()
        if common_name is None:
            common_name = dns[0] if dns else (ips[0] if ips else "leaf")
        builder = self._builder(_name(common_name), key.public_key(), not_before, not_after)
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        if san and names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if crl_url is not None:
            builder = builder.add_extension(_crl_distribution(crl_url), critical=False)
        if eku is not None:
            try:
                oids = [_EKU_NAMES[e] for e in eku]
            except KeyError as exc:
                raise ValueError(
                    f"unknown EKU name {exc.args[0]!r}; use 'client' or 'server'"
                ) from None
            builder = builder.add_extension(x509.ExtendedKeyUsage(oids), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Leaf(cert, key, (cert, *self.chain))

    def crl(
        self,
        revoked_serials: Sequence[int] = (),
        *,
        last_update: _dt.datetime | None = None,
        next_update: _dt.datetime | None = None,
    ) -> x509.CertificateRevocationList:
        """A CRL signed by this CA. Defaults: issued an hour ago, valid for 7 days."""
        now = _now()
        last = last_update if last_update is not None else now - _DEFAULT_BACKDATE
        nxt = next_update if next_update is not None else now + _dt.timedelta(days=7)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(last)
            .next_update(nxt)
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build()
            )
        return builder.sign(self.key, hashes.SHA256())

    def cert_pem(self) -> bytes:
        """This CA's certificate, PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _crl_distribution(url: str) -> x509.CRLDistributionPoints:
    """A CRL distribution point: where the issuer's CRL can be fetched."""
    point = x509.DistributionPoint(
        full_name=[x509.UniformResourceIdentifier(url)],
        relative_name=None,
        reasons=None,
        crl_issuer=None,
    )
    return x509.CRLDistributionPoints([point])


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
