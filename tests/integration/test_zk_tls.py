"""TLS to ZooKeeper (``zookeeper.tls``): a region whose bridge reaches its ensemble on the
secureClientPort (ZooKeeper's Netty connection factory, a PKCS12 keystore and a client
certificate made with openssl at test time; the server requires client certificates).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.handlers.threading import KazooTimeoutError

from tests.conftest import ZkServers
from tests.harness import procs
from tests.harness.broker import Broker
from tests.harness.procs import wait_for
from tests.harness.tls import (
    TlsFiles,
    make_client_cert,
    make_tls,
    not_after,
    reissue_server_cert,
)
from tests.harness.zookeeper import ZooKeeperServer
from tests.harness.zookeeper import version as zookeeper_version
from tests.integration.federation import Federation, scrape

pytestmark = [pytest.mark.integration, pytest.mark.every_zookeeper]


# A server that allows only TLS 1.3. ZooKeeper 3.8's default ssl.ciphersuites are TLS 1.2
# suites only, so there such a server needs TLS 1.3 suites named, or it ends every
# handshake, its own Java client's too (tried: "No appropriate protocol"). 3.9's default
# adds the TLS 1.3 suites (X509Util.getTLSv13Ciphers): there the TLS 1.2 suites are named
# to make the same server.
TLS13_ONLY = ("ssl.protocol=TLSv1.3", "ssl.enabledProtocols=TLSv1.3")
TLS13_SUITES = "ssl.ciphersuites=TLS_AES_128_GCM_SHA256,TLS_AES_256_GCM_SHA384"
NO_TLS13_SUITES = () if zookeeper_version() == "3.8" else (
    "ssl.ciphersuites=TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,"
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",)


def secure_config(files: TlsFiles, port: int, *more: str) -> list[str]:
    """zoo.cfg lines of a server speaking only TLS on ``port``, requiring client
    certificates signed by the test CA."""
    return [
        f"secureClientPort={port}",
        "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
        f"ssl.keyStore.location={files.keystore}",
        f"ssl.keyStore.password={files.keystore_password}",
        "ssl.keyStore.type=PKCS12",
        f"ssl.trustStore.location={files.ca_cert}",
        "ssl.trustStore.type=PEM",
        "ssl.clientAuth=need",  # ZooKeeper's default: clients show a certificate
        *more,
    ]


def trusting_only(config: Sequence[str], ca: Path) -> tuple[str, ...]:
    """A server's zoo.cfg lines with its client trust moved to ``ca`` alone."""
    return tuple(f"ssl.trustStore.location={ca}"
                 if line.startswith("ssl.trustStore.location=") else line for line in config)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[ZooKeeperServer, int, TlsFiles]]:
    files = make_tls(tmp_path / "tls")
    port = procs.free_port()
    server = ZooKeeperServer("r1-tls", extra_config=secure_config(files, port))
    server.start()
    try:
        yield server, port, files
    finally:
        server.close()


def assert_stops_naming(fed: Federation, key: str) -> str:
    """r1's bridge stops by itself (exit 1), its last lines naming ``key``; those lines."""
    before = fed["r1"].log_path.stat().st_size if fed["r1"].log_path.exists() else 0
    proc = fed.start("r1", wait=False).proc
    assert proc is not None
    return assert_stopped_naming(fed, proc, before, key, timeout=60)


def assert_stopped_naming(fed: Federation, proc: subprocess.Popen[bytes], before: int,
                          key: str, timeout: float) -> str:
    """r1's running ``proc`` stops by itself (exit 1), the lines it logged after offset
    ``before`` naming ``key``; those lines."""
    proc.wait(timeout=timeout)
    with fed["r1"].log_path.open("rb") as f:
        f.seek(before)
        tail = f.read().decode(errors="replace")[-3000:]
    assert proc.returncode != 0, tail
    assert key in tail, tail
    return tail


