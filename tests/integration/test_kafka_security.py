"""Transport security and ACLs end to end on Apache Kafka: SSL, SASL_SSL with SCRAM-SHA-512.

Certificates are made with openssl for each module run; SCRAM users are
created when the broker's storage is formatted. The SASL broker runs
StandardAuthorizer: each region's principal may write (and replay) its own
topic, read its peers' topics and use its own consumer group, nothing else.
Passwords are recognisable so that a leak into any output is caught.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAuthorizationFailedError
from aiokafka.helpers import create_ssl_context

from tests.conftest import REGION_NAMES, ZkServers
from tests.harness import procs
from tests.harness.broker import KafkaBroker, KafkaSecurity
from tests.harness.procs import wait_for
from tests.harness.tls import (
    TlsFiles,
    make_client_cert,
    make_tls,
    not_after,
    reissue_server_cert,
)
from tests.integration.federation import Federation

PASSWORDS = {name: f"Secret-{name}-Pa55word-7x" for name in REGION_NAMES}
ADMIN_PASSWORD = "Secret-admin-Pa55word-7x"
WRONG_PASSWORD = "Secret-WRONG-Pa55word-7x"
NEW_PASSWORD = "Secret-rotated-Pa55word-7x"
ALL_SECRETS = (*PASSWORDS.values(), ADMIN_PASSWORD, WRONG_PASSWORD, NEW_PASSWORD)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


def _broker(base: Path, security: KafkaSecurity,
            properties: dict[str, str] | None = None) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(base, security=security, properties=properties)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="module")
def ssl_kafka(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    security = KafkaSecurity("SSL", tls.keystore, tls.keystore_password)
    yield from _broker(tmp_path_factory.mktemp("kafka-ssl"), security)


@pytest.fixture(scope="module")
def mtls_kafka(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """SSL with client certificates required, trusting the CA of ``tls`` only."""
    security = KafkaSecurity("SSL", tls.keystore, tls.keystore_password)
    yield from _broker(tmp_path_factory.mktemp("kafka-mtls"), security, {
        "listener.name.client.ssl.client.auth": "required",
        "listener.name.client.ssl.truststore.location": str(tls.ca_cert),
        "listener.name.client.ssl.truststore.type": "PEM",
    })


@pytest.fixture(scope="module")
def sasl_kafka(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    security = KafkaSecurity(
        "SASL_SSL", tls.keystore, tls.keystore_password,
        scram_users={"admin": ADMIN_PASSWORD, **PASSWORDS},
        authorizer=True, super_users=("admin",),
    )
    yield from _broker(tmp_path_factory.mktemp("kafka-sasl"), security)


def _federation(tmp: Path, token: str, broker: KafkaBroker, zk: ZkServers) -> Federation:
    return Federation(tmp, token, broker, dict(zip(REGION_NAMES, zk.regions, strict=True)))


def _create_topics(broker: KafkaBroker, fed: Federation) -> list[str]:
    # An operator with a locked-down cluster creates the topics (compacted) as
    # admin; the bridges then only need Describe to find them.
    topics = [f"{fed.prefix}.{fed.subtree}.{n}" for n in fed.regions]

    async def go() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.internal_bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(t, 1, 1, topic_configs={"cleanup.policy": "compact"}) for t in topics])
        finally:
            await admin.close()

    asyncio.run(go())
    return topics


def _grant_region_acls(broker: KafkaBroker, fed: Federation) -> None:
    for name in fed.regions:
        principal = f"User:{name}"
        own = f"{fed.prefix}.{fed.subtree}.{name}"
        # Read on its own topic too: a rebuilt region replays what it published.
        broker.add_acls(principal, ["Write", "Read", "Describe"], topic=own)
        for peer in fed.regions:
            if peer != name:
                broker.add_acls(principal, ["Read", "Describe"],
                                topic=f"{fed.prefix}.{fed.subtree}.{peer}")
        broker.add_acls(principal, ["Read", "Describe"], group=f"{fed.prefix}.{name}")


def _sasl(fed: Federation, name: str, tls: TlsFiles, *, user: str | None = None,
          password: str | None = None, **extra: Any) -> None:
    user = user or name
    fed.write_config(name, kafka={
        "security_protocol": "SASL_SSL",
        "ssl": {"cafile": str(tls.ca_cert)},
        "sasl": {"mechanism": "SCRAM-SHA-512", "username": user,
                 "password": password or PASSWORDS[user]},
    }, **extra)


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in ALL_SECRETS:
            assert secret not in text, f"a password leaked: {text[:400]}"


def _wait_exit(fed: Federation, name: str, timeout: float = 60) -> tuple[int, float]:
    r = fed[name]
    assert r.proc is not None
    t0 = time.monotonic()
    try:
        rc = r.proc.wait(timeout=timeout)
    finally:
        procs.stop(r.proc)
        r.proc = None
    return rc, time.monotonic() - t0


def _one_error(fed: Federation, name: str) -> str:
    errors = [e for e in fed.events(name) if e.get("level") == "error"]
    assert [e["event"] for e in errors] == ["bridge_stopped"], errors
    line = str(errors[0]["error"])
    assert "\n" not in line
    return line


def _last_error(fed: Federation, name: str, since: int = 0) -> str:
    """The error of the last error-level line ``name``'s bridge logged after line ``since``."""
    errors = [e for e in fed.events(name)[since:] if e.get("level") == "error"]
    assert errors, f"{name} logged no error"
    return str(errors[-1].get("error"))


