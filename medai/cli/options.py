"""Options that several command groups share, spelled once."""

from __future__ import annotations

from typing import Any

import typer


def override_option(what: str) -> Any:
    """The one override option of every command: `-o/--override key.sub=value`, repeatable, values read as YAML."""
    return typer.Option([], "--override", "-o", help=f"{what}: key.sub=value (value read as YAML), repeatable.")
