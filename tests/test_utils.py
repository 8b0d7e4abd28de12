"""lrkit/utils.py: atomic writes (what every record, report, cache and figure goes through). An interrupted write must
leave the previous file as it was and no temporary file behind: the interruption is simulated by making every
binary file write write half its bytes, then fail (a full disk, a killed process)."""
import builtins
import io
import os
import stat

import pytest

from lrkit.utils import atomic_write_bytes


class _HalfWrite:
    """A file whose every write puts half the bytes on disk, then raises (ENOSPC)."""

    def __init__(self, f):
        self._f = f

    def write(self, b):
        self._f.write(bytes(b)[: len(b) // 2])
        self._f.flush()
        raise OSError(28, "No space left on device (injected midway)")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def interrupt_writes(monkeypatch):
    """Every file opened for binary writing, by open(), io.open (os.fdopen, Path.open, Path.write_bytes), fails midway."""
    real = io.open

    def opener(file, mode="r", *a, **k):
        f = real(file, mode, *a, **k)
        return _HalfWrite(f) if "b" in mode and any(m in mode for m in "wax+") else f

    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(builtins, "open", opener)


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
    """The harness above sees the ways a writer may write in place (else the test proves nothing)."""
    path = tmp_path / "f"
    path.write_bytes(b"old")
    with monkeypatch.context() as m:
        interrupt_writes(m)
        for write in (lambda: path.write_bytes(b"new data"), lambda: open(path, "wb").write(b"new data"),
                      lambda: os.fdopen(os.open(path, os.O_WRONLY | os.O_TRUNC), "wb").write(b"new data")):
            with pytest.raises(OSError, match="injected midway"):
                write()
            assert path.read_bytes() == b"new "