def _stops_at_once(fed: Federation, name: str) -> str:
    """Start ``name``'s bridge and see it stop by itself (exit 1) without a retry loop;
    the error it stopped with."""
    before = len(fed.events(name))
    fed.start(name, wait=False)
    rc, took = _wait_exit(fed, name)
    assert rc == 1
    assert took < 20, f"took {took:.1f}s: a retry loop?"
    return _last_error(fed, name, before)


def _r1_to_r2(fed: Federation, path: str) -> None:
    """Start r1 and r2 together and see a znode of r1 arrive in r2."""
    fed.start("r1", wait=False)
    fed.start("r2", wait=False)
    fed.wait_ready("r1")
    fed.wait_ready("r2")
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path(path), b"over TLS")
    wait_for(lambda: r2.client.exists(r2.path(path)), 30)
    fed.wait_converged(["r1", "r2"])


# -- SSL ---------------------------------------------------------------------------


def test_ssl_bridges_replicate_and_an_untrusted_ca_fails_at_once(
    ssl_kafka: KafkaBroker, tls: TlsFiles, tmp_path: Path, token: str, zk_servers: ZkServers
) -> None:
    fed = _federation(tmp_path, token, ssl_kafka, zk_servers)
    try:
        for name in ("r1", "r2"):
            fed.write_config(name, kafka={"security_protocol": "SSL",
                                          "ssl": {"cafile": str(tls.ca_cert)}})
        fed.write_config("r3", kafka={"security_protocol": "SSL",
                                      "ssl": {"cafile": str(tls.other_ca_cert)}})
        _r1_to_r2(fed, "/tls")

        fed.start("r3", wait=False)
        rc, took = _wait_exit(fed, "r3")
        assert rc == 1
        assert took < 20, f"took {took:.1f}s: a retry loop?"
        line = _one_error(fed, "r3")
        assert "not trusted" in line and "kafka.ssl.cafile" in line, line
        fed.assert_clean_logs(allowed={"bridge_stopped"})

        # A listener that does not speak TLS ends the handshake: retried (its
        # operator may be moving it to SSL), and the retries say so (before: only
        # "Connection closed", as for a broker that is down).
        fed.write_config("r3", kafka={"security_protocol": "SSL",
                                      "bootstrap_servers": ssl_kafka.internal_bootstrap,
                                      "ssl": {"cafile": str(tls.ca_cert)}})
        before = len(fed.events("r3"))
        fed.start("r3", wait=False)
        wait_for(lambda: any("ends the TLS handshake" in str(e.get("error", ""))
                             for e in fed.events("r3")[before:]), 30,
                 message="r3's retries did not say the listener ends the TLS handshake")
        r3 = fed["r3"]
        assert r3.proc is not None and r3.proc.poll() is None, "r3's bridge gave up"
        fed.stop("r3")

        # The reverse, no TLS configured for an SSL listener: only the config cures
        # it (before: "Unable to bootstrap", retried for ever).
        fed.write_config("r3", kafka={"security_protocol": "PLAINTEXT"})
        line = _stops_at_once(fed, "r3")
        assert "speaks TLS" in line and "kafka.security_protocol" in line, line
    finally:
        fed.close()


