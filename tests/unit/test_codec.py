"""bridge.codec against the committed golden vectors, the JSON Schema, and hostile input."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import codec, statecodec
from bridge.errors import CodecError, OversizedError
from bridge.model import Conflict, Event, NodeMeta, Op, VectorClock, Version, content_hash

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "schemas" / "vectors"
INVALID = VECTORS / "invalid"
SCHEMA = json.loads((ROOT / "schemas" / "event.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def json_view(obj: Any) -> Any:
    """The JSON view of an unpacked msgpack value, as the schema describes it."""
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, dict):
        return {k: json_view(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_view(v) for v in obj]
    return obj


def event_from_json(d: dict[str, Any]) -> Event:
    return Event(
        origin=d["origin"],
        subtree=d["subtree"],
        path=d["path"],
        op=Op(d["op"]),
        vc=VectorClock.of(d["vc"]),
        ts=d["ts"],
        writer=d["writer"],
        data=base64.b64decode(d["data"]) if "data" in d else None,
        v=d["v"],
        batch=d.get("batch"),
        batch_index=d.get("batch_index", 0),
        batch_size=d.get("batch_size", 1),
        inc=d.get("inc"),
        acl=tuple(d["acl"]) if "acl" in d else None,
        applied=tuple(sorted((r, int(t)) for r, t in (x.split(":") for x in d["applied"])))
        if "applied" in d else None,
    )


def valid_vectors() -> list[Path]:
    return sorted(VECTORS.glob("*.msgpack"))


def invalid_vectors() -> list[Path]:
    return sorted(INVALID.glob("*.msgpack"))


def sidecar(p: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(p.with_suffix(".json").read_text())
    return result


# ---------------------------------------------------------------- strategies

_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\uf8ff\ufff0-\U0010ffff/]")
regions = st.from_regex(r"[a-z0-9-]{1,32}", fullmatch=True)
subtrees = st.from_regex(r"[a-z0-9_-]{1,40}", fullmatch=True)
components = st.text(
    alphabet=st.characters(max_codepoint=0xFFFF).filter(lambda c: not _BAD.match(c)),
    min_size=1,
    max_size=12,
).filter(lambda c: c not in (".", ".."))
paths = st.lists(components, min_size=1, max_size=5).map(lambda cs: "/" + "/".join(cs))
counters = st.integers(1, 2**63 - 1)
clocks = st.dictionaries(regions, counters, min_size=1, max_size=6).map(VectorClock.of)
stamps = st.integers(0, 2**63 - 1)


@st.composite
def events(draw: st.DrawFn) -> Event:
    op = draw(st.sampled_from(list(Op)))
    heartbeat = op is Op.HEARTBEAT
    return Event(
        origin=draw(regions),
        subtree=draw(subtrees),
        path="/" if heartbeat else draw(paths),
        op=op,
        vc=draw(st.one_of(st.just(VectorClock()), clocks) if heartbeat else clocks),
        ts=draw(stamps),
        writer=draw(regions),
        data=draw(st.binary(max_size=300)) if op is Op.PUT else None,
        applied=tuple(sorted(draw(st.dictionaries(regions, stamps, max_size=5)).items()))
        if heartbeat and draw(st.booleans()) else None,
    )


# ---------------------------------------------------------------- round trips


@SETTINGS
@given(events())
def test_round_trip(event: Event) -> None:
    raw = codec.encode(event)
    assert codec.decode(raw) == event
    assert codec.encode(codec.decode(raw)) == raw


@SETTINGS
@given(events())
def test_schema_accepts_everything_the_encoder_writes(event: Event) -> None:
    VALIDATOR.validate(json_view(msgpack.unpackb(codec.encode(event))))


def test_encode_key_order_and_bin_type() -> None:
    e = Event("us-east", "s", "/a", Op.PUT, VectorClock.of({"b": 1, "a": 2}), 5, "us-east", b"x")
    m = msgpack.unpackb(codec.encode(e), raw=True)
    assert list(m) == [
        b"v",
        b"origin",
        b"subtree",
        b"path",
        b"op",
        b"vc",
        b"ts",
        b"writer",
        b"data",
    ]
    assert list(m[b"vc"]) == [b"a", b"b"]
    assert m[b"data"] == b"x"  # bin: raw=True would give bytes either way, so also check below
    assert codec.encode(e).endswith(b"\xa4data\xc4\x01x")


# ---------------------------------------------------------------- golden vectors


@pytest.mark.parametrize("path", valid_vectors(), ids=lambda p: p.stem)
def test_valid_vector_decodes(path: Path) -> None:
    meta = sidecar(path)
    raw = path.read_bytes()
    expected = event_from_json(meta["event"])
    assert codec.decode(raw) == expected
    if meta["canonical"]:
        assert codec.encode(expected) == raw


@pytest.mark.parametrize("path", valid_vectors(), ids=lambda p: p.stem)
def test_schema_accepts_valid_vector(path: Path) -> None:
    VALIDATOR.validate(json_view(msgpack.unpackb(path.read_bytes())))
    VALIDATOR.validate(sidecar(path)["event"])


@pytest.mark.parametrize("path", invalid_vectors(), ids=lambda p: p.stem)
def test_invalid_vector_is_rejected_with_its_reason(path: Path) -> None:
    meta = sidecar(path)
    kwargs = {"max_bytes": meta["max_bytes"]} if "max_bytes" in meta else {}
    with pytest.raises(CodecError) as info:
        codec.decode(path.read_bytes(), **kwargs)
    assert info.value.reason == meta["reason"]
    assert info.value.reason in codec.REASONS


@pytest.mark.parametrize("path", invalid_vectors(), ids=lambda p: p.stem)
def test_schema_on_invalid_vector(path: Path) -> None:
    expectation = sidecar(path)["schema_rejects"]
    if expectation is None:
        # No map to validate: msgpack itself refuses these bytes.
        with pytest.raises(ValueError):
            msgpack.unpackb(path.read_bytes())
        return
    view = json_view(msgpack.unpackb(path.read_bytes()))
    # ``False`` records a rule the schema cannot express; if the schema learns
    # it, flip the flag in make_vectors.py so the gap stays documented.
    assert VALIDATOR.is_valid(view) is not expectation


def test_vector_set_covers_the_brief() -> None:
    assert {p.stem for p in valid_vectors()} >= {
        "put-binary",
        "put-empty",
        "delete",
        "heartbeat",
        "unicode-path",
        "multi-region-vc",
        "extra-field",
    }
    assert {p.stem for p in invalid_vectors()} >= {
        "v2",
        "missing-vc",
        "path-dotdot",
        "data-on-delete",
        "truncated",
        "not-a-map",
        "oversized-bin",
    }
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


# ---------------------------------------------------------------- rejection details


def base_map(**fields: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "v": 1,
        "origin": "us-east",
        "subtree": "critical",
        "path": "/a",
        "op": "put",
        "vc": {"us-east": 1},
        "ts": 1,
        "writer": "us-east",
        "data": b"d",
    }
    m.update(fields)
    return {k: v for k, v in m.items() if v is not None}


def reason_of(raw: bytes, **kwargs: Any) -> CodecError:
    with pytest.raises(CodecError) as info:
        codec.decode(raw, **kwargs)
    return info.value


@pytest.mark.parametrize(
    ("fields", "reason", "names"),
    [
        ({"v": None}, "bad_field", "v"),
        ({"v": True}, "unknown_version", "v"),
        ({"v": 1.0}, "unknown_version", "v"),
        ({"v": 0}, "unknown_version", "v"),
        ({"v": 2**64 - 1}, "unknown_version", "v"),
        ({"origin": None}, "bad_field", "origin"),
        ({"origin": "US"}, "bad_field", "origin"),
        ({"origin": "a" * 33}, "bad_field", "origin"),
        ({"origin": "a\n"}, "bad_field", "origin"),
        ({"writer": b"us-east"}, "bad_field", "writer"),
        ({"subtree": "Crit"}, "bad_field", "subtree"),
        ({"subtree": ""}, "bad_field", "subtree"),
        ({"op": 1}, "bad_field", "op"),
        ({"vc": {}}, "bad_field", "vc"),
        ({"vc": [1]}, "bad_field", "vc"),
        ({"vc": {"us-east": True}}, "bad_field", "vc"),
        ({"vc": {"us-east": -1}}, "bad_field", "vc"),
        ({"vc": {"us-east": 2**63}}, "bad_field", "vc"),
        ({"vc": {"us-east": 1.5}}, "bad_field", "vc"),
        ({"ts": None}, "bad_field", "ts"),
        ({"ts": -1}, "bad_field", "ts"),
        ({"ts": 2**63}, "bad_field", "ts"),
        ({"ts": False}, "bad_field", "ts"),
        ({"data": None}, "bad_field", "data"),
        ({"data": "text"}, "bad_field", "data"),
        ({"op": "heartbeat", "path": "/"}, "bad_field", "data"),
        ({"op": "heartbeat", "path": "/a", "data": None}, "bad_path", ""),
        ({"op": "delete", "path": "/", "data": None}, "bad_path", ""),
        ({"path": None}, "bad_field", "path"),
        ({"path": 7}, "bad_path", ""),
        ({"path": "a/b"}, "bad_path", ""),
        ({"path": "/a/./b"}, "bad_path", ""),
        ({"path": "/a/"}, "bad_path", ""),
        ({"path": "/\U0001f600"}, "bad_path", ""),
        ({"extra": {"nested": 1}}, "bad_field", ""),
        ({"extra": [[1]]}, "bad_field", ""),
    ],
)
def test_field_rejections(fields: dict[str, Any], reason: str, names: str) -> None:
    err = reason_of(msgpack.packb(base_map(**fields)))
    assert err.reason == reason
    assert names in str(err)


def test_version_is_checked_before_other_fields() -> None:
    # A future major may drop or retype any v1 field.
    assert reason_of(msgpack.packb({"v": 2, "everything": "else changed"})).reason == (
        "unknown_version"
    )


def test_unknown_scalar_and_flat_list_fields_are_ignored() -> None:
    raw = msgpack.packb(base_map(note="hi", tags=["a", 1, None, b"x"], f=1.5, n=None))
    assert codec.decode(raw) == codec.decode(msgpack.packb(base_map()))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        msgpack.packb(base_map())[:-1],
        msgpack.packb(base_map()) + b"\x90",
        msgpack.packb([base_map()]),
        msgpack.packb("a string"),
        msgpack.packb(dict[Any, Any]({1: 2}, **base_map())),
        msgpack.packb({b"v": 1}),
        msgpack.packb({**base_map(), **{f"k{i}": i for i in range(60)}}),
        msgpack.packb(base_map(vc={f"r{i}": 1 for i in range(257)})),
        msgpack.packb(base_map(path="/" + "a" * 70_000)),
        msgpack.packb(base_map(extra=msgpack.ExtType(5, b"12345"))),
        b"\x91" * 10_000 + b"\x00",
        b"\x81\xa1a" * 10_000 + b"\x00",
        b"\xa2\xff\xfe",
    ],
    ids=[
        "empty",
        "never-used-byte",
        "truncated",
        "trailing",
        "array",
        "str",
        "int-key",
        "bin-key",
        "65-keys",
        "vc-257",
        "long-str",
        "ext-type",
        "deep-arrays",
        "deep-maps",
        "bad-utf8",
    ],
)
def test_malformed(raw: bytes) -> None:
    assert reason_of(raw).reason == "malformed"


def test_size_limit_is_checked_before_unpacking() -> None:
    raw = msgpack.packb(base_map(data=bytes(codec.DEFAULT_MAX_BYTES)))
    err = reason_of(raw)
    assert isinstance(err, OversizedError)
    assert err.reason == "oversized"
    assert codec.decode(raw, max_bytes=len(raw)).data == bytes(codec.DEFAULT_MAX_BYTES)
    # Garbage that is too large is also "oversized": the size is all we look at.
    assert reason_of(b"\xc1" * 100, max_bytes=99).reason == "oversized"


SECRET = b"SECRET-PAYLOAD-\xff\x00-do-not-log"


@pytest.mark.parametrize(
    "raw",
    [
        msgpack.packb(base_map(op="delete", data=SECRET)),
        msgpack.packb(base_map(data=SECRET.decode("latin-1"))),
        msgpack.packb(base_map(data=SECRET, v=9)),
        msgpack.packb(base_map(data=SECRET, origin="BAD")),
        msgpack.packb(base_map(data=SECRET, path="/../x")),
        msgpack.packb(base_map(data=SECRET, zz={"a": SECRET})),
        msgpack.packb(base_map(data=SECRET))[:-2],
        msgpack.packb(base_map(data=SECRET * 100)),
    ],
)
def test_errors_never_quote_payload(raw: bytes) -> None:
    err = reason_of(raw, max_bytes=1000)
    for text in (str(err), repr(err), str(err.__cause__ or "")):
        assert "SECRET" not in text
        assert "PAYLOAD" not in text


# ---------------------------------------------------------------- fuzz


@SETTINGS
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(raw: bytes) -> None:
    try:
        codec.decode(raw)
    except CodecError as err:
        assert err.reason in codec.REASONS


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
)
msgpack_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
field_values = st.one_of(
    msgpack_values,
    regions,
    paths,
    st.sampled_from(["put", "delete", "heartbeat", "/", ""]),
    st.dictionaries(
        st.one_of(regions, st.text(max_size=3)), st.integers(-2, 2**64 - 1), max_size=3
    ),
)


EVENT_KEYS = ["v", "origin", "subtree", "path", "op", "vc", "ts", "writer", "data"]


@SETTINGS
@given(
    st.dictionaries(st.sampled_from([*EVENT_KEYS, "x"]), field_values, max_size=3),
    st.sets(st.sampled_from(EVENT_KEYS), max_size=2),
)
def test_fuzz_structured_maps(overrides: dict[str, Any], dropped: set[str]) -> None:
    # A valid map with a few fields replaced or dropped reaches the field
    # checks, which random bytes almost never do.
    m = {k: v for k, v in {**base_map(), **overrides}.items() if k not in dropped}
    try:
        event = codec.decode(msgpack.packb(m))
    except CodecError as err:
        assert err.reason in codec.REASONS
    else:
        assert codec.decode(codec.encode(event)) == event


@SETTINGS
@given(st.sampled_from(valid_vectors()), st.data())
def test_fuzz_mutated_vectors(path: Path, data: st.DataObject) -> None:
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        codec.decode(bytes(raw[:cut]))
    except CodecError as err:
        assert err.reason in codec.REASONS


# ---------------------------------------------------------------- paths, encode, sizes


@pytest.mark.parametrize("path", ["/", "/a", "/a/b", "/a.b", "/...", "/.a", "/a-b_c~", "/é/日本"])
def test_normalise_path_accepts(path: str) -> None:
    assert codec.normalise_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        "a",
        "a/",
        "//",
        "/a/",
        "/a//b",
        "/.",
        "/..",
        "/a/./b",
        "/a/../b",
        "/a\x00",
        "/a\tb",
        "/a\x7f",
        "/a\x85",
        "/\ue000",
        "/\ufffe",
        "/\U0001f600",
        b"/a",
        None,
        1,
    ],
)
def test_normalise_path_rejects(path: object) -> None:
    with pytest.raises(CodecError) as info:
        codec.normalise_path(path)
    assert info.value.reason == "bad_path"


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (
            Event("us-east", "s", "/a", Op.PUT, VectorClock.of({"us-east": 1}), 1, "us-east"),
            "bad_field",
        ),
        (
            Event(
                "us-east", "s", "/a", Op.DELETE, VectorClock.of({"us-east": 1}), 1, "us-east", b"x"
            ),
            "bad_field",
        ),
        (
            Event(
                "us-east", "s", "/a/", Op.PUT, VectorClock.of({"us-east": 1}), 1, "us-east", b"x"
            ),
            "bad_path",
        ),
        (
            Event(
                "us-east",
                "s",
                "/a",
                Op.PUT,
                VectorClock.of({"us-east": 1}),
                1,
                "us-east",
                b"x",
                v=2,
            ),
            "unknown_version",
        ),
        (Event("us-east", "s", "/a", Op.PUT, VectorClock(), 1, "us-east", b"x"), "bad_field"),
    ],
)
def test_encode_refuses_what_peers_would_reject(event: Event, reason: str) -> None:
    with pytest.raises(CodecError) as info:
        codec.encode(event)
    assert info.value.reason == reason


def test_check_size() -> None:
    vc = VectorClock.of({"us-east": 1})
    small = Event("us-east", "s", "/a", Op.PUT, vc, 1, "us-east", bytes(100))
    codec.check_size(small, max_data_bytes=100)
    with pytest.raises(OversizedError):
        codec.check_size(small, max_data_bytes=99)
    big = Event("us-east", "s", "/a", Op.PUT, vc, 1, "us-east", bytes(codec.MAX_EVENT_BYTES))
    with pytest.raises(OversizedError) as info:
        codec.check_size(big, max_data_bytes=2 * codec.MAX_EVENT_BYTES)
    assert "event" in str(info.value)
    delete = Event("us-east", "s", "/a", Op.DELETE, vc, 1, "us-east")
    codec.check_size(delete, max_data_bytes=0)


# ---------------------------------------------------------------- metadata, positions, conflicts

hashes = st.one_of(st.just(b""), st.binary(min_size=16, max_size=16))


@SETTINGS
@given(
    st.builds(
        NodeMeta,
        vc=st.one_of(st.just(VectorClock()), clocks),
        data_hash=hashes,
        deleted=st.booleans(),
        writer=st.one_of(st.just(""), regions),
        ts=stamps,
        placeholder=st.booleans(),
        placeholder_czxid=st.integers(0, 2**63 - 1),
    )
)
def test_meta_round_trip(meta: NodeMeta) -> None:
    assert statecodec.decode_meta(statecodec.encode_meta(meta)) == meta


def test_meta_empty_and_garbage() -> None:
    assert statecodec.decode_meta(b"") is None
    with pytest.raises(CodecError) as info:
        statecodec.decode_meta(b"\xc1garbage")
    assert info.value.reason == "malformed"
    with pytest.raises(CodecError) as info:
        statecodec.decode_meta(msgpack.packb([1, 2]))
    assert info.value.reason == "malformed"
    with pytest.raises(CodecError) as info:
        statecodec.decode_meta(msgpack.packb({"vc": {}, "h": b"", "d": 1, "w": "", "ts": 0}))
    assert info.value.reason == "bad_field"
    assert "d" in str(info.value)


def test_meta_without_placeholder_flag_is_not_a_placeholder() -> None:
    raw = msgpack.packb({"vc": {"a": 1}, "h": content_hash(b"x"), "d": False, "w": "a", "ts": 3})
    meta = statecodec.decode_meta(raw)
    assert meta == NodeMeta(VectorClock.of({"a": 1}), content_hash(b"x"), False, "a", 3)


@SETTINGS
@given(st.dictionaries(st.integers(0, 10_000), st.integers(0, 2**63 - 1), max_size=50))
def test_positions_round_trip(d: dict[int, int]) -> None:
    assert statecodec.decode_positions(statecodec.encode_positions(d)) == d


def test_positions_edge_cases() -> None:
    assert statecodec.decode_positions(b"") == {}
    for raw in (
        b"\xc1",
        msgpack.packb([1]),
        msgpack.packb({"0": 1}),
        msgpack.packb({0: -1}),
        msgpack.packb({0: True}),
    ):
        with pytest.raises(CodecError):
            statecodec.decode_positions(raw)
    with pytest.raises(CodecError):
        statecodec.encode_positions({-1: 0})


rel_paths = st.lists(st.text(st.characters(codec="utf-8"), max_size=20), max_size=4).map(
    lambda parts: "/" + "/".join(parts))


@SETTINGS
@given(st.dictionaries(st.integers(0, 100), st.tuples(
    st.integers(0, 2**63 - 1), st.lists(rel_paths, max_size=5).map(tuple)), max_size=5))
def test_rereads_round_trip(d: dict[int, tuple[int, tuple[str, ...]]]) -> None:
    assert statecodec.decode_rereads(statecodec.encode_rereads(d)) == d


@SETTINGS
@given(st.lists(rel_paths, max_size=20).map(tuple))
def test_paths_round_trip(paths: tuple[str, ...]) -> None:
    assert statecodec.decode_paths(statecodec.encode_paths(paths)) == paths


@SETTINGS
@given(st.dictionaries(rel_paths, st.one_of(st.none(), st.integers(0, 2**63 - 1)), max_size=10))
def test_joining_marker_round_trip(entries: dict[str, int | None]) -> None:
    paths = tuple(sorted(entries))
    lines = {p: line for p, line in entries.items() if line is not None}
    assert statecodec.decode_marker(statecodec.encode_marker(paths, lines)) == (paths, lines)


def test_a_joining_marker_of_paths_alone_reads_as_before() -> None:
    # Written by a release before lines were kept.
    assert statecodec.decode_marker(statecodec.encode_paths(("/a", "/b"))) == (("/a", "/b"), {})
    for raw in (b"\xc1", msgpack.packb({0: 1}), msgpack.packb(["tmp"]), msgpack.packb([1]),
                msgpack.packb([["/a", -1]]), msgpack.packb([["/a", True]]),
                msgpack.packb([["tmp", 3]]), msgpack.packb([[3, 3]]),
                msgpack.packb([["/a", 3, 4]])):
        with pytest.raises(CodecError):
            statecodec.decode_marker(raw)


def test_rereads_and_paths_garbage() -> None:
    assert statecodec.decode_rereads(b"") == {}
    for raw in (b"\xc1", msgpack.packb([1]), msgpack.packb({0: [1]}),
                msgpack.packb({0: [-1, []]}), msgpack.packb({0: [1, ["tmp"]]}),
                msgpack.packb({0: [True, []]}), msgpack.packb({0: [1, "/tmp"]})):
        with pytest.raises(CodecError):
            statecodec.decode_rereads(raw)
    for raw in (b"\xc1", msgpack.packb({0: 1}), msgpack.packb(["tmp"]), msgpack.packb([1])):
        with pytest.raises(CodecError):
            statecodec.decode_paths(raw)


versions = st.builds(
    Version, vc=clocks, ts=stamps, writer=regions, data_hash=hashes, deleted=st.booleans()
)


@SETTINGS
@given(
    st.builds(
        Conflict,
        subtree=subtrees,
        path=paths,
        local=versions,
        remote=versions,
        winner=st.sampled_from(["local", "remote"]),
        rule=st.sampled_from(["lww", "priority"]),
        merged=clocks,
        at_ms=st.integers(0, 2**50),
        extra=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    )
)
def test_conflict_round_trip(c: Conflict) -> None:
    assert statecodec.decode_conflict(statecodec.encode_conflict(c)) == c


def test_conflict_garbage() -> None:
    for raw in (b"\xc1", msgpack.packb({}), msgpack.packb({"local": {"h": "zz"}})):
        with pytest.raises(CodecError):
            statecodec.decode_conflict(raw)


@SETTINGS
@given(events())
def test_incarnation_of_reads_the_field_decode_reads(event: Event) -> None:
    raw = codec.encode(event)
    assert codec.incarnation_of(raw) == event.inc
    # The own-topic check's shortcut: our field's bytes are in every record we encode.
    if event.inc is not None:
        assert codec.incarnation_field(event.inc) in raw


def test_incarnation_of_rejects_what_decode_rejects_of_it() -> None:
    with pytest.raises(CodecError):
        codec.incarnation_of(b"\xc1garbage")
    with pytest.raises(CodecError):
        codec.incarnation_of(msgpack.packb({"inc": "NOT-HEX"}))
    assert codec.incarnation_of(msgpack.packb({"v": "1.3"})) is None


# ---------------------------------------------------------------- the usual event's inline checks


acl_entries = st.one_of(
    st.from_regex(r"(0|[1-9][0-9]?):[a-z0-9]{1,32}:[^\x00-\x1f]{0,20}", fullmatch=True),
    st.text(max_size=12),
)
usual_values = st.one_of(
    field_values,
    st.integers(-1, 2),
    st.integers(2**63 - 2, 2**63 + 1),
    st.lists(acl_entries, max_size=3),
    st.from_regex(r"[0-9a-f]{1,70}", fullmatch=True),
    st.sampled_from(["/a/./b", "/a/../b", "/a//b", "/a/", "/\x01", "/", "a"]),
)
ALL_KEYS = [*EVENT_KEYS, "batch", "batch_index", "batch_size", "acl", "inc", "applied"]


def both_checks(m: dict[str, Any]) -> tuple[Event | None, Event | None]:
    """(what the inline checks build, or None) and (what the full checks build, or None)."""
    try:
        checked: Event | None = codec._checked_event(m)
    except CodecError:
        checked = None
    usual = codec.event_from_map(m) if codec._usual(m) is not None else None
    return usual, checked


@SETTINGS
@given(events(), st.data())
def test_inline_checks_build_what_the_full_checks_build(event: Event, data: st.DataObject) -> None:
    if event.op is not Op.HEARTBEAT:
        batch = data.draw(st.none() | st.integers(0, 2**63 - 1))
        size = data.draw(st.integers(1, 1000)) if batch is not None else 1
        event = replace(
            event, batch=batch, batch_index=data.draw(st.integers(0, size - 1)),
            batch_size=size,
            acl=data.draw(st.none() | st.lists(st.sampled_from(
                ["31:world:anyone", "1:digest:u:x="]), max_size=2).map(tuple))
            if event.op is Op.PUT else None,
            inc=data.draw(st.none() | st.from_regex(r"[0-9a-f]{1,64}", fullmatch=True)))
    m = codec.event_to_map(event)
    usual, checked = both_checks(m)
    assert checked == event
    # Every event a bridge writes takes the inline path, heartbeats aside.
    assert usual == (None if event.op is Op.HEARTBEAT else event)
    assert codec.decode(codec.encode(event)) == event


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from([*ALL_KEYS, "x"]), usual_values, max_size=4),
    st.sets(st.sampled_from(ALL_KEYS), max_size=2),
    st.booleans(),
)
def test_inline_checks_never_accept_what_the_full_checks_refuse(
    overrides: dict[str, Any], dropped: set[str], batched: bool
) -> None:
    start = base_map(batch=7, batch_index=1, batch_size=3, inc="ab12",
                     acl=["31:world:anyone"]) if batched else base_map()
    m = {k: v for k, v in {**start, **overrides}.items() if k not in dropped}
    usual, checked = both_checks(m)
    if checked is None:
        assert usual is None, m
    elif usual is not None:
        assert usual == checked, m


NEAR_MISSES: list[dict[str, Any]] = [
    *({"path": p} for p in ["/a/../b", "/a/./b", "/..", "/.", "/a//b", "/a/", "", "a", "/",
                            "/\x00", "/\x7f", "/a\x9f", 7]),
    *({"vc": vc} for vc in [{}, {"us-east": 0}, {"us-east": -1}, {"us-east": 2**63},
                            {"us-east": True}, {"US": 1}, {"a" * 33: 1}, {1: 1}, [],
                            {"us-east": 1.0}, {f"r{i}": 1 for i in range(257)}]),
    *({"ts": t} for t in [-1, 2**63, True, 1.0, "1", None]),
    *({"v": v} for v in [2, 0, True, 1.0, "1"]),
    *({"op": op} for op in ["heartbeat", "PUT", "del", 1]),
    *({key: r} for key in ("origin", "writer") for r in ["US", "", "a" * 33, 1, "a_b"]),
    *({"subtree": s} for s in ["", "A", "a b", 1]),
    {"data": "d"}, {"data": None}, {"op": "delete"}, {"op": "delete", "data": None, "acl": None},
    *({"batch": b} for b in [-1, 2**63, True, None, "1"]),
    *({"batch_size": b} for b in [0, 100_001, True, None]),
    *({"batch_index": i} for i in [-1, 3, True, None]),
    {"batch": None, "batch_size": None}, {"batch": None, "batch_index": None},
    *({"acl": a} for a in ["x", ["bad"], [1], ["999:world:anyone"], ["31:World:anyone"], [],
                           ["31:world:any\x01one"]]),
    {"op": "delete", "data": None},
    *({"inc": i} for i in ["", "G", "a" * 65, 1]),
    {"applied": []}, {"x": 1}, {"x": [1, 2]}, {"x": {"nested": 1}},
    *({"op": "heartbeat", "path": p, "data": None, "acl": None, "batch": None,
       "batch_index": None, "batch_size": None} for p in ["/a", "/"]),
]


@pytest.mark.parametrize("fields", NEAR_MISSES, ids=repr)
def test_inline_checks_agree_on_near_misses(fields: dict[str, Any]) -> None:
    m = {**base_map(batch=7, batch_index=1, batch_size=3, inc="ab12", acl=["31:world:anyone"])}
    for key, value in fields.items():
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
    usual, checked = both_checks(m)
    assert usual == (None if checked is None else usual)
    if usual is not None:
        assert usual == checked


@SETTINGS
@given(events(), st.integers(0, 2**63 - 1), st.integers(1, 1000), st.data())
def test_in_batch_is_replace_of_the_batch_fields(event: Event, batch: int, size: int,
                                                 data: st.DataObject) -> None:
    index = data.draw(st.integers(0, size - 1))
    # Every field distinct from its neighbours', so a field out of order shows.
    event = replace(event, inc=data.draw(st.from_regex(r"[0-9a-f]{1,8}", fullmatch=True)),
                    acl=("31:world:anyone",) if event.op is Op.PUT else None)
    assert event.in_batch(batch, index, size) == replace(
        event, batch=batch, batch_index=index, batch_size=size)
