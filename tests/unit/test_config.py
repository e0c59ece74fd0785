"""Configuration loading: every rule yields its exact problem line, all problems at once;
the committed JSON schema and README table are what the settings classes generate."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from bridge import configdoc
from bridge.config import (
    KafkaSettings,
    MassDeleteSettings,
    Settings,
    SubtreeSettings,
    ZooKeeperSettings,
    describe,
    load_settings,
    parse_settings,
    reloaded,
)
from bridge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "schemas" / "config.schema.json").read_text())
EXAMPLES = sorted((ROOT / "schemas" / "examples").glob("region-*.yaml"))

DELETE = object()


def base() -> dict[str, Any]:
    return {
        "region": "us-east",
        "zookeeper": {"hosts": "127.0.0.1:2181"},
        "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
        "peers": ["eu-west", "ap-south"],
        "subtrees": [{"name": "critical", "path": "/critical"}],
    }


_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def edit(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``doc`` with each ``a.b[0].c`` key path set (or removed with DELETE)."""
    doc = copy.deepcopy(doc)
    for key_path, value in changes.items():
        steps: list[str | int] = [
            name if name else int(index) for name, index in _STEP.findall(key_path)
        ]
        target: Any = doc
        for step in steps[:-1]:
            if isinstance(step, str) and step not in target:
                target[step] = {}
            target = target[step]
        if value is DELETE:
            del target[steps[-1]]
        else:
            target[steps[-1]] = value
    return doc


def mk(**changes: Any) -> dict[str, Any]:
    """Base document with changes; ``a__b__0__c`` in a keyword stands for ``a.b[0].c``."""
    return edit(
        base(),
        {re.sub(r"__(\d+)", r"[\1]", k).replace("__", "."): v for k, v in changes.items()},
    )


