"""TLS to ZooKeeper (``zookeeper.tls``): a region whose bridge reaches its ensemble on the
secureClientPort (ZooKeeper's Netty connection factory, a PKCS12 keystore and a client
certificate made with openssl at test time; the server requires client certificates).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.handlers.threading import KazooTimeoutError

from tests.conftest import ZkServers
from tests.harness import procs
from tests.harness.broker import Broker
from tests.harness.procs import wait_for
from tests.harness.tls import TlsFiles, make_client_cert, make_tls
from tests.harness.zookeeper import ZooKeeperServer
from tests.integration.federation import Federation

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[ZooKeeperServer, int, TlsFiles]]:
    files = make_tls(tmp_path / "tls")
    port = procs.free_port()
    server = ZooKeeperServer("r1-tls", extra_config=[
        f"secureClientPort={port}",
        "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
        f"ssl.keyStore.location={files.keystore}",
        f"ssl.keyStore.password={files.keystore_password}",
        "ssl.keyStore.type=PKCS12",
        f"ssl.trustStore.location={files.ca_cert}",
        "ssl.trustStore.type=PEM",
        "ssl.clientAuth=need",  # ZooKeeper's default: clients show a certificate
    ])
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
    proc.wait(timeout=60)
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
        out = fed.cli("status", "-c", str(r1.config_path))
        assert out.returncode == 0 and "HEALTHY" in out.stdout, out.stdout + out.stderr
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
    finally:
        fed.close()
