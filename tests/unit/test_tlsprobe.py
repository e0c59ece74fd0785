"""Where the TLS probe connects: each form a host list's entry may take."""

from __future__ import annotations

import pytest

from bridge.tlsprobe import host_and_port


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
