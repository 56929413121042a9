"""A small name -> entry registry (timm's register_model pattern), shared by models and ops."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterator, TypeVar

from medai.errors import UnknownNameError

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
        """Return the entry for `name`, or raise UnknownNameError (a KeyError) listing close names."""
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=5, cutoff=0.6)
            close += [n for n in self._entries if name.split("_")[0] in n and n not in close]
            hint = f"; did you mean {', '.join(close[:8])}?" if close else f"; known: {', '.join(sorted(self._entries))}"
            raise UnknownNameError(f"unknown {self.kind} '{name}'{hint}") from None

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
