"""Throwaway TLS material for the secured Kafka listeners, made with openssl at test time.

A CA, a server certificate for 127.0.0.1 (and localhost) signed by it, the
PKCS#12 keystore Kafka reads, and a second, unrelated CA that a client can be
wrongly told to trust.
"""

from __future__ import annotations

import calendar
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class TlsError(RuntimeError):
    """openssl failed; the message holds its output."""


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    keystore: Path
    keystore_password: str
    other_ca_cert: Path
    """A CA that signed nothing of the broker's: trusting it must fail the handshake."""


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    if done.returncode != 0:
        raise TlsError(f"openssl {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "2", "-subj", f"/CN=zkbridge test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return key, cert


def make_tls(directory: Path, keystore_password: str = "keystore-pass") -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca(directory, "ca")
    _, other_ca = _ca(directory, "other-ca")
    key, csr, cert = (directory / n for n in ("server.key", "server.csr", "server.pem"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=127.0.0.1", cwd=directory)
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
    )
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
             cwd=directory)
    keystore = directory / "server.p12"
    _openssl("pkcs12", "-export", "-in", str(cert), "-inkey", str(key),
             "-certfile", str(ca_cert), "-name", "broker", "-out", str(keystore),
             "-passout", f"pass:{keystore_password}", cwd=directory)
    return TlsFiles(ca_cert, cert, key, keystore, keystore_password, other_ca)


def make_client_cert(files: TlsFiles, name: str = "client",
                     signer: str = "ca", days: int = 2) -> tuple[Path, Path]:
    """A client certificate and key signed by ``files``' CA (mutual TLS), next to them,
    valid for ``days``; ``signer="other-ca"``: by the unrelated CA, which the server does
    not trust."""
    directory = files.ca_cert.parent
    key, csr, cert = (directory / f"{name}{s}" for s in (".key", ".csr", ".pem"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={name}", cwd=directory)
    ext = directory / f"{name}.ext"
    ext.write_text("extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(directory / f"{signer}.pem"),
             "-CAkey", str(directory / f"{signer}.key"), "-CAcreateserial", "-out", str(cert),
             "-days", str(days), "-extfile", str(ext), cwd=directory)
    return cert, key


def openssl_time(when: str) -> float:
    """A time as openssl prints it ("Jan  4 15:08:08 2027 GMT"), in seconds since the epoch."""
    return float(calendar.timegm(time.strptime(when, "%b %d %H:%M:%S %Y GMT")))


def not_after(cert: Path) -> float:
    """The certificate's notAfter as openssl prints it, in seconds since the epoch."""
    done = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-enddate"],
                          capture_output=True, text=True, timeout=60, check=True)
    return openssl_time(done.stdout.strip().split("=", 1)[1])

