"""Why a TLS server refuses this client, asked once over a plain socket with Python's ssl.

The clients (kazoo, aiokafka) report a refused handshake as a lost or
closed connection and try again for ever, like a server that is down. Some
refusals no retry cures: the server's certificate is untrusted or names
another host, or the server refuses the client's certificate (or its
absence). A TLS 1.3 server judges the client's certificate only after the
handshake, so the probe waits briefly for its alert too. Others a server's
operator cures, so the callers keep retrying but say why: a server that ends
the handshake without a word (a port that does not speak TLS, or no cipher
suite in common, as a TLSv1.3-only ZooKeeper with its default ssl.ciphersuites
offers), or a server certificate outside its validity period by this host's clock
(expired, or not yet valid: renewed on the servers, or this host's clock set
right). Used by both adapters; each words the key to fix.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass
from typing import Final, Literal

ALERT_WAIT_SECONDS = 1.0  # how long a finished handshake waits for a TLS 1.3 server's alert

# Alerts a server sends about the certificate the client showed (or did not show).
_CLIENT_CERT_ALERT = re.compile(
    r"ALERT_(BAD_CERTIFICATE|CERTIFICATE_\w+|UNKNOWN_CA|UNSUPPORTED_CERTIFICATE)")
# OpenSSL's verify codes for a certificate in the server's chain that is not valid now.
_NOT_YET_VALID, _EXPIRED = 9, 10

ACCEPTED: Final = "accepted"  # the handshake went through and no alert followed


@dataclass(frozen=True, slots=True)
class Refusal:
    """Whose certificate a TLS connection failed on, and why in the TLS library's words."""

    refused: Literal["server", "client", "hostname", "handshake", "validity"]
    why: str

    @property
    def curable_here(self) -> bool:
        """A certificate this bridge shows or trusts: only its configuration cures it."""
        return self.refused not in ("handshake", "validity")


def host_and_port(server: str, default_port: int) -> tuple[str, int]:
    """"host", "host:port", "[v6]" or "[v6]:port" as a host to connect to and a port."""
    host, sep, port = server.rpartition(":")
    if not sep or (host.startswith("[") and not host.endswith("]")) or not port.isdigit():
        host, port = server, str(default_port)  # no port: a bare name or "[v6]"
    return host.strip("[]"), int(port)


def verification_refusal(exc: ssl.SSLCertVerificationError) -> Refusal:
    """What this client's check of the server's certificate refused it for."""
    why = exc.verify_message or str(exc)
    if exc.verify_code in (_NOT_YET_VALID, _EXPIRED):
        return Refusal("validity", why)
    return Refusal("hostname" if "mismatch" in why else "server", why)


def probe(host: str, port: int, context: ssl.SSLContext, *,
          timeout: float = 5.0) -> Refusal | Literal["accepted"] | None:
    """Why ``host:port`` refuses TLS with ``context``, ACCEPTED if it does not, None if
    it does not answer (unreachable, or silent: no verdict either way)."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ValueError):
        return None  # unreachable: nothing refused
    shaken = False
    try:
        with raw, context.wrap_socket(raw, server_hostname=host) as tls:
            shaken = True
            tls.settimeout(ALERT_WAIT_SECONDS)
            tls.recv(1)  # a server waits for the client's first request: nothing comes
        return ACCEPTED  # or it hung up without an alert, having taken the handshake
    except ssl.SSLCertVerificationError as exc:
        return verification_refusal(exc)
    except ssl.SSLError as exc:
        why = (exc.reason or type(exc).__name__).replace("_", " ").lower()
        if _CLIENT_CERT_ALERT.search(exc.reason or ""):
            return Refusal("client", why)
        if not shaken:
            return Refusal("handshake", why)
    except ConnectionError as exc:  # reset; a timeout is no answer, not a refusal
        if not shaken:
            return Refusal("handshake", type(exc).__name__)
    except TimeoutError:
        # The handshake's own timeout is no answer; the wait for an alert
        # after it is the quiet of a server that took this client.
        return ACCEPTED if shaken else None
    except (OSError, ValueError):
        pass
    return None


def speaks_tls(host: str, port: int, *, timeout: float = 5.0) -> bool:
    """Whether ``host:port`` answers a TLS handshake, its certificate unchecked: a
    server that a client without TLS never gets a session from."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except ssl.SSLError as exc:
        # An alert is TLS spoken back (a client certificate asked for, say); a
        # closed socket or bytes that are no TLS record are a plain server.
        return "ALERT" in (exc.reason or "")
    except (OSError, ValueError):
        return False
