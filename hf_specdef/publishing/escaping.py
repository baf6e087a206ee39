"""Escaping of user-provided strings for where they land in the model card.

Every string that comes from the source or the records (Hub ids, folder and class names, names from the records
and from red-team results) is escaped before it reaches the card: Markdown text through :func:`escape_markdown`
(one line, no HTML, no emphasis, links or table cells; :func:`markdown_values` for every string inside lists and
dicts) and the Python usage snippet through JSON string literals (:func:`python_string_literal`), which no value can
break out of. The YAML front matter is escaped by :class:`~huggingface_hub.ModelCardData` (``yaml.dump``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|~&$])")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")  # an intraword "_" opens no emphasis


def escape_markdown(value: Any) -> str:
    """``value`` as inline Markdown text that renders literally: one line, no HTML, no emphasis, links or table cells.

    Whitespace runs (newlines included) become one space (so no value can start a block: a heading, a list, a raw
    HTML block), control and format characters (bidirectional overrides) are dropped, and every character that
    could start inline markup is backslash-escaped: HTML ``<>``, entities ``&``, emphasis ``*`` ``~`` and ``_``
    (except between two letters or digits, where it opens nothing), code spans, links ``[]``, math ``$`` and the
    table cell separator ``|`` (CommonMark allows a backslash before any ASCII punctuation; GFM tables need
    ``\\|``). The card only places values inside a line, never at its start.

    Args:
        value: any value; ``None`` gives ``""``.

    Returns:
        The escaped text.

    Example:

    ```python
    >>> escape_markdown("x\\n**VERIFIED SAFE** <script>|")
    'x \\\\*\\\\*VERIFIED SAFE\\\\*\\\\* \\\\<script\\\\>\\\\|'
    ```
    """
    if value is None:
        return ""
    text = "".join(ch for ch in str(value) if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf"))
    text = re.sub(r"\s+", " ", text).strip()
    return _MD_UNDERSCORE.sub(r"\\_", _MD_SPECIAL.sub(r"\\\1", text))


def markdown_values(value: Any) -> Any:
    """:func:`escape_markdown` applied to every string inside ``value`` (lists and dicts kept as such)."""
    if isinstance(value, str):
        return escape_markdown(value)
    if isinstance(value, Mapping):
        return {k: markdown_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [markdown_values(v) for v in value]
    return value


def python_string_literal(value: str) -> str:
    """A Python string literal of ``value`` (JSON's escapes are Python's; backticks escaped so that no value can
    close the Markdown code fence around the snippet)."""
    return json.dumps(str(value), ensure_ascii=True).replace("`", "\\u0060")
