"""Turn one region's YAML configuration file into frozen settings, reporting every problem at once.

Nothing here talks to ZooKeeper or Kafka: the only side effects are reading the
configuration file itself and the secret files and environment variables it
points at, so ``zkbridge check-config`` can run anywhere the service would.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from bridge.errors import ConfigError

# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class ZooKeeperAuth:
    scheme: str
    # Resolved from the inline value, file or environment; kept out of repr
    # because settings end up in log lines.
    credential: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ZooKeeperSettings:
    hosts: str
    session_timeout: float = 10.0
    connect_timeout: float = 15.0
    auth: ZooKeeperAuth | None = None


@dataclass(frozen=True, slots=True)
class KafkaSasl:
    mechanism: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class KafkaSsl:
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap_servers: str
    topic_prefix: str = "zkbridge"
    enable_idempotence: bool = True
    replication_factor: int = -1
    security_protocol: str = "PLAINTEXT"
    sasl: KafkaSasl | None = None
    ssl: KafkaSsl | None = None
    request_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class SubtreeSettings:
    name: str
    path: str
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MassDeleteSettings:
    max_ratio: float = 0.5
    min_nodes: int = 20


@dataclass(frozen=True, slots=True)
class Settings:
    region: str
    zookeeper: ZooKeeperSettings
    kafka: KafkaSettings
    peers: tuple[str, ...]
    subtrees: tuple[SubtreeSettings, ...]
    state_path: str = "/zkbridge"
    heartbeat_interval: float = 5.0
    conflict_policy: str = "lww"
    max_data_bytes: int = 1_000_000
    mass_delete: MassDeleteSettings = field(default_factory=MassDeleteSettings)
    metrics_listen: str | None = None
    log_format: str = "auto"
    log_level: str = "info"
    source: str = ""

    def subtree(self, name: str) -> SubtreeSettings:
        for subtree in self.subtrees:
            if subtree.name == name:
                return subtree
        raise KeyError(name)


# --------------------------------------------------------------------------- accepted keys

# The single list of keys the loader accepts, per mapping in the document
# ("subtrees[]" is each item of ``subtrees``). ``_Section`` refuses to read a key
# missing from here, and the unit tests compare it with the JSON schema, so the
# loader, the schema and the reference docs cannot drift apart.
SECTION_KEYS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "": frozenset(
            {
                "region",
                "zookeeper",
                "kafka",
                "peers",
                "subtrees",
                "state_path",
                "heartbeat_interval",
                "conflict_policy",
                "max_data_bytes",
                "mass_delete",
                "metrics",
                "log",
            }
        ),
        "zookeeper": frozenset({"hosts", "session_timeout", "connect_timeout", "auth"}),
        "zookeeper.auth": frozenset({"scheme", "credential", "credential_file", "credential_env"}),
        "kafka": frozenset(
            {
                "bootstrap_servers",
                "topic_prefix",
                "enable_idempotence",
                "replication_factor",
                "security_protocol",
                "ssl",
                "sasl",
                "request_timeout",
            }
        ),
        "kafka.ssl": frozenset({"cafile", "certfile", "keyfile"}),
        "kafka.sasl": frozenset(
            {"mechanism", "username", "password", "password_file", "password_env"}
        ),
        "subtrees[]": frozenset({"name", "path", "exclude"}),
        "mass_delete": frozenset({"max_ratio", "min_nodes"}),
        "metrics": frozenset({"listen"}),
        "log": frozenset({"format", "level"}),
    }
)

ZK_AUTH_SCHEMES = ("digest",)
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
CONFLICT_POLICIES = ("lww",)
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")

MAX_SESSION_TIMEOUT = 600.0
MAX_DATA_BYTES = 1_000_000  # ZooKeeper's default jute.maxbuffer
MAX_TOPIC_NAME = 249  # Kafka refuses longer topic names

_REGION = re.compile(r"[a-z0-9-]{1,32}")
_SUBTREE_NAME = re.compile(r"[a-z0-9_-]+")
_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)"
_HOST_PORT = re.compile(rf"{_HOST}(?::([0-9]{{1,5}}))?")
_LISTEN = re.compile(rf"{_HOST}:([0-9]{{1,5}})")
# ZooKeeper rejects these characters in znode names.
_ZNODE_BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\uf8ff\ufff0-\uffff]")

_REGION_RULE = "must be 1-32 characters of a-z, 0-9 or '-'"


def topic_name(prefix: str, subtree: str, region: str) -> str:
    """The topic ``region`` publishes ``subtree`` events to: one topic per subtree and origin."""
    return f"{prefix}.{subtree}.{region}"


# --------------------------------------------------------------------------- reading helpers


class _Missing:
    pass


_MISSING = _Missing()


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.lines.append(f"{key}: {message}")


class _Section:
    """One mapping of the document being read, with its key path for messages.

    Getters never raise: a bad value becomes a problem and the getter returns a
    placeholder (the default, or "" / None), so reading carries on and every
    problem in the file is found in one pass. The placeholders never leave this
    module because any problem ends in ``ConfigError``.
    """

    def __init__(
        self, data: Mapping[Any, Any], key: str, section: str, problems: _Problems
    ) -> None:
        self._data = data
        self.key = key
        self._allowed = SECTION_KEYS[section]
        self.problems = problems
        for name in data:
            if not isinstance(name, str) or name not in self._allowed:
                problems.add(self.path(str(name)), "unknown key")

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def add(self, name: str, message: str) -> None:
        self.problems.add(self.path(name), message)

    def has(self, name: str) -> bool:
        return self.raw(name) is not _MISSING

    def raw(self, name: str) -> object:
        if name not in self._allowed:
            raise AssertionError(f"loader reads {self.path(name)!r}, missing from SECTION_KEYS")
        return self._data.get(name, _MISSING)

    def text(
        self,
        name: str,
        default: str | None = None,
        check: Callable[[str], str | None] | None = None,
    ) -> str:
        """A string; without ``default`` the key is required. "" when unusable."""
        value = self.raw(name)
        if isinstance(value, _Missing):
            if default is None:
                self.add(name, "required")
                return ""
            return default
        if not isinstance(value, str):
            self.add(name, "must be a string")
            return ""
        if value == "":
            self.add(name, "must not be empty")
            return ""
        message = check(value) if check else None
        if message:
            self.add(name, message)
            return ""
        return value

    def optional_text(
        self, name: str, check: Callable[[str], str | None] | None = None
    ) -> str | None:
        if not self.has(name):
            return None
        return self.text(name, check=check) or None

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        return self.text(name, default, _choice_of(choices))

    def number(self, name: str, default: float, check: Callable[[float], str | None]) -> float:
        value = self.raw(name)
        if isinstance(value, _Missing):
            return default
        # bool is an int subclass; ``true`` for a timeout is a typo, not 1 second.
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.add(name, "must be a number")
            return default
        if not math.isfinite(value):
            self.add(name, "must be a finite number")
            return default
        message = check(float(value))
        if message:
            self.add(name, message)
            return default
        return float(value)

    def integer(self, name: str, default: int, check: Callable[[int], str | None]) -> int:
        value = self.raw(name)
        if isinstance(value, _Missing):
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(name, "must be an integer")
            return default
        message = check(value)
        if message:
            self.add(name, message)
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if isinstance(value, _Missing):
            return default
        if not isinstance(value, bool):
            self.add(name, "must be a boolean")
            return default
        return value

    def section(self, name: str, section: str) -> _Section | None:
        """The nested mapping ``name``, or None when absent or not a mapping."""
        value = self.raw(name)
        if isinstance(value, _Missing):
            return None
        if not isinstance(value, Mapping):
            self.add(name, "must be a mapping")
            return None
        return _Section(value, self.path(name), section, self.problems)

    def items(self, name: str, required: bool) -> Iterator[tuple[str, object]] | None:
        """(key path, value) for each item of the list ``name``; None when absent or bad."""
        value = self.raw(name)
        if isinstance(value, _Missing):
            if required:
                self.add(name, "required")
            return None
        if not isinstance(value, list):
            self.add(name, "must be a list")
            return None
        base = self.path(name)
        return ((f"{base}[{i}]", item) for i, item in enumerate(value))


def _greater_than(low: float, high: float | None = None) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        if value <= low:
            return f"must be greater than {low:g}"
        if high is not None and value > high:
            return f"must be at most {high:g}"
        return None

    return check


def _int_between(low: int, high: int | None = None) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        if value < low:
            return f"must be at least {low}"
        if high is not None and value > high:
            return f"must be at most {high}"
        return None

    return check


def _choice_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _replication_factor(value: int) -> str | None:
    return None if value == -1 or value >= 1 else "must be -1 (broker default) or at least 1"


def _region(value: str) -> str | None:
    return None if _REGION.fullmatch(value) else _REGION_RULE


def _subtree_name(value: str) -> str | None:
    if _SUBTREE_NAME.fullmatch(value):
        return None
    return "must use only a-z, 0-9, '_' or '-'"


def _topic_prefix(value: str) -> str | None:
    if _TOPIC_PREFIX.fullmatch(value):
        return None
    return "must use only A-Z, a-z, 0-9, '.', '_' or '-' and not start with '.'"


def _port_problem(port: str | None) -> str | None:
    if port is not None and not 1 <= int(port) <= 65535:
        return f"port {port} is out of range 1-65535"
    return None


def _host_list(value: str) -> str | None:
    for entry in value.split(","):
        match = _HOST_PORT.fullmatch(entry)
        if not match:
            return "must be a comma-separated list of host or host:port (no spaces, no chroot)"
        port_problem = _port_problem(match.group(1))
        if port_problem:
            return port_problem
    return None


def _listen(value: str) -> str | None:
    match = _LISTEN.fullmatch(value)
    if not match:
        return "must be host:port"
    return _port_problem(match.group(1))


def _env_name(value: str) -> str | None:
    return None if _ENV_NAME.fullmatch(value) else "must be an environment variable name"


def _znode_path(value: str) -> str | None:
    """Why ``value`` is not an absolute, normalised znode path below the root, or None."""
    if _ZNODE_BAD_CHARS.search(value):
        return "must not contain NUL or other characters ZooKeeper rejects"
    if not value.startswith("/"):
        return "must be absolute"
    if value == "/":
        return "must not be /"
    if value.endswith("/"):
        return "must not end with '/'"
    if "//" in value:
        return "must not contain '//'"
    if any(part in (".", "..") for part in value.split("/")):
        return "must not contain '.' or '..' components"
    return None


def _mount_path(value: str) -> str | None:
    problem = _znode_path(value)
    if problem:
        return problem
    if value == "/zookeeper" or value.startswith("/zookeeper/"):
        return "must not be /zookeeper or below it (reserved by ZooKeeper)"
    return None


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


# --------------------------------------------------------------------------- sections


def _secret(sec: _Section, stem: str, base_dir: Path, env: Mapping[str, str]) -> str:
    """Resolve the one of ``stem`` / ``stem_file`` / ``stem_env`` that is set.

    Messages name keys, paths and variable names only: never the secret.
    """
    names = (stem, f"{stem}_file", f"{stem}_env")
    present = [name for name in names if sec.has(name)]
    if not present:
        sec.problems.add(sec.key, f"one of {', '.join(names)} is required")
        return ""
    if len(present) > 1:
        sec.problems.add(
            sec.key, f"only one of {', '.join(names)} may be set, got {', '.join(present)}"
        )
        return ""
    (name,) = present
    if name == stem:
        return sec.text(name)
    if name.endswith("_file"):
        file_name = sec.text(name)
        if not file_name:
            return ""
        path = base_dir / file_name
        try:
            secret = path.read_bytes().decode("utf-8")
        except OSError as exc:
            sec.add(name, f"cannot read {path}: {exc.strerror or exc}")
            return ""
        except UnicodeDecodeError:
            sec.add(name, f"{path} is not UTF-8 text")
            return ""
        except ValueError:  # NUL in the path
            sec.add(name, "must not contain NUL")
            return ""
        # Editors and ``echo`` add a final newline that is not part of the secret.
        secret = secret.removesuffix("\n").removesuffix("\r")
        if not secret:
            sec.add(name, f"{path} is empty")
        return secret
    var = sec.text(name, check=_env_name)
    if not var:
        return ""
    if var not in env:
        sec.add(name, f"environment variable {var} is not set")
        return ""
    if not env[var]:
        sec.add(name, f"environment variable {var} is empty")
    return env[var]


def _zookeeper(sec: _Section, base_dir: Path, env: Mapping[str, str]) -> ZooKeeperSettings:
    hosts = sec.text("hosts", check=_host_list)
    session_timeout = sec.number("session_timeout", 10.0, _greater_than(0, MAX_SESSION_TIMEOUT))
    connect_timeout = sec.number("connect_timeout", 15.0, _greater_than(0))
    auth = None
    auth_sec = sec.section("auth", "zookeeper.auth")
    if auth_sec is not None:
        scheme = auth_sec.choice("scheme", "digest", ZK_AUTH_SCHEMES)
        before = len(sec.problems.lines)
        credential = _secret(auth_sec, "credential", base_dir, env)
        if len(sec.problems.lines) == before and scheme == "digest" and ":" not in credential:
            # Name the key that supplied it; the value itself stays out of the message.
            source = next(
                n for n in ("credential", "credential_file", "credential_env") if auth_sec.has(n)
            )
            auth_sec.add(source, "a digest credential must have the form user:password")
        auth = ZooKeeperAuth(scheme, credential)
    return ZooKeeperSettings(hosts, session_timeout, connect_timeout, auth)


def _ssl_file(sec: _Section, name: str, base_dir: Path) -> str | None:
    value = sec.optional_text(name)
    if value is None:
        return None
    path = base_dir / value
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        sec.add(name, f"cannot read {path}: {exc.strerror or exc}")
        return None
    except ValueError:  # NUL in the path
        sec.add(name, "must not contain NUL")
        return None
    return str(path)


def _kafka(sec: _Section, base_dir: Path, env: Mapping[str, str]) -> KafkaSettings:
    bootstrap = sec.text("bootstrap_servers", check=_host_list)
    prefix = sec.text("topic_prefix", "zkbridge", _topic_prefix)
    idempotence = sec.boolean("enable_idempotence", True)
    replication = sec.integer("replication_factor", -1, _replication_factor)
    protocol = sec.choice("security_protocol", "PLAINTEXT", SECURITY_PROTOCOLS)
    request_timeout = sec.number("request_timeout", 30.0, _greater_than(0))

    ssl = None
    ssl_sec = sec.section("ssl", "kafka.ssl")
    if ssl_sec is not None:
        ssl = KafkaSsl(
            _ssl_file(ssl_sec, "cafile", base_dir),
            _ssl_file(ssl_sec, "certfile", base_dir),
            _ssl_file(ssl_sec, "keyfile", base_dir),
        )
        if ssl_sec.has("keyfile") and not ssl_sec.has("certfile"):
            ssl_sec.add("keyfile", "requires certfile")

    sasl = None
    sasl_sec = sec.section("sasl", "kafka.sasl")
    if sasl_sec is not None:
        mechanism = sasl_sec.text("mechanism", check=_choice_of(SASL_MECHANISMS))
        username = sasl_sec.text("username")
        password = _secret(sasl_sec, "password", base_dir, env)
        sasl = KafkaSasl(mechanism, username, password)

    # Only judge the pairing once the protocol itself was readable.
    if protocol:
        uses_sasl = protocol.startswith("SASL_")
        uses_ssl = protocol in ("SSL", "SASL_SSL")
        if uses_sasl and not sec.has("sasl"):
            sec.add("sasl", f"required when security_protocol is {protocol}")
        if not uses_sasl and sec.has("sasl"):
            sec.add("sasl", "only allowed with security_protocol SASL_PLAINTEXT or SASL_SSL")
        if not uses_ssl and sec.has("ssl"):
            sec.add("ssl", "only allowed with security_protocol SSL or SASL_SSL")
    return KafkaSettings(
        bootstrap, prefix, idempotence, replication, protocol, sasl, ssl, request_timeout
    )


def _peers(top: _Section, region: str) -> tuple[str, ...]:
    peers: list[str] = []
    seen: dict[str, str] = {}
    items = top.items("peers", required=True)
    for key, value in items or ():
        if not isinstance(value, str):
            top.problems.add(key, "must be a string")
        elif not _REGION.fullmatch(value):
            top.problems.add(key, _REGION_RULE)
        elif value == region:
            top.problems.add(key, f"must not be this bridge's own region {value}")
        elif value in seen:
            top.problems.add(key, f"duplicate of {seen[value]}")
        else:
            seen[value] = key
            peers.append(value)
    return tuple(peers)


def _excludes(sec: _Section) -> tuple[str, ...]:
    excludes: list[str] = []
    seen: dict[str, str] = {}
    for key, value in sec.items("exclude", required=False) or ():
        if not isinstance(value, str):
            sec.problems.add(key, "must be a string")
            continue
        problem = _znode_path(value) if value else "must not be empty"
        if problem:
            sec.problems.add(key, problem)
        elif value in seen:
            sec.problems.add(key, f"duplicate of {seen[value]}")
        else:
            seen[value] = key
            excludes.append(value)
    return tuple(excludes)


def _subtrees(top: _Section, state_path: str) -> tuple[SubtreeSettings, ...]:
    subtrees: list[SubtreeSettings] = []
    names: dict[str, str] = {}
    mounts: list[tuple[str, str]] = []  # (key path, mount) of the valid mounts so far
    items = top.items("subtrees", required=True)
    if items is None:
        return ()
    count = 0
    for key, value in items:
        count += 1
        if not isinstance(value, Mapping):
            top.problems.add(key, "must be a mapping")
            continue
        sec = _Section(value, key, "subtrees[]", top.problems)
        name = sec.text("name", check=_subtree_name)
        if name in names:
            sec.add("name", f"duplicate of {names[name]}")
        elif name:
            names[name] = sec.path("name")
        path = sec.text("path", check=_mount_path)
        if path:
            for other_key, other in mounts:
                if _overlap(path, other):
                    sec.add("path", f"{path} overlaps {other_key} {other}")
            if state_path and _overlap(path, state_path):
                sec.add("path", f"{path} overlaps state_path {state_path}")
            mounts.append((sec.path("path"), path))
        subtrees.append(SubtreeSettings(name, path, _excludes(sec)))
    if count == 0:
        top.add("subtrees", "must not be empty")
    return tuple(subtrees)


def _check_topic_lengths(
    top: _Section,
    kafka: KafkaSettings,
    region: str,
    peers: tuple[str, ...],
    subtrees: tuple[SubtreeSettings, ...],
) -> None:
    longest = max((region, *peers), key=len)
    if not kafka.topic_prefix or not longest:
        return
    for i, subtree in enumerate(subtrees):
        if not subtree.name:
            continue
        topic = topic_name(kafka.topic_prefix, subtree.name, longest)
        if len(topic) > MAX_TOPIC_NAME:
            top.add(
                f"subtrees[{i}].name",
                f"topic {topic} is longer than Kafka's limit of {MAX_TOPIC_NAME} characters",
            )


def _settings(
    doc: object,
    base_dir: Path,
    env: Mapping[str, str],
    problems: _Problems,
    label: str = "config",
    source: str = "",
) -> Settings:
    """Read the whole document; ``label`` names it in file-level messages."""
    if not isinstance(doc, Mapping):
        what = "an empty document" if doc is None else f"a {type(doc).__name__}"
        problems.add(label, f"must be a mapping of settings, got {what}")
        raise ConfigError(problems.lines)
    top = _Section(doc, "", "", problems)

    region = top.text("region", check=_region)
    zk_sec = top.section("zookeeper", "zookeeper")
    if zk_sec is None and not top.has("zookeeper"):
        top.add("zookeeper", "required")
    zookeeper = _zookeeper(zk_sec, base_dir, env) if zk_sec is not None else ZooKeeperSettings("")
    kafka_sec = top.section("kafka", "kafka")
    if kafka_sec is None and not top.has("kafka"):
        top.add("kafka", "required")
    kafka = _kafka(kafka_sec, base_dir, env) if kafka_sec is not None else KafkaSettings("")
    peers = _peers(top, region)
    state_path = top.text("state_path", "/zkbridge", _mount_path)
    subtrees = _subtrees(top, state_path)
    _check_topic_lengths(top, kafka, region, peers, subtrees)

    heartbeat = top.number("heartbeat_interval", 5.0, _greater_than(0))
    policy = top.choice("conflict_policy", "lww", CONFLICT_POLICIES)
    max_data = top.integer("max_data_bytes", MAX_DATA_BYTES, _int_between(1, MAX_DATA_BYTES))

    mass_delete = MassDeleteSettings()
    md_sec = top.section("mass_delete", "mass_delete")
    if md_sec is not None:
        mass_delete = MassDeleteSettings(
            md_sec.number("max_ratio", 0.5, _greater_than(0, 1)),
            md_sec.integer("min_nodes", 20, _int_between(0)),
        )

    metrics_sec = top.section("metrics", "metrics")
    listen = metrics_sec.optional_text("listen", _listen) if metrics_sec is not None else None

    log_format, log_level = "auto", "info"
    log_sec = top.section("log", "log")
    if log_sec is not None:
        log_format = log_sec.choice("format", "auto", LOG_FORMATS)
        log_level = log_sec.choice("level", "info", LOG_LEVELS)

    # Duplicate YAML keys found while reading the file are already in ``problems``.
    if problems.lines:
        raise ConfigError(problems.lines)
    return Settings(
        region=region,
        zookeeper=zookeeper,
        kafka=kafka,
        peers=peers,
        subtrees=subtrees,
        state_path=state_path,
        heartbeat_interval=heartbeat,
        conflict_policy=policy,
        max_data_bytes=max_data,
        mass_delete=mass_delete,
        metrics_listen=listen,
        log_format=log_format,
        log_level=log_level,
        source=source,
    )


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


def _read_yaml(path: str, problems: _Problems) -> object:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        problems.add(path, f"cannot read: {exc.strerror or exc}")
        raise ConfigError(problems.lines) from None
    except ValueError:  # NUL in the path
        problems.add(repr(path), "cannot read: the path contains NUL")
        raise ConfigError(problems.lines) from None
    loader = _Loader(raw)
    try:
        doc = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        # Only the problem and position: the snippet could contain a secret.
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.add(path, f"invalid YAML{where}: {exc.problem or exc.context}")
        raise ConfigError(problems.lines) from None
    except yaml.YAMLError as exc:
        problems.add(path, f"invalid YAML: {exc}")
        raise ConfigError(problems.lines) from None
    finally:
        loader.dispose()
    for duplicate in loader.duplicates:
        problems.add(path, duplicate)
    return doc


# --------------------------------------------------------------------------- public API


def parse_settings(doc: object, base_dir: Path, env: Mapping[str, str]) -> Settings:
    """Validate an already-parsed document; relative ``*_file`` paths resolve against ``base_dir``.

    Raises ``ConfigError`` listing every problem.
    """
    return _settings(doc, base_dir, env, _Problems())


def load_settings(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the YAML file at ``path``; ``env`` defaults to ``os.environ``.

    Raises ``ConfigError`` listing every problem, including YAML syntax errors
    and duplicate keys, never an unrelated exception for bad input.
    """
    label = os.fspath(path)
    problems = _Problems()
    doc = _read_yaml(label, problems)
    env = os.environ if env is None else env
    return _settings(doc, Path(label).parent, env, problems, label=label, source=label)


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
        lines.append(f"  {subtree.name} at {subtree.path}{excluded}")
        lines.append(
            f"    publishes to {topic_name(kafka.topic_prefix, subtree.name, settings.region)}"
        )
        if settings.peers:
            consumed = ", ".join(
                topic_name(kafka.topic_prefix, subtree.name, p) for p in settings.peers
            )
            lines.append(f"    consumes {consumed}")
    return "\n".join(lines)
