"""The bridge's own state follows ``zookeeper.auth``: usable by this identity, or a clear stop.

Everything under ``state_path`` is created with this bridge's own ACL entry
(ALL for its digest identity) when ``zookeeper.auth`` is set, open without
it. A change of the credential changes the identity: ZooKeeper's digest
scheme accepts any password and the new identity simply has no access, so
every first write failed with a bare "not allowed by the ACL" and systemd
restarted it again and again. Checked once at each start: state this
identity may not use stops the bridge (and the CLI) with the command that
gives it access. State left open by a bridge that ran without
``zookeeper.auth`` is made this identity's, every znode of it, the root last,
so a start cut short does it again.
"""

from __future__ import annotations

import structlog

from bridge.config import Settings
from bridge.errors import NoPermission, StateAccessError
from bridge.zk import (
    WORLD_ALL,
    ZooKeeper,
    own_acl,
)

log = structlog.get_logger("bridge.stateaccess")


async def ensure(zk: ZooKeeper, settings: Settings, *, tighten: bool) -> None:
    """Raise ``StateAccessError`` if this identity may not use the state; with
    ``tighten``, make state that is open to everyone this identity's only."""
    root = settings.state_path
    own = own_acl(settings.zookeeper)
    try:
        read = await zk.get_acls(root)
    except NoPermission:
        raise StateAccessError(_locked_out(root, own)) from None
    if read is None or own is None or own in read.entries:
        return
    if not tighten or read.entries != WORLD_ALL:
        # Readable, but neither ours nor open: someone set it by hand; leave it.
        return
    paths = await _tree(zk, root)
    log.warning("state_acl_tightened", state_path=root, znodes=len(paths),
                reason="zookeeper.auth is set and the state was open to everyone (made "
                       "by a bridge without it)",
                action="every state znode is now writable and readable by this bridge's "
                       "identity only")
    try:
        await zk.set_acls_many(paths[:0:-1], [own])  # children before parents, root last
        await zk.set_acls(root, [own])
    except NoPermission:
        raise StateAccessError(_locked_out(root, own)) from None


async def _tree(zk: ZooKeeper, root: str) -> list[str]:
    """Every path of the state, parents before their children, each level listed in
    ``multiRead``s as a scan lists a subtree."""
    out: list[str] = []
    level = [root]
    while level:
        out.extend(level)
        names, _ = await zk.read_all([("children", p) for p in level])
        parents, level = level, []
        for parent, got in zip(parents, names, strict=True):
            if isinstance(got, NoPermission):
                raise got
            level.extend(f"{parent}/{name}" for name in got or ())  # None: gone meanwhile
    return out


def _locked_out(root: str, own: str | None) -> str:
    # The shell's setAcl -R lists a znode's children after setting its ACL: a session
    # with the previous identity alone loses them at the first znode.
    if own:
        who, auth = "this bridge's zookeeper.auth identity", "the previous credential and this one"
        fix = f"setAcl -R {root} {_shell_acl(own)}"
    else:
        who, auth = "a bridge without zookeeper.auth", "the previous credential"
        fix = f"setAcl -R {root} world:anyone:cdrwa"
    return (f"the bridge's state at {root} may not be used by {who}: it was made under "
            "another credential. Put the previous zookeeper.auth back, or give this one "
            "access: stop this region's bridges, then in ZooKeeper's shell, after "
            f"addauth digest USER:PASSWORD with {auth}: {fix}")


def _shell_acl(entry: str) -> str:
    """"31:digest:user:hash" as ZooKeeper's shell writes it: "digest:user:hash:cdrwa"."""
    _perms, ident = entry.split(":", 1)
    return f"{ident}:cdrwa"


async def start_checked(zk: ZooKeeper, settings: Settings) -> None:
    """Start a command's session and check the state's ACL (read only); stopped on failure."""
    await zk.start()
    try:
        await ensure(zk, settings, tighten=False)
    except BaseException:
        await zk.stop()
        raise