def test_a_region_reached_over_tls_replicates_and_a_wrong_ca_is_named(
    tmp_path: Path, token: str, broker: Broker, zk_servers: ZkServers,
    tls_server: tuple[ZooKeeperServer, int, TlsFiles],
) -> None:
    server, port, files = tls_server
    secure = f"127.0.0.1:{port}"
    cert, key = make_client_cert(files)
    mine = {"certfile": str(cert), "keyfile": str(key)}
    # Only TLS is spoken there: a plain client gets nowhere.
    plain = KazooClient(hosts=secure)
    with pytest.raises(KazooTimeoutError):
        plain.start(timeout=3)
    plain.stop()
    fed = Federation(tmp_path, token, broker, {"r1": server, "r2": zk_servers.regions[1]})
    try:
        fed.write_config("r1", zookeeper={"hosts": secure,
                                          "tls": {"cafile": str(files.ca_cert), **mine}})
        fed.start_all()
        r1, r2 = fed["r1"], fed["r2"]
        r1.client.create(r1.path("/from-tls"), b"a")
        r2.client.create(r2.path("/to-tls"), b"b")
        wait_for(lambda: r2.client.exists(r2.path("/from-tls")) is not None, 20)
        wait_for(lambda: r1.client.exists(r1.path("/to-tls")) is not None, 20)
        fed.wait_converged()  # verify reads r1 over TLS too, from its config
        # Healthy but for the test certificate's 2 days: status names it first.
        out = fed.cli("status", "-c", str(r1.config_path))
        assert out.returncode == 0, out.stdout + out.stderr
        first = out.stdout.splitlines()[0]
        assert first.startswith("CERT_EXPIRING: zookeeper.tls.certfile expires in "), first
        assert "(+" not in first, first  # nothing else wrong
        assert "cert     zookeeper.tls.certfile expires " in out.stdout, out.stdout
        # The pre-flight check an operator runs before restarting on renewed files.
        out = fed.cli("check-config", "--connect", "-c", str(r1.config_path))
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"zookeeper: OK: {secure}: connected (TLS), session 0x" in out.stdout, out.stdout
        assert "readable" in out.stdout and "kafka: OK: " in out.stdout, out.stdout
        out = fed.cli("lag", "-c", str(r1.config_path), "--max-seconds", "30")
        assert out.returncode == 0, out.stdout + out.stderr
        fed.assert_clean_logs()

        # A CA that signed nothing of the server's: a clear stop, naming the key.
        assert fed.stop("r1") == 0
        fed.write_config("r1", zookeeper={"hosts": secure, "connect_timeout": 3,
                                          "tls": {"cafile": str(files.other_ca_cert),
                                                  **mine}})
        assert_stops_naming(fed, "zookeeper.tls.cafile")

        # The server requires a client certificate: none, or one its trust store does
        # not hold, is as incurable, and names certfile (before: "check zookeeper.hosts
        # and that the ensemble is up", retried for ever).
        stranger, stranger_key = make_client_cert(files, "stranger", signer="other-ca")
        for identity, says in [({}, "requires a client certificate"),
                               ({"certfile": str(stranger), "keyfile": str(stranger_key)},
                                "refuses this bridge's certificate")]:
            fed.write_config("r1", zookeeper={"hosts": secure, "connect_timeout": 3,
                                              "tls": {"cafile": str(files.ca_cert),
                                                      **identity}})
            tail = assert_stops_naming(fed, "zookeeper.tls.certfile")
            assert says in tail, tail

        # A certificate that expired yesterday: the server's alert does not say why,
        # the line does, with the date (before: "check zookeeper.tls.certfile: the CA
        # that signed it must be in the servers' ssl.trustStore, and it must be valid
        # now"); check-config says EXPIRED.
        old, old_key = make_client_cert(files, "old", expired=True)
        fed.write_config("r1", zookeeper={"hosts": secure, "connect_timeout": 3, "tls": {
            "cafile": str(files.ca_cert), "certfile": str(old), "keyfile": str(old_key)}})
        out = fed.cli("check-config", "-c", str(fed["r1"].config_path))
        assert out.returncode == 0 and "EXPIRED" in out.stdout, out.stdout + out.stderr
        out = fed.cli("check-config", "--connect", "-c", str(fed["r1"].config_path))
        assert out.returncode == 1, out.stdout + out.stderr
        assert "zookeeper: FAILED: " in out.stderr, out.stderr
        assert "zookeeper.tls.certfile expired on " in out.stderr, out.stderr
        assert "kafka: OK: " in out.stdout, out.stdout
        tail = assert_stops_naming(fed, "zookeeper.tls.certfile expired on "
                                   + time.strftime("%Y-%m-%d", time.gmtime(not_after(old))))
        assert "renew it in place" in tail, tail

        # No zookeeper.tls for a port that speaks only TLS: as incurable (before:
        # "check zookeeper.hosts and that the ensemble is up", retried for ever).
        fed.write_config("r1", zookeeper={"hosts": secure, "connect_timeout": 3})
        tail = assert_stops_naming(fed, "set zookeeper.tls")
        assert "speaks TLS" in tail, tail
    finally:
        fed.close()


