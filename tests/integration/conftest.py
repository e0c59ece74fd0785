"""Fixtures that build a federation of bridges on the shared servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REGION_NAMES, ZkServers
from tests.harness.broker import Broker
from tests.integration.federation import Federation


@pytest.fixture
def make_federation(
    tmp_path: Path, token: str, broker: Broker, zk_servers: ZkServers
) -> Iterator[Callable[..., Federation]]:
    """Build a federation over the three region servers (plus ``spare=True`` a fourth)."""
    made: list[Federation] = []

    def make(*, spare: bool = False) -> Federation:
        servers = dict(zip(REGION_NAMES, zk_servers.regions, strict=True))
        if spare:
            servers["r4"] = zk_servers.spare
        fed = Federation(tmp_path, token, broker, servers)
        made.append(fed)
        return fed

    try:
        yield make
    finally:
        for fed in made:
            fed.close()


@pytest.fixture
def federation(make_federation: Callable[..., Federation]) -> Federation:
    return make_federation()


@pytest.fixture
def on_tansu(tmp_path: Path, token: str, tansu: Broker, zk_servers: ZkServers
             ) -> Iterator[Federation]:
    """A federation on tansu whatever the suite's broker: what only the demo's broker shows."""
    fed = Federation(tmp_path, token, tansu, dict(zip(REGION_NAMES, zk_servers.regions,
                                                      strict=True)))
    try:
        yield fed
    finally:
        fed.close()
