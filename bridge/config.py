"""Turn one region's YAML configuration file into frozen settings, reporting every problem at once.

The settings classes are the one source of the configuration's rules: their
field types, constraints, descriptions and cross-field validators drive the
loader here, and ``bridge.configdoc`` renders the same classes as
``schemas/config.schema.json`` and the README key table.

Nothing here talks to ZooKeeper or Kafka: the only side effects are reading the
configuration file itself and the secret files and environment variables it
points at, so ``zkbridge check-config`` can run anywhere the service would.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import InitVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WrapValidator,
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


def _explain(rule: str) -> WrapValidator:
    """Replace pydantic's pattern message with the rule in words."""

    def check(value: object, handler: Callable[[object], object]) -> object:
        try:
            return handler(value)
        except ValidationError as exc:
            if exc.errors()[0]["type"] == "string_pattern_mismatch":
                raise ValueError(rule) from None
            raise

    return WrapValidator(check)


def _host_list(value: str) -> str:
    for entry in value.split(","):
        match = _HOST_PORT.fullmatch(entry)
        if not match:
            raise ValueError(
                "must be a comma-separated list of host or host:port (no spaces, no chroot)"
            )
        _check_port(match.group(1))
    return value


def _listen(value: str) -> str:
    match = _LISTEN.fullmatch(value)
    if not match:
        raise ValueError("must be host:port")
    _check_port(match.group(1))
    return value


def _check_port(port: str | None) -> None:
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")


def _znode_path(value: str) -> str:
    """``value`` if it is an absolute, normalised znode path below the root."""
    if _ZNODE_BAD_CHARS.search(value):
        raise ValueError("must not contain NUL or other characters ZooKeeper rejects")
    if not value.startswith("/"):
        raise ValueError("must be absolute")
    if value == "/":
        raise ValueError("must not be /")
    if value.endswith("/"):
        raise ValueError("must not end with '/'")
    if "//" in value:
        raise ValueError("must not contain '//'")
    if any(part in (".", "..") for part in value.split("/")):
        raise ValueError("must not contain '.' or '..' components")
    return value


def _mount_path(value: str) -> str:
    _znode_path(value)
    if value == "/zookeeper" or value.startswith("/zookeeper/"):
        raise ValueError("must not be /zookeeper or below it (reserved by ZooKeeper)")
    return value


def _readable_file(value: str, info: ValidationInfo) -> str:
    """The path resolved against the config file's directory, once it proved readable."""
    path = _base_dir(info) / value
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:  # NUL in the path
        raise ValueError("must not contain NUL") from None
    return str(path)


def _replication_factor(value: int) -> int:
    if value == -1 or value >= 1:
        return value
    raise ValueError("must be -1 (broker default) or at least 1")


_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)"
_HOST_PORT = re.compile(rf"{_HOST}(?::([0-9]{{1,5}}))?")
_LISTEN = re.compile(rf"{_HOST}:([0-9]{{1,5}})")
# ZooKeeper rejects these characters in znode names.
_ZNODE_BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\uf8ff\ufff0-\uffff]")