def test_a_tls13_only_ensemble_is_named_until_it_offers_tls13_suites_then_replicates(
    tmp_path: Path, token: str, broker: Broker, zk_servers: ZkServers,
) -> None:
    files = make_tls(tmp_path / "tls")
    port = procs.free_port()
    server = ZooKeeperServer("r1-tls13", extra_config=secure_config(files, port, *TLS13_ONLY,
                                                                     *NO_TLS13_SUITES))
    server.start()
    secure = f"127.0.0.1:{port}"
    cert, key = make_client_cert(files)
    fed = Federation(tmp_path, token, broker, {"r1": server, "r2": zk_servers.regions[1]})
    try:
        fed.write_config("r1", zookeeper={
            "hosts": secure, "connect_timeout": 3,
            "tls": {"cafile": str(files.ca_cert), "certfile": str(cert), "keyfile": str(key)}})
        fed.start("r1", wait=False)
        fed.start("r2")
        # The server ends every handshake: a condition its operator cures, so the
        # bridge keeps trying, and says why (before: "check zookeeper.hosts and that
        # the ensemble is up").
        wait_for(lambda: any("ssl.ciphersuites" in str(e.get("error", ""))
                             for e in fed.events("r1")), 30,
                 message="r1's bridge did not say the server ends the TLS handshake")
        r1 = fed["r1"]
        assert r1.proc is not None and r1.proc.poll() is None, "r1's bridge gave up"
        # The servers' operator names TLS 1.3 suites: the bridge gets in by itself.
        server.extra_config = (*server.extra_config, TLS13_SUITES)
        server.restart()
        fed.wait_ready("r1", timeout=60)
        r2 = fed["r2"]
        r1.client.create(r1.path("/over-tls13"), b"a")
        r2.client.create(r2.path("/to-tls13"), b"b")
        wait_for(lambda: r2.client.exists(r2.path("/over-tls13")) is not None, 20)
        wait_for(lambda: r1.client.exists(r1.path("/to-tls13")) is not None, 20)
        fed.wait_converged()
        # Only TLS 1.3 is spoken there: a client that stops at 1.2 is refused.
        context = ssl.create_default_context(cafile=str(files.ca_cert))
        context.load_cert_chain(cert, key)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection(("127.0.0.1", port), 5) as raw, \
                pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="127.0.0.1")
        fed.assert_clean_logs(allowed={"retrying"})
    finally:
        fed.close()
        server.close()


