"""Bytes ⇄ values for the bridge's own state records in ZooKeeper.

Outbox entries (including null entries for collected tombstones), node
metadata, consumer positions, the tombstone-collection record and conflicts.
Our own ensemble writes these, yet they are read with the event codec's
bounded unpacking and field checks (``bridge.msgfields``), so a damaged
znode fails as a ``CodecError`` rather than as whatever msgpack raises.
"""

from __future__ import annotations

from collections.abc import Mapping

from bridge.codec import DEFAULT_MAX_BYTES, MAX_BATCH_SIZE, event_from_map, event_to_map
from bridge.errors import CodecError
from bridge.model import Conflict, Event, NodeMeta, Op, Version
from bridge.msgfields import (
    BAD_FIELD,
    MALFORMED,
    MAX_TOP_LEVEL_KEYS,
    as_map,
    bool_field,
    bytes_field,
    int_field,
    pack,
    require,
    str_field,
    unpack_bounded,
    vc_field,
)

__all__ = [
    "NULL_MARK",
    "Rereads",
    "decode_conflict",
    "decode_gc",
    "decode_marker",
    "decode_meta",
    "decode_outbox",
    "decode_paths",
    "decode_positions",
    "decode_rereads",
    "encode_conflict",
    "encode_gc",
    "encode_marker",
    "encode_meta",
    "encode_null_entry",
    "encode_outbox",
    "encode_paths",
    "encode_positions",
    "encode_rereads",
    "is_null_entry",
]

MAX_HASH_LEN = 64
MAX_PARTITIONS = 65_536
MAX_REREAD_PATHS = 4096


# ---------------------------------------------------------------- outbox


def encode_outbox(payloads: list[bytes]) -> bytes:
    """One outbox entry: the encoded events of one batch, in publish order."""
    return pack([bytes(p) for p in payloads])


# An outbox entry of null-value records (collected tombstones): each payload is
# the collected tombstone as a delete event plus this key. A bridge that does
# not know the key (before null records) decodes the payload as an ordinary
# delete event and publishes it as one: a harmless re-announcement of a
# tombstone, never a crash. This release publishes the event without the key
# in the record's ``codec.NULL_HEADER`` header, with a null value.
NULL_MARK = "null_record"


def encode_null_entry(events: list[Event]) -> bytes:
    """One outbox entry holding null records for the tombstones ``events`` (deletes)."""
    payloads = []
    for event in events:
        if event.op is not Op.DELETE:
            raise ValueError("a null record stands for a delete")
        m = event_to_map(event)
        event_from_map(m)
        m[NULL_MARK] = True
        payloads.append(pack(m))
    return encode_outbox(payloads)


def is_null_entry(payload: bytes) -> bool:
    """Whether an outbox payload stands for a null record (see ``NULL_MARK``)."""
    try:
        obj = unpack_bounded(payload, max_bytes=DEFAULT_MAX_BYTES)
    except CodecError:
        return False
    return isinstance(obj, dict) and obj.get(NULL_MARK) is True


def decode_outbox(raw: bytes) -> list[bytes]:
    """The payloads of an outbox entry; an entry written before 1.1 holds one event."""
    obj = unpack_bounded(raw, max_bytes=DEFAULT_MAX_BYTES + 65_536, max_map_len=MAX_TOP_LEVEL_KEYS,
                  max_array_len=MAX_BATCH_SIZE)
    if isinstance(obj, dict):
        return [bytes(raw)]
    if isinstance(obj, list) and all(isinstance(p, bytes) for p in obj):
        return list(obj)
    raise CodecError(MALFORMED, "outbox entry is neither an event nor a list of events")


# ---------------------------------------------------------------- metadata


def encode_meta(meta: NodeMeta) -> bytes:
    return pack(
        {
            "vc": meta.vc.as_dict(),
            "h": bytes(meta.data_hash),
            "d": meta.deleted,
            "w": meta.writer,
            "ts": meta.ts,
            "ph": meta.placeholder,
            **({"pz": meta.placeholder_czxid} if meta.placeholder_czxid else {}),
        }
    )


