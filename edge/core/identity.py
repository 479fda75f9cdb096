"""The edge's own identity in `edge.toml`: certificates, keys, PKCS#12, passphrases.

Owns `Identity` (the public chain shown to partners, the internal chain shown
to the pool, their keys, the internal roots) and `IdentityReader`, which reads
`[identity]`: PEM/DER chains in order, private keys (encrypted ones with
``*_passphrase_file``), PKCS#12 (``*_pkcs12``, what Windows and Lync admins
export), each key checked against its certificate; and ``key_file_warnings``
(key files other users can read). `edge.core.config` re-exports all of it.

Must never: put key or passphrase bytes in a message or a repr (parser
messages about keys are not echoed), or keep a passphrase (only its file's
path, so a change is noticed).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from edge.core import schema
from edge.core.pem import load_certificates, load_private_key
from edge.core.toml_tables import TableReader, shown

__all__ = ["IDENTITY_KEYS", "Identity", "IdentityReader", "PrivateKey", "key_file_warnings"]

# Key types a TLS server or client certificate can use with pyOpenSSL.
PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

IDENTITY_KEYS = schema.key_names("identity")


@dataclass(frozen=True, kw_only=True)
class Identity:
    """The edge's own certificates: public (shown to partners), internal (to the pool)."""

    # With `<side>_pkcs12`, `<side>_cert` and `<side>_key` are both that file.
    public_cert: Path
    public_key: Path
    internal_cert: Path
    internal_key: Path
    internal_roots: tuple[Path, ...]
    public_chain: tuple[x509.Certificate, ...]  # leaf first
    public_private_key: PrivateKey = field(repr=False, compare=False)
    internal_chain: tuple[x509.Certificate, ...]  # leaf first
    internal_private_key: PrivateKey = field(repr=False, compare=False)
    # CAs that issue pool members' certificates.
    internal_root_certs: tuple[x509.Certificate, ...]
    # Files holding key passphrases (watched for changes like the keys; the
    # passphrases themselves are not kept).
    passphrase_files: tuple[Path, ...] = ()