def test_client_certificates_replicate_and_a_missing_or_untrusted_one_is_named(
    mtls_kafka: KafkaBroker, tls: TlsFiles, tmp_path: Path, token: str, zk_servers: ZkServers
) -> None:
    fed = _federation(tmp_path, token, mtls_kafka, zk_servers)
    try:
        for name in ("r1", "r2"):
            cert, key = make_client_cert(tls, name)
            fed.write_config(name, kafka={"security_protocol": "SSL", "ssl": {
                "cafile": str(tls.ca_cert), "certfile": str(cert), "keyfile": str(key)}})
        _r1_to_r2(fed, "/mtls")

        stranger, stranger_key = make_client_cert(tls, "stranger", signer="other-ca")
        # Expired yesterday: the broker's alert does not say why, the line does.
        old, old_key = make_client_cert(tls, "old", expired=True)
        expired = time.strftime("%Y-%m-%d", time.gmtime(not_after(old)))
        for identity, says in [({}, "requires a client certificate"),
                               ({"certfile": str(stranger), "keyfile": str(stranger_key)},
                                "refused this bridge's certificate"),
                               ({"certfile": str(old), "keyfile": str(old_key)},
                                f"kafka.ssl.certfile expired on {expired}")]:
            fed.write_config("r3", kafka={"security_protocol": "SSL", "ssl": {
                "cafile": str(tls.ca_cert), **identity}})
            line = _stops_at_once(fed, "r3")
            assert says in line and "kafka.ssl.certfile" in line, line
            # The pre-flight check says the same, without starting a bridge.
            out = fed.cli("check-config", "--connect", "-c", str(fed["r3"].config_path))
            assert out.returncode == 1, out.stdout + out.stderr
            assert "kafka: FAILED: " in out.stderr and says in out.stderr, out.stderr
            assert "zookeeper: OK: " in out.stdout, out.stdout
        out = fed.cli("check-config", "--connect", "-c", str(fed["r1"].config_path))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "kafka: OK: " in out.stdout and "(SSL), this bridge's identity accepted" \
            in out.stdout, out.stdout
        fed.assert_clean_logs(allowed={"bridge_stopped"})
    finally:
        fed.close()


def _client_trust(ca: Path) -> dict[str, str]:
    """Broker properties: client certificates required, signed by ``ca``."""
    return {"listener.name.client.ssl.client.auth": "required",
            "listener.name.client.ssl.truststore.location": str(ca),
            "listener.name.client.ssl.truststore.type": "PEM"}


def test_a_certificate_the_brokers_stop_trusting_while_running_is_named_and_a_new_one_resumes(
    tmp_path: Path, token: str, zk_servers: ZkServers, harness_report: Callable[[str], None],
) -> None:
    # The brokers' operator moves client trust to a new CA (or the bridges'
    # certificates expire) while the bridges run. Before: once the clients
    # reconnected, publishing timed out and was retried for ever, the log saying
    # only that. Now the bridge asks, as at start, and stops naming the key; the
    # service manager's restart then loads whatever the files hold.
    files = make_tls(tmp_path / "tls")
    broker = KafkaBroker(tmp_path / "kafka",
                         security=KafkaSecurity("SSL", files.keystore, files.keystore_password),
                         properties=_client_trust(files.ca_cert))
    broker.start()
    fed = _federation(tmp_path, token, broker, zk_servers)
    try:
        def configure(signer: str) -> None:
            for name in ("r1", "r2"):
                cert, key = make_client_cert(files, name, signer=signer)
                fed.write_config(name, kafka={
                    "security_protocol": "SSL", "request_timeout": 5,
                    "ssl": {"cafile": str(files.ca_cert), "certfile": str(cert),
                            "keyfile": str(key)}})

        configure("ca")
        _r1_to_r2(fed, "/before")
        # The broker's own certificate expired: its operator's to renew (or this host's
        # clock to set right), so the bridges stay and say so (before: r1 stopped,
        # told to check kafka.ssl.cafile, which was right all along; the service
        # manager's restarts would have repeated that until the renewal).
        seen = {name: len(fed.events(name)) for name in ("r1", "r2")}
        reissue_server_cert(files, expired=True)
        broker.restart()
        for name in ("r1", "r2"):
            wait_for(lambda name=name: any(
                e.get("event") == "kafka_unreachable"
                and "certificate has expired" in str(e.get("error"))
                and "ssl.keystore" in str(e.get("error"))
                for e in fed.events(name)[seen[name]:]), 60,
                message=f"{name} did not say the broker's certificate expired")
            proc = fed[name].proc
            assert proc is not None and proc.poll() is None, f"{name}'s bridge gave up"
        before = len(fed.events("r3"))
        fed.write_config("r3", kafka={"security_protocol": "SSL", "ssl": {
            "cafile": str(files.ca_cert)}})
        fed.start("r3", wait=False)
        wait_for(lambda: any(e.get("event") == "retrying"
                             and "certificate has expired" in str(e.get("error"))
                             for e in fed.events("r3")[before:]), 30,
                 message="r3's retries did not say the broker's certificate expired")
        fed.stop("r3")
        # The brokers' operator renews that and moves client trust to a new CA.
        reissue_server_cert(files)
        broker.properties.update(_client_trust(files.other_ca_cert))
        broker.restart()
        back = time.monotonic()
        stopped = []
        for name in ("r1", "r2"):
            rc, _ = _wait_exit(fed, name, timeout=90)
            stopped.append(time.monotonic() - back)
            assert rc == 1, (name, rc)
            line = _last_error(fed, name)
            assert "refused this bridge's certificate" in line, line
            assert "kafka.ssl.certfile" in line, line
        # New certificates from the new CA at the same paths, and a restart: it resumes.
        configure("other-ca")
        _r1_to_r2(fed, "/after")
        fed.assert_clean_logs(allowed={"bridge_stopped", "task_failed"})
        harness_report("client certificate no longer trusted: bridges stopped "
                       + ", ".join(f"{t:.1f}s" for t in stopped) + " after the broker was back")
    finally:
        fed.close()
        broker.close()


