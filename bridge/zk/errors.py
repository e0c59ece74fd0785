"""kazoo's exceptions translated into ``bridge.errors``: the adapter's one error boundary."""

from __future__ import annotations

from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    InvalidACLError,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    OperationTimeoutError,
    QuotaExceededError,
    SessionExpiredError,
    ZookeeperError,
)
from kazoo.handlers.threading import KazooTimeoutError

from bridge.errors import (
    AclRefused,
    MissingNode,
    NoPermission,
    QuotaExceeded,
    VersionConflict,
    ZooKeeperError,
)


def translate(exc: BaseException, what: str) -> BaseException:
    if isinstance(exc, NoNodeError):
        return MissingNode(what)
    if isinstance(exc, NoAuthError):
        return NoPermission(f"{what}: not allowed by the znode's ACL")
    if isinstance(exc, InvalidACLError):
        return AclRefused(f"{what}: the ACL is refused here (InvalidACL)")
    if isinstance(exc, QuotaExceededError):
        return QuotaExceeded(f"{what}: over a hard quota")
    if isinstance(exc, BadVersionError | NodeExistsError | NotEmptyError):
        return VersionConflict(f"{what}: {type(exc).__name__}")
    if isinstance(exc, ConnectionLoss | SessionExpiredError | OperationTimeoutError):
        return ZooKeeperError(f"{what}: {type(exc).__name__}")
    if isinstance(exc, KazooTimeoutError):
        return ZooKeeperError(f"{what}: timed out")
    if isinstance(exc, ZookeeperError | KazooException):
        err = ZooKeeperError(f"{what}: {type(exc).__name__} {exc}")
        return err
    return exc
