"""Attestation (the Nitro Enclaves idea): what exactly runs in an environment, measured and
signed by the host agent, checkable offline by anyone who holds the region CA certificate.

Measurements are PCR-like SHA-256 digests: ``runtime`` (the interpreter and cellcloud's guest
code), ``bundle`` and each of ``layers`` (a canonical walk of the unpacked tree: paths, modes,
contents), ``config`` (the function configuration that shapes behaviour). The document is
canonical JSON signed with the agent's ECDSA key; the agent's certificate, issued by the region
CA and naming the role ``agent``, travels inside it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import sys
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import pki

DOC_VERSION = 1
_CHUNK = 1 << 20


class AttestationError(Exception):
    pass


def measure_tree(root: str) -> str:
    """SHA-256 over a canonical walk: sorted relative paths, type, mode bits, content."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames) + [d + "/" for d in dirnames]:
            path = os.path.join(dirpath, name.rstrip("/"))
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            h.update(f"{rel}\0{stat.S_IFMT(st.st_mode):o}\0{stat.S_IMODE(st.st_mode):o}\0".encode())
            if stat.S_ISREG(st.st_mode):
                fh = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        fh.update(chunk)
                h.update(fh.digest())
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
    return h.hexdigest()


def measure_runtime(runtime_argv: list[str]) -> str:
    """The interpreter that runs the function and the cellcloud code inside the environment."""
    h = hashlib.sha256()
    exe = runtime_argv[0] if runtime_argv and runtime_argv[0] != "bootstrap" else sys.executable
    h.update(os.path.realpath(exe).encode())
    h.update(f"{sys.version}\0".encode())
    sandbox = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sandbox")
    for name in ("guest.py", "pyruntime.py", "runtime_api.py", "extensions.py"):
        with open(os.path.join(sandbox, name), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    # A runtime client script the interpreter runs (the Node runtime's runtime.cjs).
    for arg in runtime_argv[1:]:
        if arg.startswith(sandbox + os.sep) and os.path.isfile(arg) and not arg.endswith(".py"):
            with open(arg, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def measure_config(config: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(config)).hexdigest()


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign(body: dict[str, Any], cert_path: str, key_path: str) -> dict[str, Any]:
    """Sign a document body with the agent's key; the result carries the agent certificate."""
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    with open(cert_path) as f:
        cert_pem = f.read()
    doc = {"version": DOC_VERSION, **body, "certificate": cert_pem}
    sig = key.sign(_canonical(doc), ec.ECDSA(hashes.SHA256()))
    return {**doc, "signature": base64.b64encode(sig).decode()}


def verify(doc: dict[str, Any], ca_pem: bytes, *, nonce: str | None = None,
           expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a document offline: chain to the region CA, role ``agent``, signature, and the
    optional nonce and expected measurements. Returns the measurements; raises otherwise."""
    try:
        body = {k: v for k, v in doc.items() if k != "signature"}
        sig = base64.b64decode(doc["signature"])
        cert = x509.load_pem_x509_certificate(doc["certificate"].encode())
        ca = x509.load_pem_x509_certificate(ca_pem)
    except (KeyError, ValueError, TypeError) as e:
        raise AttestationError(f"malformed attestation document: {e}") from e
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise AttestationError("the agent certificate is not issued by this CA") from e
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    idents = [pki.identity_of({"subjectAltName": [("URI", u)]})
              for u in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    if not any(i is not None and i.role == "agent" for i in idents):
        raise AttestationError("the document is not signed by an agent")
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    try:
        pub.verify(sig, _canonical(body), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as e:
        raise AttestationError("bad signature: the document was altered") from e
    if nonce is not None and doc.get("nonce") != nonce:
        raise AttestationError("the document is not bound to the expected nonce")
    measurements: dict[str, Any] = doc["measurements"]
    for key, value in (expect or {}).items():
        if measurements.get(key) != value:
            raise AttestationError(f"measurement {key} differs: {measurements.get(key)} != {value}")
    return measurements
