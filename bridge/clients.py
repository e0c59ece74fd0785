"""The bridge's clients and its ZooKeeper session: membership, session events, closing.

Registers this bridge's member znode (again after a new session), reacts to
session events (a lost session ends a leader's term; a reconnect rescans),
asks the servers why a disconnection lasts (a certificate they refuse stops the
bridge), restarts a ZooKeeper client whose disconnection does not heal, connects the
separate ACL reader in the background, and closes the clients in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import TYPE_CHECKING

import structlog

from bridge.errors import BridgeError, VersionConflict, ZooKeeperTlsError

if TYPE_CHECKING:
    from bridge.engine import Bridge

# The logger these events always had: log routing and tests select them by it.
log = structlog.get_logger("bridge.engine")

DIAGNOSE_AFTER = 5.0  # seconds without a connection before the servers are asked why
DIAGNOSE_INTERVAL = 10.0  # seconds between two such questions while it lasts


class Clients:
    def __init__(self, bridge: Bridge, lost: asyncio.Event, stop: asyncio.Event) -> None:
        self.bridge = bridge
        # The bridge's own events: a lost session ends the term, a stop ends the watchdog.
        self._lost = lost
        self._stop = stop
        self.acl_zk_starting: asyncio.Future[None] | None = None

    async def close(self) -> None:
        await self.bridge.kafka.stop()
        await self.bridge.zk.stop()
        if self.acl_zk_starting is not None:
            # kazoo cannot stop a client whose start is still running.
            await self.acl_zk_starting
            await self.bridge.acl_zk.stop()

    async def start_acl_reader(self) -> None:
        if os.environ.get("ZKBRIDGE_NO_ACL_READER") == "1":
            return  # tests of captures without it
        try:
            await self.bridge.acl_zk.start()
        except BridgeError as exc:
            # Only slower without it: large captures read on the main session.
            log.warning("acl_session_unavailable", error=str(exc))
            return
        log.info("acl_session_connected", session=f"{self.bridge.acl_zk.session_id or 0:#x}")
        for store in self.bridge.stores.values():
            store.acl_reader = self.bridge.acl_zk

    @property
    def member_path(self) -> str:
        return f"{self.bridge.settings.state_path}/members/{self.bridge.identity}"

    async def register_member(self) -> None:
        """An ephemeral znode per running bridge: who is alive, seen by status and tests."""
        await self.bridge.zk.ensure_path(f"{self.bridge.settings.state_path}/members")
        member = {"identity": self.bridge.identity, "region": self.bridge.region,
                  "session": f"{self.bridge.zk.session_id or 0:#x}"}
        # Already there when this same session registered it before a reconnect.
        with contextlib.suppress(VersionConflict):
            await self.bridge.zk.create(self.member_path, json.dumps(member).encode(),
                                        ephemeral=True)

    def on_session(self, state: str, new_session: bool) -> None:
        log.info("zookeeper_session", state=state, new_session=new_session)
        if state == "LOST" and self.bridge.in_term:
            # The session held our candidate znode: someone else may lead now.
            self._lost.set()
        if state != "CONNECTED":
            self.bridge.watching.disconnected()
        if state == "CONNECTED" and new_session:
            # The ephemeral member znode died with the old session.
            self.bridge.background(self.bridge.retry("register member", self.register_member))
        if state == "CONNECTED":
            # Nothing was delivered while away, and the persistent watch is
            # gone (kazoo does not restore it): re-add it and rescan. Also
            # during a term's start-up, before ready: the rescanner runs as
            # soon as the term's tasks do (a reconnect mid-start-up scan
            # otherwise left the term without a watch).
            self.bridge.watching.request()

    async def _diagnose(self, down_for: float) -> None:
        """Why the disconnection lasts, asked of the servers: a certificate they stopped
        taking (expired, or its CA no longer in their trust store) shows only as refused
        handshakes, which kazoo retries for ever. That stops the bridge naming the key,
        as at start; the service manager's restart then loads the files anew. Without
        zookeeper.tls nothing is asked: a plain port that turns TLS-only under running
        clients is rare, and the question (a TLS ClientHello) is a bad packet in a plain
        server's log, every 10 s of an outage."""
        if self.bridge.settings.zookeeper.tls is None:
            return
        why = await self.bridge.zk.diagnose()
        if why is not None:
            log.warning("zookeeper_unreachable", disconnected_for=round(down_for, 1), error=why)
            self.bridge.note_error("zookeeper", why)

    async def watchdog(self) -> None:
        """Ask why a disconnection lasts, and restart the ZooKeeper client if it does not
        heal.

        kazoo reconnects by itself through ordinary outages; what it cannot get
        past is an ensemble that lost its data (wiped, restored from an old
        backup), which refuses a client that has seen later transactions.
        """
        limit = max(15.0, 3 * self.bridge.settings.zookeeper.session_timeout)
        down_since: float | None = None
        diagnosed_at = float("-inf")
        while not self._stop.is_set():
            await asyncio.sleep(1.0)
            if self.bridge.zk.connected:
                down_since = None
                continue
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since >= DIAGNOSE_AFTER and now - diagnosed_at >= DIAGNOSE_INTERVAL:
                diagnosed_at = now
                await self._diagnose(now - down_since)
            if now - down_since < limit:
                continue
            log.warning("zookeeper_client_restart", disconnected_for=round(now - down_since, 1),
                        hint="the ensemble may have been wiped or restored; reconnecting afresh")
            self.bridge.note_error("zookeeper",
                                   f"disconnected for {now - down_since:.0f}s; restarted")
            if self.bridge.in_term:
                self._lost.set()
            try:
                await self.bridge.zk.restart()
            except ZooKeeperTlsError:
                raise  # no retry cures it: the bridge stops naming the key
            except Exception as exc:  # the next round tries again
                log.warning("zookeeper_client_restart_failed", error=str(exc))
            down_since = None
