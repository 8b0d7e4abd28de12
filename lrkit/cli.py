"""Command lines and config files. The kit's command lines report a bad input in one line and exit with status 2 (``--debug`` shows the
traceback), never with a raw traceback for an error the kit itself raised and explained; YAML files and
``--set`` values read numbers as a user means them (:func:`yaml_value`)."""
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


def _number_loader():
    """PyYAML's SafeLoader, plus YAML 1.2's floats without a dot (``1e-3``, ``3E5``), which YAML 1.1 reads
    as strings; quoted scalars stay strings."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def yaml_value(text: str):
    """A YAML document or scalar read the way a user means numbers: ``1e-3`` is 0.001 (PyYAML alone reads it
    as the string '1e-3'); ``'1e-3'`` in quotes stays a string."""
    import yaml

    return yaml.load(text, Loader=_number_loader())