def test_a_certificate_the_servers_stop_trusting_while_running_is_named_and_a_new_one_resumes(
    tmp_path: Path, token: str, broker: Broker, zk_servers: ZkServers,
    tls_server: tuple[ZooKeeperServer, int, TlsFiles], harness_report: Callable[[str], None],
) -> None:
    server, port, files = tls_server
    cert, key = make_client_cert(files)
    fed = Federation(tmp_path, token, broker, {"r1": server, "r2": zk_servers.regions[1]})
    metrics = procs.free_port()
    try:
        fed.write_config("r1", metrics={"listen": f"127.0.0.1:{metrics}"}, zookeeper={
            "hosts": f"127.0.0.1:{port}", "connect_timeout": 3,
            "tls": {"cafile": str(files.ca_cert), "certfile": str(cert), "keyfile": str(key)}})
        fed.start_all()
        r1, r2 = fed["r1"], fed["r2"]
        # The certificate's expiry, as openssl reads it, and a warning: 2 days left.
        gauge = 'zkbridge_certificate_expiry_timestamp_seconds{key="zookeeper.tls.certfile"}'
        assert scrape(metrics)[gauge] == not_after(cert)
        ca_gauge = gauge.replace("certfile", "cafile")
        assert scrape(metrics)[ca_gauge] == not_after(files.ca_cert)
        expiring = [e for e in fed.events("r1") if e.get("event") == "certificate_expiring"]
        assert len(expiring) == 1 and 1.9 < float(expiring[0]["days_left"]) <= 2, expiring
        r1.client.create(r1.path("/before"), b"a")
        wait_for(lambda: r2.client.exists(r2.path("/before")) is not None, 20)
        # A server that ends every handshake (TLS 1.3 only, without TLS 1.3 suites): its
        # operator cures that, so the running bridge stays, and says why.
        trusting = server.extra_config
        server.extra_config = (*trusting, *TLS13_ONLY, *NO_TLS13_SUITES)
        server.restart()
        wait_for(lambda: any(e.get("event") == "zookeeper_unreachable"
                             and "ssl.ciphersuites" in str(e.get("error"))
                             for e in fed.events("r1")), 40,
                 message="r1's bridge did not say the server ends the TLS handshake")
        assert r1.proc is not None and r1.proc.poll() is None, "r1's bridge gave up"
        # The servers' certificate expired: theirs to renew (or this host's clock to set
        # right), so the bridge stays and says so (before: it stopped, told to check
        # zookeeper.tls.cafile, which was right all along).
        reissue_server_cert(files, expired=True)
        server.extra_config = trusting
        seen = len(fed.events("r1"))
        server.restart()
        wait_for(lambda: any(e.get("event") == "zookeeper_unreachable"
                             and "certificate has expired" in str(e.get("error"))
                             and "ssl.keyStore" in str(e.get("error"))
                             for e in fed.events("r1")[seen:]), 40,
                 message="r1's bridge did not say the servers' certificate expired")
        assert r1.proc is not None and r1.proc.poll() is None, "r1's bridge gave up"
        reissue_server_cert(files)
        # The servers' operator rotates the clients' CA: after a restart the servers
        # trust only the new one, and the running bridge's next connection is refused.
        # Before, the bridge reconnected for ever, its only hint "the ensemble may have
        # been wiped or restored".
        server.extra_config = trusting_only(trusting, files.other_ca_cert)
        before = r1.log_path.stat().st_size
        proc = r1.proc
        assert proc is not None
        server.restart()
        back = time.monotonic()
        tail = assert_stopped_naming(fed, proc, before, "zookeeper.tls.certfile", timeout=90)
        harness_report(f"client certificate no longer trusted by ZooKeeper: the bridge "
                       f"stopped {time.monotonic() - back:.1f}s after the server was back")
        assert "refuses this bridge's certificate" in tail, tail
        # A certificate from the new CA at the same paths: the bridge starts again as is
        # (the service manager's restart) and catches up.
        make_client_cert(files, signer="other-ca", days=400)
        r2.client.create(r2.path("/while-refused"), b"b")
        fed.start("r1")
        # The renewed file's expiry, read at this start; nothing due, so no new warning.
        assert scrape(metrics)[gauge] == not_after(cert)
        assert scrape(metrics)[gauge] - time.time() > 399 * 86400
        assert len([e for e in fed.events("r1") if e.get("event") == "certificate_expiring"]) == 1
        wait_for(lambda: r1.client.exists(r1.path("/while-refused")) is not None, 30)
        r1.client.create(r1.path("/after"), b"c")
        wait_for(lambda: r2.client.exists(r2.path("/after")) is not None, 20)
        fed.wait_converged()
        fed.assert_clean_logs(allowed={"bridge_stopped", "task_failed"})
    finally:
        fed.close()