def decode_meta(raw: bytes) -> NodeMeta | None:
    """Parse a metadata znode; empty bytes mean a hierarchy-only node (``None``)."""
    if len(raw) == 0:
        return None
    m = as_map(unpack_bounded(raw, max_bytes=DEFAULT_MAX_BYTES), "metadata")
    data_hash = bytes_field(m, "h")
    if len(data_hash) > MAX_HASH_LEN:
        raise CodecError(BAD_FIELD, f"h: longer than {MAX_HASH_LEN} bytes")
    return NodeMeta(
        # Our own ensemble wrote this, so region names are not re-policed, but a
        # placeholder may legitimately have an empty clock and writer.
        vc=vc_field(require(m, "vc"), "vc", min_counter=0, check_regions=False),
        data_hash=data_hash,
        deleted=bool_field(m, "d"),
        writer=str_field(m, "w"),
        ts=int_field(m, "ts", 0),
        # Absent in records written before placeholders existed.
        placeholder=bool_field(m, "ph") if "ph" in m else False,
        # Absent in records written before it was kept: a leftover is then
        # taken for a re-creation, as it was.
        placeholder_czxid=int_field(m, "pz", 0) if "pz" in m else 0,
    )


# ---------------------------------------------------------------- positions


def encode_positions(d: Mapping[int, int]) -> bytes:
    """Partition → next offset to consume."""
    for partition, offset in d.items():
        if partition < 0 or offset < 0:
            raise CodecError(BAD_FIELD, "positions: negative partition or offset")
    return pack({int(p): int(o) for p, o in sorted(d.items())})


Rereads = Mapping[int, tuple[int, tuple[str, ...]]]


def encode_rereads(d: Rereads) -> bytes:
    """Partition → (offset up to which only ``paths``' events apply, paths): a topic read
    again for paths no longer excluded (``TopicCheck.read_again``)."""
    return pack({int(p): [int(until), list(paths)] for p, (until, paths) in sorted(d.items())})


def decode_rereads(raw: bytes) -> dict[int, tuple[int, tuple[str, ...]]]:
    if len(raw) == 0:
        return {}
    obj = unpack_bounded(raw, max_bytes=DEFAULT_MAX_BYTES, int_keys=True,
                         max_map_len=MAX_PARTITIONS, max_array_len=MAX_REREAD_PATHS)
    if not isinstance(obj, dict):
        raise CodecError(MALFORMED, "rereads is not a map")
    out: dict[int, tuple[int, tuple[str, ...]]] = {}
    for partition, entry in obj.items():
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[1], list)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                           for v in (partition, entry[0]))
                or not all(isinstance(path, str) and path.startswith("/")
                           for path in entry[1])):
            raise CodecError(BAD_FIELD, "rereads: entries must be [offset, [paths]]")
        out[partition] = (entry[0], tuple(entry[1]))
    return out


def encode_paths(paths: tuple[str, ...]) -> bytes:
    return pack(list(paths))


def decode_paths(raw: bytes) -> tuple[str, ...]:
    obj = unpack_bounded(raw, max_bytes=DEFAULT_MAX_BYTES, max_array_len=MAX_REREAD_PATHS)
    if not isinstance(obj, list) or not all(isinstance(p, str) and p.startswith("/")
                                            for p in obj):
        raise CodecError(BAD_FIELD, "paths: must be a list of absolute paths")
    return tuple(obj)


def encode_marker(paths: tuple[str, ...], lines: Mapping[str, int]) -> bytes:
    """The joining marker's paths; one that joined before the marker was made again
    as ``[path, line]``, the zxid its join began at (``SubtreeStore.mark_joining``)."""
    return pack([[p, int(lines[p])] if p in lines else p for p in paths])


