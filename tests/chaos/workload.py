"""The campaign's clients: writers in every region recording each operation, pointer readers.

Each region's writer is one thread with its own session straight to its
ensemble (never through the bridges' proxies: applications keep writing
while a region is cut off). Every operation lands in the history with its
outcome: ``ok`` (ZooKeeper acknowledged it), ``fail`` (ZooKeeper refused
it, nothing changed) or ``unknown`` (the connection broke before the
answer: it may or may not have happened).

Paths (relative to the mount):
- ``/<region>/k<N>``: that region's own keys (create, set, delete, multi);
- ``/<region>/tree/t<N>/c<M>``: small trees, removed recursively;
- ``/<region>/eph-<N>``: ephemeral, never replicated;
- ``/<region>/ptr/data/d<N>`` then ``/<region>/ptr/p = N``: the pointer pattern;
- ``/shared/c<N>``: contended, every region sets them.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import (
    BadVersionError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    ZookeeperError,
)
from kazoo.handlers.threading import KazooTimeoutError

from tests.chaos.topology import MOUNT, REGIONS

OWN_KEYS = 12
SHARED_KEYS = 4
TREES = 4
OP_TIMEOUT = 6.0
ABSENT = None


@dataclass
class Op:
    region: str
    path: str  # relative to the mount
    kind: str  # put | delete
    value: str | None  # None for a delete
    outcome: str  # ok | fail | unknown
    zxid: int | None
    start: float  # wall clock seconds
    end: float
    how: str  # create, set, delete, multi, rdelete, setup

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class History:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.lock = threading.Lock()
        self.reads = 0
        self.dangling: list[dict[str, Any]] = []
        self.backwards: list[dict[str, Any]] = []
        self.eph_created: set[str] = set()

    def add(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)


def _unknown(exc: BaseException) -> bool:
    # Refusals leave the tree untouched; anything else may or may not have happened.
    return not isinstance(exc, NoNodeError | NodeExistsError | BadVersionError | NotEmptyError)


class Writer(threading.Thread):
    def __init__(self, region: str, hosts: str, seed: int, history: History,
                 rate: float) -> None:
        super().__init__(name=f"writer-{region}", daemon=True)
        self.region = region
        self.hosts = hosts
        self.rng = random.Random(f"{seed}-{region}")
        self.history = history
        self.pause = 1.0 / rate
        self.stop_flag = threading.Event()
        self.seq = 0
        self.ptr = 0
        self.client: KazooClient | None = None
        self.trees: dict[int, list[str]] = {}
        self.errors = 0

    def _value(self) -> str:
        self.seq += 1
        return f"{self.region}:{self.seq}"

    def _record(self, path: str, kind: str, value: str | None, outcome: str,
                zxid: int | None, start: float, how: str) -> None:
        self.history.add(Op(self.region, path, kind, value, outcome, zxid, start,
                            time.time(), how))

    def _abs(self, rel: str) -> str:
        return MOUNT + rel

    def put(self, rel: str, how: str = "put", ephemeral: bool = False,
            value: str | None = None) -> bool:
        """Set, or create when missing; True when acknowledged."""
        assert self.client is not None
        if value is None:
            value = self._value()
        t0 = time.time()
        try:
            try:
                stat = self.client.set_async(self._abs(rel), value.encode()).get(OP_TIMEOUT)
                how2 = "set"
            except NoNodeError:
                self.client.create_async(self._abs(rel), value.encode(),
                                         ephemeral=ephemeral).get(OP_TIMEOUT)
                how2 = "create"
                stat = self.client.exists_async(self._abs(rel)).get(OP_TIMEOUT)
        except (ZookeeperError, KazooTimeoutError, Exception) as exc:
            self.errors += 1
            if not ephemeral:
                self._record(rel, "put", value, "unknown" if _unknown(exc) else "fail", None,
                             t0, how)
            return False
        if ephemeral:
            self.history.eph_created.add(rel)
            return True
        zxid = stat.mzxid if stat is not None else None
        self._record(rel, "put", value, "ok", zxid, t0, f"{how}:{how2}")
        return True

    def delete(self, rel: str, recursive: bool = False) -> None:
        assert self.client is not None
        t0 = time.time()
        under = [rel]
        if recursive:
            under = [p for p in self._known_under(rel)]
        try:
            if recursive:
                self.client.delete(self._abs(rel), recursive=True)
            else:
                self.client.delete_async(self._abs(rel)).get(OP_TIMEOUT)
        except Exception as exc:
            self.errors += 1
            outcome = "unknown" if (recursive or _unknown(exc)) else "fail"
            for p in under:
                self._record(p, "delete", ABSENT, outcome, None, t0, "rdelete" if recursive
                             else "delete")
            return
        for p in under:
            self._record(p, "delete", ABSENT, "ok", None, t0,
                         "rdelete" if recursive else "delete")

    def _known_under(self, rel: str) -> list[str]:
        # Deepest first, as a recursive delete removes them.
        with self.history.lock:
            paths = {o.path for o in self.history.ops
                     if o.region == self.region and (o.path == rel or o.path.startswith(rel + "/"))}
        return sorted(paths, key=lambda p: -p.count("/"))

    def multi(self) -> None:
        """An application multi: two own keys set together (both or neither)."""
        assert self.client is not None
        keys = self.rng.sample(range(OWN_KEYS), 2)
        rels = [f"/{self.region}/k{k}" for k in keys]
        t0 = time.time()
        try:
            exists = [self.client.exists_async(self._abs(r)).get(OP_TIMEOUT) for r in rels]
        except Exception:
            self.errors += 1
            return
        if not all(exists):
            return
        values = [self._value() for _ in rels]
        tx = self.client.transaction()
        for r, v in zip(rels, values, strict=True):
            tx.set_data(self._abs(r), v.encode())
        try:
            results = tx.commit_async().get(OP_TIMEOUT)
        except Exception:
            self.errors += 1
            for r, v in zip(rels, values, strict=True):
                self._record(r, "put", v, "unknown", None, t0, "multi")
            return
        if any(isinstance(x, Exception) for x in results):
            for r, v in zip(rels, values, strict=True):
                self._record(r, "put", v, "fail", None, t0, "multi")
            return
        for r, v, st in zip(rels, values, results, strict=True):
            self._record(r, "put", v, "ok", getattr(st, "mzxid", None), t0, "multi")

    def pointer(self) -> None:
        n = self.ptr + 1
        if self.put(f"/{self.region}/ptr/data/d{n}", "ptrdata"):
            if self.put(f"/{self.region}/ptr/p", "ptr", value=str(n)):
                self.ptr = n
            # A failed flip is retried with the next number; the data stays.
            else:
                self.ptr = n

    def step(self) -> None:
        r = self.rng.random()
        own = f"/{self.region}/k{self.rng.randrange(OWN_KEYS)}"
        if r < 0.30:
            self.put(own)
        elif r < 0.38:
            self.delete(own)
        elif r < 0.48:
            self.multi()
        elif r < 0.63:
            self.put(f"/shared/c{self.rng.randrange(SHARED_KEYS)}", "shared")
        elif r < 0.83:
            self.pointer()
        elif r < 0.93:
            t = self.rng.randrange(TREES)
            base = f"/{self.region}/tree/t{t}"
            if self.rng.random() < 0.5:
                if self.put(base, "tree"):
                    for c in range(self.rng.randrange(1, 4)):
                        self.put(f"{base}/c{c}", "tree")
            else:
                self.delete(base, recursive=True)
        else:
            eph = f"/{self.region}/eph-{self.rng.randrange(3)}"
            if self.rng.random() < 0.7:
                self.put(eph, "eph", ephemeral=True)
            else:
                try:
                    assert self.client is not None
                    self.client.delete_async(self._abs(eph)).get(OP_TIMEOUT)
                except Exception:
                    pass

    def run(self) -> None:
        self.client = KazooClient(hosts=self.hosts, timeout=10.0)
        try:
            self.client.start(timeout=30)
            while not self.stop_flag.is_set():
                try:
                    self.step()
                except Exception:
                    self.errors += 1
                    time.sleep(0.2)
                self.stop_flag.wait(self.pause)
        finally:
            self.client.stop()
            self.client.close()


class PointerReader(threading.Thread):
    """In one region, follows the other regions' pointers: data first, never backwards."""

    def __init__(self, region: str, hosts: str, history: History) -> None:
        super().__init__(name=f"reader-{region}", daemon=True)
        self.region = region
        self.hosts = hosts
        self.history = history
        self.stop_flag = threading.Event()
        self.seen: dict[str, int] = {}

    def read_once(self, client: KazooClient, origin: str) -> None:
        try:
            raw, _ = client.get_async(f"{MOUNT}/{origin}/ptr/p").get(OP_TIMEOUT)
        except Exception:
            return
        text = raw.decode(errors="replace")
        if not text.isdigit():
            return
        n = int(text)
        last = self.seen.get(origin, 0)
        now = time.time()
        if n < last:
            with self.history.lock:
                self.history.backwards.append(
                    {"reader": self.region, "origin": origin, "seen": last, "now": n, "t": now})
        self.seen[origin] = max(last, n)
        try:
            st = client.exists_async(f"{MOUNT}/{origin}/ptr/data/d{n}").get(OP_TIMEOUT)
        except Exception:
            return
        with self.history.lock:
            self.history.reads += 1
            if st is None:
                self.history.dangling.append(
                    {"reader": self.region, "origin": origin, "ptr": n, "t": now})

    def run(self) -> None:
        client = KazooClient(hosts=self.hosts, timeout=10.0)
        try:
            client.start(timeout=30)
            while not self.stop_flag.is_set():
                for origin in REGIONS:
                    if origin != self.region:
                        self.read_once(client, origin)
                self.stop_flag.wait(0.05)
        finally:
            client.stop()
            client.close()
