"""Configuration loading: every rule yields its exact problem line, all problems at once;
the committed JSON schema and README table are what the settings classes generate."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
from pathlib import Path
from typing import Any, get_args, get_type_hints

import jsonschema
import pytest
import yaml

from bridge import configdoc
from bridge.config import (
    KafkaSettings,
    KafkaSsl,
    LogSettings,
    MassDeleteSettings,
    MetricsSettings,
    Settings,
    SubtreeSettings,
    ZooKeeperSettings,
)
from bridge.configload import load_settings, parse_settings
from bridge.configreload import describe, reloaded
from bridge.errors import ConfigError
from tests.harness.tls import make_client_cert, make_tls

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "schemas" / "config.schema.json").read_text())
EXAMPLES = sorted((ROOT / "schemas" / "examples").glob("region-*.yaml"))
README = str(ROOT / "README.md")  # any readable file, by an absolute path
ENV = {"ZKB_ZK": "bridge:zz", "ZKB_PW": "kafka-pw", "ZKB_EMPTY": ""}
SASL = {"mechanism": "PLAIN", "username": "u", "password": "p"}
SASL_SSL = {"kafka.security_protocol": "SASL_SSL"}
SSL = {"kafka.security_protocol": "SSL"}
NO = "No such file or directory"
ZK_SOURCES = "credential, credential_file, credential_env"
PW_SOURCES = "password, password_file, password_env"
DELETE = object()
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def steps(key_path: str) -> list[str | int]:
    return [name if name else int(index) for name, index in _STEP.findall(key_path)]


def mk(changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The base document with each ``a.b[0].c`` key path set (or removed with DELETE)."""
    doc: dict[str, Any] = {
        "region": "us-east",
        "zookeeper": {"hosts": "127.0.0.1:2181"},
        "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
        "peers": ["eu-west", "ap-south"],
        "subtrees": [{"name": "critical", "path": "/critical"}],
    }
    for key_path, value in (changes or {}).items():
        *parents, last = steps(key_path)
        target: Any = doc
        for step in parents:
            target = target.setdefault(step, {}) if isinstance(step, str) else target[step]
        if value is DELETE:
            del target[last]
        else:
            target[last] = copy.deepcopy(value)
    return doc


def get(obj: Any, key_path: str) -> Any:
    for step in steps(key_path):
        obj = obj[step] if isinstance(step, int) else getattr(obj, step)
    return obj


def problems(doc: object, base_dir: Path = Path("/nonexistent")) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(doc, base_dir, ENV)
    assert str(info.value) == "; ".join(info.value.problems)
    return info.value.problems


def parse(doc: object, base_dir: Path = ROOT) -> Settings:
    return parse_settings(doc, base_dir, ENV)


def two_mounts(first: str, second: str) -> dict[str, Any]:
    return {"subtrees": [{"name": "critical", "path": first}, {"name": "other", "path": second}]}


def zk_auth(**auth: str) -> dict[str, Any]:
    return {"zookeeper.auth": auth}


def sasl(**fields: str) -> dict[str, Any]:
    return {**SASL_SSL, "kafka.sasl": {"mechanism": "PLAIN", "username": "u", **fields}}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- good documents


def test_examples_load_as_one_federation() -> None:
    loaded = [load_settings(path, env={}) for path in EXAMPLES]
    for path, settings in zip(EXAMPLES, loaded, strict=True):
        jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)
        region = path.stem.removeprefix("region-")
        assert (settings.region, settings.source) == (region, str(path))
        assert settings.subtree("critical").path == "/critical"
        assert set(settings.peers) == {"us-east", "eu-west", "ap-south"} - {region}
        assert f"publishes to zkbridge.critical.{region}" in describe(settings)
    assert len({s.zookeeper.hosts for s in loaded}) == 3  # each region has its own ensemble


def test_minimal_document_gets_defaults() -> None:
    settings = parse(mk())
    assert settings == Settings(
        "us-east", ZooKeeperSettings("127.0.0.1:2181"), KafkaSettings("127.0.0.1:9092"),
        peers=("eu-west", "ap-south"), subtrees=(SubtreeSettings("critical", "/critical"),))
    assert (settings.state_path, settings.kafka.topic_prefix, settings.subtrees[0].acl) == (
        "/zkbridge", "zkbridge", "copy")
    assert (settings.mass_delete, settings.max_clock_skew) == (MassDeleteSettings(0.5, 20), 60.0)
    assert (settings.metrics_listen, settings.log_format, settings.log_level, settings.source) == (
        None, "auto", "info", "")
    with pytest.raises(KeyError):
        settings.subtree("missing")