def decode_marker(raw: bytes) -> tuple[tuple[str, ...], dict[str, int]]:
    obj = unpack_bounded(raw, max_bytes=DEFAULT_MAX_BYTES, max_array_len=MAX_REREAD_PATHS)
    if not isinstance(obj, list):
        raise CodecError(BAD_FIELD, "joining marker: must be a list of paths")
    paths: list[str] = []
    lines: dict[str, int] = {}
    for entry in obj:
        line = None
        if isinstance(entry, list) and len(entry) == 2:
            entry, line = entry
            if not isinstance(line, int) or isinstance(line, bool) or line < 0:
                raise CodecError(BAD_FIELD, "joining marker: a line must be a zxid")
        if not isinstance(entry, str) or not entry.startswith("/"):
            raise CodecError(BAD_FIELD, "joining marker: entries must be absolute paths")
        if line is not None:
            lines[entry] = line
        paths.append(entry)
    return tuple(paths), lines


def decode_positions(raw: bytes) -> dict[int, int]:
    if len(raw) == 0:
        return {}
    obj = unpack_bounded(raw, max_bytes=DEFAULT_MAX_BYTES, int_keys=True,
                         max_map_len=MAX_PARTITIONS)
    if not isinstance(obj, dict):
        raise CodecError(MALFORMED, "positions is not a map")
    out: dict[int, int] = {}
    for partition, offset in obj.items():
        for value in (partition, offset):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CodecError(BAD_FIELD, "positions: entries must be ints >= 0")
        out[partition] = offset
    return out


# ---------------------------------------------------------------- tombstone collection


def encode_gc(floor: int, collected: int) -> bytes:
    """The subtree's collection record: counter floor for recreated paths, total collected."""
    return pack({"floor": floor, "collected": collected})


def decode_gc(raw: bytes) -> tuple[int, int]:
    if len(raw) == 0:
        return 0, 0
    m = as_map(unpack_bounded(raw, max_bytes=DEFAULT_MAX_BYTES), "gc record")
    return int_field(m, "floor", 0), int_field(m, "collected", 0)


# ---------------------------------------------------------------- conflicts


def _version_to_map(v: Version) -> dict[str, object]:
    return {"vc": v.vc.as_dict(), "ts": v.ts, "w": v.writer, "h": v.data_hash.hex(), "d": v.deleted}


def _version_from_map(obj: object, key: str) -> Version:
    m = as_map(obj, key)
    h = str_field(m, "h")
    try:
        data_hash = bytes.fromhex(h)
    except ValueError as exc:
        raise CodecError(BAD_FIELD, f"{key}.h: not hex") from exc
    return Version(
        vc=vc_field(require(m, "vc"), f"{key}.vc", min_counter=0, check_regions=False),
        ts=int_field(m, "ts", 0),
        writer=str_field(m, "w"),
        data_hash=data_hash,
        deleted=bool_field(m, "d"),
    )


def encode_conflict(c: Conflict) -> bytes:
    return pack(
        {
            "subtree": c.subtree,
            "path": c.path,
            "local": _version_to_map(c.local),
            "remote": _version_to_map(c.remote),
            "winner": c.winner,
            "rule": c.rule,
            "merged": c.merged.as_dict(),
            "at_ms": c.at_ms,
            "extra": dict(c.extra),
        }
    )


def decode_conflict(raw: bytes) -> Conflict:
    m = as_map(unpack_bounded(raw, max_bytes=DEFAULT_MAX_BYTES), "conflict")
    extra = as_map(m.get("extra", {}), "extra")
    if any(not isinstance(v, str) for v in extra.values()):
        raise CodecError(BAD_FIELD, "extra: values must be strings")
    return Conflict(
        subtree=str_field(m, "subtree"),
        path=str_field(m, "path"),
        local=_version_from_map(require(m, "local"), "local"),
        remote=_version_from_map(require(m, "remote"), "remote"),
        winner=str_field(m, "winner"),
        rule=str_field(m, "rule"),
        merged=vc_field(require(m, "merged"), "merged", min_counter=0, check_regions=False),
        at_ms=int_field(m, "at_ms", 0),
        extra=dict(extra),
    )
