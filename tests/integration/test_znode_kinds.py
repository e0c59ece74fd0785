"""Container and TTL znodes: persistent to ZooKeeper's clients, so replicated.

ZooKeeper shows a container or TTL znode to clients as a persistent one
(``ephemeralOwner`` 0), so the bridge replicates it and what is under it, and
other regions hold it as a persistent znode. Its lifecycle is the origin's:
the origin's server removes it (a container once its last child is gone, a
TTL znode once it expired childless) and that delete is replicated like any.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError
from kazoo.protocol.serialization import Create2, int_struct, write_buffer, write_string
from kazoo.security import OPEN_ACL_UNSAFE

from tests.harness.procs import wait_for
from tests.integration.federation import Federation

# Server behaviours (container and TTL removal): on every ZooKeeper line tested.
pytestmark = [pytest.mark.integration, pytest.mark.every_zookeeper]

CONTAINER = 4  # CreateMode flags
PERSISTENT_WITH_TTL = 5


class _CreateContainer(Create2):
    type = 19  # kazoo has no call for it; the reply is create2's


class _CreateTtl(NamedTuple):
    path: str
    data: bytes
    acl: Any
    flags: int
    ttl: int
    type = 21

    def serialize(self) -> bytearray:
        b = bytearray(write_string(self.path))
        b.extend(write_buffer(self.data))
        b.extend(int_struct.pack(len(self.acl)))
        for acl in self.acl:
            b.extend(int_struct.pack(acl.perms) + write_string(acl.id.scheme)
                     + write_string(acl.id.id))
        b.extend(int_struct.pack(self.flags))
        b.extend(self.ttl.to_bytes(8, "big", signed=True))
        return b

    @classmethod
    def deserialize(cls, raw: bytes, offset: int) -> Any:
        return Create2.deserialize(raw, offset)


def _call(client: KazooClient, request: Any) -> Any:
    result = client.handler.async_result()
    client._call(request, result)
    return result.get(timeout=10)


def create_container(client: KazooClient, path: str, data: bytes = b"") -> None:
    _call(client, _CreateContainer(path, data, OPEN_ACL_UNSAFE, CONTAINER))


def create_ttl(client: KazooClient, path: str, data: bytes, ttl_ms: int) -> None:
    _call(client, _CreateTtl(path, data, OPEN_ACL_UNSAFE, PERSISTENT_WITH_TTL, ttl_ms))


def test_a_container_is_replicated_and_so_is_its_removal_by_the_origins_server(
    federation: Federation,
) -> None:
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    create_container(r1.client, r1.path("/flags"), b"set-by-curator")
    r1.client.create(r1.path("/flags/a"), b"on")
    wait_for(lambda: r2.client.exists(r2.path("/flags/a")), 30, message="child of a container")
    assert r2.client.get(r2.path("/flags"))[0] == b"set-by-curator"
    fed.wait_converged()
    # Its last child gone, r1's server removes the container; r2 follows.
    r1.client.delete(r1.path("/flags/a"))
    _removed_by_r1s_server_then_in_r2(fed, "/flags")


def test_a_ttl_znode_is_replicated_and_so_is_its_expiry(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    create_ttl(r1.client, r1.path("/lease"), b"held", ttl_ms=4000)
    _round_trip(fed, "r1", "r2", "/marker")
    assert r2.client.get(r2.path("/lease"))[0] == b"held"
    _removed_by_r1s_server_then_in_r2(fed, "/lease")


def _removed_by_r1s_server_then_in_r2(fed: Federation, rel: str) -> None:
    r1, r2 = fed["r1"], fed["r2"]
    wait_for(lambda: not r1.client.exists(r1.path(rel)), 30,
             message=f"r1's server did not remove {rel}")
    wait_for(lambda: not r2.client.exists(r2.path(rel)), 30,
             message=f"{rel}'s removal did not reach r2")
    fed.wait_converged()
    fed.assert_clean_logs()


def _register_both_then_leave_r1(fed: Federation, app1: KazooClient, app2: KazooClient,
                                 svc: str) -> None:
    """r1 and r2 each register an instance under ``svc``; r1's leaves, and r1's
    server removes its emptied container. r2's instance keeps r2's znode."""
    r1, r2 = fed["r1"], fed["r2"]
    create_container(app1, r1.path(svc))
    app1.create(r1.path(f"{svc}/i1"), b"10.0.1.1", ephemeral=True)
    wait_for(lambda: r2.client.exists(r2.path(svc)), 30, message="the container")
    with contextlib.suppress(NodeExistsError):
        create_container(app2, r2.path(svc))  # what creatingParentContainersIfNeeded meets
    app2.create(r2.path(f"{svc}/i2"), b"10.0.2.1", ephemeral=True)
    app1.delete(r1.path(f"{svc}/i1"))
    wait_for(lambda: not r1.client.exists(r1.path(svc)), 30,
             message="r1's server removes the emptied container")


def _round_trip(fed: Federation, src: str, dst: str, name: str) -> None:
    """Everything ``src``'s bridge published before now has reached ``dst``."""
    a, b = fed[src], fed[dst]
    a.client.create(a.path(name), b"m")
    wait_for(lambda: b.client.exists(b.path(name)), 30, message=f"{name} from {src} to {dst}")


@pytest.mark.parametrize("watches", ["recursive", "per-node"])
def test_service_discovery_under_containers_keeps_each_regions_members(
    federation: Federation, watches: str
) -> None:
    """Curator's pattern: each region's instances register as ephemerals under a
    container that every region creates if missing. Instances are never
    replicated; when one region's server removes its emptied container, that
    delete reaches the others, where live members keep the znode (a tombstoned
    placeholder) until the last goes: then it goes too, and is not brought back.

    Before, the placeholder stayed for good, since an ephemeral child is not
    in the metadata; a restart or an audit then took it for a new znode and
    created it again in every region, undoing the delete.
    """
    fed = federation
    # Per-node watches: what a server that refuses addWatch leaves (ZooKeeper 3.5).
    env = {"ZKBRIDGE_REFUSE_ADDWATCH": "1"} if watches == "per-node" else {}
    for name in fed.regions:
        fed.start(name, env=env, wait=False)
    for name in fed.regions:
        fed.wait_ready(name)
    r1, r2 = fed["r1"], fed["r2"]
    with r1.session() as app1, r2.session() as app2:
        _register_both_then_leave_r1(fed, app1, app2, "/live")
        _register_both_then_leave_r1(fed, app1, app2, "/restarted")
        _round_trip(fed, "r1", "r2", "/marker-1")
        for svc in ("/live", "/restarted"):
            assert r2.client.get_children(r2.path(svc)) == ["i2"]
            assert r2.client.get(r2.path(f"{svc}/i2"))[0] == b"10.0.2.1"
        # r2's member of /live leaves while r2's bridge runs (its watch sees it go);
        # that of /restarted while it is stopped (the start-up scan finds it).
        app2.delete(r2.path("/live/i2"))
        wait_for(lambda: not r2.client.exists(r2.path("/live")), 30,
                 message="r2's /live goes with its last member")
        fed.stop("r2")
        app2.delete(r2.path("/restarted/i2"))
    fed.start("r2", env=env)
    wait_for(lambda: not r2.client.exists(r2.path("/restarted")), 60,
             message="r2's /restarted goes once its bridge finds it empty")
    _round_trip(fed, "r2", "r1", "/marker-2")
    assert not r1.client.exists(r1.path("/live"))
    assert not r1.client.exists(r1.path("/restarted"))
    fed.wait_converged()
    assert fed.tree("r1") == fed.tree("r2")
    fed.assert_clean_logs()