def test_full_document_values() -> None:
    doc = mk({
        "zookeeper": {"hosts": "zk:2181", "session_timeout": 20, "connect_timeout": 2.5},
        "kafka": {"bootstrap_servers": "k:9092", "topic_prefix": "prod_zk-bridge.v1",
                  "enable_idempotence": False, "replication_factor": 3, "request_timeout": 10},
        "peers": [],
        "subtrees": [{"name": "critical", "path": "/critical", "exclude": ["/tmp", "/locks/a"]},
                     {"name": "flags_2", "path": "/zookeeperish/flags", "acl": "open"}],
        "state_path": "/ops/zkbridge", "heartbeat_interval": 0.5, "max_clock_skew": 2,
        "max_data_bytes": 1, "mass_delete": {"max_ratio": 1, "min_nodes": 0},
        "metrics": {"listen": "[::1]:9464"}, "log": {"format": "json", "level": "debug"},
    })
    jsonschema.validate(doc, SCHEMA)
    settings = parse(doc)
    assert settings == Settings(
        "us-east", ZooKeeperSettings("zk:2181", session_timeout=20.0, connect_timeout=2.5),
        KafkaSettings("k:9092", topic_prefix="prod_zk-bridge.v1", enable_idempotence=False,
                      replication_factor=3, request_timeout=10.0),
        peers=(),
        subtrees=(SubtreeSettings("critical", "/critical", exclude=("/tmp", "/locks/a")),
                  SubtreeSettings("flags_2", "/zookeeperish/flags", acl="open")),
        state_path="/ops/zkbridge", heartbeat_interval=0.5, max_clock_skew=2.0, max_data_bytes=1,
        mass_delete=MassDeleteSettings(1.0, 0), metrics=MetricsSettings("[::1]:9464"),
        log=LogSettings("json", "debug"))
    assert (settings.metrics_listen, settings.log_format, settings.log_level) == (
        "[::1]:9464", "json", "debug")
    assert isinstance(settings.max_clock_skew, float)
    assert isinstance(settings.zookeeper.session_timeout, float)


# A document accepted with one change, and what it reads back as.
ACCEPTED: list[tuple[dict[str, Any], str, object]] = [
    ({"zookeeper.hosts": "zk1:2181,zk2,[::1]:2181"}, "zookeeper.hosts", "zk1:2181,zk2,[::1]:2181"),
    ({"kafka.bootstrap_servers": "k1"}, "kafka.bootstrap_servers", "k1"),
    ({"zookeeper.session_timeout": 600}, "zookeeper.session_timeout", 600.0),  # bounds inclusive
    ({"mass_delete": {"max_ratio": 1}}, "mass_delete.max_ratio", 1.0),
    ({"region": "a" * 32}, "region", "a" * 32),
    ({"peers": []}, "peers", ()),
    ({"metrics": {}}, "metrics_listen", None),  # no endpoint
    # Excludes are relative to the mount, so /zookeeper is fine there.
    ({"subtrees[0].exclude": ["/zookeeper"]}, "subtrees[0].exclude", ("/zookeeper",)),
    (two_mounts("/critical", "/criticality"), "subtrees[1].path", "/criticality"),  # no overlap
    (zk_auth(credential="bridge:s3cret"), "zookeeper.auth.credential", "bridge:s3cret"),
    (zk_auth(credential_env="ZKB_ZK"), "zookeeper.auth.credential", "bridge:zz"),
    (sasl(mechanism="SCRAM-SHA-256", password_env="ZKB_PW"), "kafka.sasl.password", "kafka-pw"),
]


@pytest.mark.parametrize(("changes", "key", "value"), ACCEPTED, ids=[k for _, k, _ in ACCEPTED])
def test_accepted(changes: dict[str, Any], key: str, value: object) -> None:
    assert get(parse(mk(changes)), key) == value


