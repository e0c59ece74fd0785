"""What every part of the Kafka client shares: the settings, the clients'
state, the options each aiokafka client connects with, and the security check
made before the first one does.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaError as AioKafkaError,
)
from aiokafka.helpers import create_ssl_context

from bridge.certexpiry import expired_on
from bridge.config import KafkaSettings
from bridge.errors import FatalKafkaError, KafkaError
from bridge.kafka.boundary import _FATAL
from bridge.tlsprobe import Refusal, host_and_port, probe, speaks_tls, verification_refusal

TLS_PROBE_TIMEOUT = 2.0  # per broker, asked only once a plain connection failed
DIAGNOSE_INTERVAL = 10.0  # seconds between two diagnoses of failures while running


class Connection:
    """The base of ``Kafka``: one config, the clients it started, how to connect."""

    def __init__(self, settings: KafkaSettings, *, client_id: str) -> None:
        self.settings = settings
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        # Offset and metadata queries go on a connection of their own: a broker
        # answers one request per connection at a time, so on the fetching
        # consumer's connection each waited behind a long-polling fetch (up to
        # fetch_max_wait_ms: 200 ms for the two offset lookups of a topic check,
        # which held every applied batch back by as much once a second).
        self._probe: AIOKafkaConsumer | None = None
        self._probe_lock = asyncio.Lock()
        self._probe_fetch = asyncio.Lock()  # readable_ends assigns the query consumer
        # Seeks to the start of partitions without a leader, done once one answers.
        self._pending_seeks: set[asyncio.Future[bool]] = set()
        self._secure_ok = False
        self._diagnosed_at = float("-inf")
        self._diagnosing = False
        self.refusals: list[str] = []  # the last security check's, for diagnose
        self._producer_lock = asyncio.Lock()
        self._producer_started = False
        self._ids_unsupported = False

    def _common(self) -> dict[str, Any]:
        s = self.settings
        opts: dict[str, Any] = {
            "bootstrap_servers": s.bootstrap_servers,
            "client_id": self.client_id,
            "request_timeout_ms": int(s.request_timeout * 1000),
            "security_protocol": s.security_protocol,
        }
        if s.ssl is not None:
            opts["ssl_context"] = create_ssl_context(
                cafile=s.ssl.cafile, certfile=s.ssl.certfile, keyfile=s.ssl.keyfile
            )
        elif s.security_protocol in ("SSL", "SASL_SSL"):
            opts["ssl_context"] = create_ssl_context()
        if s.sasl is not None:
            opts["sasl_mechanism"] = s.sasl.mechanism
            opts["sasl_plain_username"] = s.sasl.username
            opts["sasl_plain_password"] = s.sasl.password
        return opts

    async def _check_security(self) -> None:
        """Fail at once on a broker we must not or cannot talk to (untrusted TLS, bad SASL,
        a TLS listener without kafka.ssl).

        aiokafka's bootstrap logs such a cause and then raises the same retriable
        "Unable to bootstrap" it raises for a broker that is merely down, so one
        connection made here first tells the two apart. Unreachable brokers stay
        retriable.
        """
        if self._secure_ok:
            return
        opts = self._common()
        unreachable: list[str] = []
        refusals = self.refusals = []  # TLS refusals the brokers' operator cures
        # The first server that answers decides; only if none does is it retriable.
        for server in (s.strip() for s in self.settings.bootstrap_servers.split(",")):
            host, port = host_and_port(server, 9092)
            try:
                conn = await create_conn(
                    host,
                    port,
                    client_id=self.client_id,
                    request_timeout_ms=opts["request_timeout_ms"],
                    ssl_context=opts.get("ssl_context"),
                    security_protocol=opts["security_protocol"],
                    sasl_mechanism=opts.get("sasl_mechanism", "PLAIN"),
                    sasl_plain_username=opts.get("sasl_plain_username"),
                    sasl_plain_password=opts.get("sasl_plain_password"),
                )
            except ssl.SSLCertVerificationError as exc:
                mistrust = verification_refusal(exc)
                if mistrust.curable_here:
                    raise FatalKafkaError(self._refused(server, mistrust)) from exc
                refusals.append(self._not_now(server, mistrust))
                continue
            except ssl.SSLError as exc:
                raise FatalKafkaError(
                    f"TLS to {server}: handshake failed ({exc.reason or exc}); check "
                    "kafka.security_protocol and kafka.ssl"
                ) from exc
            except _FATAL as exc:
                user = self.settings.sasl.username if self.settings.sasl else "?"
                raise FatalKafkaError(
                    f"SASL to {server}: authentication of {user!r} failed "
                    f"({type(exc).__name__}); check kafka.sasl.username, "
                    "kafka.sasl.password and kafka.sasl.mechanism"
                ) from exc
            except (AioKafkaError, OSError, TimeoutError) as exc:
                context = opts.get("ssl_context")
                if context is None and await asyncio.to_thread(
                        speaks_tls, host, port, timeout=TLS_PROBE_TIMEOUT):
                    raise FatalKafkaError(
                        f"{server} speaks TLS: set kafka.security_protocol to SSL or "
                        "SASL_SSL (with kafka.ssl), or name a PLAINTEXT listener in "
                        "kafka.bootstrap_servers") from exc
                if context is not None:
                    # A TLS 1.3 broker refuses a client certificate after the
                    # handshake: aiokafka sees only a closed connection.
                    refusal = await asyncio.to_thread(probe, host, port, context)
                    if isinstance(refusal, Refusal) and refusal.curable_here:
                        raise FatalKafkaError(self._refused(server, refusal)) from exc
                    if isinstance(refusal, Refusal):  # the broker's operator cures it
                        refusals.append(self._not_now(server, refusal))
                        continue
                unreachable.append(f"{server}: {type(exc).__name__} {exc}")
                continue
            conn.close()
            self._secure_ok = True
            return
        # Down, unreachable or refusing until its operator acts: the caller retries.
        raise KafkaError("connect: " + "; ".join([*refusals, *unreachable]))

    async def check_identity(self) -> None:
        """The start's security check, asked anew (``zkbridge check-config --connect``):
        FatalKafkaError naming the key to fix, KafkaError if no broker answered."""
        self._secure_ok = False
        await self._check_security()

    async def diagnose(self) -> str | None:
        """After a failure while running (a topic check without an answer), ask the
        brokers again whether they still take this bridge's identity; raise
        FatalKafkaError if not, as at start.

        A client certificate that expired or is no longer trusted, or a SASL
        password changed on the brokers, shows once the clients reconnect, only
        as closed connections and timeouts, retried for ever. Stopping with the
        key to fix lets the service manager start the bridge again, which loads
        the files anew (a renewed certificate or password file then just works).
        Asked at most once every DIAGNOSE_INTERVAL seconds, and never for
        PLAINTEXT (no identity to refuse). Returns what the brokers' operator
        must cure (a listener that ends the handshake, a broker certificate
        expired by this host's clock), or None.
        """
        now = asyncio.get_running_loop().time()
        if (self.settings.security_protocol == "PLAINTEXT" or self._diagnosing
                or now - self._diagnosed_at < DIAGNOSE_INTERVAL):
            return None
        self._diagnosed_at, self._diagnosing = now, True
        try:
            await self.check_identity()
        except KafkaError:  # unreachable: the retry goes on
            return "; ".join(self.refusals) or None
        finally:
            self._diagnosing = False
        return None

    @staticmethod
    def _not_now(server: str, refusal: Refusal) -> str:
        if refusal.refused == "validity":
            return (f"{server}: the broker's certificate (or a CA above it) is not valid now "
                    f"({refusal.why}) by this host's clock; renew it in the listener's "
                    "ssl.keystore (a CA: in kafka.ssl.cafile too), or set this host's clock "
                    "right")
        return (f"{server} ends the TLS handshake ({refusal.why}): check that it is an SSL "
                "listener and its ssl.enabled.protocols and ssl.cipher.suites")

    def _refused(self, server: str, refusal: Refusal) -> str:
        if refusal.refused == "hostname":
            return (f"TLS to {server}: the broker's certificate names another host "
                    f"({refusal.why}); name the broker as its certificate does in "
                    "kafka.bootstrap_servers")
        if refusal.refused == "server":
            return (f"TLS to {server}: the broker's certificate is not trusted "
                    f"({refusal.why}); check kafka.ssl.cafile")
        if self.settings.ssl is None or self.settings.ssl.certfile is None:
            return (f"TLS to {server}: the broker requires a client certificate "
                    f"({refusal.why}); set kafka.ssl.certfile and keyfile to one signed by "
                    "a CA in the listener's ssl.truststore")
        expired = expired_on(self.settings.ssl.certfile)
        if expired:
            return (f"TLS to {server}: the broker refused this bridge's certificate "
                    f"({refusal.why}): kafka.ssl.certfile expired on {expired}; renew it "
                    "in place and start the bridge again")
        return (f"TLS to {server}: the broker refused this bridge's certificate "
                f"({refusal.why}); check kafka.ssl.certfile: the CA that signed it must be "
                "in the listener's ssl.truststore, and it must be valid now")