# -- SASL_SSL, SCRAM-SHA-512, ACLs -----------------------------------------------------


def test_sasl_scram_with_acls_replicates_without_leaking_secrets(
    sasl_kafka: KafkaBroker, tls: TlsFiles, tmp_path: Path, token: str, zk_servers: ZkServers
) -> None:
    fed = _federation(tmp_path, token, sasl_kafka, zk_servers)
    try:
        _create_topics(sasl_kafka, fed)
        _grant_region_acls(sasl_kafka, fed)
        metrics_port = procs.free_port()
        for name in fed.regions:
            extra = {"metrics": {"listen": f"127.0.0.1:{metrics_port}"}} if name == "r1" else {}
            _sasl(fed, name, tls, **extra)
        fed.start_all()
        r1, r2, r3 = fed["r1"], fed["r2"], fed["r3"]
        r1.client.create(r1.path("/a"), b"1")
        r2.client.create(r2.path("/b"), b"2")
        r3.client.create(r3.path("/c"), b"3")
        fed.wait_converged()
        assert sorted(fed.tree("r1")) == ["/a", "/b", "/c"]

        status = fed.cli("status", "-c", str(r1.config_path))
        status_json = fed.cli("status", "-c", str(r1.config_path), "--json")
        lag = fed.cli("lag", "-c", str(r1.config_path))
        assert status.returncode == 0, status.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert "zkbridge" in metrics
        logs = [fed[n].log_path.read_text() for n in fed.regions]
        _assert_no_secret(*logs, status.stdout, status.stderr, status_json.stdout,
                          lag.stdout, lag.stderr, metrics)
        fed.assert_clean_logs()
    finally:
        fed.close()


def test_wrong_sasl_password_fails_at_once_with_one_line_and_no_secret(
    sasl_kafka: KafkaBroker, tls: TlsFiles, tmp_path: Path, token: str, zk_servers: ZkServers
) -> None:
    fed = _federation(tmp_path, token, sasl_kafka, zk_servers)
    try:
        _sasl(fed, "r1", tls, password=WRONG_PASSWORD)
        fed.start("r1", wait=False)
        rc, took = _wait_exit(fed, "r1")
        assert rc == 1
        assert took < 20, f"took {took:.1f}s: a retry loop?"
        line = _one_error(fed, "r1")
        assert "authentication" in line and "kafka.sasl.password" in line, line
        _assert_no_secret(fed["r1"].log_path.read_text())
    finally:
        fed.close()