class IdentityReader(TableReader):
    """Reads `[identity]` (a part of the configuration loader)."""

    def certificates(self, key: str, path: Path, data: bytes) -> tuple[x509.Certificate, ...]:
        try:
            certs = load_certificates(data)
        except ValueError:
            self.problem(key, f"{path}: no readable certificate (expected PEM or DER)")
            return ()
        return certs

    def chain(self, key: str, raw: str) -> tuple[Path, tuple[x509.Certificate, ...]]:
        path, data = self.file(key, raw)
        if data is None:
            return path, ()
        certs = self.certificates(key, path, data)
        for index, (cert, issuer) in enumerate(itertools.pairwise(certs)):
            if cert.issuer != issuer.subject:
                self.problem(
                    key,
                    f"{path}: certificate #{index + 2} ({issuer.subject.rfc4514_string()}) "
                    f"did not issue certificate #{index + 1} (issuer "
                    f"{cert.issuer.rfc4514_string()}); list the leaf first, then its issuers",
                )
                break
        return path, certs

    def passphrase(self, table: Mapping[str, Any], key: str) -> bytes | None:
        """The passphrase in the file named by ``identity.<key>`` (None: key not set).

        One trailing newline is dropped (``echo secret > file`` writes one). The
        passphrase itself never goes into a message.
        """
        raw = self.string(table, key, "identity.", required=False)
        if raw is None:
            return None
        _, data = self.file(f"identity.{key}", raw)
        if data is None:
            return None
        if data.endswith(b"\r\n"):
            return data[:-2]
        return data[:-1] if data.endswith(b"\n") else data

    def checked_key(
        self, key: str, path: Path, loaded: object, cert_key: str, leaf: x509.Certificate | None
    ) -> PrivateKey | None:
        if not isinstance(
            loaded,
            rsa.RSAPrivateKey
            | ec.EllipticCurvePrivateKey
            | ed25519.Ed25519PrivateKey
            | ed448.Ed448PrivateKey,
        ):
            self.problem(key, f"{path}: unsupported key type {type(loaded).__name__}")
            return None
        if leaf is not None and loaded.public_key() != leaf.public_key():
            self.problem(
                key,
                f"{path}: does not match the certificate in {cert_key} "
                f"({leaf.subject.rfc4514_string()})",
            )
            return None
        return loaded

    def private_key(
        self,
        key: str,
        raw: str,
        cert_key: str,
        chain: tuple[x509.Certificate, ...],
        passphrase: bytes | None = None,
    ) -> tuple[Path, PrivateKey | None]:
        path, data = self.file(key, raw)
        if data is None:
            return path, None
        # Parser messages are not echoed: never risk quoting key bytes to an operator.
        try:
            try:
                loaded: object = load_private_key(data, passphrase)
            except TypeError:
                if passphrase is None:
                    self.problem(
                        key,
                        f"{path}: the key is encrypted; name its passphrase file in "
                        f"{key}_passphrase_file (or give an unencrypted PKCS#8 key)",
                    )
                    return path, None
                loaded = load_private_key(data)  # a passphrase for a plain key: harmless
        except (ValueError, UnsupportedAlgorithm):
            if passphrase is not None:
                self.problem(
                    key,
                    f"{path}: cannot decrypt the key: wrong passphrase in "
                    f"{key}_passphrase_file, or not a private key",
                )
            else:
                self.problem(key, f"{path}: no readable private key (expected PEM or DER)")
            return path, None
        return path, self.checked_key(key, path, loaded, cert_key, chain[0] if chain else None)

    def pkcs12(
        self, key: str, raw: str, passphrase: bytes | None
    ) -> tuple[Path, tuple[x509.Certificate, ...], PrivateKey | None]:
        """Certificate, its chain and its key from one PKCS#12 (.pfx/.p12) file."""
        path, data = self.file(key, raw)
        if data is None:
            return path, (), None
        try:
            loaded, cert, extra = pkcs12.load_key_and_certificates(data, passphrase)
        except (ValueError, UnsupportedAlgorithm, TypeError):
            how = f"wrong passphrase in {key}_passphrase_file" if passphrase else "no passphrase"
            self.problem(key, f"{path}: cannot read the PKCS#12 file ({how}, or not PKCS#12)")
            return path, (), None
        if cert is None or loaded is None:
            missing = "certificate" if cert is None else "private key"
            self.problem(key, f"{path}: the PKCS#12 file holds no {missing}")
            return path, (), None
        # The file's other certificates come in any order: keep those that
        # chain from the leaf, leaf first, as a PEM chain file would list them.
        chain = [cert]
        rest = list(extra)
        while rest and chain[-1].issuer != chain[-1].subject:
            issuer = next((c for c in rest if c.subject == chain[-1].issuer), None)
            if issuer is None:
                break
            chain.append(issuer)
            rest.remove(issuer)
        return path, tuple(chain), self.checked_key(key, path, loaded, key, cert)

    def key_pair(
        self, table: Mapping[str, Any], side: str
    ) -> tuple[Path, Path, tuple[x509.Certificate, ...], PrivateKey | None]:
        """One side's (``public``/``internal``) certificate chain and key, from
        ``<side>_cert`` + ``<side>_key`` or from ``<side>_pkcs12``."""
        p12_key = f"{side}_pkcs12"
        if p12_key in table:
            for other in (f"{side}_cert", f"{side}_key", f"{side}_key_passphrase_file"):
                if other in table:
                    self.problem(
                        f"identity.{other}",
                        f"give either {side}_cert and {side}_key, or {p12_key}, not both",
                    )
            raw = self.string(table, p12_key, "identity.")
            secret = self.passphrase(table, f"{p12_key}_passphrase_file")
            if raw is None:
                return Path(), Path(), (), None
            path, chain, loaded = self.pkcs12(f"identity.{p12_key}", raw, secret)
            return path, path, chain, loaded
        if f"{p12_key}_passphrase_file" in table:
            self.problem(f"identity.{p12_key}_passphrase_file", f"only used with {p12_key}")
        cert_raw = self.string(table, f"{side}_cert", "identity.")
        key_raw = self.string(table, f"{side}_key", "identity.")
        secret = self.passphrase(table, f"{side}_key_passphrase_file")
        cert_path, chain = (
            self.chain(f"identity.{side}_cert", cert_raw) if cert_raw else (Path(), ())
        )
        key_path, loaded = (
            self.private_key(
                f"identity.{side}_key", key_raw, f"identity.{side}_cert", chain, secret
            )
            if key_raw
            else (Path(), None)
        )
        return cert_path, key_path, chain, loaded

    def identity(self, data: Mapping[str, Any]) -> Identity | None:
        table = self.table(data, "identity", required=True)
        if table is None:
            return None
        self.unknown_keys(table, IDENTITY_KEYS, "identity.")
        public_cert, public_key_path, public_chain, public_key = self.key_pair(table, "public")
        internal_cert, internal_key_path, internal_chain, internal_key = self.key_pair(
            table, "internal"
        )
        root_paths, roots = self.internal_roots(table)
        if (
            not public_chain
            or public_key is None
            or not internal_chain
            or internal_key is None
            or not roots
        ):
            return None
        secrets = tuple(
            self.base / str(table[k])
            for k in IDENTITY_KEYS
            if k.endswith("passphrase_file")
            if isinstance(table.get(k), str)
        )
        return Identity(
            public_cert=public_cert,
            public_key=public_key_path,
            internal_cert=internal_cert,
            internal_key=internal_key_path,
            internal_roots=root_paths,
            public_chain=public_chain,
            public_private_key=public_key,
            internal_chain=internal_chain,
            internal_private_key=internal_key,
            internal_root_certs=roots,
            passphrase_files=secrets,
        )

    def internal_roots(
        self, table: Mapping[str, Any]
    ) -> tuple[tuple[Path, ...], tuple[x509.Certificate, ...]]:
        key = "identity.internal_roots"
        if "internal_roots" not in table:
            self.problem(key, "missing (required): the CA files that issue pool members' certs")
            return (), ()
        value = table["internal_roots"]
        if isinstance(value, str):
            value = [value]  # a single file is an obvious intent; accept it
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problem(key, f"must be a list of file names, not {shown(value)}")
            return (), ()
        if not value:
            self.problem(key, "must name at least one CA file")
            return (), ()
        paths: list[Path] = []
        roots: list[x509.Certificate] = []
        for raw in value:
            path, data = self.file(key, raw)
            paths.append(path)
            if data is None:
                continue
            for cert in self.certificates(key, path, data):
                try:
                    is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
                except x509.ExtensionNotFound:
                    is_ca = False
                if not is_ca:
                    self.problem(
                        key,
                        f"{path}: {cert.subject.rfc4514_string()} is not a CA certificate",
                    )
                    continue
                roots.append(cert)
        return tuple(paths), tuple(roots)


def key_file_warnings(identity: Identity | None) -> list[str]:
    """Private key (and passphrase) files that other users can read, or a group write."""
    if identity is None:
        return []
    files = dict.fromkeys([identity.public_key, identity.internal_key, *identity.passphrase_files])
    out = []
    for path in files:
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            continue  # already reported when it was read
        # Group read is allowed (a Kubernetes fsGroup, a dedicated group);
        # anyone else reading, or a group writing, is not.
        if mode & 0o027:
            out.append(
                f"{path}: private key file is open to other users (mode {mode:04o}); "
                "run chmod 600 (or 640 with a group only the edge is in)"
            )
    return out
