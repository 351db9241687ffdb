"""The one exception type that means "the user asked for something we cannot do".

Everything raised as `FlexevalError` carries a one-line message that says what was wrong and
what to do instead; anything else escaping flexeval is a bug.
"""


class FlexevalError(ValueError):
    """Bad input: an unknown model, a broken checkpoint, an impossible request."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error message, for embedding in a one-line FlexevalError."""
    return (str(err).strip().splitlines() or [""])[0]
