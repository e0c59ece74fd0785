"""Pure conflict resolution: what to do with a remote version given the local one.

The rule must be a total order that respects causality (a version written after
seeing another sorts above it). Last-writer-wins on the hybrid-logical-clock
stamp has that property, which is what makes the result independent of the
order events arrive in, even when a region compares against a state that won
an earlier conflict.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bridge.clock import Order, compare, merge
from bridge.model import VectorClock, Version

RULE_LWW = "lww"
RULE_COLLISION = "collision"
# ZooKeeper names a sequential znode after its parent's count of child
# changes, zero-padded to ten digits.
SEQUENCE_DIGITS = 10


class Action(enum.Enum):
    SKIP = "skip"  # remote is dominated by or equal to local
    APPLY = "apply"  # remote dominates local (or there is no local)
    CONFLICT = "conflict"  # concurrent: ``winner`` says whose content stays
    # Equal clocks, different content: two writers share one region's
    # identity. Never a duplicate, never applied (no rule can tell which
    # content that clock "really" means).
    COLLISION = "collision"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    merged: VectorClock
    remote_wins: bool
    rule: str = ""


def lww_key(v: Version) -> tuple[int, str, bytes, bool]:
    return (v.ts, v.writer, v.data_hash, not v.deleted)


def decide(local: Version | None, remote: Version) -> Decision:
    """Decide for one path. ``local`` is None when the path has no metadata."""
    if local is None:
        return Decision(Action.APPLY, remote.vc, True)
    order = compare(remote.vc, local.vc)
    if order is Order.EQUAL and (remote.data_hash, remote.deleted) != (local.data_hash,
                                                                       local.deleted):
        return Decision(Action.COLLISION, local.vc, False, RULE_COLLISION)
    if order in (Order.EQUAL, Order.BEFORE):
        return Decision(Action.SKIP, local.vc, False)
    if order is Order.AFTER:
        return Decision(Action.APPLY, remote.vc, True)
    remote_wins = lww_key(remote) > lww_key(local)
    return Decision(Action.CONFLICT, merge(local.vc, remote.vc), remote_wins, RULE_LWW)


def independent_sequential(path: str, local: Version, remote: Version) -> bool:
    """Whether a conflict is two regions' sequential znodes that got the same name.

    Each ensemble numbers a parent's sequential children from its own counter,
    so applications in two regions creating one at about the same time get
    the same name for two different znodes. Told apart from two writes to one
    znode by the name's ten-digit suffix and by clocks that never saw each
    other: each counts only its own writer's region (both were created, and
    maybe updated, where they were written).
    """
    name = path.rpartition("/")[2]
    if len(name) < SEQUENCE_DIGITS or not name[-SEQUENCE_DIGITS:].isdigit():
        return False
    if local.deleted or remote.deleted or local.writer == remote.writer:
        return False
    return (set(local.vc.as_dict()) == {local.writer}
            and set(remote.vc.as_dict()) == {remote.writer})
