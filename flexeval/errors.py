"""The one exception type that means "the user asked for something we cannot do".

Everything raised as `FlexevalError` carries a one-line message that says what was wrong and
what to do instead; anything else escaping flexeval is a bug.
"""

import os
import sys
import traceback
from typing import NoReturn

DEBUG_ENV = "FLEXEVAL_DEBUG"  # set (FLEXEVAL_DEBUG=1): an input error's traceback is printed above it


class FlexevalError(ValueError):
    """Bad input: an unknown model, a broken checkpoint, an impossible request."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error message, for embedding in a one-line FlexevalError."""
    return (str(err).strip().splitlines() or [""])[0]


def exit_with(err: FlexevalError) -> NoReturn:
    """End a command on an input error: one line, `error: ...`, exit status 2."""
    if os.environ.get(DEBUG_ENV):
        traceback.print_exception(err)
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
