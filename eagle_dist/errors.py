"""The base class of every error a user can act on.  Imports nothing.

Each module defines its own error class next to the code that raises it, as a subclass of
`EagleError` (and of the builtin it replaces, so existing `except ValueError` still works).
Entry points catch `EagleError` and print its message as one line instead of a traceback:
the message already says what was wrong and what to do.  An error class that two modules
raise lives here, below both, so neither has to import the other for it.
"""


class EagleError(Exception):
    """A problem with the user's input, files or environment; the message says what to do."""


class WeightsError(EagleError, RuntimeError):
    """A weights file that is missing, unreadable or does not fit the architecture (raised by
    eagle_dist.method.backbone and eagle_dist.method.dinov2)."""


def key_list(keys: list[str], limit: int = 8) -> str:
    """The first `limit` of `keys` for an error message, with the total when there are more."""
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


# Kept for callers that want a tuple to put in an `except` clause.
USER_ERRORS: tuple[type[BaseException], ...] = (EagleError,)