def test_a_server_that_refuses_the_bridge_while_another_member_may_take_it_is_waited_out(
    tmp_path: Path, token: str, broker: Broker, zk_servers: ZkServers,
) -> None:
    # A rolling change of the servers' client trust: one server in zookeeper.hosts
    # already trusts only a new CA, the one that still takes this bridge's certificate
    # is down for its own restart. One session needs one server: the bridge waits for
    # it, saying which refuses (before: it stopped at the first refusal, a restart
    # loop under systemd until the other server was back). Two standalone servers
    # stand in for the members; the bridge's data lives on the one that takes it.
    files = make_tls(tmp_path / "tls")
    ports = procs.free_port(), procs.free_port()
    trusting = secure_config(files, ports[1])
    refusing = ZooKeeperServer("r1-refusing", extra_config=trusting_only(
        secure_config(files, ports[0]), files.other_ca_cert))
    taking = ZooKeeperServer("r1-taking", extra_config=trusting)
    refusing.start()
    taking.start()
    cert, key = make_client_cert(files)
    no, yes = (f"127.0.0.1:{port}" for port in ports)
    fed = Federation(tmp_path, token, broker, {"r1": taking, "r2": zk_servers.regions[1]})
    try:
        fed.write_config("r1", zookeeper={
            "hosts": f"{no},{yes}", "connect_timeout": 3,
            "tls": {"cafile": str(files.ca_cert), "certfile": str(cert), "keyfile": str(key)}})
        taking.stop()
        fed.start("r1", wait=False)
        fed.start("r2")
        said = "refuses this bridge's certificate"
        waited = f"(1 of 2 servers refuse; {yes}: no answer; retrying the others)"
        wait_for(lambda: any(said in str(e.get("error")) and waited in str(e.get("error"))
                             for e in fed.events("r1")), 30,
                 message="r1's bridge did not say which server refuses it")
        r1, r2 = fed["r1"], fed["r2"]
        assert r1.proc is not None and r1.proc.poll() is None, "r1's bridge gave up"
        taking.start()
        fed.wait_ready("r1", timeout=60)
        r1.client.create(r1.path("/through-the-other"), b"a")
        wait_for(lambda: r2.client.exists(r2.path("/through-the-other")) is not None, 20)

        # The same while running: the member it is connected to goes down for longer
        # than the watchdog waits; the bridge says why it cannot reconnect, and stays.
        seen = len(fed.events("r1"))
        taking.stop()
        wait_for(lambda: any(e.get("event") == "zookeeper_unreachable"
                             and waited in str(e.get("error"))
                             for e in fed.events("r1")[seen:]), 40,
                 message="r1's bridge did not say which server refuses it while running")
        assert r1.proc is not None and r1.proc.poll() is None, "r1's bridge gave up"
        r2.client.create(r2.path("/while-down"), b"b")
        taking.start()
        wait_for(lambda: r1.client.exists(r1.path("/while-down")) is not None, 60)
        fed.wait_converged()

        # Every server refusing it: no retry cures that, the bridge stops naming the key.
        proc, before = r1.proc, r1.log_path.stat().st_size
        assert proc is not None
        taking.extra_config = trusting_only(trusting, files.other_ca_cert)
        taking.restart()
        tail = assert_stopped_naming(fed, proc, before, "zookeeper.tls.certfile", timeout=90)
        assert said in tail, tail
        fed.assert_clean_logs(allowed={"bridge_stopped", "task_failed"})
    finally:
        fed.close()
        taking.close()
        refusing.close()
