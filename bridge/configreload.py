"""What a reload (SIGHUP) applies of a changed configuration, and its summary for
``zkbridge check-config``."""

from __future__ import annotations

import dataclasses
from typing import Any

from bridge.config import LIVE, Settings, SubtreeSettings, topic_name

# Runtime names and the document section they are read from.
_FLATTENED = {"metrics_listen": "metrics", "log_format": "log", "log_level": "log"}


def _live(kind: Any, name: str) -> bool:
    return kind.__pydantic_fields__[_FLATTENED.get(name, name)].json_schema_extra is LIVE


def reloaded(old: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """What a reload (SIGHUP) from ``old`` to ``new`` does, by the fields marked ``LIVE``.

    Returns the running settings (live keys from ``new``, every other from
    ``old``), the changed keys applied and the changed keys left for a restart.
    A subtree's live keys apply only while no subtree changed otherwise.
    """
    changed = [
        f.name
        for f in dataclasses.fields(Settings)
        if f.name not in ("subtrees", "source") and getattr(old, f.name) != getattr(new, f.name)
    ]
    applied = [name for name in changed if _live(Settings, name)]
    restart = [name for name in changed if name not in applied]
    changes = {name: getattr(new, name) for name in applied}
    names = [f.name for f in dataclasses.fields(SubtreeSettings)]

    def fixed(settings: Settings) -> list[list[object]]:
        kept = [n for n in names if not _live(SubtreeSettings, n)]
        return [[getattr(st, n) for n in kept] for st in settings.subtrees]

    if fixed(old) != fixed(new):
        restart.append("subtrees")
    else:
        changes["subtrees"] = new.subtrees
        applied += [
            f"subtrees[{b.name}].{n}"
            for a, b in zip(old.subtrees, new.subtrees, strict=True)
            for n in names
            if _live(SubtreeSettings, n) and getattr(a, n) != getattr(b, n)
        ]
    return dataclasses.replace(old, **changes), applied, restart


def describe(settings: Settings) -> str:
    """A short human summary for ``zkbridge check-config`` (never shows secrets)."""
    prefix, peers = settings.kafka.topic_prefix, settings.peers
    lines = [
        f"region {settings.region}" + (f" ({settings.source})" if settings.source else ""),
        f"zookeeper {settings.zookeeper.hosts}, state at {settings.state_path}",
        f"kafka {settings.kafka.bootstrap_servers} ({settings.kafka.security_protocol})",
        f"peers: {', '.join(peers) or '(none)'}",
        "subtrees:",
    ]
    for st in settings.subtrees:
        excluded = f" (excluding {', '.join(st.exclude)})" if st.exclude else ""
        lines.append(f"  {st.name} at {st.path}{excluded}, acl {st.acl}")
        lines.append(f"    publishes to {topic_name(prefix, st.name, settings.region)}")
        if peers:
            consumed = ", ".join(topic_name(prefix, st.name, p) for p in peers)
            lines.append(f"    consumes {consumed}")
    return "\n".join(lines)
