"""lrkit/utils.py: atomic writes (what every record, report, cache and figure goes through). An interrupted write must
leave the previous file as it was and no temporary file behind: the interruption is simulated by making every
binary file write write half its bytes, then fail (a full disk, a killed process)."""
import os
import stat

import pytest

from helpers import interrupt_writes
from lrkit.utils import atomic_write_bytes


def test_an_interrupted_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "metrics.json"
    atomic_write_bytes(path, b'{"old": 1}')
    assert path.read_bytes() == b'{"old": 1}' and stat.S_IMODE(os.stat(path).st_mode) == 0o644  # served, shared
    with monkeypatch.context() as m:
        interrupt_writes(m)
        with pytest.raises(OSError, match="injected midway"):
            atomic_write_bytes(path, b'{"new": 2, "padding": "' + b"x" * 1000 + b'"}')
    assert path.read_bytes() == b'{"old": 1}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temporary file left
    # and a first write interrupted leaves no file at all (not half of one)
    with monkeypatch.context() as m:
        interrupt_writes(m)
        with pytest.raises(OSError):
            atomic_write_bytes(tmp_path / "new.bin", b"0123456789")
    assert not (tmp_path / "new.bin").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
    atomic_write_bytes(path, b"replaced")
    assert path.read_bytes() == b"replaced" and sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_interrupt_writes_reaches_a_write_in_place(tmp_path, monkeypatch):
    """The harness (helpers.interrupt_writes) sees the ways a writer may write in place (else the test proves nothing)."""
    path = tmp_path / "f"
    path.write_bytes(b"old")
    with monkeypatch.context() as m:
        interrupt_writes(m)
        for write in (lambda: path.write_bytes(b"new data"), lambda: open(path, "wb").write(b"new data"),
                      lambda: os.fdopen(os.open(path, os.O_WRONLY | os.O_TRUNC), "wb").write(b"new data")):
            with pytest.raises(OSError, match="injected midway"):
                write()
            assert path.read_bytes() == b"new "
