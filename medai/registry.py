"""A small name -> entry registry (timm's register_model pattern), shared by models and ops."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


@dataclass
class Registry(Generic[T]):
    """Named entries of one kind; registering a name twice is an error."""

    kind: str
    _entries: dict[str, T] = field(default_factory=dict)

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; return it."""
        if name in self._entries:
            raise KeyError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """Return the entry for `name`, or raise KeyError listing close names."""
        try:
            return self._entries[name]
        except KeyError:
            close = [n for n in self._entries if name.split("_")[0] in n][:8]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise KeyError(f"unknown {self.kind} '{name}'{hint}") from None

    def names(self, pattern: str = "*") -> list[str]:
        """Return sorted registered names matching a shell-style pattern."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def decorator(self, wrap: Callable[[Callable], T]) -> Callable[[Callable], Callable]:
        """Return a decorator that registers `wrap(fn)` under fn.__name__."""

        def register(fn: Callable) -> Callable:
            self.add(fn.__name__, wrap(fn))
            return fn

        return register
