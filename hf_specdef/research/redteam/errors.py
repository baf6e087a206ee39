"""The red team's error type (a module of its own so every red-team module can raise it)."""

from __future__ import annotations

from hf_specdef.errors import SpecDefError


class RedTeamError(SpecDefError, ValueError):
    """The red team cannot run or cannot prove anything with these inputs."""

    docs_page = "docs/redteam.md"
