"""Throw-away certificate authorities and server certificates for TLS tests."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """A CA that signs server certificates for chosen names.

    With ``parent``, an intermediate CA signed by that one: the certificates
    it issues are written followed by the intermediates above them (a
    "fullchain" file, as certbot writes it).
    """

    def __init__(
        self, name: str = "netlab test CA", parent: CertificateAuthority | None = None
    ) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        #: The intermediate certificates from this CA up to the root's child.
        self.chain: list[x509.Certificate] = []
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(parent.certificate.subject if parent else _name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None), critical=True
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(parent.key if parent else self.key, hashes.SHA256())
        )
        if parent is not None:
            self.chain = [self.certificate, *parent.chain]

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(
        self, directory: Path, names: list[str], stem: str = "server"
    ) -> tuple[Path, Path]:
        """Write a certificate for ``names`` (DNS names or IPs) and its key."""
        key = ec.generate_private_key(ec.SECP256R1())
        alternatives: list[x509.GeneralName] = []
        for name in names:
            try:
                alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternatives.append(x509.DNSName(name))
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        certificate_path = directory / f"{stem}.pem"
        key_path = directory / f"{stem}.key"
        certificate_path.write_bytes(
            b"".join(
                cert.public_bytes(serialization.Encoding.PEM)
                for cert in [certificate, *self.chain]
            )
        )
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return certificate_path, key_path
