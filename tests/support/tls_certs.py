"""Throwaway certificate authorities for TLS tests, made with the openssl CLI.

An AWS IoT-like set-up: the broker presents a server certificate for 127.0.0.1 signed
by a CA the client trusts, and requires a client certificate signed by a CA it trusts.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


class CertAuthority:
    """A self-signed CA (EC P-256: fast to make) that issues leaf certificates."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.cert = directory / f"{name}-ca.pem"
        self.key = directory / f"{name}-ca.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-days", "2", "-subj", f"/CN={name} test CA",
                 "-keyout", self.key, "-out", self.cert)

    def issue(self, common_name: str, *, server: bool = False) -> CertPair:
        key = self.dir / f"{common_name}.key"
        csr = self.dir / f"{common_name}.csr"
        cert = self.dir / f"{common_name}.pem"
        ext = self.dir / f"{common_name}.ext"
        usage = "serverAuth" if server else "clientAuth"
        lines = [f"extendedKeyUsage={usage}"]
        if server:
            lines.append("subjectAltName=IP:127.0.0.1,DNS:localhost")
        ext.write_text("\n".join(lines) + "\n")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-subj", f"/CN={common_name}", "-keyout", key, "-out", csr)
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                 "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", cert)
        return CertPair(cert, key)


@dataclass(frozen=True)
class Pki:
    """A trusted CA with a client certificate, and a rogue CA with one of its own."""

    trusted: CertAuthority
    rogue: CertAuthority
    client: CertPair
    rogue_client: CertPair


@dataclass(frozen=True)
class TlsBroker:
    """A Mosquitto with a mutual-TLS listener and a plain one for the test's probes."""

    tls_url: str
    plain_url: str
    tls_port: int
