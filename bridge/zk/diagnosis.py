"""Why no ZooKeeper server gave this bridge a session, asked once ourselves: kazoo only
logs each failed try, and tries again for ever.

Every server in ``zookeeper.hosts`` is asked at once. One session needs one
server, so a refusal stops the bridge only when every server refused it: while
a server takes the bridge, or has not answered, a retry may still succeed
(a rolling rotation of the servers' trust or certificates is under way, or the
members that would take it are down), and the line says which servers refuse
and which do not.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from bridge.certexpiry import expired_on
from bridge.config import ZooKeeperSettings, ZooKeeperTls
from bridge.tlsprobe import ACCEPTED, Refusal, host_and_port, probe, speaks_tls

PROBE_TIMEOUT = 2.0  # per server, all asked at once: a blackholed one costs this much
UNREACHED = "check zookeeper.hosts and that the ensemble is up"

_Answer = TypeVar("_Answer")


def connect_failure(settings: ZooKeeperSettings) -> tuple[str, bool]:
    """A line naming what to fix, and whether no retry can cure it (this bridge's TLS
    settings are wrong for every server, or missing for servers that speak only TLS)."""
    hosts = _servers(settings)
    tls = settings.tls
    if tls is None:
        speaking = _ask_all(hosts, lambda h: speaks_tls(*host_and_port(h, 2181),
                                                        timeout=PROBE_TIMEOUT))
        tls_only = [h for h, yes in speaking.items() if yes]
        if not tls_only:
            return UNREACHED, False
        line = (f"ZooKeeper at {tls_only[0]} speaks TLS (a secureClientPort): set "
                "zookeeper.tls, or name the servers' clientPort in zookeeper.hosts")
        return _all_or_some(line, tls_only, hosts, lambda h: "no TLS", verb="speak TLS")
    try:
        context = ssl.create_default_context(cafile=tls.cafile)
        context.check_hostname = tls.check_hostname
        if tls.certfile:
            context.load_cert_chain(tls.certfile, tls.keyfile)
    except (OSError, ValueError) as exc:  # changed since the configuration was loaded
        return f"cannot load the zookeeper.tls files: {exc}", True
    answers = _ask_all(hosts, lambda h: probe(*host_and_port(h, 2181), context,
                                              timeout=PROBE_TIMEOUT))
    refusals = {h: a for h, a in answers.items() if isinstance(a, Refusal)}
    curable = [h for h, r in refusals.items() if r.curable_here]
    if curable:
        line = _refused(curable[0], refusals[curable[0]], tls)
        return _all_or_some(line, curable, hosts, lambda h: _said(answers[h]))
    if refusals:
        # The servers' operator cures it (or a rolling restart is under way).
        hostport, refusal = next(iter(refusals.items()))
        return _refused(hostport, refusal, tls), False
    return UNREACHED, False


def _servers(settings: ZooKeeperSettings) -> list[str]:
    """``zookeeper.hosts`` as its servers, each once, in order."""
    return list(dict.fromkeys(h.strip() for h in settings.hosts.split(",") if h.strip()))


def _ask_all(hosts: list[str], ask: Callable[[str], _Answer]) -> dict[str, _Answer]:
    """``ask`` of every host at once, in the order of ``zookeeper.hosts``."""
    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        return dict(zip(hosts, pool.map(ask, hosts), strict=True))


def _all_or_some(line: str, refusing: list[str], hosts: list[str],
                 others: Callable[[str], str], *, verb: str = "refuse") -> tuple[str, bool]:
    """``line`` is fatal if every server refuses; else retried, saying what each of the
    others answered (``others``: "takes it", "no answer")."""
    if len(refusing) == len(hosts):
        return line, True
    said: dict[str, list[str]] = {}
    for hostport in hosts:
        if hostport not in refusing:
            said.setdefault(others(hostport), []).append(hostport)
    told = "; ".join(f"{', '.join(group)}: {what}" for what, group in said.items())
    return (f"{line} ({len(refusing)} of {len(hosts)} servers {verb}; {told}; "
            "retrying the others)"), False


def _said(answer: Refusal | str | None) -> str:
    """What a server that did not refuse this bridge's own settings answered."""
    if isinstance(answer, Refusal):
        return ("ends the handshake" if answer.refused == "handshake"
                else "its certificate is not valid now")
    return "takes it" if answer == ACCEPTED else "no answer"


def _refused(hostport: str, refusal: Refusal, tls: ZooKeeperTls) -> str:
    """The line for one server's refusal, naming the key or the servers' setting to fix."""
    kind = refusal.refused
    if kind == "handshake":
        return (f"ZooKeeper at {hostport} ends the TLS handshake ({refusal.why}): check "
                "that it is the servers' secureClientPort, and their ssl.protocol, "
                "ssl.enabledProtocols and ssl.ciphersuites (a TLSv1.3-only server needs "
                "TLS 1.3 suites in ssl.ciphersuites: ZooKeeper's default list has none)")
    if kind == "client":
        if not tls.certfile:
            return (f"ZooKeeper at {hostport} requires a client certificate "
                    f"({refusal.why}); set zookeeper.tls.certfile and keyfile to one "
                    "signed by a CA in the servers' ssl.trustStore")
        expired = expired_on(tls.certfile)
        if expired:
            return (f"ZooKeeper at {hostport} refuses this bridge's certificate "
                    f"({refusal.why}): zookeeper.tls.certfile expired on {expired}; "
                    "renew it in place and start the bridge again")
        return (f"ZooKeeper at {hostport} refuses this bridge's certificate "
                f"({refusal.why}); check zookeeper.tls.certfile: the CA that signed it "
                "must be in the servers' ssl.trustStore, and it must be valid now")
    if kind == "validity":
        # The servers' operator renews it (or this host's clock is wrong).
        return (f"ZooKeeper at {hostport}: its certificate (or a CA above it) is not "
                f"valid now ({refusal.why}) by this host's clock; renew it in the "
                "servers' ssl.keyStore (a CA: in zookeeper.tls.cafile too), or set this "
                "host's clock right")
    key = "check_hostname" if kind == "hostname" else "cafile"
    return (f"ZooKeeper at {hostport}: its certificate is refused ({refusal.why}); "
            f"check zookeeper.tls.{key}")


def server_versions(settings: ZooKeeperSettings) -> dict[str, str]:
    """Each plain server's version as its ``srvr`` says it (ZooKeeper 3.5 and later allow
    that four-letter word by default), for a message; servers that do not say are left out.
    Not asked over TLS: the line then goes without it."""
    if settings.tls is not None:
        return {}
    hosts = _servers(settings)
    said = _ask_all(hosts, lambda h: _srvr_version(*host_and_port(h, 2181)))
    return {h: v for h, v in said.items() if v}


def _srvr_version(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as s:
            s.settimeout(PROBE_TIMEOUT)
            s.sendall(b"srvr")
            reply = s.recv(4096).decode("utf-8", "replace")
    except OSError:
        return None
    return version_said(reply)


def version_said(srvr: str) -> str | None:
    """The release in a ``srvr`` reply ("3.5.10" of "Zookeeper version:
    3.5.10-a32c...13, built on ..."), without what a build appends; None if absent."""
    found = re.search(r"Zookeeper version: ([0-9]+(?:\.[0-9]+)+)", srvr)
    return found.group(1) if found else None


def supports_multi_read(release: str) -> bool:
    """Whether a release ("3.5.10") has ``multiRead`` and ``addWatch`` (3.6 and later)."""
    parts = tuple(int(p) for p in release.split(".")[:2])
    return parts >= (3, 6)
