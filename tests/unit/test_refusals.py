"""A server's refusal of one znode's write is a condition of that path, held back as such."""

from __future__ import annotations

from kazoo.exceptions import (
    InvalidACLError,
    NoAuthError,
    NoChildrenForEphemeralsError,
    QuotaExceededError,
)

from bridge.errors import AclRefused, EphemeralParent, NoPermission, QuotaExceeded, Refused
from bridge.model import Event, Op, VectorClock
from bridge.store import _under
from bridge.zk.errors import translate


def test_a_quota_refusal_is_held_as_quota_and_never_retried_as_a_conflict() -> None:
    err = translate(QuotaExceededError(), "create /q/n5")
    assert isinstance(err, QuotaExceeded) and isinstance(err, Refused)
    assert not err.retriable and err.hold == "quota"
    assert "quota" in str(err)
    denied = translate(NoAuthError(), "set /p")
    assert isinstance(denied, NoPermission) and denied.hold == "write"
    refused = translate(InvalidACLError(), "setACL /p")
    assert isinstance(refused, AclRefused) and not refused.retriable
    assert refused.hold == "acl-refused"
    under = translate(NoChildrenForEphemeralsError(), "create /svc/child")
    assert isinstance(under, EphemeralParent) and under.hold == "ephemeral-parent"
    assert translate(ValueError("x"), "y").__class__ is ValueError  # not the server's refusal


def _event(path: str) -> Event:
    return Event(origin="r1", subtree="critical", path=path, op=Op.PUT,
                 vc=VectorClock.of({"r1": 1}), ts=1, writer="r1", data=b"")


def test_a_refused_placeholder_parent_stands_for_the_events_below_it() -> None:
    events = [_event(p) for p in ("/q/deep", "/q/deep/a", "/q/deep/a/b", "/q/deeper", "/r")]
    assert _under("/q/deep", events) == ["/q/deep", "/q/deep/a", "/q/deep/a/b"]
    assert _under("/q/deep/a/b", events) == ["/q/deep/a/b"]
    assert _under("/q/other", events) == ["/q/other"]  # no event there: the path itself