def test_a_password_the_brokers_change_while_running_is_named_and_the_new_one_resumes(
    tls: TlsFiles, tmp_path: Path, token: str, zk_servers: ZkServers,
) -> None:
    # r1's SCRAM password is changed on the brokers while the bridges run: its
    # open connections stay authenticated, the next ones are refused. Before:
    # publishing waited for ever. Now it stops naming the key, and its restart
    # reads the new password from password_file.
    security = KafkaSecurity("SASL_SSL", tls.keystore, tls.keystore_password,
                             scram_users={"admin": ADMIN_PASSWORD, **PASSWORDS})
    broker = KafkaBroker(tmp_path / "kafka", security=security)
    broker.start()
    fed = _federation(tmp_path, token, broker, zk_servers)
    secret = tmp_path / "r1.password"
    try:
        secret.write_text(PASSWORDS["r1"] + "\n")
        fed.write_config("r1", kafka={
            "security_protocol": "SASL_SSL", "ssl": {"cafile": str(tls.ca_cert)},
            "sasl": {"mechanism": "SCRAM-SHA-512", "username": "r1",
                     "password_file": str(secret)}})
        _sasl(fed, "r2", tls)
        _r1_to_r2(fed, "/before")
        broker.run_tool("kafka.admin.ConfigCommand", "--bootstrap-server",
                        broker.internal_bootstrap, "--alter", "--add-config",
                        f"SCRAM-SHA-512=[password={NEW_PASSWORD}]",
                        "--entity-type", "users", "--entity-name", "r1")
        broker.restart()  # the clients reconnect
        rc, _ = _wait_exit(fed, "r1", timeout=90)
        assert rc == 1
        line = _last_error(fed, "r1")
        assert "authentication of 'r1' failed" in line and "kafka.sasl.password" in line, line
        r2 = fed["r2"]
        assert r2.proc is not None and r2.proc.poll() is None, "r2's bridge stopped too"
        secret.write_text(NEW_PASSWORD + "\n")
        fed.start("r1")
        r1 = fed["r1"]
        r1.client.create(r1.path("/after"), b"new password")
        wait_for(lambda: r2.client.exists(r2.path("/after")), 30)
        _assert_no_secret(fed["r1"].log_path.read_text(), fed["r2"].log_path.read_text())
        fed.assert_clean_logs(allowed={"bridge_stopped", "task_failed"})
    finally:
        fed.close()
        broker.close()


def test_a_principal_cannot_publish_into_another_regions_topic(
    sasl_kafka: KafkaBroker, tls: TlsFiles, tmp_path: Path, token: str, zk_servers: ZkServers
) -> None:
    fed = _federation(tmp_path, token, sasl_kafka, zk_servers)
    try:
        topics = _create_topics(sasl_kafka, fed)
        _grant_region_acls(sasl_kafka, fed)
        r1_topic = topics[0]

        # The broker itself refuses r2's principal on r1's topic...
        async def produce_as_r2() -> None:
            producer = AIOKafkaProducer(
                bootstrap_servers=sasl_kafka.bootstrap, security_protocol="SASL_SSL",
                ssl_context=create_ssl_context(cafile=str(tls.ca_cert)),
                sasl_mechanism="SCRAM-SHA-512", sasl_plain_username="r2",
                sasl_plain_password=PASSWORDS["r2"], enable_idempotence=True,
                request_timeout_ms=10000)
            await producer.start()
            try:
                await producer.send_and_wait(r1_topic, b"forged", key=b"/forged")
            finally:
                await producer.stop()

        with pytest.raises(TopicAuthorizationFailedError):
            asyncio.run(asyncio.wait_for(produce_as_r2(), 60))

        # ...and a bridge that claims to be r1 with r2's credentials stops with the
        # reason. r1's consumer group is opened to r2 here (a too-broad group ACL)
        # so that what stops it is the write itself, not the group.
        sasl_kafka.add_acls("User:r2", ["Read", "Describe"], group=f"{fed.prefix}.r1")
        _sasl(fed, "r1", tls, user="r2")
        fed["r1"].client.create(fed["r1"].path("/forged"), b"x")
        fed.start("r1", wait=False)
        rc, _ = _wait_exit(fed, "r1", timeout=90)
        assert rc == 1
        errors = [e for e in fed.events("r1") if e.get("level") == "error"]
        assert errors and errors[-1]["event"] == "bridge_stopped", errors
        reason = str(errors[-1]["error"])
        assert reason.startswith("publish: TopicAuthorizationFailedError"), reason
        assert "ACLs" in reason, reason
        _assert_no_secret(fed["r1"].log_path.read_text())
    finally:
        fed.close()
