"""TLS files checked before gRPC takes them.

gRPC accepts a certificate and a private key that do not belong together and fails only
later: the worker's bind then reads as "the port is in use", and an edge's mTLS
handshake fails on its first request. Python's own `ssl` loads the pair at once and says
what is wrong, so both sides check their pair with it at start-up.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path


class TlsError(ValueError):
    """A certificate or key that cannot be used, with the reason."""


def check_pem(data: bytes, what: str, marker: bytes, where: str) -> None:
    """Refuse anything that is not a PEM block of this kind (`marker`, e.g. b"CERTIFICATE-----")."""
    if b"-----BEGIN" not in data or marker not in data:
        raise TlsError(f"{where}: not a PEM {what} (no '-----BEGIN ...{marker.decode()}' block)")


def check_key_pair(cert: bytes, key: bytes, *, where: str) -> None:
    """Refuse a certificate chain and private key (PEM bytes) that TLS cannot use together:
    not PEM, unreadable, or a key that does not belong to the certificate."""
    check_pem(cert, "certificate", b"CERTIFICATE-----", where)
    check_pem(key, "private key", b"PRIVATE KEY-----", where)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # ssl loads a pair only from files: written to a private folder and removed at once
    with tempfile.TemporaryDirectory(prefix="splitexit-tls-") as folder:
        cert_path, key_path = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert_path.write_bytes(cert)
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key)
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc) or getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
                raise TlsError(f"{where}: the private key does not belong to the certificate") from None
            raise TlsError(f"{where}: cannot load the certificate and key ({getattr(exc, 'reason', None) or exc})") \
                from None
