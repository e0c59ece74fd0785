"""Bytes ⇄ values for what travels on the topics: the replication event wire codec.

Events arrive from other regions, so ``decode`` treats its input as hostile:
size is bounded before unpacking, msgpack's own limits bound every container,
every field is type- and range-checked, and a failure is always a
``CodecError`` whose ``reason`` is a short stable slug (used as a metric label)
and whose detail never quotes payload bytes. The wire format is documented in
``schemas/README.md`` and pinned by the golden vectors in ``schemas/vectors``.
The bridge's own records in ZooKeeper are in ``bridge.statecodec``, which shares
the bounded unpacking and the field checks below.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgpack

from bridge.errors import CodecError, OversizedError
from bridge.model import SCHEMA_VERSION, Event, Op, VectorClock

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

MALFORMED = "malformed"
UNKNOWN_VERSION = "unknown_version"
BAD_FIELD = "bad_field"
BAD_PATH = "bad_path"
OVERSIZED = "oversized"
REASONS = frozenset({MALFORMED, UNKNOWN_VERSION, BAD_FIELD, BAD_PATH, OVERSIZED})

MAX_INT64 = 2**63 - 1
MAX_TOP_LEVEL_KEYS = 64
MAX_VC_ENTRIES = 256
# No legitimate string in an event (path, region, subtree) comes near this;
# bounding it keeps a hostile record from smuggling large text past the checks.
MAX_STR_LEN = 65_536

_REGION = re.compile(r"[a-z0-9-]{1,32}")
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


# ---------------------------------------------------------------- unpacking


def unpack_bounded(
    raw: bytes, *, max_bytes: int, int_keys: bool = False, max_map_len: int = MAX_VC_ENTRIES,
    max_array_len: int = MAX_TOP_LEVEL_KEYS,
) -> object:
    """msgpack → Python with every container bounded; errors become ``malformed``."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise CodecError(MALFORMED, f"expected bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise OversizedError(f"{len(raw)} bytes exceeds limit {max_bytes}")
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            use_list=True,
            strict_map_key=not int_keys,
            max_str_len=min(MAX_STR_LEN, max_bytes),
            max_bin_len=max_bytes,
            max_array_len=max_array_len,
            max_map_len=max_map_len,
            max_ext_len=0,
        )
    # The boundary with the library: whatever it raises on hostile input
    # (ExtraData, FormatError, StackError, UnicodeDecodeError, ValueError on a
    # limit) means the same thing to us, and must never escape as itself.
    except Exception as exc:
        raise CodecError(MALFORMED, type(exc).__name__) from exc


def pack(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


# ---------------------------------------------------------------- field checks


def require(m: Mapping[str, object], key: str) -> object:
    if key not in m:
        raise CodecError(BAD_FIELD, f"{key}: missing")
    return m[key]


def int_field(m: Mapping[str, object], key: str, lo: int, hi: int = MAX_INT64) -> int:
    value = require(m, key)
    # bool is an int in Python but never a valid counter or timestamp.
    if not isinstance(value, int) or isinstance(value, bool):
        raise CodecError(BAD_FIELD, f"{key}: expected int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise CodecError(BAD_FIELD, f"{key}: out of range [{lo}, {hi}]")
    return value


def str_field(m: Mapping[str, object], key: str) -> str:
    value = require(m, key)
    if not isinstance(value, str):
        raise CodecError(BAD_FIELD, f"{key}: expected str, got {type(value).__name__}")
    return value


def bool_field(m: Mapping[str, object], key: str) -> bool:
    value = require(m, key)
    if not isinstance(value, bool):
        raise CodecError(BAD_FIELD, f"{key}: expected bool, got {type(value).__name__}")
    return value


def bytes_field(m: Mapping[str, object], key: str) -> bytes:
    value = require(m, key)
    if not isinstance(value, bytes):
        raise CodecError(BAD_FIELD, f"{key}: expected bin, got {type(value).__name__}")
    return value


def _region(m: Mapping[str, object], key: str) -> str:
    value = str_field(m, key)
    if not _REGION.fullmatch(value):
        raise CodecError(BAD_FIELD, f"{key}: not a region name [a-z0-9-]{{1,32}}")
    return value


def vc_field(value: object, key: str, *, min_counter: int, check_regions: bool) -> VectorClock:
    if not isinstance(value, dict):
        raise CodecError(BAD_FIELD, f"{key}: expected map, got {type(value).__name__}")
    if len(value) > MAX_VC_ENTRIES:
        raise CodecError(BAD_FIELD, f"{key}: more than {MAX_VC_ENTRIES} entries")
    for region, counter in value.items():
        if not isinstance(region, str) or (check_regions and not _REGION.fullmatch(region)):
            raise CodecError(BAD_FIELD, f"{key}: entry is not a region name")
        if not isinstance(counter, int) or isinstance(counter, bool):
            raise CodecError(BAD_FIELD, f"{key}: counter is not an int")
        if not min_counter <= counter <= MAX_INT64:
            raise CodecError(BAD_FIELD, f"{key}: counter out of range [{min_counter}, 2**63-1]")
    return VectorClock.of(value)


def as_map(obj: object, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise CodecError(MALFORMED, f"{what} is not a map")
    if any(not isinstance(k, str) for k in obj):
        raise CodecError(MALFORMED, f"{what} has a non-string key")
    return obj


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, bool | int | float | str | bytes)


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
    origin = _region(m, "origin")
    subtree = str_field(m, "subtree")
    if not _SUBTREE.fullmatch(subtree):
        raise CodecError(BAD_FIELD, "subtree: not a subtree name [a-z0-9_-]+")
    path = normalise_path(require(m, "path"))
    if op is Op.HEARTBEAT and path != "/":
        raise CodecError(BAD_PATH, "heartbeat path must be /")
    if op is not Op.HEARTBEAT and path == "/":
        # The mount point itself belongs to each region's configuration.
        raise CodecError(BAD_PATH, "the mount root is not replicated")
    writer = _region(m, "writer")
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
            _is_scalar(value) or (isinstance(value, list) and all(_is_scalar(x) for x in value))
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
    event_from_map(m)
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
