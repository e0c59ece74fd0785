"""When the certificates this bridge shows its servers, and the CAs it checks theirs
with, stop being valid.

A client certificate that expires is refused at the next handshake, and the
bridge stops (``bridge.zk.session``, ``bridge.kafka.connection``): correct,
but late; once the CA in a ``cafile`` expires, every server's certificate is.
Read from the configured ``certfile``s and ``cafile``s when the bridge
starts, the expiry is exported as a gauge, shown in ``status`` and warned of
ahead, so the renewal is due before anything is refused. Python's ``ssl``
decodes no certificate file (and ``cryptography`` is not a dependency), so
this reads the one field it needs, ``notAfter``, from the DER itself.
"""

from __future__ import annotations

import base64
import calendar
import re
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from bridge.config import Settings

log = structlog.get_logger("bridge.certexpiry")

WARN_DAYS = 30  # a start this close to an expiry logs certificate_expiring

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.DOTALL)
_SEQUENCE, _CONTEXT_0, _UTC_TIME, _GENERALIZED_TIME = 0x30, 0xA0, 0x17, 0x18


@dataclass(frozen=True, slots=True)
class Expiry:
    key: str  # the configuration key that names the file, e.g. kafka.ssl.certfile
    path: str
    not_after: float  # seconds since the epoch: the earliest notAfter in the file

    def days_left(self, now: float) -> float:
        return (self.not_after - now) / 86400


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """The DER element at ``at``: its tag, where its content starts and where it ends."""
    if at + 2 > len(der):
        raise ValueError("truncated")
    tag, size, at = der[at], der[at + 1], at + 2
    if size & 0x80:  # long form: the next (size & 0x7f) bytes are the length
        count = size & 0x7F
        if count == 0 or count > 4 or at + count > len(der):
            raise ValueError("bad length")
        size, at = int.from_bytes(der[at:at + count], "big"), at + count
    if at + size > len(der):
        raise ValueError("truncated")
    return tag, at, at + size


def _time(tag: int, text: bytes) -> float:
    digits = text.decode("ascii")
    if not digits.endswith("Z"):
        raise ValueError(f"not a UTC time: {digits!r}")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; RFC 5280: 50-99 are 19xx
        year = int(digits[:2])
        digits = f"{1900 + year if year >= 50 else 2000 + year}{digits[2:]}"
    elif tag != _GENERALIZED_TIME:
        raise ValueError(f"not a time (tag {tag:#x})")
    if len(digits) != 15 or not digits[:14].isdigit():
        raise ValueError(f"not a time: {digits!r}")
    fields = (int(digits[0:4]), int(digits[4:6]), int(digits[6:8]), int(digits[8:10]),
              int(digits[10:12]), int(digits[12:14]))
    return float(calendar.timegm((*fields, 0, 0, 0)))


def not_after_der(der: bytes) -> float:
    """A DER certificate's notAfter, in seconds since the epoch."""
    tag, start, _ = _element(der, 0)  # Certificate
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    tag, at, _ = _element(der, start)  # tbsCertificate
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    tag, _, end = _element(der, at)
    if tag == _CONTEXT_0:  # [0] version, absent in v1 certificates
        at = end
    for _field in ("serialNumber", "signature", "issuer"):
        at = _element(der, at)[2]
    tag, at, _ = _element(der, at)  # validity
    if tag != _SEQUENCE:
        raise ValueError("no validity")
    at = _element(der, at)[2]  # notBefore
    tag, start, end = _element(der, at)
    return _time(tag, der[start:end])


def not_after_pem(pem: bytes, *, latest: bool = False) -> float:
    """The earliest notAfter of the certificates in a PEM file (a chain stops being
    accepted when its first certificate expires); ``latest``: the last one's (a CA
    bundle is of no use only once all its CAs expired, and an old CA kept in it
    beside its successor must not raise an alarm)."""
    blocks = _PEM.findall(pem)
    if not blocks:
        raise ValueError("no PEM certificate")
    times = [not_after_der(base64.b64decode(b"".join(b.split()))) for b in blocks]
    return max(times) if latest else min(times)


def configured(settings: Settings) -> dict[str, str]:
    """The certificate files this bridge shows its servers, and the CA files it checks
    theirs with, by configuration key (no cafile: the system's CAs, not ours to watch)."""
    files = {}
    for prefix, tls in (("zookeeper.tls", settings.zookeeper.tls),
                        ("kafka.ssl", settings.kafka.ssl)):
        if tls is None:
            continue
        if tls.certfile:
            files[f"{prefix}.certfile"] = str(tls.certfile)
        if tls.cafile:
            files[f"{prefix}.cafile"] = str(tls.cafile)
    return files


def read(settings: Settings) -> tuple[tuple[Expiry, ...], list[str]]:
    """Each configured certificate's expiry, and a line per file that could not be read
    (the configuration's checks read them once already: it changed since)."""
    found, problems = [], []
    for key, path in configured(settings).items():
        try:
            pem = Path(path).read_bytes()
            found.append(Expiry(key, path, not_after_pem(pem, latest=key.endswith("cafile"))))
        except (OSError, ValueError) as exc:
            problems.append(f"{key}: cannot read its expiry from {path}: {exc}")
    return tuple(found), problems


def when(epoch: float) -> str:
    """An expiry as ISO 8601 UTC, as every line that names one prints it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def expired_on(path: str | Path, now: float | None = None) -> str | None:
    """When the certificate file at ``path`` expired, if it has (for the line that names
    a refused certificate: the servers' alert seldom says why); None if it is valid or
    cannot be read."""
    try:
        not_after = not_after_pem(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return when(not_after) if not_after <= (time.time() if now is None else now) else None


def describe(settings: Settings, now: float) -> list[str]:
    """A line per configured certificate, for ``zkbridge check-config``."""
    found, problems = read(settings)
    lines = []
    for e in found:
        days = e.days_left(now)
        state = (f"in {days:.1f} days" if days >= 0
                 else "EXPIRED: refused at the next connection, renew it")
        lines.append(f"{e.key} {e.path} expires {when(e.not_after)} ({state})")
    return lines + problems


def announce(settings: Settings) -> tuple[Expiry, ...]:
    """Read the certificates' expiries at start, warning of those due within WARN_DAYS
    (or past: the servers refuse them, and the bridge stops naming the key)."""
    found, problems = read(settings)
    for problem in problems:
        log.warning("certificate_unreadable", error=problem)
    now = time.time()
    for e in found:
        days = e.days_left(now)
        if days < WARN_DAYS:
            log.warning("certificate_expiring", key=e.key, path=e.path, days_left=round(days, 1),
                        expires=when(e.not_after),
                        hint="renew the file in place, then restart the bridge")
    return found
