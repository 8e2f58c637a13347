"""The one exception family effcc raises for things a user can fix.

Every message says what went wrong *and where* (a pass, a node, a layer), and what to do.
The CLI prints these as one line with no traceback; anything else is a bug in effcc.
"""

import re


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's message (its type's name if it has none), terminal colours removed,
    at most `limit` characters: how effcc quotes a library's error inside its own."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    fallback = type(error).__name__ if isinstance(error, BaseException) else ""
    return (lines[0] if lines else fallback)[:limit]


class EffccError(Exception):
    """Base class of every error effcc raises on purpose."""


class CaptureError(EffccError):
    """The model could not be turned into a graph."""


class UnknownPassError(EffccError):
    """A pass name or option that effcc does not know."""


class VerificationError(EffccError):
    """A rewritten model does not compute what the original computes (within tolerance)."""
