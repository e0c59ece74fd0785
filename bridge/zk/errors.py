"""kazoo's exceptions translated into ``bridge.errors``: the adapter's one error boundary."""

from __future__ import annotations

from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    InvalidACLError,
    KazooException,
    NoAuthError,
    NoChildrenForEphemeralsError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    OperationTimeoutError,
    QuotaExceededError,
    SessionExpiredError,
    UnimplementedError,
    ZookeeperError,
)
from kazoo.handlers.threading import KazooTimeoutError

from bridge.errors import (
    AclRefused,
    EphemeralParent,
    MissingNode,
    NoPermission,
    QuotaExceeded,
    Refused,
    UnsupportedServerError,
    VersionConflict,
    ZooKeeperError,
)

# The server's refusals of one znode's operation for a reason of that znode: not
# retried, held back by the caller (``bridge.errors.Refused``), whatever else flows.
_REFUSALS: dict[type[Exception], tuple[type[Refused], str]] = {
    NoAuthError: (NoPermission, "not allowed by the ACL"),
    InvalidACLError: (AclRefused, "its ACL is refused here (InvalidACL)"),
    QuotaExceededError: (QuotaExceeded, "over a hard quota"),
    NoChildrenForEphemeralsError: (EphemeralParent, "its parent is an ephemeral znode here"),
}


def refusal(exc: BaseException, what: str, path: str | None = None) -> Refused | None:
    """``exc`` as a ``Refused`` of ``path`` (``what`` names the operation), or None."""
    for kind, (error, reason) in _REFUSALS.items():
        if isinstance(exc, kind):
            return error(f"{what}: {reason}", path=path)
    return None


def translate(exc: BaseException, what: str) -> BaseException:
    if isinstance(exc, NoNodeError):
        return MissingNode(what)
    refused = refusal(exc, what)
    if refused is not None:
        return refused
    if isinstance(exc, BadVersionError | NodeExistsError | NotEmptyError):
        return VersionConflict(f"{what}: {type(exc).__name__}")
    if isinstance(exc, ConnectionLoss | SessionExpiredError | OperationTimeoutError):
        return ZooKeeperError(f"{what}: {type(exc).__name__}")
    if isinstance(exc, UnimplementedError):
        return UnsupportedServerError(f"{what}: the server does not implement it")
    if isinstance(exc, KazooTimeoutError):
        return ZooKeeperError(f"{what}: timed out")
    if isinstance(exc, ZookeeperError | KazooException):
        err = ZooKeeperError(f"{what}: {type(exc).__name__} {exc}")
        return err
    return exc
