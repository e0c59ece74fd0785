"""Why a TLS connection to the ensemble is refused, asked once with Python's own ssl.

kazoo logs a failed handshake and tries again for ever; what no retry can
cure (an untrusted server certificate, a host name it does not name, a
client certificate the server refuses or lacks) must instead stop the
bridge with one line naming the key to fix.
"""

from __future__ import annotations

import re
import socket
import ssl

from bridge.config import ZooKeeperSettings

# Alerts a server sends about the certificate the client showed (or did not show).
_CLIENT_CERT_ALERT = re.compile(
    r"ALERT_(BAD_CERTIFICATE|CERTIFICATE_\w+|UNKNOWN_CA|UNSUPPORTED_CERTIFICATE)")


def tls_refusal(settings: ZooKeeperSettings) -> str | None:
    """Why the first reachable server refuses TLS with this bridge (a line naming the key
    to fix), or None: accepted, or no server answered."""
    tls = settings.tls
    assert tls is not None
    try:
        context = ssl.create_default_context(cafile=tls.cafile)
        context.check_hostname = tls.check_hostname
        if tls.certfile:
            context.load_cert_chain(tls.certfile, tls.keyfile)
    except (OSError, ValueError) as exc:  # changed since the configuration was loaded
        return f"cannot load the zookeeper.tls files: {exc}"
    for hostport in settings.hosts.split(","):
        host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "2181")
        try:
            with socket.create_connection((host, int(port)), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as exc:
            key = ("zookeeper.tls.check_hostname" if "mismatch" in (exc.verify_message or "")
                   else "zookeeper.tls.cafile")
            return (f"ZooKeeper at {hostport}: its certificate is refused "
                    f"({exc.verify_message}); check {key}")
        except ssl.SSLError as exc:
            if not _CLIENT_CERT_ALERT.search(exc.reason or ""):
                continue
            alert = (exc.reason or "").replace("_", " ").lower()
            if not tls.certfile:
                return (f"ZooKeeper at {hostport} requires a client certificate ({alert}); "
                        "set zookeeper.tls.certfile and keyfile to one signed by a CA in "
                        "the servers' ssl.trustStore")
            return (f"ZooKeeper at {hostport} refuses this bridge's certificate ({alert}); "
                    "check zookeeper.tls.certfile: the CA that signed it must be in the "
                    "servers' ssl.trustStore, and it must be valid now")
        except (OSError, ValueError):
            continue
    return None
