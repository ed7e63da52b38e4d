"""Keys and certificates for a loopback control plane, made with the ``openssl`` command.

The openssl CLI is part of every Debian-like system, so the test bed needs no Python crypto
package (and none can clash with the project's own dependencies). One CA signs one serving
certificate, valid for 127.0.0.1 and the in-cluster names, that every component serves with; a
separate RSA pair signs and verifies service-account tokens.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# The names a client may use for the API server; the in-cluster ones keep client libraries that
# check them happy when a pod's env points at the bed.
SERVING_SANS = (
    "IP:127.0.0.1",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class Pki:
    """Paths of the files :func:`make_pki` writes."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_private_key: Path
    sa_public_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(directory: Path, *, days: int = 30) -> Pki:
    """Write a CA, a serving cert signed by it and a service-account key pair into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        serving_cert=directory / "serving.crt",
        serving_key=directory / "serving.key",
        sa_private_key=directory / "sa.key",
        sa_public_key=directory / "sa.pub",
    )
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
        "-keyout", str(pki.ca_key), "-out", str(pki.ca_cert), "-subj", "/CN=kubetune-testbed-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )  # fmt: skip
    csr = directory / "serving.csr"
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki.serving_key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    extensions = directory / "serving.ext"
    extensions.write_text(
        f"subjectAltName={','.join(SERVING_SANS)}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        # Key identifiers: strict verifiers (Python 3.13's default context) require them.
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(pki.ca_cert), "-CAkey", str(pki.ca_key),
        "-CAcreateserial", "-days", str(days), "-out", str(pki.serving_cert), "-extfile", str(extensions),
    )  # fmt: skip
    _openssl("genrsa", "-out", str(pki.sa_private_key), "2048")
    _openssl("rsa", "-in", str(pki.sa_private_key), "-pubout", "-out", str(pki.sa_public_key))
    for key in (pki.ca_key, pki.serving_key, pki.sa_private_key):
        key.chmod(0o600)
    return pki
