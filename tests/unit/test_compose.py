"""The compose federation (compose/), checked statically: no Docker engine, no servers.

Nothing here can start a container, so these tests pin what can go wrong
without one: a file a service mounts or builds from is missing, a bridge
config does not load or names a host/port no service provides, Prometheus
scrapes a port the bridge does not listen on, the regions disagree about
peers or topics, or an alert watches a metric the daemon does not export.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import Settings
from bridge.configload import load_settings
from bridge.metrics import exported

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
REGIONS = ("us-east", "eu-west", "ap-south")

BRIDGE_CONFIG = "/etc/zkbridge/zkbridge.yaml"
ALL_CONFIGS = "/etc/zkbridge/all"
# The official zookeeper image's clientPort (its generated zoo.cfg).
ZK_CLIENT_PORT = 2181

# What the daemon exports, with each series' labels (the scrape adds region,
# job and instance to all of them): read from the collector's own table.
METRICS: dict[str, frozenset[str]] = exported()
# Prometheus' own per-target series: the only way to alert on a bridge that
# is down, since a dead bridge exports nothing.
PROMETHEUS_SERIES: dict[str, frozenset[str]] = {"up": frozenset()}
TARGET_LABELS = frozenset({"region", "job", "instance"})


# --------------------------------------------------------------------------- loading


def _yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = _yaml(COMPOSE_FILE)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    return _yaml(COMPOSE_DIR / "prometheus.yml")


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    doc = _yaml(COMPOSE_DIR / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → host path of the service's bind mounts (named volumes left out)."""
    mounts = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), "volumes use the short SRC:DST[:MODE] syntax"
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE_DIR / source).resolve()
    return mounts


def _named_volumes(service: dict[str, Any]) -> list[str]:
    sources = (str(v).split(":")[0] for v in service.get("volumes", []))
    return [s for s in sources if not s.startswith((".", "/"))]


def _bridge_config_path(services: dict[str, dict[str, Any]], region: str) -> Path:
    return _bind_mounts(services[f"bridge-{region}"])[BRIDGE_CONFIG]


@pytest.fixture(scope="module")
def settings(services: dict[str, dict[str, Any]]) -> dict[str, Settings]:
    # An empty environment: the compose configs must not depend on the caller's.
    return {r: load_settings(_bridge_config_path(services, r), env={}) for r in REGIONS}


def _host_port(entry: str) -> tuple[str, int]:
    host, _, port = entry.rpartition(":")
    return host, int(port)