Text = Annotated[str, StringConstraints(strict=True, min_length=1)]
Positive = Annotated[float, Field(strict=True, gt=0)]
Count = Annotated[int, Field(strict=True)]
Flag = Annotated[bool, Field(strict=True)]
Region = Annotated[
    Text,
    StringConstraints(pattern=r"^[a-z0-9-]{1,32}$"),
    _explain("must be 1-32 characters of a-z, 0-9 or '-'"),
]
SubtreeName = Annotated[
    Text,
    StringConstraints(pattern=r"^[a-z0-9_-]+$"),
    _explain("must use only a-z, 0-9, '_' or '-'"),
]
TopicPrefix = Annotated[
    Text,
    StringConstraints(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$"),
    _explain("must use only A-Z, a-z, 0-9, '.', '_' or '-' and not start with '.'"),
]
EnvName = Annotated[
    Text,
    StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"),
    _explain("must be an environment variable name"),
]
HostList = Annotated[Text, AfterValidator(_host_list)]
ZnodePath = Annotated[Text, AfterValidator(_znode_path)]
MountPath = Annotated[Text, AfterValidator(_mount_path)]
ReadableFile = Annotated[Text, AfterValidator(_readable_file)]

# Descriptions are the attribute docstrings below each field.
_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


def _valid(kind: Any, value: object) -> bool:
    """Whether ``value`` passes ``kind``'s own checks: cross-field rules judge only those."""
    try:
        _adapter(kind).validate_python(value)
    except ValidationError:
        return False
    return True


_ADAPTERS: dict[int, TypeAdapter[Any]] = {}


def _adapter(kind: Any) -> TypeAdapter[Any]:
    if id(kind) not in _ADAPTERS:
        _ADAPTERS[id(kind)] = TypeAdapter(kind)
    return _ADAPTERS[id(kind)]


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _duplicates(items: object, kind: Any) -> Iterator[tuple[int, int]]:
    """(index, index of its first occurrence) for each repeated valid string in a raw list."""
    if not isinstance(items, list):
        return
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        value = _text_if(kind, item)
        if value is None:
            continue
        if value in seen:
            yield i, seen[value]
        else:
            seen[value] = i


# --------------------------------------------------------------------------- cross-field rules


def _with_rules(
    rules: Callable[[Mapping[str, Any], ValidationInfo], Iterator[Problem]],
) -> Any:
    """A model validator running ``rules`` on the raw mapping even when fields failed.

    A plain after-validator only runs once every field is valid, which would
    hide e.g. a mount overlap behind an unrelated typo; the rules therefore see
    the document as written and judge only values that pass their own type.
    Settings built in code (``dataclasses.replace``) are not re-judged.
    """

    def validate(
        cls: type, data: Any, handler: Callable[[Any], Any], info: ValidationInfo
    ) -> Any:
        if not isinstance(data, Mapping):
            return handler(data)
        return _validate_reporting(handler, data, list(rules(data, info)))

    return model_validator(mode="wrap")(validate)


def _validate_reporting(handler: Callable[[Any], Any], data: Any, problems: list[Problem]) -> Any:
    """``handler(data)``, raising its problems and ``problems`` together."""
    errors = [_problem(loc, message) for loc, message in problems]
    try:
        result = handler(data)
    except ValidationError as exc:
        errors = _converted(exc) + errors
    if errors:
        raise ValidationError.from_exception_data("settings", errors)
    return result


def _converted(exc: ValidationError) -> list[InitErrorDetails]:
    """pydantic's errors as problems in house wording, ready to be raised again with more."""
    problems = []
    for error in exc.errors():
        loc = error["loc"]
        if error["type"] == "invalid_key":  # a non-string key; pydantic puts an index there
            loc = (*loc[:-1], str(error["input"]))
        problems.append(_problem(loc, _message(error)))
    return problems


def _problem(loc: Loc, message: str) -> InitErrorDetails:
    error = PydanticCustomError("config", "{message}", {"message": message})
    return InitErrorDetails(type=error, loc=loc, input=None)


class _Unusable(Exception):
    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.problem = (loc, message)


def _read_secret(data: Mapping[str, Any], info: ValidationInfo, stem: str) -> tuple[str, str]:
    """(key, secret) from the one of ``stem`` / ``stem_file`` / ``stem_env`` that is set.

    The secret is "" when that key's own type is violated (its field reports
    that). Messages name keys, paths and variable names only: never the secret.
    """
    names = (stem, f"{stem}_file", f"{stem}_env")
    present = [name for name in names if data.get(name) is not None]
    if not present:
        raise _Unusable((), f"one of {', '.join(names)} is required")
    if len(present) > 1:
        raise _Unusable((), f"only one of {', '.join(names)} may be set, got {', '.join(present)}")
    (name,) = present
    value = data[name]
    if name == stem:
        return name, value if isinstance(value, str) else ""
    if name.endswith("_env"):
        env = _env(info)
        if not _valid(EnvName, value):
            return name, ""
        if value not in env:
            raise _Unusable((name,), f"environment variable {value} is not set")
        if not env[value]:
            raise _Unusable((name,), f"environment variable {value} is empty")
        return name, env[value]
    if not _valid(Text, value):
        return name, ""
    path = _base_dir(info) / value
    try:
        secret = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise _Unusable((name,), f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _Unusable((name,), f"{path} is not UTF-8 text") from None
    except ValueError:  # NUL in the path
        raise _Unusable((name,), "must not contain NUL") from None
    # Editors and ``echo`` add a final newline that is not part of the secret.
    secret = secret.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise _Unusable((name,), f"{path} is empty")
    return name, secret


def _context(info: ValidationInfo) -> Mapping[str, Any]:
    return info.context if isinstance(info.context, Mapping) else {}


def _base_dir(info: ValidationInfo) -> Path:
    return Path(_context(info).get("base_dir", "."))


def _env(info: ValidationInfo) -> Mapping[str, str]:
    env = _context(info).get("env")
    return os.environ if env is None else env


def _resolving_secret(stem: str, check: Callable[[str], str | None] | None = None) -> Any:
    """A model validator putting the secret read for ``stem`` into that field.

    ``check`` judges the secret itself; its message names the key it came from.
    """

    def validate(
        cls: type, data: Any, handler: Callable[[Any], Any], info: ValidationInfo
    ) -> Any:
        if not isinstance(data, Mapping):
            return handler(data)
        problems: list[Problem] = []
        try:
            source, secret = _read_secret(data, info, stem)
        except _Unusable as exc:
            problems.append(exc.problem)
        else:
            message = check(secret) if check and secret else None
            if message:
                problems.append(((source,), message))
            if secret:
                data = {**data, stem: secret}
        return _validate_reporting(handler, data, problems)

    return model_validator(mode="wrap")(validate)


def _digest_form(credential: str) -> str | None:
    return None if ":" in credential else "a digest credential must have the form user:password"


# --------------------------------------------------------------------------- settings

LIVE: dict[str, Any] = {"x-reload": "live"}  # a reload (SIGHUP) applies it; else: restart


def _secret() -> Any:
    """The field a secret resolves into: out of repr (settings reach log lines), no default."""

    def no_default(schema: dict[str, Any]) -> None:
        schema.pop("default", None)  # "" only stands in until the secret is read

    return Field(default="", repr=False, json_schema_extra=no_default)


@dataclass(frozen=True, config=_CONFIG)
class ZooKeeperAuth:
    """Authenticate the session (addauth).
    Exactly one of credential, credential_file, credential_env."""

    scheme: Literal["digest"] = "digest"
    """ZooKeeper auth scheme; only digest is supported."""
    credential: Text = _secret()
    """The digest credential, user:password, inline. Prefer credential_file or credential_env
    so the secret does not sit in this file."""
    credential_file: Text | None = None
    """File holding the digest credential; a relative path is resolved against this
    configuration file's directory. One trailing newline is ignored."""
    credential_env: EnvName | None = None
    """Name of the environment variable holding the digest credential; it must be set and
    non-empty."""

    _resolve = _resolving_secret("credential", _digest_form)


@dataclass(frozen=True, config=_CONFIG)
class ZooKeeperSettings:
    """The local ZooKeeper ensemble (never a remote region's)."""

    hosts: HostList
    """Comma-separated host or host:port list, no spaces and no chroot, e.g.
    "zk1:2181,zk2:2181"."""
    session_timeout: Annotated[Positive, Field(le=MAX_SESSION_TIMEOUT)] = 10.0
    """Session timeout in seconds, at most 600; also how long a standby waits before taking
    over. The server may negotiate it into its own bounds."""
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
    password: Text = _secret()
    """The SASL password inline. Prefer password_file or password_env so the secret does not
    sit in this file."""
    password_file: Text | None = None
    """File holding the SASL password; a relative path is resolved against this
    configuration file's directory. One trailing newline is ignored."""
    password_env: EnvName | None = None
    """Name of the environment variable holding the SASL password; it must be set and
    non-empty."""

    _resolve = _resolving_secret("password")


def _ssl_rules(data: Mapping[str, Any], info: ValidationInfo) -> Iterator[Problem]:
    if data.get("keyfile") is not None and data.get("certfile") is None:
        yield ("keyfile",), "requires certfile"


@dataclass(frozen=True, config=_CONFIG)
class KafkaSsl:
    """TLS files; relative paths are resolved against this configuration file's directory
    and must be readable."""

    cafile: ReadableFile | None = None
    """CA bundle (PEM) to verify the brokers; system CAs when absent."""
    certfile: ReadableFile | None = None
    """Client certificate (PEM) for mutual TLS; may also hold the key."""
    keyfile: ReadableFile | None = None
    """Private key (PEM) of certfile; requires certfile."""

    _rules = _with_rules(_ssl_rules)


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


def _kafka_rules(data: Mapping[str, Any], info: ValidationInfo) -> Iterator[Problem]:
    protocol = _text_if(SecurityProtocol, data.get("security_protocol", "PLAINTEXT"))
    if protocol is None:
        return  # the pairing cannot be judged without a protocol
    uses_sasl = protocol.startswith("SASL_")
    has_sasl = data.get("sasl") is not None
    if uses_sasl and not has_sasl:
        yield ("sasl",), f"required when security_protocol is {protocol}"
    if not uses_sasl and has_sasl:
        yield ("sasl",), "only allowed with security_protocol SASL_PLAINTEXT or SASL_SSL"
    if protocol not in ("SSL", "SASL_SSL") and data.get("ssl") is not None:
        yield ("ssl",), "only allowed with security_protocol SSL or SASL_SSL"


@dataclass(frozen=True, config=_CONFIG)
class KafkaSettings:
    """The Kafka cluster carrying the federation's events."""

    bootstrap_servers: HostList
    """Comma-separated host:port list of brokers, e.g. "k1:9092,k2:9092"."""
    topic_prefix: TopicPrefix = "zkbridge"
    """First part of every topic name <prefix>.<subtree>.<region>; A-Z, a-z, 0-9, '.', '_'
    or '-', not starting with '.'. The same in every region."""
    enable_idempotence: Flag = True
    """Use the idempotent producer; turn off only for brokers without InitProducerId support
    (tansu, the demo's broker): against such a broker the bridge stops at once with an error
    naming this key."""
    replication_factor: Annotated[
        Count,
        AfterValidator(_replication_factor),
        Field(json_schema_extra={"minimum": -1, "not": {"const": 0}}),
    ] = -1
    """Replication factor for topics the bridge creates; -1 uses the broker default."""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    """How to talk to the brokers. SASL_* requires the sasl block; ssl is only allowed with
    SSL or SASL_SSL."""
    sasl: KafkaSasl | None = None
    ssl: KafkaSsl | None = None
    request_timeout: Positive = 30.0
    """Seconds a single Kafka request may take before it counts as failed."""

    _rules = _with_rules(_kafka_rules)


@dataclass(frozen=True, config=_CONFIG)
class SubtreeSettings:
    """One replicated subtree."""

    name: SubtreeName
    """a-z, 0-9, '_' or '-', unique, the same in every region (part of the topic name)."""
    path: MountPath
    """Local mount point: absolute, normalised (no trailing '/', no '//', no '.' or '..'),
    not '/', not under /zookeeper. May differ per region. Mounts must not overlap each
    other or state_path."""
    exclude: tuple[ZnodePath, ...] = Field(default=(), json_schema_extra=LIVE)
    """Paths relative to the mount, written absolute-looking and normalised (e.g. /tmp),
    whose whole subtree is neither published nor applied. A reload rescans the subtree."""
    acl: Literal["copy", "open"] = "copy"
    """copy: each znode's ACL travels in its event and is applied in the receiving region,
    plus an entry for the bridge's own identity so it can keep managing the znode. open:
    ACLs are not replicated, copies are created world-accessible, and a znode whose ACL is
    not world-readable and -writable at its origin is held back (never widened)."""


@dataclass(frozen=True, config=_CONFIG)
class MassDeleteSettings:
    """Guard against announcing the deletion of most of a subtree (e.g. after pointing at an
    empty ensemble)."""

    max_ratio: Annotated[Positive, Field(le=1)] = 0.5
    """A scan that would announce deleting more than this share of a subtree stops, in
    (0, 1]."""
    min_nodes: Annotated[Count, Field(ge=0)] = 20
    """... but only when at least this many deletions are involved."""


@dataclass(frozen=True, config=_CONFIG)
class MetricsSettings:
    """Prometheus metrics endpoint."""

    listen: Annotated[Text, AfterValidator(_listen)] | None = None
    """host:port to serve /metrics (Prometheus) and /healthz on; no endpoint when absent."""


@dataclass(frozen=True, config=_CONFIG)
class LogSettings:
    """Logging."""

    format: Literal["auto", "json", "console"] = "auto"
    """auto: console on a terminal, JSON otherwise."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged."""


def _settings_rules(data: Mapping[str, Any], info: ValidationInfo) -> Iterator[Problem]:
    for name in ("metrics_listen", "log_format", "log_level", "source"):
        if name in data:
            yield (name,), "unknown key"
    region = _text_if(Region, data.get("region"))
    peers = data.get("peers")
    peers = peers if isinstance(peers, list) else []
    subtrees = data.get("subtrees")
    if subtrees == []:
        yield ("subtrees",), "must not be empty"
    items = [s if isinstance(s, Mapping) else {} for s in subtrees] if isinstance(
        subtrees, list
    ) else []
    yield from _peer_rules(region, peers)
    yield from _subtree_rules(items, _text_if(MountPath, data.get("state_path", "/zkbridge")))
    kafka = data.get("kafka")
    prefix = _text_if(TopicPrefix, kafka.get("topic_prefix", "zkbridge")) if isinstance(
        kafka, Mapping
    ) else None
    grace, skew = data.get("tombstone_grace", 604800.0), data.get("max_clock_skew", 60.0)
    if _is_number(grace) and _is_number(skew) and 0 < grace <= skew:
        # A write after a collection must be stamped later than the delete it follows.
        yield ("tombstone_grace",), f"must be greater than max_clock_skew ({skew})"
    regions = [r for r in (region, *peers) if _text_if(Region, r)]
    if prefix and regions:
        yield from _topic_rules(items, prefix, max(regions, key=len))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text_if(kind: Any, value: object) -> str | None:
    """``value`` when it is a string passing ``kind``'s own checks."""
    return value if isinstance(value, str) and _valid(kind, value) else None


def _peer_rules(region: str | None, peers: list[object]) -> Iterator[Problem]:
    for i, peer in enumerate(peers):
        if region is not None and peer == region:
            yield ("peers", i), f"must not be this bridge's own region {region}"
    for i, first in _duplicates(peers, Region):
        if peers[i] != region:
            yield ("peers", i), f"duplicate of peers[{first}]"


def _subtree_rules(items: list[Mapping[str, Any]], state_path: str | None) -> Iterator[Problem]:
    names = [item.get("name") for item in items]
    for i, first in _duplicates(names, SubtreeName):
        yield ("subtrees", i, "name"), f"duplicate of subtrees[{first}].name"
    for i, item in enumerate(items):
        for j, first in _duplicates(item.get("exclude"), ZnodePath):
            yield ("subtrees", i, "exclude", j), f"duplicate of subtrees[{i}].exclude[{first}]"
    mounts: list[tuple[int, str]] = []
    for i, item in enumerate(items):
        path = _text_if(MountPath, item.get("path"))
        if path is None:
            continue
        for j, other in mounts:
            if _overlap(path, other):
                yield ("subtrees", i, "path"), f"{path} overlaps subtrees[{j}].path {other}"
        if state_path is not None and _overlap(path, state_path):
            yield ("subtrees", i, "path"), f"{path} overlaps state_path {state_path}"
        mounts.append((i, path))


def _topic_rules(items: list[Mapping[str, Any]], prefix: str, region: str) -> Iterator[Problem]:
    """Topic names within Kafka's limit, for the longest of the region and its peers."""
    for i, item in enumerate(items):
        name = _text_if(SubtreeName, item.get("name"))
        topic = topic_name(prefix, name, region) if name else ""
        if len(topic) > MAX_TOPIC_NAME:
            yield (
                ("subtrees", i, "name"),
                f"topic {topic} is longer than Kafka's limit of {MAX_TOPIC_NAME} characters",
            )


@dataclass(frozen=True, config=_CONFIG)
class Settings:
    """One region's zkbridge configuration, read by every zkbridge command (-c FILE).
    Unknown keys are rejected."""

    region: Region
    """This bridge's region: 1-32 characters of a-z, 0-9 or '-', unique in the federation.
    Used in topic names and vector clocks, so it must never change."""
    zookeeper: ZooKeeperSettings
    kafka: KafkaSettings
    peers: tuple[Region, ...] = Field(json_schema_extra={"uniqueItems": True})
    """Regions whose events this bridge applies; may be empty, must not contain region
    itself."""
    subtrees: tuple[SubtreeSettings, ...] = Field(json_schema_extra={"minItems": 1})
    """The replicated subtrees; at least one. Mounts must not overlap each other or
    state_path."""
    state_path: MountPath = "/zkbridge"
    """Where the bridge keeps its own state (metadata, outbox, positions, election, status)
    in the local ensemble; same path rules as a mount and disjoint from every mount."""
    heartbeat_interval: Positive = Field(default=5.0, json_schema_extra=LIVE)
    """Seconds between heartbeats this bridge publishes per subtree (they drive lag
    reporting)."""
    max_clock_skew: Positive = Field(default=60.0, json_schema_extra=LIVE)
    """Seconds. A peer event stamped further ahead of the local wall clock than this waits
    (loudly) instead of being applied, and the bridge's hybrid clock never runs further
    than this ahead of its wall clock."""
    tombstone_grace: Positive = Field(default=604800.0, json_schema_extra=LIVE)
    """Seconds a tombstone (the metadata of a deleted znode) is kept at least. It is
    collected only once it is this old and its delete is causally stable (every region
    has applied it); it must exceed max_clock_skew. Default 7 days."""
    conflict_policy: Literal["lww"] = Field(default="lww", json_schema_extra=LIVE)
    """How concurrent writes are resolved; only lww (last writer wins on the hybrid logical
    clock) exists."""
    max_data_bytes: Annotated[Count, Field(ge=1, le=MAX_DATA_BYTES)] = MAX_DATA_BYTES
    """Largest znode payload replicated, in bytes (at most ZooKeeper's default
    jute.maxbuffer); larger znodes are reported and not replicated."""
    mass_delete: MassDeleteSettings = Field(
        default_factory=MassDeleteSettings, json_schema_extra=LIVE
    )
    # The document's sections; the rest of the code reads them flattened below.
    metrics: InitVar[MetricsSettings | None] = None
    log: InitVar[LogSettings | None] = Field(default=None, json_schema_extra=LIVE)
    # Set from those sections, never keys of the document (the rules refuse them).
    metrics_listen: SkipJsonSchema[str | None] = None
    log_format: SkipJsonSchema[str] = "auto"
    log_level: SkipJsonSchema[str] = "info"
    # The file these settings came from, for reload.
    source: SkipJsonSchema[str] = ""

    _rules = _with_rules(_settings_rules)

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


def topic_name(prefix: str, subtree: str, region: str) -> str:
    """The topic ``region`` publishes ``subtree`` events to: one topic per subtree and origin."""
    return f"{prefix}.{subtree}.{region}"


# --------------------------------------------------------------------------- problem lines

_MESSAGES = {
    "missing": "required",
    "unexpected_keyword_argument": "unknown key",
    "extra_forbidden": "unknown key",
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
}


def _message(error: ErrorDetails) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    if kind == "config":
        return str(ctx["message"])
    if kind == "value_error":
        return str(ctx["error"])
    if kind == "literal_error":
        return "must be one of " + ", ".join(re.findall(r"'([^']*)'", ctx["expected"]))
    bounds = {
        "greater_than": ("must be greater than", "gt"),
        "greater_than_equal": ("must be at least", "ge"),
        "less_than_equal": ("must be at most", "le"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"{words} {_number(ctx[key])}"
    return str(error["msg"])  # a rule with no house wording yet: pydantic's own


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _key_path(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _order(loc: Loc) -> tuple[int, ...]:
    """Sort key putting problems in the order of the fields, unknown keys first."""
    kind: Any = Settings
    ranks: list[int] = []
    for part in loc:
        if isinstance(part, int):
            ranks.append(part)
            continue
        # __dataclass_fields__ holds the InitVar sections too, in declaration order.
        names = list(getattr(kind, "__dataclass_fields__", ()))
        if part not in names:
            ranks.append(-1)
            kind = None
            continue
        ranks.append(names.index(part))
        kind = _section(typing.get_type_hints(kind)[part])
    return tuple(ranks)


def _section(hint: Any) -> Any:
    """The settings class inside ``hint`` (``X``, ``X | None``, ``tuple[X, ...]``), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    if isinstance(hint, InitVar):
        return _section(hint.type)
    return next((c for c in map(_section, typing.get_args(hint)) if c is not None), None)


def _lines(exc: ValidationError) -> list[str]:
    found = [(error["loc"], _message(error)) for error in exc.errors()]
    found.sort(key=lambda item: _order(item[0]))
    return [f"{_key_path(loc)}: {message}" for loc, message in found]


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that records duplicate keys instead of silently keeping the last one."""

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            # Merge keys (<<) legitimately repeat keys; only scalars can collide by value.
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                mark = key_node.start_mark
                self.duplicates.append(
                    f"duplicate key {key!s} at line {mark.line + 1}, column {mark.column + 1}"
                )
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
    loader = _Loader(raw)
    try:
        doc = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        # Only the problem and position: the snippet could contain a secret.
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        message = f"invalid YAML{where}: {exc.problem or exc.context}"
        raise ConfigError([f"{path}: {message}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    return doc, [f"{path}: {duplicate}" for duplicate in loader.duplicates]


# --------------------------------------------------------------------------- public API


def _settings(
    doc: object,
    base_dir: Path,
    env: Mapping[str, str],
    problems: list[str],
    label: str = "config",
    source: str = "",
) -> Settings:
    if not isinstance(doc, Mapping):
        what = "an empty document" if doc is None else f"a {type(doc).__name__}"
        raise ConfigError([*problems, f"{label}: must be a mapping of settings, got {what}"])
    try:
        settings: Settings = _adapter(Settings).validate_python(
            doc, context={"base_dir": base_dir, "env": env}
        )
    except ValidationError as exc:
        raise ConfigError(problems + _lines(exc)) from None
    if problems:  # duplicate YAML keys
        raise ConfigError(problems)
    return dataclasses.replace(settings, source=source) if source else settings


def parse_settings(doc: object, base_dir: Path, env: Mapping[str, str]) -> Settings:
    """Validate an already-parsed document; relative ``*_file`` paths resolve against ``base_dir``.

    Raises ``ConfigError`` listing every problem.
    """
    return _settings(doc, base_dir, env, [])


def load_settings(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the YAML file at ``path``; ``env`` defaults to ``os.environ``.

    Raises ``ConfigError`` listing every problem, including YAML syntax errors
    and duplicate keys, never an unrelated exception for bad input.
    """
    label = os.fspath(path)
    doc, problems = _read_yaml(label)
    env = os.environ if env is None else env
    return _settings(doc, Path(label).parent, env, problems, label=label, source=label)


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
    applied: list[str] = []
    restart: list[str] = []
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        after = getattr(new, f.name)
        if f.name in ("subtrees", "source") or getattr(old, f.name) == after:
            continue
        if _live(Settings, f.name):
            applied.append(f.name)
            changes[f.name] = after
        else:
            restart.append(f.name)
    names = [f.name for f in dataclasses.fields(SubtreeSettings)]
    fixed = [n for n in names if not _live(SubtreeSettings, n)]

    def identity(settings: Settings) -> list[list[object]]:
        return [[getattr(st, n) for n in fixed] for st in settings.subtrees]

    if identity(old) != identity(new):
        restart.append("subtrees")
    else:
        changes["subtrees"] = new.subtrees
        applied += [
            f"subtrees[{b.name}].{n}"
            for a, b in zip(old.subtrees, new.subtrees, strict=True)
            for n in names
            if n not in fixed and getattr(a, n) != getattr(b, n)
        ]
    return dataclasses.replace(old, **changes), applied, restart


def describe(settings: Settings) -> str:
    """A short human summary for ``zkbridge check-config`` (never shows secrets)."""
    kafka = settings.kafka
    peers = ", ".join(settings.peers) or "(none)"
    lines = [
        f"region {settings.region}" + (f" ({settings.source})" if settings.source else ""),
        f"zookeeper {settings.zookeeper.hosts}, state at {settings.state_path}",
        f"kafka {kafka.bootstrap_servers} ({kafka.security_protocol})",
        f"peers: {peers}",
        "subtrees:",
    ]
    for subtree in settings.subtrees:
        excluded = f" (excluding {', '.join(subtree.exclude)})" if subtree.exclude else ""
        lines.append(f"  {subtree.name} at {subtree.path}{excluded}, acl {subtree.acl}")
        lines.append(
            f"    publishes to {topic_name(kafka.topic_prefix, subtree.name, settings.region)}"
        )
        if settings.peers:
            consumed = ", ".join(
                topic_name(kafka.topic_prefix, subtree.name, p) for p in settings.peers
            )
            lines.append(f"    consumes {consumed}")
    return "\n".join(lines)
