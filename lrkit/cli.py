"""The kit's command lines report a bad input in one line and exit with status 2 (``--debug`` shows the
traceback), never with a raw traceback for an error the kit itself raised and explained."""
from __future__ import annotations

import sys

# Errors whose message is the explanation (the kit's validation raises these, naming the value and what is
# accepted); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_USAGE = 2


def run_cli(fn, *, debug: bool = False, prog: str = "lrkit"):
    """``fn()``'s result; on one of :data:`USER_ERRORS` print ``<prog>: error: <message>`` to stderr and return
    :data:`EXIT_USAGE` (re-raise with ``debug``)."""
    try:
        return fn()
    except USER_ERRORS as e:
        if debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USAGE
