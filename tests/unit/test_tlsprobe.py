"""The TLS probe: where it connects (each form a host list's entry may take), and what
a server's answer to its handshake means."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.certexpiry import expired_on
from bridge.config import ZooKeeperSettings, ZooKeeperTls
from bridge.tlsprobe import ACCEPTED, Refusal, host_and_port, probe, speaks_tls
from bridge.zk.diagnosis import UNREACHED, connect_failure
from tests.harness.tls import TlsFiles, make_client_cert, make_tls


@pytest.mark.parametrize(("server", "expected"), [
    ("zk1", ("zk1", 2181)),
    ("zk1:2281", ("zk1", 2281)),
    ("10.0.0.1", ("10.0.0.1", 2181)),
    ("10.0.0.1:9", ("10.0.0.1", 9)),
    ("[::1]", ("::1", 2181)),
    ("[::1]:2281", ("::1", 2281)),
    ("[fe80::1:2]", ("fe80::1:2", 2181)),
])
def test_host_and_port(server: str, expected: tuple[str, int]) -> None:
    assert host_and_port(server, 2181) == expected


# -- what a server's answer to a handshake means, against local sockets ------------------


@contextlib.contextmanager
def _listening(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback server whose accepted connections ``answer`` handles; its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


def _closes(conn: socket.socket) -> None:
    """A plain server given a ClientHello: it reads a few bytes and hangs up."""
    conn.recv(4)


def _silent(conn: socket.socket) -> None:
    """A frozen server: the kernel accepted, nobody answers."""
    time.sleep(1.5)


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_a_server_that_hangs_up_during_the_handshake_is_a_handshake_refusal() -> None:
    with _listening(_closes) as port:
        refusal = probe("127.0.0.1", port, _client_context(), timeout=2)
        assert refusal is not None and refusal.refused == "handshake", refusal
        assert not refusal.curable_here
        assert not speaks_tls("127.0.0.1", port, timeout=2)


def test_a_server_that_never_answers_refuses_nothing() -> None:
    # A frozen server is "no answer", never "ends the handshake".
    with _listening(_silent) as port:
        assert probe("127.0.0.1", port, _client_context(), timeout=0.5) is None
        assert not speaks_tls("127.0.0.1", port, timeout=0.5)


def test_nobody_listening_refuses_nothing() -> None:
    with _listening(_closes) as port:
        pass
    assert probe("127.0.0.1", port, _client_context(), timeout=0.5) is None
    assert not speaks_tls("127.0.0.1", port, timeout=0.5)


def test_a_tls_server_speaks_tls_whether_or_not_it_wants_a_client_certificate(
    tmp_path: Path,
) -> None:
    files = make_tls(tmp_path)
    for required in (False, True):
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(files.server_cert, files.server_key)
        if required:
            server.load_verify_locations(files.ca_cert)
            server.verify_mode = ssl.CERT_REQUIRED

        def handshake(conn: socket.socket, server: ssl.SSLContext = server) -> None:
            with contextlib.suppress(ssl.SSLError, OSError), \
                    server.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(1)
                tls.recv(1)

        with _listening(handshake) as port:
            assert speaks_tls("127.0.0.1", port, timeout=2), required


# -- the error that closed a connection, when nobody awaited it --------------------------


@pytest.mark.parametrize(("error", "reported"), [
    (ssl.SSLError(1, "[SSL: SSLV3_ALERT_CERTIFICATE_UNKNOWN] sslv3 alert certificate unknown"),
     False),
    (ConnectionResetError(104, "Connection reset by peer"), False),
    (ValueError("a bug"), True),
])
def test_an_unawaited_connection_error_is_no_traceback_anything_else_is(
    error: Exception, reported: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    # CI saw aiokafka's unawaited TLS alert come back as a traceback in the
    # bridge's log, after the bridge had named the refused certificate.
    from bridge.daemon import _unawaited

    loop = asyncio.new_event_loop()
    loop.set_exception_handler(_unawaited)
    try:
        future = loop.create_future()
        future.set_exception(error)
        del future
        gc.collect()
    finally:
        loop.close()
    told = [r for r in caplog.records if r.name == "asyncio"]
    assert bool(told) == reported, told


# -- certificates outside their validity period ------------------------------------------


def _tls_answer(server: ssl.SSLContext) -> Callable[[socket.socket], None]:
    def handshake(conn: socket.socket) -> None:
        with contextlib.suppress(ssl.SSLError, OSError), \
                server.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(1)
            tls.recv(1)
    return handshake


def _server_context(files: TlsFiles, *, clients_signed_by: Path | None = None) -> ssl.SSLContext:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files.server_cert, files.server_key)
    if clients_signed_by is not None:
        server.load_verify_locations(clients_signed_by)
        server.verify_mode = ssl.CERT_REQUIRED
    return server


def _zookeeper(port: int, files: TlsFiles, cert: Path | None = None,
               key: Path | None = None) -> ZooKeeperSettings:
    return ZooKeeperSettings(f"127.0.0.1:{port}", tls=ZooKeeperTls(
        cafile=str(files.ca_cert), certfile=str(cert) if cert else None,
        keyfile=str(key) if key else None))


def test_an_expired_server_certificate_is_the_servers_to_renew_and_retried(
    tmp_path: Path,
) -> None:
    files = make_tls(tmp_path, server_expired=True)
    with _listening(_tls_answer(_server_context(files))) as port:
        context = ssl.create_default_context(cafile=files.ca_cert)
        refusal = probe("127.0.0.1", port, context, timeout=2)
        assert refusal is not None and refusal.refused == "validity", refusal
        assert "expired" in refusal.why
        assert not refusal.curable_here
        why, fatal = connect_failure(_zookeeper(port, files))
    assert not fatal
    assert "not valid now (certificate has expired)" in why, why
    assert "zookeeper.tls.cafile" in why, why
    assert "ssl.keyStore" in why and "clock" in why, why


def test_an_expired_client_certificate_is_named_with_its_date(tmp_path: Path) -> None:
    files = make_tls(tmp_path)
    expired, expired_key = make_client_cert(files, "old", expired=True)
    valid, valid_key = make_client_cert(files, "new")
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    server = _server_context(files, clients_signed_by=files.ca_cert)
    with _listening(_tls_answer(server)) as port:
        why, fatal = connect_failure(_zookeeper(port, files, expired, expired_key))
        assert fatal
        assert f"zookeeper.tls.certfile expired on {yesterday}T" in why, why
        assert "renew it in place" in why, why
        # A valid certificate the server takes: nothing refused.
        bare = probe("127.0.0.1", port, ssl.create_default_context(cafile=files.ca_cert),
                     timeout=2)  # no certificate shown: refused
        assert isinstance(bare, Refusal) and bare.refused == "client", bare
        context = ssl.create_default_context(cafile=files.ca_cert)
        context.load_cert_chain(valid, valid_key)
        assert probe("127.0.0.1", port, context, timeout=2) == ACCEPTED
    assert expired_on(expired) is not None and expired_on(valid) is None
    assert expired_on(tmp_path / "missing.pem") is None


# -- several servers: a refusal is fatal only when every server refuses ------------------


def _hosts(*ports: int) -> str:
    return ",".join(f"127.0.0.1:{port}" for port in ports)


def test_one_server_refusing_while_another_takes_the_bridge_is_retried(
    tmp_path: Path,
) -> None:
    # A rolling change of the servers' trust: one member already trusts only a new
    # client CA, another still takes this bridge, a third is down for its restart.
    files = make_tls(tmp_path)
    other = make_tls(tmp_path / "other")
    cert, key = make_client_cert(files, "bridge")
    refusing = _server_context(files, clients_signed_by=other.ca_cert)
    taking = _server_context(files, clients_signed_by=files.ca_cert)
    with _listening(_closes) as down:
        pass  # a port nobody listens on any more
    with _listening(_tls_answer(refusing)) as no, _listening(_tls_answer(taking)) as yes:
        settings = ZooKeeperSettings(_hosts(no, yes, down), tls=ZooKeeperTls(
            cafile=str(files.ca_cert), certfile=str(cert), keyfile=str(key)))
        why, fatal = connect_failure(settings)
        assert not fatal, why
        assert f"ZooKeeper at 127.0.0.1:{no} refuses this bridge's certificate" in why, why
        assert "zookeeper.tls.certfile" in why, why
        assert (f"(1 of 3 servers refuse; 127.0.0.1:{yes}: takes it; "
                f"127.0.0.1:{down}: no answer; retrying the others)") in why, why
        # Every server refusing: no retry can cure it.
        with _listening(_tls_answer(refusing)) as also_no:
            settings = ZooKeeperSettings(_hosts(no, also_no), tls=settings.tls)
            why, fatal = connect_failure(settings)
        assert fatal and "servers refuse" not in why, why


def test_servers_refusing_while_the_others_do_not_answer_are_retried(
    tmp_path: Path,
) -> None:
    files = make_tls(tmp_path)
    other = make_tls(tmp_path / "other")
    with _listening(_closes) as down:
        pass
    with _listening(_tls_answer(_server_context(other))) as untrusted:
        tls = ZooKeeperTls(cafile=str(files.ca_cert))
        why, fatal = connect_failure(ZooKeeperSettings(_hosts(untrusted, down), tls=tls))
        assert not fatal, why
        assert "check zookeeper.tls.cafile" in why, why
        assert f"127.0.0.1:{down}: no answer" in why, why
        why, fatal = connect_failure(ZooKeeperSettings(_hosts(untrusted), tls=tls))
        assert fatal and "check zookeeper.tls.cafile" in why, why


def test_a_plain_bridge_stops_only_when_every_server_speaks_tls_only(
    tmp_path: Path,
) -> None:
    files = make_tls(tmp_path)
    with _listening(_tls_answer(_server_context(files))) as secure, \
            _listening(_closes) as plain:
        why, fatal = connect_failure(ZooKeeperSettings(_hosts(secure, plain)))
        assert not fatal, why
        assert f"ZooKeeper at 127.0.0.1:{secure} speaks TLS" in why, why
        assert f"(1 of 2 servers speak TLS; 127.0.0.1:{plain}: no TLS; retrying" in why, why
        why, fatal = connect_failure(ZooKeeperSettings(_hosts(secure)))
        assert fatal and "set zookeeper.tls" in why, why
        why, fatal = connect_failure(ZooKeeperSettings(_hosts(plain)))
        assert not fatal and why == UNREACHED, why
