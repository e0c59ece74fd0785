"""Bytes ⇄ values for what travels on the topics: the replication event wire codec.

Events arrive from other regions, so ``decode`` treats its input as hostile:
size is bounded before unpacking, msgpack's own limits bound every container,
every field is type- and range-checked, and a failure is always a
``CodecError`` whose ``reason`` is a short stable slug (used as a metric label)
and whose detail never quotes payload bytes. The wire format is documented in
``schemas/README.md`` and pinned by the golden vectors in ``schemas/vectors``.
The bridge's own records in ZooKeeper are in ``bridge.statecodec``; both use the
bounded unpacking and field checks of ``bridge.msgfields``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from bridge.errors import CodecError, OversizedError
from bridge.model import SCHEMA_VERSION, Event, Op, VectorClock
from bridge.msgfields import (
    BAD_FIELD,
    BAD_PATH,
    MALFORMED,
    MAX_INT64,
    MAX_TOP_LEVEL_KEYS,
    MAX_VC_ENTRIES,
    REASONS,
    REGION,
    UNKNOWN_VERSION,
    as_map,
    bytes_field,
    int_field,
    is_scalar,
    pack,
    region_field,
    require,
    str_field,
    unpack_bounded,
    vc_field,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_EVENT_BYTES",
    "NULL_HEADER",
    "REASONS",
    "check_size",
    "decode",
    "encode",
    "normalise_path",
]

# Kafka's default max.message.bytes is 1 MiB including record overhead, and
# ZooKeeper's jute.maxbuffer is about 1 MiB for the znode plus its metadata
# write in the same ``multi``: 1,000,000 leaves headroom for both.
MAX_EVENT_BYTES = 1_000_000
# Decoding is slightly more tolerant than encoding so that a peer with a
# marginally different limit is not rejected for a few bytes of envelope.
DEFAULT_MAX_BYTES = 1_048_576

_SUBTREE = re.compile(r"[a-z0-9_-]+")
# The characters ZooKeeper's PathUtils.validatePath refuses. Java
# checks UTF-16 units, so every code point above U+FFFF (a surrogate pair
# there) is refused too: a path ZooKeeper cannot create must be refused here,
# not half-applied later.
_BAD_PATH_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\uf8ff\ufff0-\U0010ffff]")

_OPS = {op.value: op for op in Op}
_EVENT_KEYS = ("v", "origin", "subtree", "path", "op", "vc", "ts", "writer", "data",
               "batch", "batch_index", "batch_size", "acl", "inc", "applied")
_ACL_ENTRY = re.compile(r"(0|[1-9][0-9]?):[a-z0-9]{1,32}:[^\x00-\x1f]{0,1024}")
# An incarnation is a uuid4 hex today; any short lower-case hex id is accepted.
_INC = re.compile(r"[0-9a-f]{1,64}")
# Schema 1.3: one "region:ts" string per origin a heartbeat reports applied.
_APPLIED = re.compile(r"([a-z0-9-]{1,32}):(0|[1-9][0-9]{0,18})")
# A batch is bounded by ZooKeeper's request size long before this.
MAX_BATCH_SIZE = 100_000
# The header of a null-value record: the collected tombstone, as a delete event.
NULL_HEADER = "zkbridge-tombstone"


# ---------------------------------------------------------------- paths


def normalise_path(path: object) -> str:
    """Return ``path`` if it is a normalised relative path, else raise ``bad_path``.

    Nothing is rewritten: ZooKeeper paths are compared byte for byte, so a
    path that is not already in normal form is refused rather than guessed
    at (``/a/../b`` must never become ``/b`` and land outside what the
    publisher meant). ``/`` passes here; callers decide whether the root is
    acceptable for their operation.
    """
    if not isinstance(path, str):
        raise CodecError(BAD_PATH, f"expected str, got {type(path).__name__}")
    if not path.startswith("/"):
        raise CodecError(BAD_PATH, "does not start with /")
    if path == "/":
        return path
    if path.endswith("/"):
        raise CodecError(BAD_PATH, "trailing /")
    if _BAD_PATH_CHAR.search(path):
        raise CodecError(BAD_PATH, "control or reserved character")
    for component in path[1:].split("/"):
        if component == "":
            raise CodecError(BAD_PATH, "empty component")
        if component in (".", ".."):
            raise CodecError(BAD_PATH, "relative component")
    return path


# ---------------------------------------------------------------- events


def event_from_map(m: Mapping[str, object]) -> Event:
    """The event a map holds, or ``CodecError`` saying what is wrong with it."""
    usual = _usual(m)
    return _checked_event(m) if usual is None else Event(*usual)


def check_event_map(m: Mapping[str, object]) -> None:
    """Raise ``CodecError`` unless ``event_from_map`` accepts ``m`` (nothing built)."""
    if _usual(m) is None:
        _checked_event(m)


_KNOWN_KEYS = frozenset(_EVENT_KEYS)
# ``Event``'s fields, in order.
_Usual = tuple[str, str, str, Op, VectorClock, int, str, bytes | None, int, int | None, int, int,
               tuple[str, ...] | None, str | None, None]


def _usual(m: Mapping[str, object]) -> _Usual | None:
    """An event as bridges write it, checked by ``_checked_event``'s rules inline.

    Every record is checked twice (encoded, then decoded by each peer), and
    the checks, one call per field, cost more than the rest of an encode or
    a decode (profiled: 17 µs a check, against 12 here including the
    event). This accepts only what those rules accept, with exact types (what
    msgpack returns), and returns None for anything else, heartbeats and
    unknown keys included: ``_checked_event`` then decides, with its reasons.
    A property test holds the two to the same answers. Returns the event's
    fields, in order (building it costs 2 µs the encoder's check does not need).
    """
    if not _KNOWN_KEYS.issuperset(m) or "applied" in m:
        return None
    v, op_name, origin, subtree, path, writer, vc, ts = (
        m.get("v"), m.get("op"), m.get("origin"), m.get("subtree"), m.get("path"),
        m.get("writer"), m.get("vc"), m.get("ts"))
    if (type(v) is not int or v != SCHEMA_VERSION or type(op_name) is not str
            or type(origin) is not str or type(subtree) is not str or type(path) is not str
            or type(writer) is not str or type(vc) is not dict or type(ts) is not int
            or not 0 <= ts <= MAX_INT64):
        return None
    op = _OPS.get(op_name)
    if (op is None or op is Op.HEARTBEAT or not REGION.fullmatch(origin)
            or not _SUBTREE.fullmatch(subtree) or not REGION.fullmatch(writer)
            or not vc or len(vc) > MAX_VC_ENTRIES):
        return None
    for region, counter in vc.items():
        if (type(region) is not str or not REGION.fullmatch(region)
                or type(counter) is not int or not 1 <= counter <= MAX_INT64):
            return None
    if (path == "/" or not path.startswith("/") or path.endswith("/")
            or _BAD_PATH_CHAR.search(path)):
        return None
    for component in path[1:].split("/"):
        if component in ("", ".", ".."):
            return None
    data: bytes | None = None
    if op is Op.PUT:
        given = m.get("data")
        if type(given) is not bytes:
            return None
        data = given
    elif "data" in m:
        return None
    batch: int | None = None
    batch_index, batch_size = 0, 1
    if "batch" in m:
        number, size, index = m["batch"], m.get("batch_size"), m.get("batch_index")
        if (type(number) is not int or type(size) is not int or type(index) is not int
                or not 0 <= number <= MAX_INT64 or not 1 <= size <= MAX_BATCH_SIZE
                or not 0 <= index < size):
            return None
        batch, batch_index, batch_size = number, index, size
    elif "batch_index" in m or "batch_size" in m:
        return None
    acl: tuple[str, ...] | None = None
    if "acl" in m:
        raw_acl = m["acl"]
        if op is not Op.PUT or type(raw_acl) is not list or not all(
                type(x) is str and _ACL_ENTRY.fullmatch(x) for x in raw_acl):
            return None
        acl = tuple(raw_acl)
    inc: str | None = None
    if "inc" in m:
        stamp = m["inc"]
        if type(stamp) is not str or not _INC.fullmatch(stamp):
            return None
        inc = stamp
    return (origin, subtree, path, op, VectorClock(tuple(sorted(vc.items()))), ts, writer,
            data, v, batch, batch_index, batch_size, acl, inc, None)


def _checked_event(m: Mapping[str, object]) -> Event:
    # Version first: a future major may change any other field, and its
    # events must be reported as unknown_version, not as a field error.
    v = require(m, "v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise CodecError(UNKNOWN_VERSION, f"v is {type(v).__name__}, not an int")
    if v != SCHEMA_VERSION:
        raise CodecError(UNKNOWN_VERSION, f"v={v}" if -1000 < v < 1000 else "v out of range")

    op_name = str_field(m, "op")
    op = _OPS.get(op_name)
    if op is None:
        raise CodecError(BAD_FIELD, "op: not put, delete or heartbeat")
    origin = region_field(m, "origin")
    subtree = str_field(m, "subtree")
    if not _SUBTREE.fullmatch(subtree):
        raise CodecError(BAD_FIELD, "subtree: not a subtree name [a-z0-9_-]+")
    path = normalise_path(require(m, "path"))
    if op is Op.HEARTBEAT and path != "/":
        raise CodecError(BAD_PATH, "heartbeat path must be /")
    if op is not Op.HEARTBEAT and path == "/":
        # The mount point itself belongs to each region's configuration.
        raise CodecError(BAD_PATH, "the mount root is not replicated")
    writer = region_field(m, "writer")
    vc = vc_field(require(m, "vc"), "vc", min_counter=1, check_regions=True)
    if op is not Op.HEARTBEAT and not vc.entries:
        raise CodecError(BAD_FIELD, "vc: empty")
    ts = int_field(m, "ts", 0)
    data: bytes | None = None
    if op is Op.PUT:
        data = bytes_field(m, "data")
    elif "data" in m:
        raise CodecError(BAD_FIELD, f"data: not allowed for op={op.value}")

    batch: int | None = None
    batch_index, batch_size = 0, 1
    if "batch" in m:
        if op is Op.HEARTBEAT:
            raise CodecError(BAD_FIELD, "batch: not allowed for a heartbeat")
        batch = int_field(m, "batch", 0)
        batch_size = int_field(m, "batch_size", 1, MAX_BATCH_SIZE)
        batch_index = int_field(m, "batch_index", 0, batch_size - 1)
    elif "batch_index" in m or "batch_size" in m:
        raise CodecError(BAD_FIELD, "batch_index/batch_size without batch")
    acl: tuple[str, ...] | None = None
    if "acl" in m:
        raw_acl = m["acl"]
        if op is not Op.PUT:
            raise CodecError(BAD_FIELD, "acl: only for op=put")
        if not isinstance(raw_acl, list) or not all(
                isinstance(x, str) and _ACL_ENTRY.fullmatch(x) for x in raw_acl):
            raise CodecError(BAD_FIELD, "acl: expected a list of perms:scheme:id strings")
        acl = tuple(raw_acl)

    inc = _inc(m)

    applied: tuple[tuple[str, int], ...] | None = None
    if "applied" in m:
        applied = _applied(m["applied"], op)

    for key, value in m.items():
        if key in _EVENT_KEYS:
            continue
        # Unknown keys are later minor additions; they may be scalars or flat
        # lists, never nested containers, so no field costs more than one pass.
        if not (
            is_scalar(value) or (isinstance(value, list) and all(is_scalar(x) for x in value))
        ):
            raise CodecError(BAD_FIELD, "an unknown field holds a nested container")

    return Event(
        origin=origin,
        subtree=subtree,
        path=path,
        op=op,
        vc=vc,
        ts=ts,
        writer=writer,
        data=data,
        v=v,
        batch=batch,
        batch_index=batch_index,
        batch_size=batch_size,
        acl=acl,
        inc=inc,
        applied=applied,
    )


def _applied(raw: object, op: Op) -> tuple[tuple[str, int], ...]:
    """Schema 1.3: a flat list of "region:ts" strings (flat, so 1.2 readers ignore it)."""
    if op is not Op.HEARTBEAT:
        raise CodecError(BAD_FIELD, "applied: only for op=heartbeat")
    if not isinstance(raw, list) or len(raw) > MAX_VC_ENTRIES:
        raise CodecError(BAD_FIELD, f"applied: expected a list of at most {MAX_VC_ENTRIES}")
    out: dict[str, int] = {}
    for item in raw:
        match = _APPLIED.fullmatch(item) if isinstance(item, str) else None
        if match is None or int(match[2]) > MAX_INT64:
            raise CodecError(BAD_FIELD, "applied: expected region:ts strings")
        if match[1] in out:
            raise CodecError(BAD_FIELD, "applied: a region twice")
        out[match[1]] = int(match[2])
    return tuple(sorted(out.items()))


def event_to_map(event: Event) -> dict[str, object]:
    m: dict[str, object] = {
        "v": event.v,
        "origin": event.origin,
        "subtree": event.subtree,
        "path": event.path,
        "op": str(event.op),
        "vc": event.vc.as_dict(),
        "ts": event.ts,
        "writer": event.writer,
    }
    if event.data is not None:
        m["data"] = bytes(event.data)
    if event.batch is not None:
        m["batch"] = event.batch
        m["batch_index"] = event.batch_index
        m["batch_size"] = event.batch_size
    if event.acl is not None:
        m["acl"] = list(event.acl)
    if event.inc is not None:
        m["inc"] = event.inc
    if event.applied is not None:
        m["applied"] = [f"{r}:{ts}" for r, ts in event.applied]
    return m


def encode(event: Event) -> bytes:
    """The msgpack value of ``event``'s Kafka record.

    The event is validated with the decoder's own rules first, so this region
    never publishes a record its peers would refuse.
    """
    m = event_to_map(event)
    check_event_map(m)
    return pack(m)


def decode(raw: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Event:
    """Parse one Kafka record value; raise ``CodecError`` for anything unacceptable."""
    m = as_map(unpack_bounded(raw, max_bytes=max_bytes), "event")
    if len(m) > MAX_TOP_LEVEL_KEYS:
        raise CodecError(MALFORMED, f"more than {MAX_TOP_LEVEL_KEYS} keys")
    return event_from_map(m)


def incarnation_of(raw: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> str | None:
    """The ``inc`` field of a record value, and nothing else checked (None: absent).

    For reading one's own topic back, where only the publisher's incarnation
    matters: a full ``decode`` of every record a start-up capture publishes
    was about a tenth of the origin's CPU during a catch-up (profiled).
    """
    return _inc(as_map(unpack_bounded(raw, max_bytes=max_bytes), "event"))


def incarnation_field(inc: str) -> bytes:
    """The bytes of the field ``inc: <inc>`` as ``encode`` writes it (key, then value)."""
    return pack("inc") + pack(inc)


def _inc(m: Mapping[str, object]) -> str | None:
    if "inc" not in m:
        return None
    inc = str_field(m, "inc")
    if not _INC.fullmatch(inc):
        raise CodecError(BAD_FIELD, "inc: not a hex incarnation id [0-9a-f]{1,64}")
    return inc


def check_size(event: Event, max_data_bytes: int) -> None:
    """Raise ``OversizedError`` if ``event`` cannot be written to ZooKeeper or Kafka.

    Called before anything is written, so an oversized znode is reported
    rather than half-applied.
    """
    if event.data is not None and len(event.data) > max_data_bytes:
        raise OversizedError(f"data {len(event.data)} bytes exceeds limit {max_data_bytes}")
    size = len(encode(event))
    if size > MAX_EVENT_BYTES:
        raise OversizedError(f"event {size} bytes exceeds limit {MAX_EVENT_BYTES}")
