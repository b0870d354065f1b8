"""The region's certificate authority and mutual TLS for every internal link (Nitro's
"encrypted by default").

Each component gets a certificate that names its **role** and **cell** in a SAN URI,
``urn:cellcloud:<region>:<role>:<cell>``; both ends of a link check the other's role after the
TLS 1.3 handshake (an agent accepts only frontends and the control plane; a frontend only
routers, dispatchers and the control plane; ...). Keys are ECDSA P-256, made with
``cryptography``; nothing here parses or builds TLS by hand.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROLES = ("router", "frontend", "dispatcher", "control", "agent", "store", "client", "storage",
         "volume")
URN_PREFIX = "urn:cellcloud:"
ca_validity_days = 3650
cert_validity_days = 30
rotate_before_days = 7  # a certificate this close to expiry is replaced at the next start/tick

# Who may call whom (server role -> client roles it accepts). Passive communication: nobody
# accepts a call from an agent.
ACCEPTS: dict[str, frozenset[str]] = {
    # A router only for ``leased_invoke`` (OPS_ALLOWED), on an environment its frontend leased it.
    "agent": frozenset({"frontend", "control", "router"}),
    "frontend": frozenset({"router", "dispatcher", "control"}),
    "dispatcher": frozenset({"control", "client"}),
    "router": frozenset({"control"}),  # its internal port (cell map pushes)
    # operators' CLI, peer control planes; routers for the scheduler, ECS and EC2 APIs only
    # (OPS_ALLOWED)
    "control": frozenset({"client", "control", "router"}),
    "store": frozenset({"store", "client", "control"}),
    # Storage servers (volumes/server.py) answer volume clients (the host-side process that
    # serves a volume's block device) and the control plane; never an agent or a guest.
    "storage": frozenset({"volume", "control"}),
}

# Where a server accepts a role for some of its ops only: (server role, client role) -> ops.
# A router reaches an agent for the warm path (issue #13) and nothing else: it cannot create,
# destroy, attest or read an agent's status; the agent still only answers.
OPS_ALLOWED: dict[tuple[str, str], frozenset[str]] = {
    ("agent", "router"): frozenset({"leased_invoke"}),
    ("control", "router"): frozenset({"scheduler", "ecs", "ec2"}),
}


@dataclass(frozen=True)
class Identity:
    region: str
    role: str
    cell: str


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertificateAuthority:
    """The region CA, kept in ``<state>/pki``: ``ca.pem`` (public) and ``ca.key`` (0600)."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.cert_path = os.path.join(directory, "ca.pem")
        self._key_path = os.path.join(directory, "ca.key")

    @classmethod
    def ensure(cls, directory: str, region: str) -> CertificateAuthority:
        ca = cls(directory)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not os.path.exists(ca.cert_path):
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cellcloud"),
                              x509.NameAttribute(NameOID.COMMON_NAME, f"cellcloud {region} CA")])
            now = _now()
            cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(minutes=5))
                    .not_valid_after(now + datetime.timedelta(days=ca_validity_days))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(
                        digital_signature=True, key_cert_sign=True, crl_sign=True,
                        content_commitment=False, key_encipherment=False,
                        data_encipherment=False, key_agreement=False, encipher_only=False,
                        decipher_only=False), critical=True)
                    .sign(key, hashes.SHA256()))
            _write_private(ca._key_path, _key_pem(key))
            with open(ca.cert_path, "wb") as f:
                f.write(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        with open(self.cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(self._key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def issue(self, ident: Identity, directory: str, *, hosts: tuple[str, ...] = ("127.0.0.1",),
              days: int = cert_validity_days) -> tuple[str, str]:
        """A key and certificate for one component; returns (cert path, key path)."""
        assert ident.role in ROLES, ident
        ca_cert, ca_key = self._load()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(urn(ident)), x509.DNSName("localhost")]
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cellcloud"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ident.role),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"{ident.role}.{ident.cell}")]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([
                    x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                    x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        base = os.path.join(directory, f"{ident.role}")
        _write_private(base + ".key", _key_pem(key))
        with open(base + ".pem.tmp", "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        os.rename(base + ".pem.tmp", base + ".pem")
        return base + ".pem", base + ".key"


def urn(ident: Identity) -> str:
    return f"{URN_PREFIX}{ident.region}:{ident.role}:{ident.cell}"


def needs_rotation(cert_path: str, now: datetime.datetime | None = None) -> bool:
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return True
    now = now or _now()
    return cert.not_valid_after_utc - now < datetime.timedelta(days=rotate_before_days)


def identity_of(peercert: dict[str, Any] | None) -> Identity | None:
    """The role and cell in a peer certificate (as ``ssl`` reports it), or None."""
    if not peercert:
        return None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "URI" and value.startswith(URN_PREFIX):
            parts = value[len(URN_PREFIX):].split(":")
            if len(parts) == 3 and parts[1] in ROLES:
                return Identity(parts[0], parts[1], parts[2])
    return None


@dataclass
class TlsConfig:
    """What a component needs to speak mTLS: its identity's files and the CA."""

    ca_path: str
    cert_path: str
    key_path: str
    region: str

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(self.ca_path)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # The peer is identified by the role in its certificate, checked after the handshake;
        # the chain is still verified against the region CA.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(self.ca_path)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    def reload(self, ctx: ssl.SSLContext) -> None:
        """Rotation: new connections present the new certificate; open ones are untouched."""
        ctx.load_cert_chain(self.cert_path, self.key_path)


def tls_config(state_dir: str, region: str, role: str, cell: str, name: str) -> TlsConfig:
    """Issue (or reuse, until it nears expiry) the certificate of one component."""
    ca = CertificateAuthority.ensure(os.path.join(state_dir, "pki"), region)
    directory = os.path.join(state_dir, "pki", name)
    cert, key = os.path.join(directory, f"{role}.pem"), os.path.join(directory, f"{role}.key")
    if needs_rotation(cert):
        cert, key = ca.issue(Identity(region, role, cell), directory)
    return TlsConfig(ca.cert_path, cert, key, region)


def peer_check(region: str, roles: frozenset[str] | set[str]) -> Any:
    """A transport peer check: the certificate is from this region's CA (the TLS layer checked
    the chain) and names one of ``roles``."""

    def check(peercert: Any) -> bool:
        ident = identity_of(peercert)
        return ident is not None and ident.region == region and ident.role in roles

    return check
