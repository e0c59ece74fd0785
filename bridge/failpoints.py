"""Failpoints: named places where a test can make the bridge die on purpose.

Set ``ZKBRIDGE_FAILPOINTS`` to a comma-separated list of ``name=crash@N``
(die at the N-th hit) or ``name=crash~P`` (die with probability P at each hit,
seeded by ``ZKBRIDGE_FAILPOINT_SEED``). Dying is SIGKILL to ourselves, the
same abrupt end as an OOM kill or power loss: no cleanup runs.
``name=lose@N`` instead raises, at the N-th hit only, the error of a request
whose answer was lost although it was carried out (placed right after a
ZooKeeper write succeeded). ``name=stop@N`` stops the process (SIGSTOP to
itself) at the N-th hit, until a test sends SIGCONT: a pause at a chosen
step, long enough for its ZooKeeper session to expire. Unset in production,
``hit`` is a dictionary lookup.

``ZKBRIDGE_CLOCK_OFFSET_MS`` shifts the bridge's wall clock, as a host whose
clock is off would (the clock-skew checks are tested with it).
"""

from __future__ import annotations

import os
import random
import signal
import time

from bridge.errors import ZooKeeperError

AFTER_OUTBOX_WRITE = "after_outbox_write"
AFTER_PUBLISH = "after_publish_before_outbox_delete"
AFTER_APPLY = "after_apply_before_position"
BEFORE_APPLY = "before_apply"
CAPTURE_COMMITTED = "capture_committed"  # the capture multi (metadata + outbox) committed
ACL_READ = "acl_read"  # a group of a capture's ACL reads was answered
EPOCH_TAKEN = "epoch_taken"  # a term took the epoch (its first write)
TOPIC_REWOUND = "topic_rewound"  # a lost topic's stream rewound, all of it stored
REREAD_STORED = "reread_stored"  # a topic read again: its filter and rewound position stored
OWN_TOPIC_SURVEY = "own_topic_survey"  # a term checks its own topics (after reading their ends)
# An outbox overflow ends: the re-announce marker is written, the overflow's not yet
# removed (ENDING); both done, the re-announce not yet read (ENDED).
OVERFLOW_ENDING = "overflow_ending"
OVERFLOW_ENDED = "overflow_ended"
# A joining marker made or widened, before the scan that sets its paths aside.
JOIN_MARKED = "join_marked"
# A join's list added to, not yet marked whole for its marker.
JOIN_LISTED = "join_listed"
# A joining subtree's own znodes are published, its marker not yet removed.
JOIN_ENDING = "join_ending"

_rules: dict[str, tuple[str, float]] = {}
_hits: dict[str, int] = {}
_rng = random.Random()


def configure(spec: str | None, seed: str | None = None) -> None:
    _rules.clear()
    _hits.clear()
    _rng.seed(seed)
    for item in (spec or "").split(","):
        name, _, rule = item.strip().partition("=")
        if not name:
            continue
        if rule.startswith("crash@"):
            _rules[name] = ("at", float(rule[6:]))
        elif rule.startswith("crash~"):
            _rules[name] = ("p", float(rule[6:]))
        elif rule.startswith("lose@"):
            _rules[name] = ("lose", float(rule[5:]))
        elif rule.startswith("stop@"):
            _rules[name] = ("stop", float(rule[5:]))
        else:
            raise ValueError(f"failpoint {name}: unknown rule {rule!r}")


def hit(name: str) -> None:
    rule = _rules.get(name)
    if rule is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    kind, value = rule
    if kind == "lose":
        if _hits[name] == value:
            raise ZooKeeperError(f"failpoint {name}: answer lost (the request was carried out)")
        return
    if kind == "stop":
        if _hits[name] == value:
            os.kill(os.getpid(), signal.SIGSTOP)
        return
    if (kind == "at" and _hits[name] >= value) or (kind == "p" and _rng.random() < value):
        os.kill(os.getpid(), signal.SIGKILL)


_clock_offset_ms = int(os.environ.get("ZKBRIDGE_CLOCK_OFFSET_MS") or "0")


def wall_ms() -> int:
    """The wall clock in ms, shifted when a test says so."""
    return int(time.time() * 1000) + _clock_offset_ms


configure(os.environ.get("ZKBRIDGE_FAILPOINTS"), os.environ.get("ZKBRIDGE_FAILPOINT_SEED"))