def _listen_port(s: Settings) -> int:
    assert s.metrics_listen is not None, f"{s.region}: metrics.listen must be set"
    return _host_port(s.metrics_listen)[1]


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` → {NAME: (host, port)}."""
    out = {}
    for item in value.split(","):
        name, _, address = item.partition("://")
        out[name] = _host_port(address)
    return out


# --------------------------------------------------------------------------- compose file


def test_every_region_has_its_zookeeper_and_bridge(services: dict[str, dict[str, Any]]) -> None:
    expected = {f"zk-{r}" for r in REGIONS} | {f"bridge-{r}" for r in REGIONS}
    assert expected | {"kafka", "prometheus", "grafana"} == set(services)
    for r in REGIONS:
        assert services[f"zk-{r}"]["image"] == "zookeeper:3.8"
    assert services["kafka"]["image"] == "apache/kafka:3.8.0"
    assert services["prometheus"]["image"].startswith("prom/prometheus")


def test_bind_mounted_files_exist_and_named_volumes_are_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for target, source in _bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"
        for volume in _named_volumes(service):
            assert volume in declared, f"{name}: volume {volume} is not declared"


def test_bridges_build_the_repository_with_compose_dockerfile(
    services: dict[str, dict[str, Any]],
) -> None:
    for r in REGIONS:
        service = services[f"bridge-{r}"]
        build = service["build"]
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == ROOT, "the image installs the project, so the context is the repo"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert service["restart"] == "on-failure"
        # The daemon drains on SIGTERM; docker's default 10 s would cut that short.
        assert service.get("stop_grace_period") == "30s"


@pytest.mark.parametrize("region", REGIONS)
def test_each_bridge_mounts_its_own_config_and_all_of_them(
    services: dict[str, dict[str, Any]], region: str
) -> None:
    mounts = _bind_mounts(services[f"bridge-{region}"])
    assert mounts[BRIDGE_CONFIG] == COMPOSE_DIR / "config" / f"{region}.yaml"
    # `zkbridge verify` inside any bridge needs every region's config.
    every = mounts[ALL_CONFIGS]
    assert sorted(p.name for p in every.glob("*.yaml")) == sorted(f"{r}.yaml" for r in REGIONS)


@pytest.mark.parametrize("region", REGIONS)
def test_bridge_config_names_this_compose_files_services(
    services: dict[str, dict[str, Any]], settings: dict[str, Settings], region: str
) -> None:
    s = settings[region]
    assert s.region == region, "bridge-<region> must run that region's config"

    hosts = [_host_port(h) for h in s.zookeeper.hosts.split(",")]
    assert hosts == [(f"zk-{region}", ZK_CLIENT_PORT)], "only the region's own ensemble"

    kafka_env = services["kafka"]["environment"]
    advertised = _listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    for entry in s.kafka.bootstrap_servers.split(","):
        host, port = _host_port(entry)
        assert host in services, f"bootstrap host {host} is not a compose service"
        # Clients reconnect to the advertised address, so that is what must match.
        assert (host, port) in advertised.values()

    deps = services[f"bridge-{region}"]["depends_on"]
    assert set(deps) == {f"zk-{region}", "kafka"}
    for dep, cond in deps.items():
        assert cond == {"condition": "service_healthy"}
        assert "test" in services[dep]["healthcheck"], f"{dep} needs a healthcheck to wait on"


def test_configs_agree_on_federation(settings: dict[str, Settings]) -> None:
    for region, s in settings.items():
        assert set(s.peers) == set(REGIONS) - {region}
        assert len(s.peers) == len(set(s.peers))
    # Topic names are <prefix>.<subtree>.<region>: a region with another
    # prefix or subtree name would publish where nobody listens.
    assert len({s.kafka.topic_prefix for s in settings.values()}) == 1
    assert len({tuple(sorted(t.name for t in s.subtrees)) for s in settings.values()}) == 1
    assert len({s.kafka.bootstrap_servers for s in settings.values()}) == 1
    for s in settings.values():
        assert [(t.name, t.path) for t in s.subtrees] == [("critical", "/critical")]
        assert s.kafka.enable_idempotence is True, "real Kafka supports the idempotent producer"
        assert s.log_format == "json"


def test_kafka_is_a_single_kraft_node(
    services: dict[str, dict[str, Any]], settings: dict[str, Settings]
) -> None:
    env = {k: str(v) for k, v in services["kafka"]["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    # The image refuses to format KRaft storage without it: a base64 UUID.
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"])

    listeners = _listeners(env["KAFKA_LISTENERS"])
    protocol_map = env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    protocols = dict(item.split(":") for item in protocol_map.split(","))
    assert set(listeners) <= set(protocols), "every listener needs a security protocol"
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners

    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert len(voters) == 1
    node_id, _, address = voters[0].partition("@")
    assert node_id == env["KAFKA_NODE_ID"]
    assert _host_port(address) == ("kafka", listeners[controller][1])

    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    assert controller not in advertised
    for name, (host, port) in advertised.items():
        assert host == "kafka" and listeners[name][1] == port == 9092
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised

    # One broker: any replication factor above 1 makes topic creation fail.
    for key in (
        "KAFKA_DEFAULT_REPLICATION_FACTOR",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_MIN_INSYNC_REPLICAS",
    ):
        assert env[key] == "1", key
    assert int(env["KAFKA_NUM_PARTITIONS"]) >= 1
    for s in settings.values():
        assert s.kafka.replication_factor == 1
    # The bridge creates its topics compacted; auto-creation would not.
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_LOG_DIRS"] in {
        v.split(":")[1] for v in services["kafka"]["volumes"]
    }, "KRaft metadata and topics must live on the volume"


def test_zookeeper_healthcheck_command_is_whitelisted(
    services: dict[str, dict[str, Any]],
) -> None:
    for r in REGIONS:
        service = services[f"zk-{r}"]
        allowed = service["environment"]["ZOO_4LW_COMMANDS_WHITELIST"].split(",")
        probe = " ".join(service["healthcheck"]["test"])
        used = re.search(r"echo (\w+) \|", probe)
        assert used and used.group(1) in allowed
        assert f" {ZK_CLIENT_PORT} " in probe


# --------------------------------------------------------------------------- prometheus


def _relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str]:
    """Apply Prometheus ``replace`` relabel rules (the only action used here)."""
    out = dict(labels)
    for rule in rules:
        assert rule.get("action", "replace") == "replace"
        value = rule.get("separator", ";").join(out.get(s, "") for s in rule["source_labels"])
        # Prometheus anchors relabel regexes at both ends.
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match:
            out[rule["target_label"]] = match.expand(
                re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule.get("replacement", "$1"))
            )
    return out


def test_prometheus_files_are_the_mounted_ones(
    services: dict[str, dict[str, Any]], prometheus_config: dict[str, Any]
) -> None:
    prom = services["prometheus"]
    mounts = _bind_mounts(prom)
    flags = dict(arg.split("=", 1) for arg in prom["command"] if "=" in arg)
    assert mounts[flags["--config.file"]] == COMPOSE_DIR / "prometheus.yml"
    rule_files = prometheus_config["rule_files"]
    assert [mounts[f] for f in rule_files] == [COMPOSE_DIR / "alerts.yml"]


@pytest.mark.parametrize("region", REGIONS)
def test_prometheus_scrapes_each_bridge_on_its_metrics_port(
    prometheus_config: dict[str, Any], settings: dict[str, Settings], region: str
) -> None:
    jobs = [j for j in prometheus_config["scrape_configs"] if j["job_name"] == "zkbridge"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    mine = [t for t in targets if _host_port(t)[0] == f"bridge-{region}"]
    assert [_host_port(t)[1] for t in mine] == [_listen_port(settings[region])]
    # The per-region alerts group by this label.
    labels = _relabel({"__address__": mine[0], "job": "zkbridge"}, job["relabel_configs"])
    assert labels["region"] == region


def test_bridge_listens_where_others_can_scrape(settings: dict[str, Settings]) -> None:
    for s in settings.values():
        assert s.metrics_listen is not None
        host, _ = _host_port(s.metrics_listen)
        assert host == "0.0.0.0", "loopback would hide /metrics from the Prometheus container"


# --------------------------------------------------------------------------- alerts

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![0-9A-Za-z_:.])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right",
                       "offset", "bool", "and", "or", "unless", "atan2", "inf", "nan"})


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (enough PromQL for alert rules)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = _GROUPING.sub("", text)  # label lists of by/without/on/...
    names = set()
    for m in _IDENT.finditer(text):
        if text[m.end():].lstrip().startswith("("):
            continue  # a function call
        if m.group().lower() not in _KEYWORDS:
            names.add(m.group())
    return names


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for labels in _GROUPING.findall(_STRING.sub('""', expr))
        for label in labels.split(",")
        if label.strip()
    }


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('max by (region) (zkbridge_leader) == 0', {"zkbridge_leader"}),
        ('increase(zkbridge_rejected_total{reason="x"}[10m]) > 0', {"zkbridge_rejected_total"}),
        ('rate(a_total[5m] offset 1h) / on(region) group_left(peer) b > 1e3', {"a_total", "b"}),
        ('up{job="zkbridge"} == 0', {"up"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_alerts_only_use_exported_metrics(alert_rules: list[dict[str, Any]]) -> None:
    known = METRICS | PROMETHEUS_SERIES
    assert alert_rules
    for rule in alert_rules:
        used = metric_names(rule["expr"])
        assert used, f"{rule['alert']}: no metric found in {rule['expr']!r}"
        assert used <= set(known), f"{rule['alert']}: unknown metrics {used - set(known)}"


def test_alert_labels_exist_on_the_metrics(alert_rules: list[dict[str, Any]]) -> None:
    known = METRICS | PROMETHEUS_SERIES
    for rule in alert_rules:
        available = set(TARGET_LABELS)
        for name in metric_names(rule["expr"]):
            available |= known.get(name, frozenset())
        groups = grouping_labels(rule["expr"])
        assert groups <= available, f"{rule['alert']}: groups by labels the series lack"
        if groups:
            # An aggregation keeps only its by (...) labels.
            available = groups
        text = " ".join(str(v) for v in rule.get("annotations", {}).values())
        for label in re.findall(r"\$labels\.(\w+)", text):
            assert label in available, f"{rule['alert']}: $labels.{label} is not on the result"
        assert rule.get("labels", {}).get("severity"), f"{rule['alert']}: needs a severity"
        assert rule.get("annotations", {}).get("summary"), f"{rule['alert']}: needs a summary"


def _rule_with(alert_rules: list[dict[str, Any]], expr: str) -> dict[str, Any]:
    wanted = " ".join(expr.split())
    found = [r for r in alert_rules if " ".join(r["expr"].split()) == wanted]
    assert len(found) == 1, f"no single alert on {expr!r}"
    return found[0]


@pytest.mark.parametrize(
    ("expr", "duration"),
    [
        ("zkbridge_lag_seconds > 60", "5m"),
        ("zkbridge_heartbeat_age_seconds > 30", "2m"),
        ("zkbridge_outbox_depth > 1000", "5m"),
        ("max by (region) (zkbridge_leader) == 0 unless on (region) "
         "max by (region) (zkbridge_starting) == 1", "1m"),
        ("max by (region) (zkbridge_starting) == 1", "15m"),
        ("sum by (region, subtree, reason) (zkbridge_held_back) > 0", "15m"),
        ("zkbridge_oversized > 0", "5m"),
        ("max by (region, topic) (zkbridge_partitions_leaderless) > 0", "2m"),
    ],
)
def test_required_alerts(alert_rules: list[dict[str, Any]], expr: str, duration: str) -> None:
    assert _rule_with(alert_rules, expr)["for"] == duration


def test_rejected_events_alert_fires_on_increase(alert_rules: list[dict[str, Any]]) -> None:
    rules = [r for r in alert_rules if "zkbridge_rejected_total" in metric_names(r["expr"])]
    assert len(rules) == 1
    assert re.search(r"\b(increase|rate)\(zkbridge_rejected_total\[", rules[0]["expr"])


def test_readme_lists_the_metrics_and_says_it_is_untested() -> None:
    text = (COMPOSE_DIR / "README.md").read_text(encoding="utf-8")
    assert "untested here" in text.lower() and "no docker engine" in text.lower()
    for name in METRICS:
        assert f"`{name}`" in text, name
    assert "zkCli.sh create /critical/x hello" in text
    for r in REGIONS:
        assert f"-c {ALL_CONFIGS}/{r}.yaml" in text


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(path: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        yield keyword.upper(), args.strip()
    assert not pending, "dangling line continuation"


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return list(dockerfile_instructions(DOCKERFILE))


def _one(dockerfile: list[tuple[str, str]], keyword: str) -> str:
    found = [args for kw, args in dockerfile if kw == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def test_dockerfile_base_entrypoint_and_cmd(dockerfile: list[tuple[str, str]]) -> None:
    bases = [args.split()[0] for kw, args in dockerfile if kw == "FROM"]
    assert bases and set(bases) == {"python:3.11-slim"}
    assert json.loads(_one(dockerfile, "ENTRYPOINT")) == ["zkbridge"]
    assert json.loads(_one(dockerfile, "CMD")) == ["run", "-c", BRIDGE_CONFIG]
    assert "9464" in _one(dockerfile, "EXPOSE").split()


def test_dockerfile_installs_the_project_without_test_extras(
    dockerfile: list[tuple[str, str]],
) -> None:
    runs = [args for kw, args in dockerfile if kw == "RUN"]
    installs = [r for r in runs if re.search(r"\bpip install\b", r)]
    assert any(re.search(r"\bpip install(?: -[-\w=]+)* \.(?:\s|$)", r) for r in installs)
    assert not any("[test]" in r for r in installs), "the image needs no test extras"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "zkbridge" in pyproject["project"]["scripts"], "ENTRYPOINT is the console script"


def test_dockerfile_runs_as_non_root(dockerfile: list[tuple[str, str]]) -> None:
    # Only the final stage's USER counts: the last one in the file.
    users = [args for kw, args in dockerfile if kw == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user == "zkbridge"
    assert any("useradd" in args and user in args for kw, args in dockerfile if kw == "RUN")


def test_dockerfile_healthcheck_hits_the_configs_metrics_port(
    dockerfile: list[tuple[str, str]], settings: dict[str, Settings]
) -> None:
    check = _one(dockerfile, "HEALTHCHECK")
    url = re.search(r"http://127\.0\.0\.1:(\d+)/healthz", check)
    assert url, check
    # slim has neither: the probe must use the interpreter the image has.
    assert "curl" not in check and "wget" not in check and "urllib" in check
    for s in settings.values():
        assert int(url.group(1)) == _listen_port(s)


def test_build_context_allowlist_covers_the_install() -> None:
    ignore = (COMPOSE_DIR / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "an allowlist: nothing enters the context unless listed"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {p.rstrip("*") for p in packages}
    assert needed <= allowed
    assert (ROOT / "pyproject.toml").is_file() and (ROOT / "bridge").is_dir()


# --------------------------------------------------------------------------- docker CLI

_NO_ENGINE = re.compile(r"Cannot connect to the Docker daemon|docker daemon is not running|"
                        r"error during connect", re.IGNORECASE)


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True,
                             timeout=60, check=False)
    if version.returncode != 0:
        reason = (version.stderr or version.stdout).strip().splitlines()[:1]
        pytest.skip(f"docker compose plugin unavailable: {' '.join(reason)}")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode != 0 and _NO_ENGINE.search(result.stderr):
        pytest.skip(f"docker compose config needs an engine here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr


def test_compose_paths_are_posix_relative(services: dict[str, dict[str, Any]]) -> None:
    # Windows-style or absolute host paths would only work on the author's machine.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert source.startswith("./"), f"{name}: {source} must be relative to compose/"
                assert "\\" not in source, f"{name}: {source} must use /"