def test_settings_are_frozen_with_tuples() -> None:
    settings = parse(mk({"subtrees[0].exclude": ["/tmp"]}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.region = "eu-west"  # type: ignore[misc]
    assert all(isinstance(v, tuple) for v in [settings.peers, settings.subtrees[0].exclude])
    assert isinstance(settings.subtrees, tuple)


def test_replace_keeps_the_flat_names_the_engine_uses() -> None:
    old = parse(mk({"log": {"format": "json"}, "metrics": {"listen": "127.0.0.1:9464"}}))
    new = dataclasses.replace(old, log_level="debug", max_clock_skew=5.0)
    assert (new.log_format, new.log_level, new.max_clock_skew) == ("json", "debug", 5.0)
    assert new.metrics_listen == "127.0.0.1:9464"
    assert dataclasses.replace(new, log_level="info", max_clock_skew=60.0) == old


def test_reload_applies_live_keys_and_keeps_the_rest() -> None:
    old = parse(mk())
    assert reloaded(old, parse(mk())) == (old, [], [])
    new = parse(mk({"heartbeat_interval": 1, "max_clock_skew": 5, "log": {"level": "debug"},
                    "mass_delete": {"min_nodes": 3}, "subtrees[0].exclude": ["/tmp"]}))
    applied = ["heartbeat_interval", "max_clock_skew", "mass_delete", "log_level",
               "subtrees[critical].exclude"]
    assert reloaded(old, new) == (new, applied, [])


def test_reload_leaves_restart_keys_alone() -> None:
    old = parse(mk())
    new = parse(mk({"region": "us-west", "zookeeper.session_timeout": 3, "conflict_policy": "lww",
                    "metrics": {"listen": "127.0.0.1:9464"}, "subtrees[0].acl": "open",
                    "subtrees[0].exclude": ["/tmp"]}))
    assert reloaded(old, new) == (old, [], ["region", "zookeeper", "metrics_listen", "subtrees"])


def test_describe_summarises_without_secrets() -> None:
    doc = mk(sasl(password="hunter2") | {"kafka.topic_prefix": "f", "subtrees[0].exclude": ["/t"]})
    text = describe(parse(doc))
    for line in ["region us-east", "peers: eu-west, ap-south",
                 "critical at /critical (excluding /t)", "publishes to f.critical.us-east",
                 "consumes f.critical.eu-west, f.critical.ap-south"]:
        assert line in text
    assert "hunter2" not in text


# --------------------------------------------------------------------------- one line per problem

REGION_RULE = "must be 1-32 characters of a-z, 0-9 or '-'"
NAME_RULE = "must use only a-z, 0-9, '_' or '-'"
PREFIX_RULE = "must use only A-Z, a-z, 0-9, '.', '_' or '-' and not start with '.'"
HOSTS_RULE = "must be a comma-separated list of host or host:port (no spaces, no chroot)"
RF_RULE = "must be -1 (broker default) or at least 1"
RESERVED = "must not be /zookeeper or below it (reserved by ZooKeeper)"
BAD_CHARS = "must not contain NUL or other characters ZooKeeper rejects"
DOTS = "must not contain '.' or '..' components"
SASL_ONLY = "only allowed with security_protocol SASL_PLAINTEXT or SASL_SSL"
SSL_ONLY = "only allowed with security_protocol SSL or SASL_SSL"
DIGEST_FORM = "must have the form user:password"
PATH_CASES = [
    ("critical", "must be absolute"), ("", "must not be empty"), ("/", "must not be /"),
    ("/critical/", "must not end with '/'"), ("/a//b", "must not contain '//'"),
    ("/a/./b", DOTS), ("/a/..", DOTS), ("/a\x00b", BAD_CHARS), ("/a\x07b", BAD_CHARS),
]
MOUNT_CASES = [*PATH_CASES, ("/zookeeper", RESERVED), ("/zookeeper/quota", RESERVED)]
HOST_CASES = [
    *((v, HOSTS_RULE) for v in ["zk1:2181, zk2:2181", "zk1:2181,", "zk1:2181/zk", "zk1:port"]),
    *((f"zk1:{port}", f"port {port} is out of range 1-65535") for port in [70000, 0]),
]
UNKNOWN_KEYS = [
    "colour", "zookeeper.sesion_timeout", "zookeeper.auth.user", "kafka.foo", "kafka.ssl.ca_file",
    "kafka.sasl.pass", "subtrees[0].excludes", "mass_delete.ratio", "metrics.port", "log.lvl",
    # The names the rest of the code reads, set from sections or by the loader.
    "log_format", "log_level", "metrics_listen", "source",
]
# Every enclosing block valid, so that an unknown key is the only problem.
BLOCKS = {"zookeeper.auth": {"credential": "u:p"}, **sasl(password="p"), "kafka.ssl": {},
          "mass_delete": {}, "metrics": {}, "log": {}}


# The base document with one mistake, and the one line the loader must print for it:
# (key path, value, message) for a problem at the key changed, else (changes, line).
ONE_MISTAKE: list[tuple[str, object, str] | tuple[dict[str, Any], str]] = [
    # required keys below the top level
    *((key, DELETE, "required") for key in ["zookeeper.hosts", "kafka.bootstrap_servers"]),
    *((key, DELETE, "required") for key in ["subtrees[0].name", "subtrees[0].path"]),
    # types
    ("region", 5, "must be a string"),
    ("region", None, "must be a string"),
    ("heartbeat_interval", "5", "must be a number"),
    ("heartbeat_interval", True, "must be a number"),
    ("max_clock_skew", "60s", "must be a number"),
    ("max_clock_skew", float("nan"), "must be a finite number"),
    ("zookeeper.session_timeout", False, "must be a number"),
    ("zookeeper.session_timeout", float("inf"), "must be a finite number"),
    ("max_data_bytes", 1.5, "must be an integer"),
    ("kafka.replication_factor", True, "must be an integer"),
    ("kafka.enable_idempotence", "yes", "must be a boolean"),
    ("kafka.enable_idempotence", 1, "must be a boolean"),
    ("zookeeper", ["127.0.0.1:2181"], "must be a mapping"),
    ("kafka", None, "must be a mapping"),
    ("mass_delete", 0.5, "must be a mapping"),
    ("peers", "eu-west", "must be a list"),
    ("peers[0]", 1, "must be a string"),
    ("subtrees", {"name": "critical"}, "must be a list"),
    ("subtrees[0]", "/critical", "must be a mapping"),
    ("subtrees[0].exclude", "/tmp", "must be a list"),
    ({"subtrees[0].exclude": [7]}, "subtrees[0].exclude[0]: must be a string"),
    ("zookeeper.hosts", "", "must not be empty"),
    ("metrics.listen", 9464, "must be a string"),
    # ranges
    ("zookeeper.session_timeout", 0, "must be greater than 0"),
    ("zookeeper.session_timeout", -1, "must be greater than 0"),
    ("zookeeper.session_timeout", 600.5, "must be at most 600"),
    ("zookeeper.connect_timeout", 0, "must be greater than 0"),
    ("kafka.request_timeout", -3, "must be greater than 0"),
    ("heartbeat_interval", 0, "must be greater than 0"),
    ("max_clock_skew", 0, "must be greater than 0"),
    ("max_clock_skew", -0.5, "must be greater than 0"),
    ("audit_interval", -1, "must be at least 0"),
    ("audit_interval", "10m", "must be a number"),
    ("max_data_bytes", 0, "must be at least 1"),
    ("max_data_bytes", 1_000_001, "must be at most 1000000"),
    ("mass_delete.max_ratio", 0, "must be greater than 0"),
    ("mass_delete.max_ratio", 1.01, "must be at most 1"),
    ("mass_delete.min_nodes", -1, "must be at least 0"),
    ("kafka.replication_factor", 0, RF_RULE),
    ("kafka.replication_factor", -2, RF_RULE),
    # enumerations
    ("conflict_policy", "first-wins", "must be one of lww"),
    ("subtrees[0].acl", "none", "must be one of copy, open"),
    ("subtrees[0].acl", None, "must be one of copy, open"),
    ("log.format", "text", "must be one of auto, json, console"),
    ("log.level", "INFO", "must be one of debug, info, warning, error"),
    ("kafka.security_protocol", "TLS", "must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    (zk_auth(scheme="sasl", credential="u:p"), "zookeeper.auth.scheme: must be one of digest"),
    # names
    *(("region", v, REGION_RULE) for v in ["US-East", "us_east", "a" * 33, "us east"]),
    ({"peers": ["eu-west", "EU"]}, f"peers[1]: {REGION_RULE}"),
    ({"peers": ["eu-west", "ap-south", "eu-west"]}, "peers[2]: duplicate of peers[0]"),
    ({"peers": ["eu-west", "us-east"]}, "peers[1]: must not be this bridge's own region us-east"),
    ("subtrees", [], "must not be empty"),
    *(("subtrees[0].name", v, NAME_RULE) for v in ["Critical", "crit.ical", "a b", "é"]),
    (two_mounts("/critical", "/other") | {"subtrees[1].name": "critical"},
     "subtrees[1].name: duplicate of subtrees[0].name"),
    *(("kafka.topic_prefix", v, PREFIX_RULE) for v in [".zkbridge", "zk bridge", "zk/b", "zk:b"]),
    ({"subtrees[0].name": "n" * 240},  # with the longest of the region and its peers
     f"subtrees[0].name: topic zkbridge.{'n' * 240}.ap-south is longer than Kafka's limit"
     " of 249 characters"),
    ({"kafka": None, "subtrees[0].name": "n" * 240}, "kafka: must be a mapping"),  # prefix unknown
    # addresses
    *(("zookeeper.hosts", v, m) for v, m in HOST_CASES),
    *(("kafka.bootstrap_servers", v, m) for v, m in HOST_CASES),
    *(("metrics.listen", v, "must be host:port") for v in ["9464", ":9464", "localhost"]),
    ("metrics.listen", "127.0.0.1:65536", "port 65536 is out of range 1-65535"),
    # paths
    *(("subtrees[0].path", v, m) for v, m in MOUNT_CASES),
    *(("state_path", v, m) for v, m in MOUNT_CASES),
    *(({"subtrees[0].exclude": ["/ok", v]}, f"subtrees[0].exclude[1]: {m}") for v, m in PATH_CASES),
    ({"subtrees[0].exclude": ["/tmp", "/locks", "/tmp"]},
     "subtrees[0].exclude[2]: duplicate of subtrees[0].exclude[0]"),
    *(
        (two_mounts(a, b), f"subtrees[1].path: {b} overlaps subtrees[0].path {a}")
        for a, b in [("/critical", "/critical"), ("/critical", "/critical/s"), ("/c/s", "/c")]
    ),
    *(
        ({"subtrees[0].path": m, "state_path": s}, f"subtrees[0].path: {m} overlaps state_path {s}")
        for m, s in [("/zkbridge", "/zkbridge"), ("/zkbridge/d", "/zkbridge"), ("/ops", "/ops/zk")]
    ),
    # kafka security
    *(
        ({"kafka.security_protocol": p}, f"kafka.sasl: required when security_protocol is {p}")
        for p in ["SASL_SSL", "SASL_PLAINTEXT"]
    ),
    *(
        ({"kafka.sasl": SASL} | p, f"kafka.sasl: {SASL_ONLY}")
        for p in [{}, {"kafka.security_protocol": "PLAINTEXT"}, {"kafka.security_protocol": "SSL"}]
    ),
    ({"kafka.ssl": {}}, f"kafka.ssl: {SSL_ONLY}"),
    ({"kafka.security_protocol": "SASL_PLAINTEXT", "kafka.sasl": SASL, "kafka.ssl": {}},
     f"kafka.ssl: {SSL_ONLY}"),
    (SSL | {"kafka.ssl.cafile": "ca"}, f"kafka.ssl.cafile: cannot read /nonexistent/ca: {NO}"),
    (SSL | {"kafka.ssl.keyfile": README}, "kafka.ssl.keyfile: requires certfile"),
    # zookeeper tls
    ({"zookeeper.tls": {"keyfile": README}}, "zookeeper.tls.keyfile: requires certfile"),
    ({"zookeeper.tls": {"cafile": "ca"}},
     f"zookeeper.tls.cafile: cannot read /nonexistent/ca: {NO}"),
    ({"zookeeper.tls": {"check_hostname": "sometimes"}},
     "zookeeper.tls.check_hostname: must be a boolean"),
    # secrets: the key they came from, never their value
    (zk_auth(scheme="digest"), f"zookeeper.auth: one of {ZK_SOURCES} is required"),
    (zk_auth(credential="u:p", credential_env="ZKB_ZK"),
     f"zookeeper.auth: only one of {ZK_SOURCES} may be set, got credential, credential_env"),
    (sasl(), f"kafka.sasl: one of {PW_SOURCES} is required"),
    (sasl(password="a", password_file="b", password_env="C"),
     f"kafka.sasl: only one of {PW_SOURCES} may be set, got {PW_SOURCES}"),
    ("zookeeper.auth.credential_env", "ZKB_UNSET", "environment variable ZKB_UNSET is not set"),
    ("zookeeper.auth.credential_env", "ZKB_EMPTY", "environment variable ZKB_EMPTY is empty"),
    ("zookeeper.auth.credential_env", "1BAD-NAME", "must be an environment variable name"),
    (sasl(password_env="NO"), "kafka.sasl.password_env: environment variable NO is not set"),
    ("zookeeper.auth.credential_file", "zk", f"cannot read /nonexistent/zk: {NO}"),
    ("zookeeper.auth.credential_file", "/dev/null", "/dev/null is empty"),
    ("zookeeper.auth.credential", 1234, "must be a string"),
    ("zookeeper.auth.credential", "", "must not be empty"),
    ("zookeeper.auth.credential", "nocolon", f"a digest credential {DIGEST_FORM}"),
    # unknown keys, at every level
    *((BLOCKS | {key: "x"}, f"{key}: unknown key") for key in UNKNOWN_KEYS),
]
MISTAKES = [
    ({row[0]: row[1]}, f"{row[0]}: {row[2]}") if len(row) == 3 else row for row in ONE_MISTAKE
]


@pytest.mark.parametrize(("changes", "line"), MISTAKES, ids=[line for _, line in MISTAKES])
def test_one_mistake_one_line(changes: dict[str, Any], line: str) -> None:
    assert problems(mk(changes)) == [line]


def test_non_string_key_is_unknown() -> None:
    doc: dict[Any, Any] = mk()
    doc[True] = 1  # YAML 1.1 reads a bare ``on:`` or ``yes:`` key as true
    assert problems(doc) == ["True: unknown key"]


def test_every_overlap_is_reported() -> None:
    doc = mk(two_mounts("/critical", "/critical/a"))
    doc["subtrees"].append({"name": "b", "path": "/critical/a/b"})
    assert problems(doc) == [
        "subtrees[1].path: /critical/a overlaps subtrees[0].path /critical",
        "subtrees[2].path: /critical/a/b overlaps subtrees[0].path /critical",
        "subtrees[2].path: /critical/a/b overlaps subtrees[1].path /critical/a",
    ]


def test_every_problem_reported_at_once() -> None:
    doc = {
        "region": "US",
        "zookeeper": {"hosts": "zk1:2181", "sesion_timeout": 5},
        "kafka": {"security_protocol": "SASL_SSL", "topic_prefix": ".x"},
        "peers": ["us-east", "us-east"],
        "subtrees": [
            {"name": "critical", "path": "critical"},
            {"name": "critical", "path": "/a", "exclude": ["tmp", "tmp"]},  # no "duplicate"
            {"name": "b", "path": "/a/b", "acl": "closed"},
        ],
        "heartbeat_interval": True,
        "max_clock_skew": 0,
        "mass_delete": {"max_ratio": 2},
        "log": {"level": "trace"},
    }
    assert problems(doc) == [
        f"region: {REGION_RULE}",
        "zookeeper.sesion_timeout: unknown key",
        "kafka.bootstrap_servers: required",
        f"kafka.topic_prefix: {PREFIX_RULE}",
        "kafka.sasl: required when security_protocol is SASL_SSL",
        "peers[1]: duplicate of peers[0]",
        "subtrees[0].path: must be absolute",
        "subtrees[1].name: duplicate of subtrees[0].name",
        "subtrees[1].exclude[0]: must be absolute",
        "subtrees[1].exclude[1]: must be absolute",
        "subtrees[2].path: /a/b overlaps subtrees[1].path /a",
        "subtrees[2].acl: must be one of copy, open",
        "heartbeat_interval: must be a number",
        "max_clock_skew: must be greater than 0",
        "mass_delete.max_ratio: must be at most 1",
        "log.level: must be one of debug, info, warning, error",
    ]
    required = ["region", "zookeeper", "kafka", "peers", "subtrees"]
    assert problems({}) == [f"{key}: required" for key in required]


# --------------------------------------------------------------------------- secrets


def test_secret_files_relative_to_the_config_and_one_final_newline_dropped(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "zk.secret").write_text("bridge:s3cret\n")
    (tmp_path / "kafka.pw").write_text("pw with spaces \r\n")
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    doc = mk(zk_auth(scheme="digest", credential_file="secrets/zk.secret")
             | sasl(mechanism="SCRAM-SHA-512", password_file=str(tmp_path / "kafka.pw")))
    settings = load_settings(write(tmp_path, yaml.safe_dump(doc)), env={})
    assert get(settings, "zookeeper.auth.credential") == "bridge:s3cret"
    assert get(settings, "kafka.sasl.password") == "pw with spaces "
    assert problems(mk(zk_auth(credential_file="latin1")), base_dir=tmp_path) == [
        f"zookeeper.auth.credential_file: {tmp_path / 'latin1'} is not UTF-8 text"
    ]


def test_load_settings_defaults_to_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZKB_TEST_ZK_AUTH", "bridge:from-env")
    path = write(tmp_path, yaml.safe_dump(mk(zk_auth(credential_env="ZKB_TEST_ZK_AUTH"))))
    assert get(load_settings(str(path)), "zookeeper.auth.credential") == "bridge:from-env"


def test_secret_values_never_in_messages_or_repr(tmp_path: Path) -> None:
    (tmp_path / "zk").write_text("nocolonsecret\n")
    bad = mk(zk_auth(credential_file="zk") | sasl(mechanism="MD5", password="hunter2"))
    lines = problems(bad, base_dir=tmp_path)
    assert lines == [
        f"zookeeper.auth.credential_file: a digest credential {DIGEST_FORM}",
        "kafka.sasl.mechanism: must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
    ]
    assert not any("nocolonsecret" in line or "hunter2" in line for line in lines)
    text = repr(parse(mk(zk_auth(credential="u:zksecret") | sasl(password="hunter2"))))
    assert "zksecret" not in text and "hunter2" not in text


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a client certificate and key it signed, the same pair in one file, a key
    encrypted with a password, and a file of no PEM at all (openssl, no server)."""
    directory = tmp_path_factory.mktemp("pems")
    files = make_tls(directory)
    cert, key = make_client_cert(files)
    (directory / "both.pem").write_bytes(cert.read_bytes() + key.read_bytes())
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:pw",
                    "-out", str(directory / "encrypted.key")], check=True, capture_output=True)
    (directory / "junk.pem").write_text("not a certificate\n")
    return directory


def test_ssl_files_resolved_against_the_config_directory(pems: Path) -> None:
    doc = mk({"kafka.security_protocol": "SSL", "kafka.ssl.cafile": "ca.pem",
              "kafka.ssl.certfile": "both.pem"})
    jsonschema.validate(doc, SCHEMA)
    ssl = parse(doc, base_dir=pems).kafka.ssl
    assert ssl == KafkaSsl(str(pems / "ca.pem"), str(pems / "both.pem"), None)


TLS_FILE_MISTAKES = [
    ({"cafile": "junk.pem"}, "cafile: {d}/junk.pem holds no PEM certificate"),
    ({"cafile": "client.key"}, "cafile: {d}/client.key holds no PEM certificate"),
    ({"certfile": "junk.pem"}, "certfile: {d}/junk.pem holds no PEM certificate"),
    ({"certfile": "client.pem"},
     "certfile: {d}/client.pem holds no PEM private key; name it in keyfile"),
    ({"certfile": "client.pem", "keyfile": "junk.pem"},
     "keyfile: {d}/junk.pem holds no PEM private key"),
    ({"certfile": "client.pem", "keyfile": "server.key"},
     "keyfile: {d}/server.key is not the key of certfile {d}/client.pem"),
    ({"certfile": "client.pem", "keyfile": "encrypted.key"},
     "keyfile: its private key is encrypted; give it unencrypted, readable by the bridge only"),
]


@pytest.mark.parametrize("block", ["zookeeper.tls", "kafka.ssl"])
@pytest.mark.parametrize(("files", "line"), TLS_FILE_MISTAKES,
                         ids=[line.split("{d}/")[-1] for _, line in TLS_FILE_MISTAKES])
def test_tls_files_that_would_fail_every_handshake(
    pems: Path, block: str, files: dict[str, str], line: str,
) -> None:
    doc = mk({block: files} | (SSL if block == "kafka.ssl" else {}))
    assert problems(doc, base_dir=pems) == [f"{block}.{line.format(d=pems)}"]
    good = {"cafile": "ca.pem", "certfile": "client.pem", "keyfile": "client.key"}
    parse(mk({block: good} | (SSL if block == "kafka.ssl" else {})), base_dir=pems)


# --------------------------------------------------------------------------- files


def test_unreadable_files(tmp_path: Path) -> None:
    for path, why in [(tmp_path / "no", NO), (tmp_path, "Is a directory")]:
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert info.value.problems == [f"{path}: cannot read: {why}"]


@pytest.mark.parametrize(
    ("text", "line"),
    [  # The line and column of a syntax error, never the text (it could hold a secret).
        ("region: us-east\nzookeeper:\n  hosts: [a\n  password: hunter2\n",
         "invalid YAML at line 4, column 11: expected ',' or ']', but got ':'"),
        ("region: us-east\nzookeeper:\n\thosts: zk\n",
         "invalid YAML at line 3, column 1: found character '\\t' that cannot start any token"),
        ("region: !!python/object/apply:os.system ['true']\n",
         "invalid YAML at line 1, column 9: could not determine a constructor for the tag"
         " 'tag:yaml.org,2002:python/object/apply:os.system'"),
        ("", "must be a mapping of settings, got an empty document"),
        ("- a\n- b\n", "must be a mapping of settings, got a list"),
        ("just text\n", "must be a mapping of settings, got a str"),
    ],
)
def test_bad_documents(tmp_path: Path, text: str, line: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.problems == [f"{path}: {line}"]


def test_parse_settings_non_mapping() -> None:
    assert problems(["region"]) == ["config: must be a mapping of settings, got a list"]


def test_duplicate_keys_reported_with_other_problems(tmp_path: Path) -> None:
    text = yaml.safe_dump(mk({"heartbeat_interval": 0}), sort_keys=False)
    path = write(tmp_path, text + "region: us-east\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.problems == [
        f"{path}: duplicate key region at line {text.count(chr(10)) + 1}, column 1",
        "heartbeat_interval: must be greater than 0",
    ]


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = write(tmp_path, "region: us-east\n"
                 "zookeeper:\n  <<: {hosts: 'zk0:2181', session_timeout: 3}\n  hosts: 'zk1:2181'\n"
                 "kafka: {bootstrap_servers: 'k:9092'}\npeers: []\nsubtrees: [{name: a, path: /a}]")
    settings = load_settings(path, env={})
    assert (settings.zookeeper.hosts, settings.zookeeper.session_timeout) == ("zk1:2181", 3.0)


# --------------------------------------------------------------------------- generated copies


def test_committed_copies_are_generated(capsys: pytest.CaptureFixture[str]) -> None:
    assert configdoc.main(["--check"]) == 0, "run: python -m bridge.configdoc --write"
    assert capsys.readouterr().out == ""  # nothing stale, so nothing listed
    assert configdoc.main([]) == 0
    assert json.loads(capsys.readouterr().out) == SCHEMA
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def leaf_keys(kind: Any = Settings, prefix: str = "") -> set[str]:
    """Every key a document may hold, from the settings classes themselves."""
    keys: set[str] = set()
    for name, hint in get_type_hints(kind).items():
        if name in {"source", "metrics_listen", "log_format", "log_level"}:
            continue
        hint = hint.type if isinstance(hint, dataclasses.InitVar) else hint
        section = next((t for t in (hint, *get_args(hint)) if dataclasses.is_dataclass(t)), None)
        key = f"{prefix}{name}"
        if section is None:
            keys.add(key)
        else:
            keys |= leaf_keys(section, f"{key}[]." if name == "subtrees" else f"{key}.")
    return keys


def test_readme_table_one_row_per_key_with_default_and_reload() -> None:
    rows = {
        cells[0].strip("`"): cells[1:]
        for line in configdoc.table().splitlines()[2:]
        for cells in [[c.strip() for c in line.strip("|").split(" | ")]]
    }
    assert set(rows) == leaf_keys()
    assert all(meaning for _, _, meaning in rows.values())
    assert rows["region"][0] == "required"
    assert rows["max_clock_skew"][:2] == ["`60`", "live"]
    assert rows["subtrees[].acl"][:2] == ["`copy`", "restart"]
    assert rows["zookeeper.auth.credential"][0] == "—"
    # The keys a SIGHUP applies (Bridge.reload); every other key needs a restart.
    assert {key for key, (_, reload, _) in rows.items() if reload == "live"} == {
        "heartbeat_interval", "audit_interval", "max_clock_skew", "tombstone_grace",
        "conflict_policy", "mass_delete.max_ratio", "mass_delete.min_nodes", "log.format",
        "log.level", "subtrees[].exclude", "outbox_max_mb"}
    # The full example shows every key that has a default (optional blocks are comments).
    example = yaml.safe_load((ROOT / "schemas" / "examples" / "region-us-east.yaml").read_text())
    for key, (default, _, _) in rows.items():
        *sections, name = key.replace("[]", ".0").split(".")
        node = example
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else node[int(part)]
        if node is not None and default not in ("required", "—"):
            assert name in node, f"{key} missing in the example"


def test_tombstone_grace_must_exceed_the_clock_skew() -> None:
    assert problems(mk({"max_clock_skew": 30, "tombstone_grace": 10})) == [
        "tombstone_grace: must be greater than max_clock_skew (30)"]
    assert parse(mk({"max_clock_skew": 30, "tombstone_grace": 31})).tombstone_grace == 31.0
    assert parse(mk()).tombstone_grace == 7 * 24 * 3600
