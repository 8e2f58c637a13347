"""The one exception family effcc raises for things a user can fix.

Every message says what went wrong *and where* (a pass, a node, a layer), and what to do.
The CLI prints these as one line with no traceback; anything else is a bug in effcc.
"""


class EffccError(Exception):
    """Base class of every error effcc raises on purpose."""


class CaptureError(EffccError):
    """The model could not be turned into a graph."""


class UnknownPassError(EffccError):
    """A pass name or option that effcc does not know."""


class VerificationError(EffccError):
    """A rewritten model does not compute what the original computes (within tolerance)."""
