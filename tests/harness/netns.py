"""Per-region network namespaces: each region behind its own veth link, cut and healed on demand.

For one test (token ``t1a2b3``, a /24 ``10.X.Y.0`` that no address or route of
this machine overlaps), region number i gets:

- namespace ``zkbridge-<owner pid>-<token>-<region>`` with its loopback up;
- a veth pair ``zb<token><i>h`` (root side, ``10.X.Y.4i+1/30``) and
  ``zb<token><i>n`` (inside, ``10.X.Y.4i+2/30``).

A region's processes run with ``link.prefix`` (``ip netns exec NAME``) and bind
the inside address; Kafka, in the root namespace, listens on each root-side
address. There is no default route and no forwarding, so a region reaches
nothing but its own link's far end: regions meet only through the broker, as
separate data centres do.

With ``lan=True`` each region also gets a second pair, its LAN
(``zb<token><i>l`` / ``zb<token><i>m``, ``10.X.Y.128+4i+1/30`` and ``+2``),
which ``cut`` never touches: the region's own clients (the harness, standing
in for its applications) keep reaching its ZooKeeper over it while the
region's WAN link, the one to the broker, is down.

``cut(region)`` sets the root-side veth down. Packets are then dropped without
an answer (a connect times out, it is not refused), as on a broken WAN link,
while the region's loopback and inside address keep working, so its
applications and its ZooKeeper carry on. Link state was chosen over an
``iptables``/``nft`` drop because neither tool is installed on these machines
and link state behaves: local routes survive the link going down, and on
``heal`` established connections resume.

Teardown (``close``, also from ``atexit``) stops any process still inside a
namespace by pid, then deletes the namespaces and veths. The owner's pid in
the name lets ``remove_stale`` clear what a killed run left behind without
touching a namespace of a session that is still running.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

from tests.harness import procs
from tests.harness.managed import Managed

NAME_PREFIX = "zkbridge-"
_OWNED = re.compile(rf"^{NAME_PREFIX}(\d+)-")
IP_TIMEOUT = 15.0


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message holds its command line and stderr."""


@dataclass(frozen=True)
class Link:
    """One region's namespace and its veth pair to the root namespace."""

    region: str
    netns: str
    host_if: str
    ns_if: str
    host_addr: str
    """Root side: where the region reaches the broker."""
    ns_addr: str
    """Inside: what the region's servers bind, reachable from the root while the link is up."""

    @property
    def prefix(self) -> tuple[str, ...]:
        """Put before a command line to run it inside the namespace."""
        return ("ip", "netns", "exec", self.netns)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def unavailable() -> str | None:
    """Why network namespaces cannot be created here, or None when they can."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to create network namespaces"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"{NAME_PREFIX}{os.getpid()}-probe"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _namespaces() -> list[str]:
    # Lines read "NAME" or "NAME (id: N)".
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _pids_in(netns: str) -> list[int]:
    done = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _remove(netns: str, host_if: str | None = None) -> None:
    # A namespace lives on (with its veth and addresses) while a process is in it.
    for pid in _pids_in(netns):
        procs.stop(pid, deadline=5.0)
    _ip("netns", "del", netns, check=False)
    if host_if is not None:
        _ip("link", "del", host_if, check=False)


def remove_stale() -> list[str]:
    """Delete our namespaces whose owning process is gone (a killed run); their names."""
    removed = []
    for name in _namespaces():
        match = _OWNED.match(name)
        if match and int(match.group(1)) != os.getpid() and not procs.alive(int(match.group(1))):
            _remove(name)
            removed.append(name)
    return removed


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A 10.X.Y.0/24 that overlaps no address or route this machine has (other sessions' too)."""
    taken = []
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            taken.append(ipaddress.IPv4Network(fields[fields.index("inet") + 1], strict=False))
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest.startswith(("local", "broadcast", "default")):
            continue
        try:
            taken.append(ipaddress.IPv4Network(dest, strict=False))
        except ValueError:
            continue
    for _ in range(200):
        candidate = ipaddress.IPv4Network(f"10.{rng.randrange(64, 255)}.{rng.randrange(256)}.0/24")
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise NetnsError("no free 10.X.Y.0/24 found for the test namespaces")


_open: list[RegionNetworks] = []


@atexit.register
def _close_leftovers() -> None:
    for nets in list(_open):
        nets.close()


