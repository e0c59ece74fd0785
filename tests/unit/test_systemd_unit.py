"""scripts/zkbridge@.service: the settings operators rely on, and systemd's own verdict.

The unit is parsed with a small reader rather than configparser because
systemd allows a key to repeat (ExecReload= twice here) and configparser would
keep only one value. When ``systemd-analyze`` is installed, the unit is also
run through ``verify`` and the offline ``security`` audit.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "scripts" / "zkbridge@.service"
BINARY = "/usr/local/bin/zkbridge"
CONFIG = "/etc/zkbridge/%i.yaml"

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections → (key, value) in file order, repeats kept, continuations joined."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        assert section is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        section.append((key.strip(), value.strip()))
    assert not pending, "dangling line continuation"
    return unit


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times, expected once"
    return found[0]


def test_unit_is_a_template_named_after_the_service() -> None:
    # `zkbridge@us-east` must resolve to this file, with %i = us-east.
    assert UNIT.name == "zkbridge@.service"


def test_parser_keeps_repeated_keys_and_empty_values() -> None:
    parsed = parse_unit("[S]\n# c\nA=1\nA=2\nB=\nC=x\\\n  y\n")
    assert parsed == {"S": [("A", "1"), ("A", "2"), ("B", ""), ("C", "x y")]}


def test_unit_section(unit: Unit) -> None:
    assert value(unit, "Unit", "Description") == "zkbridge federation bridge (%i)"
    docs = values(unit, "Unit", "Documentation")
    assert docs
    for doc in " ".join(docs).split():
        assert re.match(r"(https?|file|man|info):", doc), doc
    assert "network-online.target" in value(unit, "Unit", "After").split()
    assert "network-online.target" in value(unit, "Unit", "Wants").split()
    # systemd only honours the start rate limit in [Unit] (since v230).
    assert int(value(unit, "Unit", "StartLimitIntervalSec")) > 0
    assert int(value(unit, "Unit", "StartLimitBurst")) > 0
    assert not values(unit, "Service", "StartLimitIntervalSec")
    assert not values(unit, "Service", "StartLimitBurst")


SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecStart": f"{BINARY} run -c {CONFIG}",
    "WatchdogSec": "30",
    "Restart": "on-failure",
    "RestartSec": "5",
    "TimeoutStopSec": "30",
    "KillSignal": "SIGTERM",
    "User": "zkbridge",
    "Group": "zkbridge",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "ReadOnlyPaths": "/etc/zkbridge",
}


@pytest.mark.parametrize(("key", "expected"), sorted(SERVICE.items()))
def test_service_setting(unit: Unit, key: str, expected: str) -> None:
    assert value(unit, "Service", key) == expected


def test_address_families_are_exactly_what_the_bridge_needs(unit: Unit) -> None:
    families = value(unit, "Service", "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_environment(unit: Unit) -> None:
    assigned = " ".join(values(unit, "Service", "Environment")).split()
    assert "PYTHONUNBUFFERED=1" in assigned


def test_reload_validates_then_signals_the_main_process(unit: Unit) -> None:
    reload = values(unit, "Service", "ExecReload")
    assert reload[-1] == "/bin/kill -HUP $MAINPID"
    for command in reload[:-1]:
        # Anything run before the signal checks the same file the service reads.
        assert command == f"{BINARY} check-config -c {CONFIG}"


def test_exec_path_comment_tells_where_to_adjust() -> None:
    text = UNIT.read_text(encoding="utf-8")
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert BINARY in comments and "adjust" in comments.lower()


def test_install_section(unit: Unit) -> None:
    assert value(unit, "Install", "WantedBy") == "multi-user.target"


def test_instance_names_a_config_file_under_etc_zkbridge(unit: Unit) -> None:
    start = value(unit, "Service", "ExecStart").replace("%i", "us-east")
    assert start.split() == [BINARY, "run", "-c", "/etc/zkbridge/us-east.yaml"]


# --------------------------------------------------------------------------- systemd-analyze


def _analyzable_copy(tmp_path: Path) -> Path:
    """The unit as zkbridge@test.service, its binary replaced by a stub that exists.

    ``verify`` rejects an ExecStart whose binary is missing, and this machine
    need not have zkbridge installed at /usr/local/bin.
    """
    stub = tmp_path / "zkbridge"
    stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stub.chmod(0o755)
    copy = tmp_path / "zkbridge@test.service"
    copy.write_text(UNIT.read_text(encoding="utf-8").replace(BINARY, str(stub)), encoding="utf-8")
    return copy


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    return tool


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    copy = _analyzable_copy(tmp_path)
    # --man=no: whether the Documentation= man page is installed here is not
    # the unit's problem.
    result = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True,
                            text=True, timeout=60, check=False)
    # verify exits 0 even for unknown keys or unparsable values, and only
    # warns on stderr, naming the file: any such line is a failure.
    complaints = [line for line in result.stderr.splitlines() if copy.name in line]
    assert result.returncode == 0 and not complaints, result.stderr


def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    copy = _analyzable_copy(tmp_path)
    # Exposure is 0.0 (locked down) to 10.0; --threshold is in tenths. 2.5 keeps
    # the sandbox from eroding unnoticed while tolerating scoring changes
    # between systemd versions.
    result = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=25", "--no-pager", str(copy)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if "--offline" in result.stderr or "unrecognized option" in result.stderr:
        pytest.skip(f"this systemd-analyze has no offline security audit: {result.stderr.strip()}")
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert score, result.stdout + result.stderr
    assert result.returncode == 0, f"exposure {score.group(1)} above 2.5\n{result.stdout}"


def test_exit_statuses_an_operator_must_act_on_are_not_restarted(unit: Unit) -> None:
    from bridge.daemon import DUPLICATE_REGION_EXIT, MASS_DELETE_EXIT

    prevented = {int(s) for v in values(unit, "Service", "RestartPreventExitStatus")
                 for s in v.split()}
    # Mass-delete breaker and a second ensemble publishing as this region:
    # a restart cannot fix either, and the duplicate would fight over the topic.
    assert {MASS_DELETE_EXIT, DUPLICATE_REGION_EXIT} <= prevented
    assert len({MASS_DELETE_EXIT, DUPLICATE_REGION_EXIT, 0, 1, 2}) == 5  # all distinct
