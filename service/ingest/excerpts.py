"""Client-given names and texts as error messages show them: quoted and cut short, so that an error
body stays small whatever the upload holds."""

from __future__ import annotations

from collections.abc import Sequence

NAME_CHARS = 80
LISTED = 5


def quoted(text: str, limit: int = NAME_CHARS) -> str:
    """`text` as repr() writes it, cut to its first `limit` characters (marked with …)."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"… ({len(text)} characters)"


def listing(names: Sequence[str], limit: int = LISTED) -> str:
    """The first `limit` names, quoted, and how many more there are."""
    shown = ", ".join(quoted(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def cut(text: str, limit: int) -> str:
    """`text` cut to its first `limit` characters (marked with …)."""
    return text if len(text) <= limit else text[:limit] + "…"