class RegionNetworks(Managed):
    """One namespace and veth link per region, for one test; see the module docstring."""

    def __init__(self, token: str, regions: Sequence[str], *, lan: bool = False) -> None:
        if len(regions) > (31 if lan else 63):
            raise NetnsError("the regions' /30 links do not fit in one /24")
        self.token = token
        self.regions = tuple(regions)
        self.with_lan = lan
        self.links: dict[str, Link] = {}
        self.lans: dict[str, Link] = {}
        self.subnet: ipaddress.IPv4Network | None = None

    def __getitem__(self, region: str) -> Link:
        return self.links[region]

    def _host_ifs(self) -> list[str]:
        return [f"zb{self.token}{i}{side}" for i in range(len(self.regions))
                for side in ("hl" if self.with_lan else "h")]

    def start(self) -> Self:
        remove_stale()
        self.subnet = _free_subnet(random.Random())
        base = self.subnet.network_address
        _open.append(self)
        try:
            for i, region in enumerate(self.regions):
                # Interface names are capped at 15 characters: no pid, no region name.
                link = Link(
                    region=region,
                    netns=f"{NAME_PREFIX}{os.getpid()}-{self.token}-{region}",
                    host_if=f"zb{self.token}{i}h",
                    ns_if=f"zb{self.token}{i}n",
                    host_addr=str(base + 4 * i + 1),
                    ns_addr=str(base + 4 * i + 2),
                )
                _ip("netns", "add", link.netns)
                self.links[region] = link
                self._create(link)
                if self.with_lan:
                    lan = Link(
                        region=region, netns=link.netns,
                        host_if=f"zb{self.token}{i}l", ns_if=f"zb{self.token}{i}m",
                        host_addr=str(base + 128 + 4 * i + 1),
                        ns_addr=str(base + 128 + 4 * i + 2),
                    )
                    self.lans[region] = lan
                    self._create(lan)
            for link in [*self.links.values(), *self.lans.values()]:
                self._wait_carrier(link, up=True)
        except BaseException:
            self.close()
            raise
        return self

    def _create(self, link: Link) -> None:
        # The peer is created inside the namespace in the same call, so no half
        # pair is ever left in the root namespace.
        _ip("link", "add", link.host_if, "type", "veth", "peer", "name", link.ns_if,
            "netns", link.netns)
        _ip("addr", "add", f"{link.host_addr}/30", "dev", link.host_if)
        _ip("link", "set", link.host_if, "up")
        _ip("-n", link.netns, "addr", "add", f"{link.ns_addr}/30", "dev", link.ns_if)
        _ip("-n", link.netns, "link", "set", link.ns_if, "up")
        _ip("-n", link.netns, "link", "set", "lo", "up")

    def _wait_carrier(self, link: Link, *, up: bool, timeout: float = 10.0) -> None:
        def state() -> bool:
            out = _ip("-n", link.netns, "-o", "link", "show", link.ns_if).stdout
            return ("LOWER_UP" in out) == up

        procs.wait_for(state, timeout, message=f"{link.ns_if} carrier never went "
                                                f"{'up' if up else 'down'}")

    def cut(self, region: str) -> None:
        """Take the region's link down: everything across it is dropped from now on."""
        link = self.links[region]
        _ip("link", "set", link.host_if, "down")
        self._wait_carrier(link, up=False)

    def heal(self, region: str) -> None:
        link = self.links[region]
        _ip("link", "set", link.host_if, "up")
        self._wait_carrier(link, up=True)
        # Neighbour entries that failed during the cut would answer "no route
        # to host" for a few more seconds; a healed link works at once.
        _ip("neigh", "flush", "dev", link.host_if, check=False)
        _ip("-n", link.netns, "neigh", "flush", "dev", link.ns_if, check=False)

    def is_cut(self, region: str) -> bool:
        out = _ip("-o", "link", "show", self.links[region].host_if).stdout
        return "LOWER_UP" not in out

    def run(self, region: str, argv: Sequence[str], *, timeout: float = 60.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run one command inside the region's namespace and wait for it."""
        return subprocess.run([*self.links[region].prefix, *argv], capture_output=True,
                              text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)

    def close(self) -> None:
        """Stop what still runs inside, then delete the namespaces and veths (idempotent)."""
        for lan in self.lans.values():
            _ip("link", "del", lan.host_if, check=False)
        for link in self.links.values():
            _remove(link.netns, link.host_if)
        self.links.clear()
        self.lans.clear()
        if self in _open:
            _open.remove(self)
        # Deleting a namespace frees its veth asynchronously; wait so that a
        # following test never sees a half-removed pair.
        end = time.monotonic() + 10.0
        while time.monotonic() < end and any(
            _ip("link", "show", name, check=False).returncode == 0 for name in self._host_ifs()
        ):
            time.sleep(0.05)
