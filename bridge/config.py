"""One region's settings: the keys an operator configures, their rules, what a reload applies.

The settings classes are the one place the keys and their rules are written:
``bridge.configdoc`` renders them as ``schemas/config.schema.json`` and the
README key table, ``bridge.configload`` reads a YAML file into them. Fields
marked ``LIVE`` are those ``reloaded`` applies without a restart.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import InitVar
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema

from bridge.configrules import (
    CaFile,
    Count,
    EnvName,
    Flag,
    HostList,
    Listen,
    MountPath,
    NonNegative,
    Positive,
    Problem,
    ReadableFile,
    Region,
    SecurityProtocol,
    SubtreeName,
    Text,
    TopicPrefix,
    ZnodePath,
    check_replication_factor,
    client_identity,
    digest_form,
    duplicates,
    items_of,
    overlap,
    rules,
    secret_from,
    valid,
)

MAX_SESSION_TIMEOUT = 600
MAX_DATA_BYTES = 1_000_000  # ZooKeeper's default jute.maxbuffer
MAX_TOPIC_NAME = 249  # Kafka refuses longer topic names

# --------------------------------------------------------------------------- settings

LIVE: dict[str, Any] = {"x-reload": "live"}  # a reload (SIGHUP) applies it; else: restart
# Descriptions are the attribute docstrings below each field (read by bridge.configdoc).
_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


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

    _source = secret_from("credential", digest_form)


@dataclass(frozen=True, config=_CONFIG)
class ZooKeeperTls:
    """TLS to the ensemble (its secureClientPort; hosts name that port); relative paths are
    resolved against this configuration file's directory and must be readable."""

    cafile: CaFile | None = None
    """CA bundle (PEM) to verify the servers; system CAs when absent."""
    certfile: ReadableFile | None = None
    """Client certificate (PEM) for servers that require one (ssl.clientAuth); may also hold the
    key."""
    keyfile: ReadableFile | None = None
    """Private key (PEM) of certfile; requires certfile."""
    check_hostname: Flag = True
    """Check that each server's certificate names the host connected to (as ZooKeeper's own
    client does, ssl.hostnameVerification)."""

    @rules
    def _key_pairs(cls, data: Mapping[str, Any]) -> Iterator[Problem]:
        if data.get("keyfile") is not None and data.get("certfile") is None:
            yield ("keyfile",), "requires certfile"

    _identity = client_identity()


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
    tls: ZooKeeperTls | None = None


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

    _source = secret_from("password")


