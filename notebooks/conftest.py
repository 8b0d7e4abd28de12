"""nbval in the same pytest session as the unit tests (`make test`): every cell of a notebook shares one kernel, so
all of a notebook's cells must run on one xdist worker. `--dist loadgroup` keeps each xdist_group on one worker;
each notebook becomes its own group here, and the unit tests' groups are unchanged."""
import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(getattr(item, "path", item.fspath))
        if path.endswith(".ipynb"):
            item.add_marker(pytest.mark.xdist_group(f"notebook:{path}"))
