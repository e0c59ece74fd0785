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
             # Long-lived, as CAs are: only the certificates they sign expire in tests.
             "-out", str(cert), "-days", "400", "-subj", f"/CN=zkbridge test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return key, cert


def _sign(directory: Path, csr: Path, signer: str, cert: Path, ext: Path, *, days: int,
          expired: bool) -> None:
    """``csr`` signed by ``signer``'s CA into ``cert``: valid for ``days`` from now, or
    (``expired``) from 60 days ago until yesterday, which only ``openssl ca`` can date."""
    ca_cert, ca_key = directory / f"{signer}.pem", directory / f"{signer}.key"
    if not expired:
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-out", str(cert), "-days", str(days),
                 "-extfile", str(ext), cwd=directory)
        return
    book = directory / f"{cert.stem}.ca"  # openssl ca's database, one per certificate
    book.mkdir(exist_ok=True)
    (book / "index.txt").write_text("")
    (book / "serial").write_text(f"{time.time_ns() & 0xFFFFFFFF:08X}\n")
    (book / "ca.cnf").write_text(
        "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nnew_certs_dir = .\n"
        "serial = serial\ndefault_md = sha256\npolicy = any\nunique_subject = no\n"
        "[any]\ncommonName = supplied\n")
    stamp = "%Y%m%d%H%M%SZ"
    _openssl("ca", "-batch", "-config", "ca.cnf", "-cert", str(ca_cert.resolve()),
             "-keyfile", str(ca_key.resolve()), "-in", str(csr.resolve()),
             "-out", str(cert.resolve()), "-notext", "-extfile", str(ext.resolve()),
             "-startdate", time.strftime(stamp, time.gmtime(time.time() - 60 * 86400)),
             "-enddate", time.strftime(stamp, time.gmtime(time.time() - 86400)), cwd=book)


def make_tls(directory: Path, keystore_password: str = "keystore-pass", *,
             server_expired: bool = False) -> TlsFiles:
    """``server_expired``: the server's certificate expired yesterday."""
    directory.mkdir(parents=True, exist_ok=True)
    _, ca_cert = _ca(directory, "ca")
    _, other_ca = _ca(directory, "other-ca")
    key, csr = directory / "server.key", directory / "server.csr"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=127.0.0.1", cwd=directory)
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
    )
    files = TlsFiles(ca_cert, directory / "server.pem", key, directory / "server.p12",
                     keystore_password, other_ca)
    reissue_server_cert(files, expired=server_expired)
    return files


def reissue_server_cert(files: TlsFiles, *, expired: bool = False) -> None:
    """The server's certificate and keystore made anew in place, by the same CA for the
    same key: valid for 2 days, or (``expired``) until yesterday."""
    directory = files.ca_cert.parent
    _sign(directory, directory / "server.csr", "ca", files.server_cert,
          directory / "server.ext", days=2, expired=expired)
    _openssl("pkcs12", "-export", "-in", str(files.server_cert), "-inkey",
             str(files.server_key), "-certfile", str(files.ca_cert), "-name", "broker",
             "-out", str(files.keystore), "-passout", f"pass:{files.keystore_password}",
             cwd=directory)


def make_client_cert(files: TlsFiles, name: str = "client", signer: str = "ca",
                     days: int = 2, *, expired: bool = False) -> tuple[Path, Path]:
    """A client certificate and key signed by ``files``' CA (mutual TLS), next to them,
    valid for ``days`` (``expired``: until yesterday); ``signer="other-ca"``: by the
    unrelated CA, which the server does not trust."""
    directory = files.ca_cert.parent
    key, csr, cert = (directory / f"{name}{s}" for s in (".key", ".csr", ".pem"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={name}", cwd=directory)
    ext = directory / f"{name}.ext"
    ext.write_text("extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n")
    _sign(directory, csr, signer, cert, ext, days=days, expired=expired)
    return cert, key


def openssl_time(when: str) -> float:
    """A time as openssl prints it ("Jan  4 15:08:08 2027 GMT"), in seconds since the epoch."""
    return float(calendar.timegm(time.strptime(when, "%b %d %H:%M:%S %Y GMT")))


def not_after(cert: Path) -> float:
    """The certificate's notAfter as openssl prints it, in seconds since the epoch."""
    done = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-enddate"],
                          capture_output=True, text=True, timeout=60, check=True)
    return openssl_time(done.stdout.strip().split("=", 1)[1])