@dataclass(frozen=True, config=_CONFIG)
class KafkaSsl:
    """TLS files; relative paths are resolved against this configuration file's directory and must
    be readable."""

    cafile: CaFile | None = None
    """CA bundle (PEM) to verify the brokers; system CAs when absent."""
    certfile: ReadableFile | None = None
    """Client certificate (PEM) for mutual TLS; may also hold the key."""
    keyfile: ReadableFile | None = None
    """Private key (PEM) of certfile; requires certfile."""

    @rules
    def _key_pairs(cls, data: Mapping[str, Any]) -> Iterator[Problem]:
        if data.get("keyfile") is not None and data.get("certfile") is None:
            yield ("keyfile",), "requires certfile"

    _identity = client_identity()


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
        AfterValidator(check_replication_factor),
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

    @rules
    def _security(cls, data: Mapping[str, Any]) -> Iterator[Problem]:
        protocol = valid(SecurityProtocol, data.get("security_protocol", "PLAINTEXT"))
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
    """a-z, 0-9, '_' or '-', unique, the same in every region (part of the topic name). A subtree
    taken out of the configuration keeps its state; configured again, what this region changed
    there meanwhile joins as a new region's copy does."""
    path: MountPath
    """Local mount point: absolute, normalised (no trailing '/', no '//', no '.' or '..'), not '/',
    not under /zookeeper. May differ per region. Mounts must not overlap each other or
    state_path. Moved, the new mount must hold the tree first: a start that finds most of it
    missing stops and names both mounts."""
    exclude: tuple[ZnodePath, ...] = Field(default=(), json_schema_extra=LIVE)
    """Paths relative to the mount, written absolute-looking and normalised (e.g. /tmp), whose whole
    subtree is neither published nor applied. A reload rescans the subtree; a reload or restart that
    includes paths again also reads the peers' topics again from their start, for the events passed
    over, and what this region holds there joins as a new region's copy does: the peers' versions
    first, then what no peer has is published."""
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
    audit_interval: NonNegative = Field(default=600.0, json_schema_extra=LIVE)
    """Seconds between audits of each subtree by the leader (0: none): every znode is listed and
    compared with the bridge's metadata, and what differs is captured. This finds what no watch
    reports: ZooKeeper 3.8.4+ and 3.9.2+ send no watch event for a znode the bridge may not read,
    so such a znode is held back and reported once an audit lists it. A new value applies on
    reload, counted from the last audit or scan."""
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
    outbox_max_mb: Positive = Field(default=256.0, json_schema_extra=LIVE)
    """Megabytes of unpublished changes each subtree's outbox may hold in the local ensemble
    (counted as each entry's data plus 400 bytes, about what it takes of ZooKeeper's heap).
    Beyond that, changes update only the bridge's metadata, and once Kafka has taken the
    outbox back below half of this, every path changed meanwhile is published again (as
    zkbridge resync does for all), so a long Kafka outage cannot run the ensemble out of
    memory. Keep the
    sum over all subtrees well under the servers' heap."""
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

    @rules
    def _across(cls, data: Mapping[str, Any]) -> Iterator[Problem]:
        for name in ("metrics_listen", "log_format", "log_level", "source"):
            if name in data:
                yield (name,), "unknown key"
        if data.get("subtrees") == []:
            yield ("subtrees",), "must not be empty"
        region = valid(Region, data.get("region"))
        peers = items_of(data.get("peers"))
        for i, peer in enumerate(peers):
            if region is not None and peer == region:
                yield ("peers", i), f"must not be this bridge's own region {region}"
        for i, first in duplicates(peers, Region):
            if peers[i] != region:
                yield ("peers", i), f"duplicate of peers[{first}]"
        subtrees = [s if isinstance(s, Mapping) else {} for s in items_of(data.get("subtrees"))]
        for i, first in duplicates([s.get("name") for s in subtrees], SubtreeName):
            yield ("subtrees", i, "name"), f"duplicate of subtrees[{first}].name"
        for i, s in enumerate(subtrees):
            for j, first in duplicates(items_of(s.get("exclude")), ZnodePath):
                yield ("subtrees", i, "exclude", j), f"duplicate of subtrees[{i}].exclude[{first}]"
        state = valid(MountPath, data.get("state_path", "/zkbridge"))
        mounts = [(i, valid(MountPath, s.get("path"))) for i, s in enumerate(subtrees)]
        for i, path in mounts:
            for j, other in mounts[:i]:
                if path and other and overlap(path, other):
                    yield ("subtrees", i, "path"), f"{path} overlaps subtrees[{j}].path {other}"
            if path and state and overlap(path, state):
                yield ("subtrees", i, "path"), f"{path} overlaps state_path {state}"
        grace, skew = data.get("tombstone_grace", 604800.0), data.get("max_clock_skew", 60.0)
        if _is_number(grace) and _is_number(skew) and 0 < grace <= skew:
            # A write after a collection must be stamped later than the delete it follows.
            yield ("tombstone_grace",), f"must be greater than max_clock_skew ({skew})"
        # Topic names within Kafka's limit, for the longest of the region and its peers.
        kafka = data.get("kafka")
        given = kafka.get("topic_prefix", "zkbridge") if isinstance(kafka, Mapping) else None
        prefix = valid(TopicPrefix, given)
        longest = max((r for r in (region, *peers) if valid(Region, r)), key=len, default=None)
        for i, s in enumerate(subtrees):
            name = valid(SubtreeName, s.get("name"))
            topic = topic_name(prefix, name, longest) if prefix and name and longest else ""
            if len(topic) > MAX_TOPIC_NAME:
                limit = f"Kafka's limit of {MAX_TOPIC_NAME} characters"
                yield ("subtrees", i, "name"), f"topic {topic} is longer than {limit}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def topic_name(prefix: str, subtree: str, region: str) -> str:
    """The topic ``region`` publishes ``subtree`` events to: one topic per subtree and origin."""
    return f"{prefix}.{subtree}.{region}"
