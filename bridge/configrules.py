"""The rules a settings key must follow: value types, rules across keys, problems in house words.

``bridge.config`` writes the settings classes with these constrained types
(names, host lists, znode paths, readable files) and model validators (keys
judged together, a secret read from exactly one source); ``problem`` words
pydantic's errors as the lines ``zkbridge check-config`` prints. The only side
effects are reading the files and environment variables a configuration names.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

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


def check_replication_factor(value: int) -> int:
    if value == 0 or value < -1:
        raise ValueError("must be -1 (broker default) or at least 1")
    return value


Text = Annotated[str, StringConstraints(strict=True, min_length=1)]
Positive = Annotated[float, Field(strict=True, gt=0)]
NonNegative = Annotated[float, Field(strict=True, ge=0)]
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


def _pem_certificates(value: str) -> str:
    """``value`` if it holds a PEM certificate: a wrong file would fail every handshake
    later, with a message naming no key."""
    try:
        ssl.create_default_context(cafile=value)
    except ssl.SSLError:
        raise ValueError(f"{value} holds no PEM certificate") from None
    return value


CaFile = Annotated[ReadableFile, AfterValidator(_pem_certificates)]


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's password.
    raise ValueError("encrypted")


def _identity_problem(cert: str, key: str | None) -> Problem | None:
    try:
        _pem_certificates(cert)
    except ValueError as exc:
        return ("certfile",), str(exc)
    try:
        ssl.create_default_context().load_cert_chain(cert, key, password=_no_password)
    except ValueError:
        return ("keyfile" if key else "certfile",), ("its private key is encrypted; give it "
                                                     "unencrypted, readable by the bridge only")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return ("keyfile",), f"{key} is not the key of certfile {cert}"
        if key:
            return ("keyfile",), f"{key} holds no PEM private key"
        return ("certfile",), f"{cert} holds no PEM private key; name it in keyfile"
    return None


def client_identity() -> Any:
    """A model validator: certfile (with keyfile, or holding its key) loads as a client
    certificate and its unencrypted private key."""

    def check(self: Any) -> Any:
        cert, key = self.certfile, self.keyfile
        if cert is not None:
            wrong = _identity_problem(cert, key)
            if wrong:
                raise _invalid([wrong])
        return self

    return model_validator(mode="after")(check)


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


@functools.cache
def adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def valid(kind: Any, value: object) -> Any:
    """``value`` if it passes ``kind``'s own checks, else None (rules judge only such values)."""
    try:
        return adapter(kind).validate_python(value)
    except ValidationError:
        return None


def items_of(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def duplicates(values: list[object], kind: Any) -> Iterator[tuple[int, int]]:
    """(index, index of its first occurrence) for each repeated valid value."""
    first: dict[object, int] = {}
    for i, value in enumerate(values):
        if valid(kind, value) is not None and first.setdefault(value, i) != i:
            yield i, first[value]


def overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


# --------------------------------------------------------------------------- cross-field rules


def _checked(handler: Callable[[Any], Any], data: Any, problems: Iterable[Problem]) -> Any:
    """``handler(data)``, raising its problems and ``problems`` together."""
    found = list(problems)
    try:
        result = handler(data)
    except ValidationError as exc:
        found[:0] = map(problem, exc.errors())
    if not found:
        return result
    raise _invalid(found)


def _invalid(problems: Iterable[Problem]) -> ValidationError:
    return ValidationError.from_exception_data("settings", [
        InitErrorDetails(type=PydanticCustomError("config", "{m}", {"m": m}), loc=loc, input=None)
        for loc, m in problems
    ])


def rules(rules: Callable[[Any, Mapping[str, Any]], Iterable[Problem]]) -> Any:
    """A model validator adding the problems ``rules`` find in the mapping as written.

    An after-validator only runs once every field is valid, which would hide e.g.
    a mount overlap behind an unrelated typo; the rules therefore see the raw
    mapping and judge only values that pass their own type (``valid``).
    Settings built in code (``dataclasses.replace``) are not judged again.
    """

    def validate(cls: type, data: Any, handler: Callable[[Any], Any]) -> Any:
        if not isinstance(data, Mapping):
            return handler(data)
        return _checked(handler, data, rules(cls, data))

    return model_validator(mode="wrap")(validate)


def secret_from(stem: str, check: Callable[[str], str | None] = lambda secret: None) -> Any:
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
            wrong = check(secret) if secret else None  # "": the key's own type says why
            if wrong:
                raise ValueError(wrong)
        except ValueError as exc:
            return _checked(handler, data, [((given[0],), str(exc))])
        return _checked(handler, {**data, stem: secret} if secret else data, [])

    return model_validator(mode="wrap")(validate)


def _secret(key: str, value: Any, info: ValidationInfo) -> str:
    """The secret ``key`` holds or names; "" when ``value`` fails the key's own type."""
    if valid(EnvName if key.endswith("_env") else Text, value) is None:
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


def digest_form(credential: str) -> str | None:
    return None if ":" in credential else "a digest credential must have the form user:password"



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


def problem(error: ErrorDetails) -> Problem:
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

