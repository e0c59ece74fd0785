"""Unique names per test, so tests share servers without seeing each other's data."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

_used_tokens: set[str] = set()


@dataclass(frozen=True)
class Namespace:
    """Names no other test in this session uses."""

    token: str
    """Short, lowercase, starts with a letter: fits region names and topic names."""

    @property
    def zk_root(self) -> str:
        return f"/{self.token}"

    @property
    def topic_prefix(self) -> str:
        return f"zkbridge-{self.token}"

    def path(self, *parts: str) -> str:
        return "/".join([self.zk_root, *(p.strip("/") for p in parts)])

    def topic(self, *parts: str) -> str:
        return ".".join([self.topic_prefix, *parts])


def new_token() -> str:
    """A short token unused in this process, e.g. 't7f3a2'."""
    while True:
        candidate = "t" + secrets.token_hex(3)[:5]
        if candidate not in _used_tokens:
            _used_tokens.add(candidate)
            return candidate