def problems(
    doc: object, env: dict[str, str] | None = None, base_dir: Path = Path("/nonexistent")
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(doc, base_dir, env or {})
    assert str(info.value) == "; ".join(info.value.problems)
    return info.value.problems


def parse(doc: object, env: dict[str, str] | None = None, base_dir: Path = ROOT) -> Settings:
    return parse_settings(doc, base_dir, env or {})


# --------------------------------------------------------------------------- good documents


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    settings = load_settings(path, env={})
    region = path.stem.removeprefix("region-")
    assert settings.region == region
    assert settings.source == str(path)
    assert settings.subtree("critical").path == "/critical"
    assert set(settings.peers) == {"us-east", "eu-west", "ap-south"} - {region}
    assert f"publishes to zkbridge.critical.{region}" in describe(settings)


def test_examples_are_one_federation() -> None:
    regions = {load_settings(p, env={}).region for p in EXAMPLES}
    assert regions == {"us-east", "eu-west", "ap-south"}
    hosts = {load_settings(p, env={}).zookeeper.hosts for p in EXAMPLES}
    assert len(hosts) == 3  # each region has its own ensemble


def test_minimal_document_gets_defaults() -> None:
    settings = parse(base())
    assert settings == Settings(
        region="us-east",
        zookeeper=ZooKeeperSettings(hosts="127.0.0.1:2181"),
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9092"),
        peers=("eu-west", "ap-south"),
        subtrees=(SubtreeSettings(name="critical", path="/critical"),),
    )
    assert settings.state_path == "/zkbridge"
    assert settings.kafka.topic_prefix == "zkbridge"
    assert settings.mass_delete == MassDeleteSettings(0.5, 20)
    assert settings.max_clock_skew == 60.0
    assert settings.subtrees[0].acl == "copy"
    assert (settings.metrics_listen, settings.log_format, settings.log_level) == (
        None,
        "auto",
        "info",
    )
    assert settings.source == ""


def test_full_document_values() -> None:
    doc = mk(
        zookeeper__session_timeout=20,
        zookeeper__connect_timeout=2.5,
        kafka__topic_prefix="prod_zk-bridge.v1",
        kafka__enable_idempotence=False,
        kafka__replication_factor=3,
        kafka__request_timeout=10,
        state_path="/ops/zkbridge",
        heartbeat_interval=0.5,
        max_clock_skew=2,
        max_data_bytes=1,
        mass_delete={"max_ratio": 1, "min_nodes": 0},
        metrics={"listen": "[::1]:9464"},
        log={"format": "json", "level": "debug"},
        peers=[],
    )
    doc["subtrees"] = [
        {"name": "critical", "path": "/critical", "exclude": ["/tmp", "/locks/a"]},
        {"name": "flags_2", "path": "/zookeeperish/flags", "acl": "open"},
    ]
    jsonschema.validate(doc, SCHEMA)
    s = parse(doc)
    assert s.zookeeper.session_timeout == 20.0
    assert isinstance(s.zookeeper.session_timeout, float)
    assert s.zookeeper.connect_timeout == 2.5
    assert s.kafka.topic_prefix == "prod_zk-bridge.v1"
    assert s.kafka.enable_idempotence is False
    assert s.kafka.replication_factor == 3
    assert s.kafka.request_timeout == 10.0
    assert s.peers == ()
    assert s.subtrees[0].exclude == ("/tmp", "/locks/a")
    assert s.subtree("flags_2").path == "/zookeeperish/flags"
    assert s.state_path == "/ops/zkbridge"
    assert s.heartbeat_interval == 0.5
    assert s.max_clock_skew == 2.0
    assert isinstance(s.max_clock_skew, float)
    assert [st.acl for st in s.subtrees] == ["copy", "open"]
    assert s.max_data_bytes == 1
    assert s.mass_delete == MassDeleteSettings(1.0, 0)
    assert s.metrics_listen == "[::1]:9464"
    assert (s.log_format, s.log_level) == ("json", "debug")


def test_settings_are_frozen_with_tuples() -> None:
    s = parse(base())
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.region = "eu-west"  # type: ignore[misc]
    assert isinstance(s.peers, tuple)
    assert isinstance(s.subtrees, tuple)
    assert isinstance(s.subtrees[0].exclude, tuple)


def test_replace_keeps_the_flat_names_the_engine_uses() -> None:
    # Bridge.reload builds the running settings this way on SIGHUP.
    old = parse(mk(log={"format": "json"}, metrics={"listen": "127.0.0.1:9464"}))
    new = dataclasses.replace(old, log_level="debug", max_clock_skew=5.0)
    assert (new.log_format, new.log_level, new.max_clock_skew) == ("json", "debug", 5.0)
    assert new.metrics_listen == "127.0.0.1:9464"
    assert dataclasses.replace(new, log_level="info", max_clock_skew=60.0) == old


@pytest.mark.parametrize("key", ["log_format", "log_level", "metrics_listen", "source"])
def test_runtime_names_are_not_document_keys(key: str) -> None:
    assert problems(mk(**{key: "json"})) == [f"{key}: unknown key"]


def test_reload_applies_live_keys_and_keeps_the_rest() -> None:
    old = parse(base())
    assert reloaded(old, parse(base())) == (old, [], [])
    new = parse(
        mk(
            heartbeat_interval=1,
            max_clock_skew=5,
            log={"level": "debug"},
            mass_delete={"min_nodes": 3},
            subtrees__0__exclude=["/tmp"],
        )
    )
    running, applied, restart = reloaded(old, new)
    assert running == new
    assert applied == [
        "heartbeat_interval",
        "max_clock_skew",
        "mass_delete",
        "log_level",
        "subtrees[critical].exclude",
    ]
    assert restart == []


def test_reload_leaves_restart_keys_alone() -> None:
    old = parse(base())
    new = parse(
        mk(
            region="us-west",
            zookeeper__session_timeout=3,
            metrics={"listen": "127.0.0.1:9464"},
            subtrees__0__acl="open",
            subtrees__0__exclude=["/tmp"],
            conflict_policy="lww",
        ),
    )
    running, applied, restart = reloaded(old, new)
    assert running == old
    assert applied == []
    assert restart == ["region", "zookeeper", "metrics_listen", "subtrees"]


def test_subtree_lookup() -> None:
    s = parse(base())
    assert s.subtree("critical").name == "critical"
    with pytest.raises(KeyError):
        s.subtree("missing")


def test_hosts_accept_lists_ipv6_and_default_ports() -> None:
    s = parse(mk(zookeeper__hosts="zk1:2181,zk2,[::1]:2181", kafka__bootstrap_servers="k1"))
    assert s.zookeeper.hosts == "zk1:2181,zk2,[::1]:2181"


def test_describe_summarises_without_secrets() -> None:
    doc = mk(
        kafka__security_protocol="SASL_PLAINTEXT",
        kafka__sasl={"mechanism": "PLAIN", "username": "bridge", "password": "hunter2"},
        kafka__topic_prefix="fed",
    )
    doc["subtrees"][0]["exclude"] = ["/tmp"]
    text = describe(parse(doc))
    assert "region us-east" in text
    assert "peers: eu-west, ap-south" in text
    assert "critical at /critical (excluding /tmp)" in text
    assert "publishes to fed.critical.us-east" in text
    assert "consumes fed.critical.eu-west, fed.critical.ap-south" in text
    assert "hunter2" not in text


# --------------------------------------------------------------------------- structure


def test_empty_mapping_reports_every_required_key() -> None:
    assert problems({}) == [
        "region: required",
        "zookeeper: required",
        "kafka: required",
        "peers: required",
        "subtrees: required",
    ]


REGION_RULE = "must be 1-32 characters of a-z, 0-9 or '-'"
NAME_RULE = "must use only a-z, 0-9, '_' or '-'"
PREFIX_RULE = "must use only A-Z, a-z, 0-9, '.', '_' or '-' and not start with '.'"
HOSTS_RULE = "must be a comma-separated list of host or host:port (no spaces, no chroot)"
RF_RULE = "must be -1 (broker default) or at least 1"
SASL_ONLY = "only allowed with security_protocol SASL_PLAINTEXT or SASL_SSL"
SASL = {"mechanism": "PLAIN", "username": "u", "password": "p"}
PATH_CASES = [
    ("critical", "must be absolute"),
    ("", "must not be empty"),
    ("/", "must not be /"),
    ("/critical/", "must not end with '/'"),
    ("/a//b", "must not contain '//'"),
    ("/a/./b", "must not contain '.' or '..' components"),
    ("/a/..", "must not contain '.' or '..' components"),
    ("/a\x00b", "must not contain NUL or other characters ZooKeeper rejects"),
    ("/a\x07b", "must not contain NUL or other characters ZooKeeper rejects"),
]
MOUNT_CASES = [
    *PATH_CASES,
    ("/zookeeper", "must not be /zookeeper or below it (reserved by ZooKeeper)"),
    ("/zookeeper/quota", "must not be /zookeeper or below it (reserved by ZooKeeper)"),
]
HOST_CASES = [
    ("zk1:2181, zk2:2181", HOSTS_RULE),
    ("zk1:2181,", HOSTS_RULE),
    ("zk1:2181/chroot", HOSTS_RULE),
    ("zk1:port", HOSTS_RULE),
    ("zk1:70000", "port 70000 is out of range 1-65535"),
    ("zk1:0", "port 0 is out of range 1-65535"),
]


def two_mounts(first: str, second: str) -> dict[str, Any]:
    return {"subtrees": [{"name": "critical", "path": first}, {"name": "other", "path": second}]}


# The base document with one mistake, and the one line the loader must print for it.
ONE_MISTAKE: list[tuple[dict[str, Any], str]] = [
    # required keys below the top level
    ({"zookeeper.hosts": DELETE}, "zookeeper.hosts: required"),
    ({"kafka.bootstrap_servers": DELETE}, "kafka.bootstrap_servers: required"),
    ({"subtrees[0].name": DELETE}, "subtrees[0].name: required"),
    ({"subtrees[0].path": DELETE}, "subtrees[0].path: required"),
    # types
    ({"region": 5}, "region: must be a string"),
    ({"region": None}, "region: must be a string"),
    ({"heartbeat_interval": "5"}, "heartbeat_interval: must be a number"),
    ({"heartbeat_interval": True}, "heartbeat_interval: must be a number"),
    ({"max_clock_skew": "60s"}, "max_clock_skew: must be a number"),
    ({"max_clock_skew": float("nan")}, "max_clock_skew: must be a finite number"),
    ({"zookeeper.session_timeout": False}, "zookeeper.session_timeout: must be a number"),
    (
        {"zookeeper.session_timeout": float("inf")},
        "zookeeper.session_timeout: must be a finite number",
    ),
    ({"max_data_bytes": 1.5}, "max_data_bytes: must be an integer"),
    ({"kafka.replication_factor": True}, "kafka.replication_factor: must be an integer"),
    ({"kafka.enable_idempotence": "yes"}, "kafka.enable_idempotence: must be a boolean"),
    ({"kafka.enable_idempotence": 1}, "kafka.enable_idempotence: must be a boolean"),
    ({"zookeeper": ["127.0.0.1:2181"]}, "zookeeper: must be a mapping"),
    ({"kafka": None}, "kafka: must be a mapping"),
    ({"mass_delete": 0.5}, "mass_delete: must be a mapping"),
    ({"peers": "eu-west"}, "peers: must be a list"),
    ({"peers[0]": 1}, "peers[0]: must be a string"),
    ({"subtrees": {"name": "critical"}}, "subtrees: must be a list"),
    ({"subtrees[0]": "/critical"}, "subtrees[0]: must be a mapping"),
    ({"subtrees[0].exclude": "/tmp"}, "subtrees[0].exclude: must be a list"),
    ({"subtrees[0].exclude": [7]}, "subtrees[0].exclude[0]: must be a string"),
    ({"zookeeper.hosts": ""}, "zookeeper.hosts: must not be empty"),
    ({"metrics": {"listen": 9464}}, "metrics.listen: must be a string"),
    # ranges
    ({"zookeeper.session_timeout": 0}, "zookeeper.session_timeout: must be greater than 0"),
    ({"zookeeper.session_timeout": -1}, "zookeeper.session_timeout: must be greater than 0"),
    ({"zookeeper.session_timeout": 600.5}, "zookeeper.session_timeout: must be at most 600"),
    ({"zookeeper.connect_timeout": 0}, "zookeeper.connect_timeout: must be greater than 0"),
    ({"kafka.request_timeout": -3}, "kafka.request_timeout: must be greater than 0"),
    ({"heartbeat_interval": 0}, "heartbeat_interval: must be greater than 0"),
    ({"max_clock_skew": 0}, "max_clock_skew: must be greater than 0"),
    ({"max_clock_skew": -0.5}, "max_clock_skew: must be greater than 0"),
    ({"max_data_bytes": 0}, "max_data_bytes: must be at least 1"),
    ({"max_data_bytes": 1_000_001}, "max_data_bytes: must be at most 1000000"),
    ({"mass_delete": {"max_ratio": 0}}, "mass_delete.max_ratio: must be greater than 0"),
    ({"mass_delete": {"max_ratio": 1.01}}, "mass_delete.max_ratio: must be at most 1"),
    ({"mass_delete": {"min_nodes": -1}}, "mass_delete.min_nodes: must be at least 0"),
    ({"kafka.replication_factor": 0}, f"kafka.replication_factor: {RF_RULE}"),
    ({"kafka.replication_factor": -2}, f"kafka.replication_factor: {RF_RULE}"),
    # enumerations
    ({"conflict_policy": "first-wins"}, "conflict_policy: must be one of lww"),
    ({"subtrees[0].acl": "none"}, "subtrees[0].acl: must be one of copy, open"),
    ({"subtrees[0].acl": None}, "subtrees[0].acl: must be one of copy, open"),
    ({"log": {"format": "text"}}, "log.format: must be one of auto, json, console"),
    ({"log": {"level": "INFO"}}, "log.level: must be one of debug, info, warning, error"),
    (
        {"kafka.security_protocol": "TLS"},
        "kafka.security_protocol: must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
    ),
    (
        {"zookeeper.auth": {"scheme": "sasl", "credential": "u:p"}},
        "zookeeper.auth.scheme: must be one of digest",
    ),
    # names
    *(
        ({"region": v}, f"region: {REGION_RULE}")
        for v in ["US-East", "us_east", "a" * 33, "us east"]
    ),
    ({"peers": ["eu-west", "EU"]}, f"peers[1]: {REGION_RULE}"),
    ({"peers": ["eu-west", "ap-south", "eu-west"]}, "peers[2]: duplicate of peers[0]"),
    ({"peers": ["eu-west", "us-east"]}, "peers[1]: must not be this bridge's own region us-east"),
    ({"subtrees": []}, "subtrees: must not be empty"),
    *(
        ({"subtrees[0].name": v}, f"subtrees[0].name: {NAME_RULE}")
        for v in ["Critical", "crit.ical", "a b", "é"]
    ),
    (
        two_mounts("/critical", "/other") | {"subtrees[1].name": "critical"},
        "subtrees[1].name: duplicate of subtrees[0].name",
    ),
    *(
        ({"kafka.topic_prefix": v}, f"kafka.topic_prefix: {PREFIX_RULE}")
        for v in [".zkbridge", "zk bridge", "zk/bridge", "zk:b"]
    ),
    # addresses
    *(({"zookeeper.hosts": v}, f"zookeeper.hosts: {m}") for v, m in HOST_CASES),
    *(({"kafka.bootstrap_servers": v}, f"kafka.bootstrap_servers: {m}") for v, m in HOST_CASES),
    ({"metrics": {"listen": "9464"}}, "metrics.listen: must be host:port"),
    ({"metrics": {"listen": ":9464"}}, "metrics.listen: must be host:port"),
    ({"metrics": {"listen": "localhost"}}, "metrics.listen: must be host:port"),
    (
        {"metrics": {"listen": "127.0.0.1:65536"}},
        "metrics.listen: port 65536 is out of range 1-65535",
    ),
    # paths
    *(({"subtrees[0].path": v}, f"subtrees[0].path: {m}") for v, m in MOUNT_CASES),
    *(({"state_path": v}, f"state_path: {m}") for v, m in MOUNT_CASES),
    *(({"subtrees[0].exclude": ["/ok", v]}, f"subtrees[0].exclude[1]: {m}") for v, m in PATH_CASES),
    (
        {"subtrees[0].exclude": ["/tmp", "/locks", "/tmp"]},
        "subtrees[0].exclude[2]: duplicate of subtrees[0].exclude[0]",
    ),
    *(
        (two_mounts(a, b), f"subtrees[1].path: {b} overlaps subtrees[0].path {a}")
        for a, b in [
            ("/critical", "/critical"),
            ("/critical", "/critical/sub"),
            ("/critical/sub", "/critical"),
        ]
    ),
    *(
        ({"subtrees[0].path": m, "state_path": s}, f"subtrees[0].path: {m} overlaps state_path {s}")
        for m, s in [
            ("/zkbridge", "/zkbridge"),
            ("/zkbridge/data", "/zkbridge"),
            ("/ops", "/ops/zkbridge"),
        ]
    ),
    # kafka security
    (
        {"kafka.security_protocol": "SASL_SSL"},
        "kafka.sasl: required when security_protocol is SASL_SSL",
    ),
    (
        {"kafka.security_protocol": "SASL_PLAINTEXT"},
        "kafka.sasl: required when security_protocol is SASL_PLAINTEXT",
    ),
    ({"kafka.sasl": SASL}, f"kafka.sasl: {SASL_ONLY}"),
    ({"kafka.sasl": SASL, "kafka.security_protocol": "PLAINTEXT"}, f"kafka.sasl: {SASL_ONLY}"),
    ({"kafka.sasl": SASL, "kafka.security_protocol": "SSL"}, f"kafka.sasl: {SASL_ONLY}"),
    *(
        (
            {"kafka.security_protocol": p, "kafka.ssl": {}}
            | ({"kafka.sasl": SASL} if "SASL" in p else {}),
            "kafka.ssl: only allowed with security_protocol SSL or SASL_SSL",
        )
        for p in ["PLAINTEXT", "SASL_PLAINTEXT"]
    ),
]


@pytest.mark.parametrize(("changes", "line"), ONE_MISTAKE, ids=[line for _, line in ONE_MISTAKE])
def test_one_mistake_one_line(changes: dict[str, Any], line: str) -> None:
    assert problems(edit(base(), changes)) == [line]


@pytest.mark.parametrize(
    "key",
    [
        "colour",
        "zookeeper.sesion_timeout",
        "zookeeper.auth.user",
        "kafka.foo",
        "kafka.ssl.ca_file",
        "kafka.sasl.pass",
        "subtrees[0].excludes",
        "mass_delete.ratio",
        "metrics.port",
        "log.lvl",
    ],
)
def test_unknown_keys_at_every_level(key: str) -> None:
    # Give the enclosing blocks valid content so the unknown key is the only problem.
    doc = mk(
        zookeeper__auth={"credential": "u:p"},
        kafka__security_protocol="SASL_SSL",
        kafka__ssl={},
        kafka__sasl={"mechanism": "PLAIN", "username": "u", "password": "p"},
        mass_delete={},
        metrics={},
        log={},
    )
    assert problems(edit(doc, {key: 1})) == [f"{key}: unknown key"]


def test_non_string_key_is_unknown() -> None:
    doc: dict[Any, Any] = base()
    doc[True] = 1  # YAML 1.1 reads a bare ``on:`` or ``yes:`` key as true
    assert problems(doc) == ["True: unknown key"]


def test_numeric_bounds_are_inclusive_where_documented() -> None:
    s = parse(mk(zookeeper__session_timeout=600, mass_delete={"max_ratio": 1}))
    assert s.zookeeper.session_timeout == 600.0
    assert s.mass_delete.max_ratio == 1.0


# --------------------------------------------------------------------------- names


def test_region_of_32_characters_is_fine() -> None:
    assert parse(mk(region="a" * 32)).region == "a" * 32


def test_peers_may_be_empty() -> None:
    assert parse(mk(peers=[])).peers == ()


def test_topic_name_length_limit() -> None:
    name = "n" * 240
    doc = mk(kafka__topic_prefix="zkbridge")
    doc["subtrees"][0]["name"] = name
    topic = f"zkbridge.{name}.ap-south"  # the longest of the region and its peers
    assert problems(doc) == [
        f"subtrees[0].name: topic {topic} is longer than Kafka's limit of 249 characters"
    ]


# --------------------------------------------------------------------------- addresses


def test_metrics_block_without_listen_means_no_endpoint() -> None:
    assert parse(mk(metrics={})).metrics_listen is None


# --------------------------------------------------------------------------- paths


def test_exclude_is_relative_to_the_mount_so_zookeeper_is_allowed() -> None:
    assert parse(mk(subtrees__0__exclude=["/zookeeper"])).subtrees[0].exclude == ("/zookeeper",)


def test_sibling_prefix_is_not_overlap() -> None:
    doc = mk()
    doc["subtrees"].append({"name": "other", "path": "/criticality"})
    assert len(parse(doc).subtrees) == 2


def test_every_overlap_is_reported() -> None:
    doc = mk()
    doc["subtrees"] += [
        {"name": "a", "path": "/critical/a"},
        {"name": "b", "path": "/critical/a/b"},
    ]
    assert problems(doc) == [
        "subtrees[1].path: /critical/a overlaps subtrees[0].path /critical",
        "subtrees[2].path: /critical/a/b overlaps subtrees[0].path /critical",
        "subtrees[2].path: /critical/a/b overlaps subtrees[1].path /critical/a",
    ]


# --------------------------------------------------------------------------- secrets


def test_zookeeper_credential_inline() -> None:
    auth = parse(mk(zookeeper__auth={"credential": "bridge:s3cret"})).zookeeper.auth
    assert auth is not None
    assert (auth.scheme, auth.credential) == ("digest", "bridge:s3cret")


def test_credential_file_relative_to_config_dir_and_newline_stripped(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "zk.secret").write_text("bridge:s3cret\n")
    (tmp_path / "kafka.pw").write_text("pw with spaces \r\n")
    doc = mk(
        zookeeper__auth={"scheme": "digest", "credential_file": "secrets/zk.secret"},
        kafka__security_protocol="SASL_SSL",
        kafka__sasl={"mechanism": "SCRAM-SHA-512", "username": "u", "password_file": "kafka.pw"},
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    s = load_settings(config, env={})
    assert s.zookeeper.auth is not None
    assert s.zookeeper.auth.credential == "bridge:s3cret"
    assert s.kafka.sasl is not None
    assert s.kafka.sasl.password == "pw with spaces "


def test_absolute_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("p4ss")
    doc = mk(
        kafka__security_protocol="SASL_PLAINTEXT",
        kafka__sasl={"mechanism": "PLAIN", "username": "u", "password_file": str(secret)},
    )
    sasl = parse(doc, base_dir=Path("/elsewhere")).kafka.sasl
    assert sasl is not None
    assert sasl.password == "p4ss"


def test_secrets_from_environment() -> None:
    doc = mk(
        zookeeper__auth={"credential_env": "ZKB_ZK"},
        kafka__security_protocol="SASL_SSL",
        kafka__sasl={"mechanism": "SCRAM-SHA-256", "username": "u", "password_env": "ZKB_PW"},
    )
    jsonschema.validate(doc, SCHEMA)
    s = parse(doc, env={"ZKB_ZK": "bridge:zz", "ZKB_PW": "kafka-pw"})
    assert s.zookeeper.auth is not None
    assert s.zookeeper.auth.credential == "bridge:zz"
    assert s.kafka.sasl is not None
    assert s.kafka.sasl.password == "kafka-pw"


def test_load_settings_defaults_to_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZKB_TEST_ZK_AUTH", "bridge:from-env")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(mk(zookeeper__auth={"credential_env": "ZKB_TEST_ZK_AUTH"})))
    auth = load_settings(str(config)).zookeeper.auth
    assert auth is not None
    assert auth.credential == "bridge:from-env"


@pytest.mark.parametrize(
    ("auth", "env", "line"),
    [
        (
            {"scheme": "digest"},
            {},
            "zookeeper.auth: one of credential, credential_file, credential_env is required",
        ),
        (
            {"credential": "u:p", "credential_env": "X"},
            {"X": "u:p"},
            "zookeeper.auth: only one of credential, credential_file, credential_env may be set,"
            " got credential, credential_env",
        ),
        (
            {"credential_env": "ZKB_ZK"},
            {},
            "zookeeper.auth.credential_env: environment variable ZKB_ZK is not set",
        ),
        (
            {"credential_env": "ZKB_ZK"},
            {"ZKB_ZK": ""},
            "zookeeper.auth.credential_env: environment variable ZKB_ZK is empty",
        ),
        (
            {"credential_env": "1BAD-NAME"},
            {},
            "zookeeper.auth.credential_env: must be an environment variable name",
        ),
        (
            {"credential_file": "/nonexistent/zk.secret"},
            {},
            "zookeeper.auth.credential_file: cannot read /nonexistent/zk.secret:"
            " No such file or directory",
        ),
        ({"credential": 1234}, {}, "zookeeper.auth.credential: must be a string"),
        ({"credential": ""}, {}, "zookeeper.auth.credential: must not be empty"),
    ],
)
def test_zookeeper_secret_problems(auth: dict[str, Any], env: dict[str, str], line: str) -> None:
    assert problems(mk(zookeeper__auth=auth), env=env) == [line]


def test_empty_secret_file(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    doc = mk(zookeeper__auth={"credential_file": "empty"})
    assert problems(doc, base_dir=tmp_path) == [
        f"zookeeper.auth.credential_file: {tmp_path / 'empty'} is empty"
    ]


def test_sasl_password_env_unset() -> None:
    doc = mk(
        kafka__security_protocol="SASL_SSL",
        kafka__sasl={"mechanism": "PLAIN", "username": "u", "password_env": "ZKB_PW"},
    )
    assert problems(doc) == ["kafka.sasl.password_env: environment variable ZKB_PW is not set"]


def test_sasl_password_sources() -> None:
    doc = mk(
        kafka__security_protocol="SASL_SSL",
        kafka__sasl={"mechanism": "PLAIN", "username": "u"},
    )
    assert problems(doc) == ["kafka.sasl: one of password, password_file, password_env is required"]
    doc["kafka"]["sasl"].update(password="a", password_file="b", password_env="C")
    assert problems(doc) == [
        "kafka.sasl: only one of password, password_file, password_env may be set,"
        " got password, password_file, password_env"
    ]


def test_secret_values_never_in_messages_or_repr(tmp_path: Path) -> None:
    (tmp_path / "zk").write_text("nocolonsecret\n")
    doc = mk(
        zookeeper__auth={"credential_file": "zk"},
        kafka__security_protocol="SASL_SSL",
        kafka__sasl={"mechanism": "MD5", "username": "u", "password": "hunter2"},
    )
    lines = problems(doc, base_dir=tmp_path)
    assert lines == [
        "zookeeper.auth.credential_file: a digest credential must have the form user:password",
        "kafka.sasl.mechanism: must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
    ]
    assert not any("nocolonsecret" in line or "hunter2" in line for line in lines)
    ok = mk(
        zookeeper__auth={"credential": "u:zksecret"},
        kafka__security_protocol="SASL_SSL",
        kafka__sasl={"mechanism": "PLAIN", "username": "u", "password": "hunter2"},
    )
    text = repr(parse(ok))
    assert "zksecret" not in text
    assert "hunter2" not in text


# --------------------------------------------------------------------------- kafka security


def test_ssl_files_resolved_and_checked(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("ca")
    (tmp_path / "client.pem").write_text("cert")
    doc = mk(
        kafka__security_protocol="SSL", kafka__ssl={"cafile": "ca.pem", "certfile": "client.pem"}
    )
    jsonschema.validate(doc, SCHEMA)
    ssl = parse(doc, base_dir=tmp_path).kafka.ssl
    assert ssl is not None
    assert (ssl.cafile, ssl.certfile, ssl.keyfile) == (
        str(tmp_path / "ca.pem"),
        str(tmp_path / "client.pem"),
        None,
    )
    bad = mk(kafka__security_protocol="SSL", kafka__ssl={"cafile": "missing.pem"})
    assert problems(bad, base_dir=tmp_path) == [
        f"kafka.ssl.cafile: cannot read {tmp_path / 'missing.pem'}: No such file or directory"
    ]


def test_ssl_keyfile_requires_certfile(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("key")
    doc = mk(kafka__security_protocol="SSL", kafka__ssl={"keyfile": "key.pem"})
    assert problems(doc, base_dir=tmp_path) == ["kafka.ssl.keyfile: requires certfile"]


# --------------------------------------------------------------------------- all at once


def test_every_problem_reported_at_once() -> None:
    doc = {
        "region": "US",
        "zookeeper": {"hosts": "zk1:2181", "sesion_timeout": 5},
        "kafka": {"security_protocol": "SASL_SSL", "topic_prefix": ".x"},
        "peers": ["us-east", "us-east"],
        "subtrees": [
            {"name": "critical", "path": "critical"},
            {"name": "critical", "path": "/a", "exclude": ["tmp"]},
            {"name": "b", "path": "/a/b", "acl": "closed"},
        ],
        "heartbeat_interval": True,
        "max_clock_skew": 0,
        "mass_delete": {"max_ratio": 2},
        "log": {"level": "trace"},
    }
    assert problems(doc, env={}) == [
        f"region: {REGION_RULE}",
        "zookeeper.sesion_timeout: unknown key",
        "kafka.bootstrap_servers: required",
        "kafka.topic_prefix: must use only A-Z, a-z, 0-9, '.', '_' or '-' and not start with '.'",
        "kafka.sasl: required when security_protocol is SASL_SSL",
        "peers[1]: duplicate of peers[0]",
        "subtrees[0].path: must be absolute",
        "subtrees[1].name: duplicate of subtrees[0].name",
        "subtrees[1].exclude[0]: must be absolute",
        "subtrees[2].path: /a/b overlaps subtrees[1].path /a",
        "subtrees[2].acl: must be one of copy, open",
        "heartbeat_interval: must be a number",
        "max_clock_skew: must be greater than 0",
        "mass_delete.max_ratio: must be at most 1",
        "log.level: must be one of debug, info, warning, error",
    ]


# --------------------------------------------------------------------------- files


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings("/nonexistent/config.yaml")
    assert info.value.problems == [
        "/nonexistent/config.yaml: cannot read: No such file or directory"
    ]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    assert info.value.problems == [f"{tmp_path}: cannot read: Is a directory"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_invalid_yaml_names_line_and_column_without_content(tmp_path: Path) -> None:
    path = write(tmp_path, "region: us-east\nzookeeper:\n  hosts: [a\n  password: hunter2\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    (line,) = info.value.problems
    assert line.startswith(f"{path}: invalid YAML at line 4, column ")
    assert "hunter2" not in line


def test_tab_indentation_is_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "region: us-east\nzookeeper:\n\thosts: zk\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.problems == [
        f"{path}: invalid YAML at line 3, column 1:"
        " found character '\\t' that cannot start any token"
    ]


def test_python_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "region: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    (line,) = info.value.problems
    assert line.startswith(f"{path}: invalid YAML at line 1, column 9: ")


@pytest.mark.parametrize(
    ("text", "what"),
    [("", "an empty document"), ("- a\n- b\n", "a list"), ("just text\n", "a str")],
)
def test_document_must_be_a_mapping(tmp_path: Path, text: str, what: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.problems == [f"{path}: must be a mapping of settings, got {what}"]


def test_parse_settings_non_mapping() -> None:
    assert problems(["region"]) == ["config: must be a mapping of settings, got a list"]


def test_duplicate_keys_reported_with_other_problems(tmp_path: Path) -> None:
    text = yaml.safe_dump(mk(region="us-east", heartbeat_interval=0), sort_keys=False)
    path = write(tmp_path, text + "region: us-east\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    line_no = text.count("\n") + 1
    assert info.value.problems == [
        f"{path}: duplicate key region at line {line_no}, column 1",
        "heartbeat_interval: must be greater than 0",
    ]


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "region: us-east\n"
        "zookeeper:\n  <<: {hosts: 'zk0:2181', session_timeout: 3}\n  hosts: 'zk1:2181'\n"
        "kafka: {bootstrap_servers: 'k:9092'}\npeers: []\n"
        "subtrees: [{name: a, path: /a}]\n",
    )
    s = load_settings(path, env={})
    assert s.zookeeper.hosts == "zk1:2181"
    assert s.zookeeper.session_timeout == 3.0


# --------------------------------------------------------------------------- generated copies


def test_committed_schema_is_generated_from_the_settings() -> None:
    committed = (ROOT / "schemas" / "config.schema.json").read_text(encoding="utf-8")
    assert committed == configdoc.schema_text(), "run: python -m bridge.configdoc --write"


def test_readme_table_is_generated_from_the_settings() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert configdoc.readme_with_table(readme) == readme, "run: python -m bridge.configdoc --write"


RUNTIME_ONLY = {"source", "metrics_listen", "log_format", "log_level"}


def leaf_keys(kind: Any = Settings, prefix: str = "") -> set[str]:
    """Every key a document may hold, from the settings classes themselves."""
    keys: set[str] = set()
    for name, hint in typing.get_type_hints(kind).items():
        if name in RUNTIME_ONLY:
            continue
        hint = hint.type if isinstance(hint, dataclasses.InitVar) else hint
        inner = (hint, *typing.get_args(hint))
        section = next((t for t in inner if dataclasses.is_dataclass(t)), None)
        key = f"{prefix}{name}"
        if section is None:
            keys.add(key)
        else:
            keys |= leaf_keys(section, f"{key}[]." if name == "subtrees" else f"{key}.")
    return keys


def table_rows() -> dict[str, list[str]]:
    return {
        cells[0].strip("`"): cells[1:]
        for line in configdoc.table().splitlines()[2:]
        for cells in [[c.strip() for c in line.strip("|").split(" | ")]]
    }


def test_readme_table_has_one_row_per_key() -> None:
    rows = table_rows()
    assert set(rows) == leaf_keys()
    assert "max_clock_skew" in rows
    assert "subtrees[].acl" in rows
    assert all(meaning for _, _, meaning in rows.values())


def test_full_example_shows_every_key_with_a_default() -> None:
    doc = yaml.safe_load((ROOT / "schemas" / "examples" / "region-us-east.yaml").read_text())
    for key, (default, _, _) in table_rows().items():
        *sections, name = key.replace("[]", ".0").split(".")
        node = doc
        for part in sections:  # optional sections (auth, ssl, sasl) are only comments there
            node = node.get(part) if isinstance(node, dict) else node[int(part)]
        if node is not None and default not in ("required", "—"):
            assert name in node, f"{key} missing in the example"


def test_table_shows_defaults_and_reload_behaviour() -> None:
    rows = table_rows()
    assert rows["region"][0] == "required"
    assert rows["max_clock_skew"][:2] == ["`60`", "live"]
    assert rows["subtrees[].acl"][:2] == ["`copy`", "restart"]
    assert rows["zookeeper.auth.credential"][0] == "—"
    # The keys a SIGHUP applies (Bridge.reload); every other key needs a restart.
    live = {key for key, (_, reload, _) in rows.items() if reload == "live"}
    assert live == {
        "heartbeat_interval",
        "max_clock_skew",
        "tombstone_grace",
        "conflict_policy",
        "mass_delete.max_ratio",
        "mass_delete.min_nodes",
        "log.format",
        "log.level",
        "subtrees[].exclude",
    }


def all_objects(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("#", schema), *((f"#/$defs/{k}", v) for k, v in schema["$defs"].items())]


def described(prop: dict[str, Any]) -> bool:
    """A key's description, or for a section the description of the object it refers to."""
    refs = [prop, *prop.get("anyOf", ())]
    return bool(prop.get("description")) or any(
        SCHEMA["$defs"][r["$ref"].rsplit("/", 1)[-1]].get("description")
        for r in refs
        if "$ref" in r
    )


def test_configdoc_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert configdoc.main(["--check"]) == 0
    assert capsys.readouterr().out == ""  # nothing stale, so nothing rewritten or listed
    assert configdoc.main([]) == 0
    assert json.loads(capsys.readouterr().out) == SCHEMA


def test_schema_is_valid_draft_2020_12() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_schema_closed_and_documented_everywhere() -> None:
    for where, node in all_objects(SCHEMA):
        assert node.get("additionalProperties") is False, where
        for name, prop in node["properties"].items():
            assert described(prop), f"{where}/properties/{name}"
    assert "source" not in SCHEMA["properties"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_schema(path: Path) -> None:
    jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)


# One document per kind of constraint the settings classes carry into the schema (the
# loader's exact lines for these are checked above); rules across keys stay loader-only.
SCHEMA_REJECTS: list[dict[str, Any]] = [
    {"region": DELETE},
    {"subtrees[0].path": DELETE},
    {"zookeeper.sesion_timeout": 5},
    {"subtrees[0].mount": "/x"},
    {"region": "US-EAST"},
    {"peers": ["eu-west", "eu-west"]},
    {"subtrees": []},
    {"subtrees[0].name": "Crit"},
    {"subtrees[0].acl": "none"},
    {"heartbeat_interval": True},
    {"max_clock_skew": 0},
    {"zookeeper.session_timeout": 601},
    {"max_data_bytes": 2_000_000},
    {"mass_delete": {"min_nodes": -1}},
    {"kafka.replication_factor": 0},
    {"kafka.enable_idempotence": "yes"},
    {"kafka.topic_prefix": ".zk"},
    {"zookeeper.auth": {"credential_env": "1BAD"}},
    {"log": {"format": "text"}},
]


@pytest.mark.parametrize("changes", SCHEMA_REJECTS, ids=lambda c: ",".join(c))
def test_schema_rejects_what_the_fields_constrain(changes: dict[str, Any]) -> None:
    doc = edit(base(), changes)
    assert problems(doc, env={})
    assert list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(doc))



def test_tombstone_grace_must_exceed_the_clock_skew() -> None:
    assert problems(mk(max_clock_skew=30, tombstone_grace=10)) == [
        "tombstone_grace: must be greater than max_clock_skew (30)"]
    assert parse(mk(max_clock_skew=30, tombstone_grace=31)).tombstone_grace == 31.0
    assert parse(mk()).tombstone_grace == 7 * 24 * 3600
