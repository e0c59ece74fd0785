"""Turn one region's YAML configuration file into frozen settings, reporting every problem at once.

The settings classes are the one place the keys and their rules are written:
``bridge.configdoc`` renders them as ``schemas/config.schema.json`` and the
README key table. Nothing here talks to ZooKeeper or Kafka; the only side
effects are reading the file and the secret files and environment variables it
names, so ``zkbridge check-config`` can run anywhere the service would.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import InitVar
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from bridge.errors import ConfigError

MAX_SESSION_TIMEOUT = 600
MAX_DATA_BYTES = 1_000_000  # ZooKeeper's default jute.maxbuffer
MAX_TOPIC_NAME = 249  # Kafka refuses longer topic names

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]

# --------------------------------------------------------------------------- value types

_PATTERN_RULES: dict[str, str] = {}  # a name pattern -> the problem line saying it in words


def _pattern(pattern: str, rule: str) -> StringConstraints:
    _PATTERN_RULES[pattern] = rule
    return StringConstraints(pattern=pattern)


def _addresses(rule: str, port: str, many: bool) -> AfterValidator:
    address = re.compile(rf"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+){port}")

    def check(value: str) -> str:
        for entry in value.split(",") if many else [value]:
            match = address.fullmatch(entry)
            if not match:
                raise ValueError(rule)
            if match[1] and not 1 <= int(match[1]) <= 65535:
                raise ValueError(f"port {match[1]} is out of range 1-65535")
        return value

    return AfterValidator(check)


# ZooKeeper rejects these characters in znode names.
_ZNODE_BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\uf8ff\ufff0-\uffff]")


def _znode_path(value: str, mount: bool = False) -> str:
    """``value`` if it is an absolute, normalised znode path below the root."""
    for wrong, rule in [
        (
            _ZNODE_BAD_CHARS.search(value),
            "must not contain NUL or other characters ZooKeeper rejects",
        ),
        (not value.startswith("/"), "must be absolute"),
        (value == "/", "must not be /"),
        (value.endswith("/"), "must not end with '/'"),
        ("//" in value, "must not contain '//'"),
        ({".", ".."} & set(value.split("/")), "must not contain '.' or '..' components"),
        (
            mount and (value + "/").startswith("/zookeeper/"),
            "must not be /zookeeper or below it (reserved by ZooKeeper)",
        ),
    ]:
        if wrong:
            raise ValueError(rule)
    return value


def _read(value: str, info: ValidationInfo, size: int = -1) -> tuple[Path, bytes]:
    """The file at ``value`` (relative to the configuration file's directory) and its bytes."""
    path = Path(_context(info).get("base_dir", ".")) / value
    try:
        with path.open("rb") as f:
            return path, f.read(size)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:  # NUL in the path
        raise ValueError("must not contain NUL") from None


def _context(info: ValidationInfo) -> Mapping[str, Any]:
    return info.context if isinstance(info.context, Mapping) else {}


def _replication_factor(value: int) -> int:
    if value == 0 or value < -1:
        raise ValueError("must be -1 (broker default) or at least 1")
    return value


Text = Annotated[str, StringConstraints(strict=True, min_length=1)]
Positive = Annotated[float, Field(strict=True, gt=0)]
Count = Annotated[int, Field(strict=True)]
Flag = Annotated[bool, Field(strict=True)]
Region = Annotated[
    Text, _pattern(r"^[a-z0-9-]{1,32}$", "must be 1-32 characters of a-z, 0-9 or '-'")
]
SubtreeName = Annotated[Text, _pattern(r"^[a-z0-9_-]+$", "must use only a-z, 0-9, '_' or '-'")]
TopicPrefix = Annotated[
    Text,
    _pattern(
        r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$",
        "must use only A-Z, a-z, 0-9, '.', '_' or '-' and not start with '.'",
    ),
]
EnvName = Annotated[
    Text, _pattern(r"^[A-Za-z_][A-Za-z0-9_]*$", "must be an environment variable name")
]
HostList = Annotated[
    Text,
    _addresses(
        "must be a comma-separated list of host or host:port (no spaces, no chroot)",
        port=r"(?::([0-9]{1,5}))?",
        many=True,
    ),
]
Listen = Annotated[Text, _addresses("must be host:port", port=r":([0-9]{1,5})", many=False)]
ZnodePath = Annotated[Text, AfterValidator(_znode_path)]
MountPath = Annotated[Text, AfterValidator(lambda value: _znode_path(value, mount=True))]
# The path resolved against the configuration file's directory, once it proved readable.
ReadableFile = Annotated[Text, AfterValidator(lambda value, info: str(_read(value, info, 0)[0]))]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


@functools.cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def _valid(kind: Any, value: object) -> Any:
    """``value`` if it passes ``kind``'s own checks, else None (rules judge only such values)."""
    try:
        return _adapter(kind).validate_python(value)
    except ValidationError:
        return None


def _items(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _duplicates(values: list[object], kind: Any) -> Iterator[tuple[int, int]]:
    """(index, index of its first occurrence) for each repeated valid value."""
    first: dict[object, int] = {}
    for i, value in enumerate(values):
        if _valid(kind, value) is not None and first.setdefault(value, i) != i:
            yield i, first[value]


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


# --------------------------------------------------------------------------- cross-field rules


def _checked(handler: Callable[[Any], Any], data: Any, problems: Iterable[Problem]) -> Any:
    """``handler(data)``, raising its problems and ``problems`` together."""
    found = list(problems)
    try:
        result = handler(data)
    except ValidationError as exc:
        found[:0] = map(_problem, exc.errors())
    if not found:
        return result
    raise ValidationError.from_exception_data("settings", [
        InitErrorDetails(type=PydanticCustomError("config", "{m}", {"m": m}), loc=loc, input=None)
        for loc, m in found
    ])


def _rules(rules: Callable[[Any, Mapping[str, Any]], Iterable[Problem]]) -> Any:
    """A model validator adding the problems ``rules`` find in the mapping as written.

    An after-validator only runs once every field is valid, which would hide e.g.
    a mount overlap behind an unrelated typo; the rules therefore see the raw
    mapping and judge only values that pass their own type (``_valid``).
    Settings built in code (``dataclasses.replace``) are not judged again.
    """

    def validate(cls: type, data: Any, handler: Callable[[Any], Any]) -> Any:
        if not isinstance(data, Mapping):
            return handler(data)
        return _checked(handler, data, rules(cls, data))

    return model_validator(mode="wrap")(validate)


def _secret_from(stem: str, check: Callable[[str], str | None] = lambda secret: None) -> Any:
    """A model validator reading ``stem`` from exactly one of stem, stem_file, stem_env.

    ``check`` judges the secret. Problems name keys, paths and variables, never the secret.
    """
    names = (stem, f"{stem}_file", f"{stem}_env")

    def validate(cls: type, data: Any, handler: Callable[[Any], Any], info: ValidationInfo) -> Any:
        if not isinstance(data, Mapping):
            return handler(data)
        given = [name for name in names if data.get(name) is not None]
        if len(given) != 1:
            wanted = ", ".join(names)
            got = f"only one of {wanted} may be set, got {', '.join(given)}"
            return _checked(handler, data, [((), got if given else f"one of {wanted} is required")])
        try:
            secret = _secret(given[0], data[given[0]], info)
            problem = check(secret) if secret else None  # "": the key's own type says why
            if problem:
                raise ValueError(problem)
        except ValueError as exc:
            return _checked(handler, data, [((given[0],), str(exc))])
        return _checked(handler, {**data, stem: secret} if secret else data, [])

    return model_validator(mode="wrap")(validate)


def _secret(key: str, value: Any, info: ValidationInfo) -> str:
    """The secret ``key`` holds or names; "" when ``value`` fails the key's own type."""
    if _valid(EnvName if key.endswith("_env") else Text, value) is None:
        return ""
    if key.endswith("_env"):
        secret: str | None = _context(info).get("env", os.environ).get(value)
        if not secret:
            state = "not set" if secret is None else "empty"
            raise ValueError(f"environment variable {value} is {state}")
        return secret
    if not key.endswith("_file"):
        return str(value)
    path, raw = _read(value, info)
    try:
        # Editors and ``echo`` add a final newline that is not part of the secret.
        secret = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def _digest_form(credential: str) -> str | None:
    return None if ":" in credential else "a digest credential must have the form user:password"


# --------------------------------------------------------------------------- settings

LIVE: dict[str, Any] = {"x-reload": "live"}  # a reload (SIGHUP) applies it; else: restart
# Descriptions are the attribute docstrings below each field.
_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _secret_field() -> Any:
    """Where a secret lands: out of repr (settings reach log lines); "" until it is read."""
    return Field(default="", repr=False, json_schema_extra=_no_default)


@dataclass(frozen=True, config=_CONFIG)
class ZooKeeperAuth:
    """Authenticate the session (addauth). Exactly one of credential, credential_file,
    credential_env."""

    scheme: Literal["digest"] = "digest"
    """ZooKeeper auth scheme; only digest is supported."""
    credential: Text = _secret_field()
    """The digest credential, user:password, inline. Prefer credential_file or credential_env so the
    secret does not sit in this file."""
    credential_file: Text | None = None
    """File holding the digest credential; a relative path is resolved against this configuration
    file's directory. One trailing newline is ignored."""
    credential_env: EnvName | None = None
    """Name of the environment variable holding the digest credential; it must be set and
    non-empty."""

    _source = _secret_from("credential", _digest_form)


@dataclass(frozen=True, config=_CONFIG)
class ZooKeeperSettings:
    """The local ZooKeeper ensemble (never a remote region's)."""

    hosts: HostList
    """Comma-separated host or host:port list, no spaces and no chroot, e.g. "zk1:2181,zk2:2181"."""
    session_timeout: Annotated[Positive, Field(le=MAX_SESSION_TIMEOUT)] = 10.0
    """Session timeout in seconds, at most 600; also how long a standby waits before taking over.
    The server may negotiate it into its own bounds."""
    connect_timeout: Positive = 15.0
    """Seconds to wait for the first connection to the ensemble."""
    auth: ZooKeeperAuth | None = None


@dataclass(frozen=True, config=_CONFIG)
class KafkaSasl:
    """SASL login; exactly one of password, password_file, password_env."""

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
    """SASL mechanism."""
    username: Text
    """SASL user name."""
    password: Text = _secret_field()
    """The SASL password inline. Prefer password_file or password_env so the secret does not sit in
    this file."""
    password_file: Text | None = None
    """File holding the SASL password; a relative path is resolved against this configuration file's
    directory. One trailing newline is ignored."""
    password_env: EnvName | None = None
    """Name of the environment variable holding the SASL password; it must be set and non-empty."""

    _source = _secret_from("password")


@dataclass(frozen=True, config=_CONFIG)
class KafkaSsl:
    """TLS files; relative paths are resolved against this configuration file's directory and must
    be readable."""

    cafile: ReadableFile | None = None
    """CA bundle (PEM) to verify the brokers; system CAs when absent."""
    certfile: ReadableFile | None = None
    """Client certificate (PEM) for mutual TLS; may also hold the key."""
    keyfile: ReadableFile | None = None
    """Private key (PEM) of certfile; requires certfile."""

    @_rules
    def _key_pairs(cls, data: Mapping[str, Any]) -> Iterator[Problem]:
        if data.get("keyfile") is not None and data.get("certfile") is None:
            yield ("keyfile",), "requires certfile"


@dataclass(frozen=True, config=_CONFIG)
class KafkaSettings:
    """The Kafka cluster carrying the federation's events."""

    bootstrap_servers: HostList
    """Comma-separated host:port list of brokers, e.g. "k1:9092,k2:9092"."""
    topic_prefix: TopicPrefix = "zkbridge"
    """First part of every topic name <prefix>.<subtree>.<region>; A-Z, a-z, 0-9, '.', '_' or '-',
    not starting with '.'. The same in every region."""
    enable_idempotence: Flag = True
    """Use the idempotent producer; turn off only for brokers without InitProducerId support (tansu,
    the demo's broker): against such a broker the bridge stops at once with an error naming this
    key."""
    replication_factor: Annotated[
        Count,
        AfterValidator(_replication_factor),
        Field(json_schema_extra={"minimum": -1, "not": {"const": 0}}),
    ] = -1
    """Replication factor for topics the bridge creates; -1 uses the broker default."""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    """How to talk to the brokers. SASL_* requires the sasl block; ssl is only allowed with SSL or
    SASL_SSL."""
    sasl: KafkaSasl | None = None
    ssl: KafkaSsl | None = None
    request_timeout: Positive = 30.0
    """Seconds a single Kafka request may take before it counts as failed."""

    @_rules
    def _security(cls, data: Mapping[str, Any]) -> Iterator[Problem]:
        protocol = _valid(SecurityProtocol, data.get("security_protocol", "PLAINTEXT"))
        if protocol is None:
            return  # the blocks cannot be judged without a protocol
        sasl = data.get("sasl") is not None
        if protocol.startswith("SASL_") and not sasl:
            yield ("sasl",), f"required when security_protocol is {protocol}"
        if sasl and not protocol.startswith("SASL_"):
            yield ("sasl",), "only allowed with security_protocol SASL_PLAINTEXT or SASL_SSL"
        if data.get("ssl") is not None and not protocol.endswith("SSL"):
            yield ("ssl",), "only allowed with security_protocol SSL or SASL_SSL"


@dataclass(frozen=True, config=_CONFIG)
class SubtreeSettings:
    """One replicated subtree."""

    name: SubtreeName
    """a-z, 0-9, '_' or '-', unique, the same in every region (part of the topic name)."""
    path: MountPath
    """Local mount point: absolute, normalised (no trailing '/', no '//', no '.' or '..'), not '/',
    not under /zookeeper. May differ per region. Mounts must not overlap each other or
    state_path."""
    exclude: tuple[ZnodePath, ...] = Field(default=(), json_schema_extra=LIVE)
    """Paths relative to the mount, written absolute-looking and normalised (e.g. /tmp), whose whole
    subtree is neither published nor applied. A reload rescans the subtree."""
    acl: Literal["copy", "open"] = "copy"
    """copy: each znode's ACL travels in its event and is applied in the receiving region, plus an
    entry for the bridge's own identity so it can keep managing the znode. open: ACLs are not
    replicated, copies are created world-accessible, and a znode whose ACL is not world-readable and
    -writable at its origin is held back (never widened)."""


@dataclass(frozen=True, config=_CONFIG)
class MassDeleteSettings:
    """Guard against announcing the deletion of most of a subtree (e.g. after pointing at an empty
    ensemble)."""

    max_ratio: Annotated[Positive, Field(le=1)] = 0.5
    """A scan that would announce deleting more than this share of a subtree stops, in (0, 1]."""
    min_nodes: Annotated[Count, Field(ge=0)] = 20
    """... but only when at least this many deletions are involved."""


@dataclass(frozen=True, config=_CONFIG)
class MetricsSettings:
    """Prometheus metrics endpoint."""

    listen: Listen | None = None
    """host:port to serve /metrics (Prometheus) and /healthz on; no endpoint when absent."""


@dataclass(frozen=True, config=_CONFIG)
class LogSettings:
    """Logging."""

    format: Literal["auto", "json", "console"] = "auto"
    """auto: console on a terminal, JSON otherwise."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged."""


@dataclass(frozen=True, config=_CONFIG)
class Settings:
    """One region's zkbridge configuration, read by every zkbridge command (-c FILE). Unknown keys
    are rejected."""

    region: Region
    """This bridge's region: 1-32 characters of a-z, 0-9 or '-', unique in the federation. Used in
    topic names and vector clocks, so it must never change."""
    zookeeper: ZooKeeperSettings
    kafka: KafkaSettings
    peers: tuple[Region, ...] = Field(json_schema_extra={"uniqueItems": True})
    """Regions whose events this bridge applies; may be empty, must not contain region itself."""
    subtrees: tuple[SubtreeSettings, ...] = Field(json_schema_extra={"minItems": 1})
    """The replicated subtrees; at least one. Mounts must not overlap each other or state_path."""
    state_path: MountPath = "/zkbridge"
    """Where the bridge keeps its own state (metadata, outbox, positions, election, status) in the
    local ensemble; same path rules as a mount and disjoint from every mount."""
    heartbeat_interval: Positive = Field(default=5.0, json_schema_extra=LIVE)
    """Seconds between heartbeats this bridge publishes per subtree (they drive lag reporting)."""
    max_clock_skew: Positive = Field(default=60.0, json_schema_extra=LIVE)
    """Seconds. A peer event stamped further ahead of the local wall clock than this waits (loudly)
    instead of being applied, and the bridge's hybrid clock never runs further than this ahead of
    its wall clock."""
    tombstone_grace: Positive = Field(default=604800.0, json_schema_extra=LIVE)
    """Seconds a tombstone (the metadata of a deleted znode) is kept at least. It is
    collected only once it is this old and its delete is causally stable (every region
    has applied it); it must exceed max_clock_skew. Default 7 days."""
    conflict_policy: Literal["lww"] = Field(default="lww", json_schema_extra=LIVE)
    """How concurrent writes are resolved; only lww (last writer wins on the hybrid logical clock)
    exists."""
    max_data_bytes: Annotated[Count, Field(ge=1, le=MAX_DATA_BYTES)] = MAX_DATA_BYTES
    """Largest znode payload replicated, in bytes (at most ZooKeeper's default jute.maxbuffer);
    larger znodes are reported and not replicated."""
    mass_delete: MassDeleteSettings = Field(
        default_factory=MassDeleteSettings, json_schema_extra=LIVE)
    # The document's sections; the rest of the code reads them flattened below.
    metrics: InitVar[MetricsSettings | None] = None
    log: InitVar[LogSettings | None] = Field(default=None, json_schema_extra=LIVE)
    # Set from those sections, never keys of the document (the rules refuse them).
    metrics_listen: SkipJsonSchema[str | None] = None
    log_format: SkipJsonSchema[str] = "auto"
    log_level: SkipJsonSchema[str] = "info"
    # The file these settings came from, for reload.
    source: SkipJsonSchema[str] = ""

    def __post_init__(self, metrics: MetricsSettings | None, log: LogSettings | None) -> None:
        # Frozen: the flattening is part of construction.
        if metrics is not None:
            object.__setattr__(self, "metrics_listen", metrics.listen)
        if log is not None:
            object.__setattr__(self, "log_format", log.format)
            object.__setattr__(self, "log_level", log.level)

    def subtree(self, name: str) -> SubtreeSettings:
        for subtree in self.subtrees:
            if subtree.name == name:
                return subtree
        raise KeyError(name)

    @_rules
    def _across(cls, data: Mapping[str, Any]) -> Iterator[Problem]:
        for name in ("metrics_listen", "log_format", "log_level", "source"):
            if name in data:
                yield (name,), "unknown key"
        if data.get("subtrees") == []:
            yield ("subtrees",), "must not be empty"
        region = _valid(Region, data.get("region"))
        peers = _items(data.get("peers"))
        for i, peer in enumerate(peers):
            if region is not None and peer == region:
                yield ("peers", i), f"must not be this bridge's own region {region}"
        for i, first in _duplicates(peers, Region):
            if peers[i] != region:
                yield ("peers", i), f"duplicate of peers[{first}]"
        subtrees = [s if isinstance(s, Mapping) else {} for s in _items(data.get("subtrees"))]
        for i, first in _duplicates([s.get("name") for s in subtrees], SubtreeName):
            yield ("subtrees", i, "name"), f"duplicate of subtrees[{first}].name"
        for i, s in enumerate(subtrees):
            for j, first in _duplicates(_items(s.get("exclude")), ZnodePath):
                yield ("subtrees", i, "exclude", j), f"duplicate of subtrees[{i}].exclude[{first}]"
        state = _valid(MountPath, data.get("state_path", "/zkbridge"))
        mounts = [(i, _valid(MountPath, s.get("path"))) for i, s in enumerate(subtrees)]
        for i, path in mounts:
            for j, other in mounts[:i]:
                if path and other and _overlap(path, other):
                    yield ("subtrees", i, "path"), f"{path} overlaps subtrees[{j}].path {other}"
            if path and state and _overlap(path, state):
                yield ("subtrees", i, "path"), f"{path} overlaps state_path {state}"
        grace, skew = data.get("tombstone_grace", 604800.0), data.get("max_clock_skew", 60.0)
        if _is_number(grace) and _is_number(skew) and 0 < grace <= skew:
            # A write after a collection must be stamped later than the delete it follows.
            yield ("tombstone_grace",), f"must be greater than max_clock_skew ({skew})"
        # Topic names within Kafka's limit, for the longest of the region and its peers.
        kafka = data.get("kafka")
        given = kafka.get("topic_prefix", "zkbridge") if isinstance(kafka, Mapping) else None
        prefix = _valid(TopicPrefix, given)
        longest = max((r for r in (region, *peers) if _valid(Region, r)), key=len, default=None)
        for i, s in enumerate(subtrees):
            name = _valid(SubtreeName, s.get("name"))
            topic = topic_name(prefix, name, longest) if prefix and name and longest else ""
            if len(topic) > MAX_TOPIC_NAME:
                limit = f"Kafka's limit of {MAX_TOPIC_NAME} characters"
                yield ("subtrees", i, "name"), f"topic {topic} is longer than {limit}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def topic_name(prefix: str, subtree: str, region: str) -> str:
    """The topic ``region`` publishes ``subtree`` events to: one topic per subtree and origin."""
    return f"{prefix}.{subtree}.{region}"


# --------------------------------------------------------------------------- problem lines

_MESSAGES = {
    "missing": "required",
    "unexpected_keyword_argument": "unknown key",
    "invalid_key": "unknown key",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "int_type": "must be an integer",
    "bool_type": "must be a boolean",
    "tuple_type": "must be a list",
    "dataclass_type": "must be a mapping",
    "dataclass_args_type": "must be a mapping",
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "value_error": "{error}",
}


def _problem(error: ErrorDetails) -> Problem:
    """One of pydantic's errors as a key path and a message in house wording."""
    kind, loc = error["type"], error["loc"]
    ctx = {k: f"{v:g}" if isinstance(v, float) else v for k, v in error.get("ctx", {}).items()}
    if kind == "invalid_key":  # a key that is not a string; pydantic puts an index there
        loc = (*loc[:-1], str(error["input"]))
    if kind == "literal_error":
        return loc, "must be one of " + ", ".join(re.findall(r"'([^']*)'", ctx["expected"]))
    if kind == "string_pattern_mismatch":
        return loc, _PATTERN_RULES[ctx["pattern"]]
    # A rule's own message (or one with no house wording yet) is pydantic's message.
    return loc, _MESSAGES[kind].format(**ctx) if kind in _MESSAGES else error["msg"]


def _rank(loc: Loc) -> list[int]:
    """Sort key putting problems in the order of the fields, unknown keys first."""
    kind: Any = Settings
    ranks: list[int] = []
    for part in loc:
        fields = getattr(kind, "__pydantic_fields__", {})  # with the InitVar sections, in order
        if isinstance(part, int) or part not in fields:
            ranks.append(part if isinstance(part, int) else -1)
            kind = kind if isinstance(part, int) else None
            continue
        ranks.append(list(fields).index(part))
        hint = fields[part].annotation
        kind = next((t for t in (hint, *get_args(hint)) if dataclasses.is_dataclass(t)), None)
    return ranks


def _lines(exc: ValidationError) -> list[str]:
    found = sorted((_problem(error) for error in exc.errors()), key=lambda p: _rank(p[0]))
    return [
        "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)[1:] + f": {message}"
        for loc, message in found
    ]


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that records duplicate keys instead of silently keeping the last one."""

    def __init__(self, stream: bytes) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            # Merge keys (<<) legitimately repeat keys; only scalars can collide by value.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            mark = key_node.start_mark
            if key in seen:
                where = f"line {mark.line + 1}, column {mark.column + 1}"
                self.duplicates.append(f"duplicate key {key!s} at {where}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: str) -> tuple[object, list[str]]:
    """The document and its duplicate-key problems; ``ConfigError`` when unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except ValueError:  # NUL in the path
        raise ConfigError([f"{path!r}: cannot read: the path contains NUL"]) from None
    try:
        loader = _Loader(raw)  # its reader already decodes and checks the first characters
        doc = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        # Only the problem and position: the snippet could contain a secret.
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}: invalid YAML{where}: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    return doc, [f"{path}: {duplicate}" for duplicate in loader.duplicates]


# --------------------------------------------------------------------------- public API


def _settings(doc: object, base_dir: Path, env: Mapping[str, str], problems: list[str],
              label: str) -> Settings:
    if not isinstance(doc, Mapping):
        what = "an empty document" if doc is None else f"a {type(doc).__name__}"
        raise ConfigError([*problems, f"{label}: must be a mapping of settings, got {what}"])
    try:
        context = {"base_dir": base_dir, "env": env}
        settings: Settings = _adapter(Settings).validate_python(doc, context=context)
    except ValidationError as exc:
        raise ConfigError(problems + _lines(exc)) from None
    if problems:  # duplicate YAML keys
        raise ConfigError(problems)
    return settings


def parse_settings(doc: object, base_dir: Path, env: Mapping[str, str]) -> Settings:
    """Validate an already-parsed document; relative ``*_file`` paths resolve against ``base_dir``.

    Raises ``ConfigError`` listing every problem.
    """
    return _settings(doc, base_dir, env, [], "config")


def load_settings(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the YAML file at ``path``; ``env`` defaults to ``os.environ``.

    Raises ``ConfigError`` listing every problem, including YAML syntax errors
    and duplicate keys, never an unrelated exception for bad input.
    """
    label = os.fspath(path)
    doc, problems = _read_yaml(label)
    env = os.environ if env is None else env
    settings = _settings(doc, Path(label).parent, env, problems, label)
    return dataclasses.replace(settings, source=label)


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
