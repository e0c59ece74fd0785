"""Bounded msgpack and the field checks both codecs use (``bridge.codec`` for events,
``bridge.statecodec`` for the bridge's own records).

Input may be hostile: size is bounded before unpacking, msgpack's own limits
bound every container, and every failure is a ``CodecError`` whose ``reason``
is one of ``REASONS`` (a short stable slug, used as a metric label) and whose
detail never quotes payload bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgpack

from bridge.errors import CodecError, OversizedError
from bridge.model import VectorClock

_T = TypeVar("_T")

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

REGION = re.compile(r"[a-z0-9-]{1,32}")


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


def _typed(m: Mapping[str, object], key: str, kind: type[_T], wire: str) -> _T:
    value = require(m, key)
    if not isinstance(value, kind):
        raise CodecError(BAD_FIELD, f"{key}: expected {wire}, got {type(value).__name__}")
    return value


def str_field(m: Mapping[str, object], key: str) -> str:
    return _typed(m, key, str, "str")


def bool_field(m: Mapping[str, object], key: str) -> bool:
    return _typed(m, key, bool, "bool")


def bytes_field(m: Mapping[str, object], key: str) -> bytes:
    return _typed(m, key, bytes, "bin")


def region_field(m: Mapping[str, object], key: str) -> str:
    value = str_field(m, key)
    if not REGION.fullmatch(value):
        raise CodecError(BAD_FIELD, f"{key}: not a region name [a-z0-9-]{{1,32}}")
    return value


def vc_field(value: object, key: str, *, min_counter: int, check_regions: bool) -> VectorClock:
    if not isinstance(value, dict):
        raise CodecError(BAD_FIELD, f"{key}: expected map, got {type(value).__name__}")
    if len(value) > MAX_VC_ENTRIES:
        raise CodecError(BAD_FIELD, f"{key}: more than {MAX_VC_ENTRIES} entries")
    for region, counter in value.items():
        if not isinstance(region, str) or (check_regions and not REGION.fullmatch(region)):
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


def is_scalar(value: object) -> bool:
    return value is None or isinstance(value, bool | int | float | str | bytes)
