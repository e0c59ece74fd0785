"""The one exception tree of zkbridge.

Every error a dependency raises is translated at the adapter boundary into one
of these, so the engine decides on retry versus stop by looking at
``retriable`` alone, never at a library's exception types.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error zkbridge raises on purpose."""

    retriable: bool = False


class ConfigError(BridgeError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class CodecError(BridgeError):
    """An event could not be encoded or decoded (malformed, unknown version)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class OversizedError(CodecError):
    """A znode or an event is larger than ZooKeeper or Kafka accepts."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("oversized", detail)


class ZooKeeperError(BridgeError):
    """A ZooKeeper operation failed for a reason that may pass (connection loss)."""

    retriable = True


class ZooKeeperTlsError(BridgeError):
    """TLS with the ensemble cannot work as configured (its certificate untrusted or
    naming another host, this bridge's refused or missing, or no ``zookeeper.tls`` for
    a server that speaks only TLS): no retry cures it."""


class StateAccessError(BridgeError):
    """This bridge's ZooKeeper identity (``zookeeper.auth``) may not use the bridge's own
    state (made under another credential, or none): no retry cures it."""


class UnsupportedServerError(BridgeError):
    """The ensemble lacks a request the bridge is built on (``multiRead`` and
    ``addWatch``, ZooKeeper 3.6 and later): no retry cures it, an upgrade does."""


class VersionConflict(ZooKeeperError):
    """A version check in a ``multi`` failed: someone wrote meanwhile; read again."""


class NotificationGap(BridgeError):
    """The ZooKeeper connection dropped during a capture: changes made while it was
    away were never notified, so what the capture read may not be closed. Its
    paths wait for the rescan that follows the reconnect."""


class FencedError(BridgeError):
    """The epoch check failed: another bridge leads this region; stop writing."""


class KafkaError(BridgeError):
    """A Kafka operation failed for a reason that may pass (broker unreachable)."""

    retriable = True


class FatalKafkaError(BridgeError):
    """A Kafka failure that retrying cannot cure (authorization, bad topic config)."""


class MassDeleteError(BridgeError):
    """A scan would announce deleting more than the configured share of a subtree."""


class MissingNode(ZooKeeperError):
    """The znode does not exist (only the adapter's callers that expect it see this)."""

    retriable = False


class Refused(ZooKeeperError):
    """The server refuses an operation on one znode for a reason of that znode.

    Not retriable: waiting does not lift it. Callers treat it as a condition
    of that one path (held back and reported), never of the stream; a write
    refused so is held back as ``hold``.
    """

    retriable = False
    hold = "write"

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class NoPermission(Refused):
    """The bridge's identity may not read or write a znode (ZooKeeper's NoAuth)."""


class AclRefused(Refused):
    """The server refuses the ACL a copy is created or set with (InvalidACL): an
    authentication scheme it has no provider for (``sasl``, ``x509``), or an id
    that scheme deems malformed."""

    hold = "acl-refused"


class EphemeralParent(Refused):
    """The znode's parent is an ephemeral znode here (NoChildrenForEphemerals), where
    the origin has a persistent one: it can be created once that one is gone."""

    hold = "ephemeral-parent"


class QuotaExceeded(Refused):
    """A write would take a subtree past a hard quota (``setquota -N``/``-B``, enforced
    where the server runs with ``zookeeper.enforceQuota``)."""

    hold = "quota"


class ClockSkewError(BridgeError):
    """A peer's event is stamped further ahead of our wall clock than allowed."""

    retriable = True


class OffsetOutOfRange(BridgeError):
    """A fetch position is outside the partition's offsets: the topic lost records.

    Not retriable as such: fetching again from the same position gets the same
    answer. The inbound pipeline checks the topic and rewinds instead.
    """

    def __init__(self, message: str, offsets: dict[tuple[str, int], int]) -> None:
        super().__init__(message)
        self.offsets = offsets


class DuplicateRegionError(BridgeError):
    """Another ensemble publishes as this region: two writers with one identity."""
