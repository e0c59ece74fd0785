"""Read one region's YAML configuration file into frozen settings, reporting every problem at once.

Every problem is one line naming its key path, in the order of the fields,
including YAML syntax errors and duplicate keys, so an operator fixes a file in
one pass. Nothing here talks to ZooKeeper or Kafka; the only side effects are
reading the file and the secret files and environment variables it names, so
``zkbridge check-config`` can run anywhere the service would.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from bridge.config import Settings
from bridge.configrules import Loc, adapter, problem
from bridge.errors import ConfigError

# --------------------------------------------------------------------------- problem lines


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
    found = sorted((problem(error) for error in exc.errors()), key=lambda p: _rank(p[0]))
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
        settings: Settings = adapter(Settings).validate_python(doc, context=context)
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

