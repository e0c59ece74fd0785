"""A three-server ZooKeeper ensemble (quorum faults: leader loss, majority loss).

On 127.0.0.1 by default; given a network namespace (`prefix`, as in
`tests/harness/netns.py`) its members run inside it, serve clients on `host`
and keep their quorum traffic on the namespace's own loopback.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.harness import procs
from tests.harness.managed import Managed
from tests.harness.zookeeper import ZooKeeperServer, start_all


class EnsembleServer(ZooKeeperServer):
    """One member: the standalone server's settings plus `server.N=` lines and `myid`."""

    def __init__(self, name: str, base_dir: Path, myid: int, members: list[str],
                 host: str = "127.0.0.1", prefix: Sequence[str] = ()) -> None:
        super().__init__(name, base_dir=base_dir, host=host, prefix=prefix)
        self.myid = myid
        self.members = members  # filled by the ensemble once every port is known
        self.quorum_port = procs.free_port()
        self.election_port = procs.free_port()

    def _write_config(self) -> None:
        super()._write_config()
        (self.data_dir / "myid").write_text(f"{self.myid}\n")
        extra = [
            # A member that was down for a while rejoins within these ticks
            # even on a loaded 2-core machine.
            "initLimit=20",
            "syncLimit=10",
            *self.members,
            "",
        ]
        with open(self.config_path, "a") as cfg:
            cfg.write("\n".join(extra))

    def _serving(self) -> bool:
        mode = self.four_letter("srvr")
        return "Mode: leader" in mode or "Mode: follower" in mode

    def mode(self) -> str:
        """leader, follower, or down (not serving)."""
        try:
            text = self.four_letter("srvr", timeout=1.0)
        except OSError:
            return "down"
        for line in text.splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return "down"


class ZooKeeperEnsemble(Managed):
    """Three `EnsembleServer`s sharing one quorum; `hosts` is the client connect string.

    A single member never reports ready on its own (no quorum), so starts and
    restarts of a majority go through `start_members`, which spawns first and
    waits after.
    """

    def __init__(self, name: str, base_dir: Path | None = None, size: int = 3,
                 host: str = "127.0.0.1", prefix: Sequence[str] = ()) -> None:
        self.name = name
        self._own_dir = base_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix=f"zkbridge-{name}-")) if base_dir is None else base_dir
        )
        members: list[str] = []
        self.servers = [
            EnsembleServer(f"{name}-zk{i}", self.base_dir / f"zk{i}", i, members, host, prefix)
            for i in range(1, size + 1)
        ]
        members.extend(
            f"server.{s.myid}=127.0.0.1:{s.quorum_port}:{s.election_port}" for s in self.servers
        )

    @property
    def hosts(self) -> str:
        return ",".join(s.hosts for s in self.servers)

    def __iter__(self) -> Iterator[EnsembleServer]:
        return iter(self.servers)

    def start(self) -> ZooKeeperEnsemble:
        start_all(self.servers)
        return self

    def start_members(self, members: list[EnsembleServer], timeout: float = 90.0) -> None:
        for s in members:
            if not s.running:
                s.spawn()
        for s in members:
            s.wait_ready(timeout)

    def leader(self) -> EnsembleServer | None:
        for s in self.servers:
            if s.running and s.mode() == "leader":
                return s
        return None

    def heal(self, timeout: float = 90.0) -> None:
        """Thaw and start every member that is down; wait until all serve."""
        for s in self.servers:
            s.thaw()
        self.start_members([s for s in self.servers if not s.running], timeout)

    def close(self) -> None:
        for s in self.servers:
            s.thaw()
            s.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
