"""Regenerate the golden event vectors in this directory.

The vectors pin the wire format independently of ``bridge.codec``: maps are
packed here with msgpack directly, so a codec change that alters the bytes
or the accepted set makes the tests fail instead of silently moving the
goalposts. Run ``python schemas/vectors/make_vectors.py`` only when the
format is meant to change, and review the diff of the committed files.

Each ``NAME.msgpack`` has a ``NAME.json`` beside it: for valid vectors the
expected decoded event (bytes as base64) and whether ``bridge.codec.encode``
must reproduce the bytes exactly (``canonical``); for invalid ones the
expected ``CodecError.reason``, an optional ``max_bytes`` to decode with, and
whether the JSON Schema can express the rejection (``schema_rejects``).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgpack

HERE = Path(__file__).resolve().parent
TS = 1_718_000_000_000 << 16  # 2024-06-10 in the hybrid logical clock's layout
EVENT_FIELDS = ("v", "origin", "subtree", "path", "op", "vc", "ts", "writer", "data",
                "batch", "batch_index", "batch_size", "acl", "inc", "applied")


def event_map(**fields: Any) -> dict[str, Any]:
    """A valid put, in the key order bridge.codec.encode writes, with overrides.

    A field set to ``None`` is left out.
    """
    m: dict[str, Any] = {
        "v": 1,
        "origin": "us-east",
        "subtree": "critical",
        "path": "/services/api",
        "op": "put",
        "vc": {"us-east": 1},
        "ts": TS,
        "writer": "us-east",
        "data": b"hello",
    }
    m.update(fields)
    return {k: v for k, v in m.items() if v is not None}


def json_view(obj: Any) -> Any:
    """The JSON view the schema describes: bin values become base64 strings."""
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, dict):
        return {k: json_view(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_view(v) for v in obj]
    return obj


VALID: dict[str, tuple[str, dict[str, Any], bool]] = {
    # name: (description, map as packed, canonical)
    "put-binary": (
        "put whose data is arbitrary binary, including NUL and non-UTF-8 bytes",
        event_map(data=bytes([0, 1, 2, 0x7F, 0x80, 0xC1, 0xFE, 0xFF]) + b"\x00binary"),
        True,
    ),
    "put-empty": (
        "put with empty data: a znode holding zero bytes, not a delete",
        event_map(path="/flags/dark-mode", data=b""),
        True,
    ),
    "delete": (
        "delete: a normal record with op=delete and no data field",
        event_map(op="delete", vc={"us-east": 4}, data=None),
        True,
    ),
    "put-with-acl": (
        "schema 1.2: a put under acl: copy carries the znode's ACL entries",
        event_map(acl=["31:digest:alice:C9s+7o3XWxCwqq1JQ6kcpFSFz0U=", "1:world:anyone"]),
        True,
    ),
    "put-batched": (
        "schema 1.1: the second of three events of one closed batch",
        event_map(batch=TS + 7, batch_index=1, batch_size=3),
        True,
    ),
    "put-incarnation": (
        "schema 1.2: a batched put stamped with the publishing ensemble's incarnation",
        event_map(batch=TS + 9, batch_index=0, batch_size=1,
                  inc="5f0c1e7a9b2d4c3e8f6a1b0c9d8e7f60"),
        True,
    ),
    "heartbeat-incarnation": (
        "schema 1.2: a heartbeat stamped with the publishing ensemble's incarnation",
        event_map(path="/", op="heartbeat", vc={}, data=None,
                  inc="5f0c1e7a9b2d4c3e8f6a1b0c9d8e7f60"),
        True,
    ),
    "heartbeat-applied": (
        "schema 1.3: a heartbeat reporting, per peer, the stamp through which this region "
        "applied that peer's stream (causal stability)",
        event_map(origin="eu-west", writer="eu-west", path="/", op="heartbeat", vc={},
                  data=None, inc="5f0c1e7a9b2d4c3e8f6a1b0c9d8e7f60",
                  applied=[f"ap-south:{TS - 5}", f"us-east:{TS + 3}"]),
        True,
    ),
    "heartbeat": (
        "heartbeat: path / (the Kafka key is also /), empty clock, no data",
        event_map(path="/", op="heartbeat", vc={}, data=None),
        True,
    ),
    "unicode-path": (
        "put on a path with non-ASCII (BMP) characters, UTF-8 in the msgpack str",
        event_map(path="/config/café/日本語/ключ", data="värde".encode()),
        True,
    ),
    "multi-region-vc": (
        "put re-announcing content written by another region, with a 3-region clock",
        event_map(
            origin="eu-west",
            vc={"ap-south": 2, "eu-west": 7, "us-east": 12},
            writer="ap-south",
            data=b"shard-map-v42",
        ),
        True,
    ),
    "extra-field": (
        "a later minor version added fields: unknown keys are ignored, not rejected",
        {**event_map(data=b"x"), "trace_id": "7f3a", "hops": [1, 2], "prio": 3},
        False,
    ),
}

INVALID: dict[str, tuple[str, bytes, str, dict[str, Any]]] = {
    # name: (description, raw bytes, reason, extra json fields)
    "v2": (
        "v=2: an unknown major version is rejected, not guessed",
        msgpack.packb(event_map(v=2)),
        "unknown_version",
        {"schema_rejects": True},
    ),
    "batch-index-out-of-range": (
        "schema 1.1: batch_index must be below batch_size",
        msgpack.packb(event_map(batch=1, batch_index=3, batch_size=3)),
        "bad_field",
        {"schema_rejects": False},
    ),
    "batch-index-without-batch": (
        "schema 1.1: batch_index and batch_size only come with batch",
        msgpack.packb(event_map(batch_index=0, batch_size=1)),
        "bad_field",
        {"schema_rejects": True},
    ),
    "applied-on-put": (
        "schema 1.3: applied is carried by heartbeats only",
        msgpack.packb(event_map(applied=[f"eu-west:{TS}"])),
        "bad_field",
        {"schema_rejects": True},
    ),
    "applied-bad-entry": (
        "schema 1.3: applied entries are region:ts strings",
        msgpack.packb(event_map(path="/", op="heartbeat", vc={}, data=None,
                                applied=["eu-west=12"])),
        "bad_field",
        {"schema_rejects": True},
    ),
    "inc-not-hex": (
        "schema 1.2: inc must be lower-case hex",
        msgpack.packb(event_map(inc="Not-An-Id")),
        "bad_field",
        {"schema_rejects": True},
    ),
    "inc-not-str": (
        "schema 1.2: inc must be a string",
        msgpack.packb(event_map(inc=42)),
        "bad_field",
        {"schema_rejects": True},
    ),
    "v-string": (
        "v is a string, not an int",
        msgpack.packb(event_map(v="1")),
        "unknown_version",
        {"schema_rejects": True},
    ),
    "missing-vc": (
        "the vc field is missing",
        msgpack.packb(event_map(vc=None)),
        "bad_field",
        {"schema_rejects": True},
    ),
    "path-dotdot": (
        "path with a .. component, which would escape the mount",
        msgpack.packb(event_map(path="/services/../../etc")),
        "bad_path",
        {"schema_rejects": True},
    ),
    "path-root-put": (
        "put on / : the mount root itself is not replicated",
        msgpack.packb(event_map(path="/")),
        "bad_path",
        {"schema_rejects": True},
    ),
    "path-control-char": (
        "path containing a control character",
        msgpack.packb(event_map(path="/a\nb")),
        "bad_path",
        {"schema_rejects": True},
    ),
    "data-on-delete": (
        "delete carrying a data field",
        msgpack.packb(event_map(op="delete", data=b"stale")),
        "bad_field",
        {"schema_rejects": True},
    ),
    "put-without-data": (
        "put with no data field",
        msgpack.packb(event_map(data=None)),
        "bad_field",
        {"schema_rejects": True},
    ),
    "data-as-str": (
        "put whose data is a msgpack str instead of bin",
        msgpack.packb(event_map(data="hello"), use_bin_type=True),
        "bad_field",
        # Both are strings in the JSON view: the schema cannot tell them apart.
        {"schema_rejects": False},
    ),
    "bad-region": (
        "vc names a region outside [a-z0-9-]{1,32}",
        msgpack.packb(event_map(vc={"US_EAST": 1})),
        "bad_field",
        {"schema_rejects": True},
    ),
    "zero-counter": (
        "vc counter 0 (counters start at 1)",
        msgpack.packb(event_map(vc={"us-east": 0})),
        "bad_field",
        {"schema_rejects": True},
    ),
    "unknown-op": (
        "op is not put, delete or heartbeat",
        msgpack.packb(event_map(op="rename")),
        "bad_field",
        {"schema_rejects": True},
    ),
    "truncated": (
        "a valid put cut short by 3 bytes",
        msgpack.packb(event_map())[:-3],
        "malformed",
        {"schema_rejects": None},
    ),
    "trailing-bytes": (
        "a valid put followed by one extra byte",
        msgpack.packb(event_map()) + b"\x00",
        "malformed",
        {"schema_rejects": None},
    ),
    "not-a-map": (
        "a msgpack array instead of a map",
        msgpack.packb(["v", 1, "op", "put"]),
        "malformed",
        {"schema_rejects": True},
    ),
    "not-msgpack": (
        "bytes that are not msgpack at all (0xc1 is never used)",
        b"\xc1\xc1\xc1 not msgpack",
        "malformed",
        {"schema_rejects": None},
    ),
    "oversized-bin": (
        "put whose 2000-byte data exceeds the decoder's size limit (max_bytes=1024 here; "
        "1 MiB by default, which would make this file needlessly large)",
        msgpack.packb(event_map(data=bytes(2000))),
        "oversized",
        {"max_bytes": 1024, "schema_rejects": False},
    ),
}


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def main() -> None:
    for name, (description, m, canonical) in VALID.items():
        (HERE / f"{name}.msgpack").write_bytes(msgpack.packb(m, use_bin_type=True))
        expected = {k: v for k, v in m.items() if k in EVENT_FIELDS}
        write_json(
            HERE / f"{name}.json",
            {"description": description, "canonical": canonical, "event": json_view(expected)},
        )
    for name, (description, raw, reason, extra) in INVALID.items():
        (HERE / "invalid" / f"{name}.msgpack").write_bytes(raw)
        write_json(
            HERE / "invalid" / f"{name}.json",
            {"description": description, "reason": reason, **extra},
        )


if __name__ == "__main__":
    main()
