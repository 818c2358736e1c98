"""Certificates and keys for a deployment, made with the ``cryptography`` package.

``make_certs(folder, hosts, devices)`` writes (and reuses what is already there):

- ``ca.crt`` / ``ca.key``: a certificate authority of this deployment (EC P-384). Devices
  get ``ca.crt`` to check the SuperLink; ``ca.key`` stays on the machine that signs.
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for
  the addresses it serves (IP addresses and DNS names in its subjectAltName).
- ``devices/<name>`` / ``devices/<name>.pub``: one key pair per device in the OpenSSH format
  that Flower's SuperNode authentication reads (NIST P-384); the ``.pub`` file is what the
  SuperLink's operator registers.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEVICES = "devices"


class CertError(ValueError):
    """Bad input to ``umbel certs`` (an unusable host or device name)."""


def _write_secret(path: Path, data: bytes) -> None:
    """Private keys: readable by their owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in " /:"):
                raise CertError(f"--host {host!r}: expected an IP address or a DNS name") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: str, public_key, issuer: str, signer, days: int, ca: bool,
                 san: x509.SubjectAlternativeName | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(signer, hashes.SHA384())


def make_certs(
    folder: str | Path, hosts: list[str] = ("127.0.0.1", "localhost"),
    devices: list[str] = (), days: int = 365, new_server: bool = False,
) -> dict[str, list[Path]]:
    """Make the missing pieces of a deployment's certificates (see the module doc); returns
    the files written, and the ones kept, by kind. ``new_server`` re-issues the server
    certificate (e.g. for other hosts); the CA and existing device keys are never replaced."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in devices:
        if not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise CertError(f"--device {name!r}: use letters, digits, '-' or '_'")
    san = _san(list(hosts))
    written: dict[str, list[Path]] = {"written": [], "kept": []}
    ca_cert, ca_key = folder / CA_CERT, folder / CA_KEY
    if ca_cert.exists() and ca_key.exists():
        key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        written["kept"] += [ca_cert, ca_key]
    else:
        key = _new_key()
        cert = _certificate("umbel deployment CA", key.public_key(), "umbel deployment CA",
                            key, days, ca=True)
        _write_secret(ca_key, _pem_key(key))
        ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        written["written"] += [ca_cert, ca_key]
        new_server = True  # a new CA invalidates any old server certificate
    server_cert, server_key = folder / SERVER_CERT, folder / SERVER_KEY
    if new_server or not server_cert.exists():
        skey = _new_key()
        scert = _certificate(hosts[0], skey.public_key(), "umbel deployment CA", key, days,
                             ca=False, san=san)
        _write_secret(server_key, _pem_key(skey))
        server_cert.write_bytes(scert.public_bytes(serialization.Encoding.PEM))
        written["written"] += [server_cert, server_key]
    else:
        written["kept"] += [server_cert, server_key]
    for name in devices:
        private, public = folder / DEVICES / name, folder / DEVICES / f"{name}.pub"
        if private.exists():
            written["kept"] += [private, public]
            continue
        dkey = _new_key()
        _write_secret(private, dkey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()))
        public.write_bytes(dkey.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
        written["written"] += [private, public]
    return written
