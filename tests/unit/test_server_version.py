"""A server older than 3.6 is told apart from a passing failure, and named by its release."""

from __future__ import annotations

import pytest
from kazoo.exceptions import ConnectionLoss, UnimplementedError

from bridge.errors import UnsupportedServerError, ZooKeeperError
from bridge.zk.diagnosis import supports_multi_read, version_said
from bridge.zk.errors import translate


def test_an_unimplemented_request_is_an_unsupported_server_never_retried() -> None:
    err = translate(UnimplementedError(), "multiRead /zookeeper")
    assert isinstance(err, UnsupportedServerError) and not err.retriable
    assert str(err) == "multiRead /zookeeper: the server does not implement it"
    # The connection the old server drops right after is a retry, as any other.
    lost = translate(ConnectionLoss(), "multiRead /zookeeper")
    assert isinstance(lost, ZooKeeperError) and lost.retriable


@pytest.mark.parametrize(
    ("srvr", "release"),
    [
        # First lines of real servers' replies.
        ("Zookeeper version: 3.4.14-4c25d480e66aadd371de8bd2fd8da255ac140bcf, built on "
         "03/06/2019 16:18 GMT\nLatency min/avg/max: 0/0/0\n", "3.4.14"),
        ("Zookeeper version: 3.5.10-a32c7183d42325b03e44a06aade6a0f16955bf13, built on "
         "05/29/2022 16:59 GMT\nMode: standalone\n", "3.5.10"),
        ("Zookeeper version: 3.6.4--d65253dcf68e9097c6e95a126463fd5fdeb4521c, built on "
         "12/18/2022 18:10 GMT\n", "3.6.4"),
        # Debian's build leaves the commit id's placeholder in.
        ("Zookeeper version: 3.8.0-${mvngit.commit.id}, built on 2024-12-29 17:54 UTC\n",
         "3.8.0"),
        ("Zookeeper version: 3.9.5-293c895a8d966a3ecb92872be4a1daf87d725da2, built on "
         "2026-02-11 20:18 UTC\n", "3.9.5"),
        ("This ZooKeeper instance is not currently serving requests\n", None),
        ("srvr is not executed because it is not in the whitelist.\n", None),
        ("", None),
    ],
)
def test_the_release_is_read_from_srvr(srvr: str, release: str | None) -> None:
    assert version_said(srvr) == release


def test_only_3_6_and_later_have_multi_read() -> None:
    assert [r for r in ("3.4.14", "3.5.10", "3.6.0", "3.6.4", "3.8.0", "3.10.1", "4.0.0")
            if supports_multi_read(r)] == ["3.6.0", "3.6.4", "3.8.0", "3.10.1", "4.0.0"]
