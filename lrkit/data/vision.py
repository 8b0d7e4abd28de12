"""Image datasets read with NumPy (torchvision's PyPI build does not import beside the CPU torch wheel).

Fashion-MNIST: Debian package ``dataset-fashion-mnist`` (offline), else a ``data/`` cache, else the
canonical download when online. CIFAR-10: the canonical python archive (online, paper profile).
"""
from __future__ import annotations

import gzip
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from lrkit.data._fetch import DataUnavailableError, url_download, verify

FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # the checksum published with the archive


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the MNIST family's format."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fetch_fashion_mnist(data_dir: Path, online: bool = True) -> Path:
    """Directory holding the four verified IDX files: Debian package, else data/ cache, else download."""
    for d in (FASHION_DEBIAN_DIR, data_dir / "fashion_mnist"):
        if all((d / f).exists() for f in FASHION_FILES):
            for f, digest in FASHION_FILES.items():
                verify(d / f, digest)
            return d
    if not online:
        raise DataUnavailableError(
            "Fashion-MNIST not found. Install the Debian package: "
            "`sudo apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), "
            f"or put the four IDX .gz files in {data_dir / 'fashion_mnist'}."
        )
    d = data_dir / "fashion_mnist"
    try:
        for f, digest in FASHION_FILES.items():
            url_download(FASHION_URL + f, d / f, digest)
    except DataUnavailableError as e:
        raise DataUnavailableError(
            f"Fashion-MNIST not found locally and not downloadable ({e}). Install the Debian package: "
            "`sudo apt-get install dataset-fashion-mnist`."
        ) from e
    return d


def load_fashion_mnist(data_dir: Path, online: bool = True) -> dict[str, np.ndarray]:
    """{'x_train': (60000, 28, 28) uint8, 'y_train', 'x_test': (10000, 28, 28), 'y_test'}."""
    d = fetch_fashion_mnist(data_dir, online=online)
    return {
        "x_train": read_idx(d / "train-images-idx3-ubyte.gz"),
        "y_train": read_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64),
        "x_test": read_idx(d / "t10k-images-idx3-ubyte.gz"),
        "y_test": read_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
    }


def load_cifar10(data_dir: Path, archive: Path | None = None) -> dict[str, np.ndarray]:
    """CIFAR-10 from the canonical ``cifar-10-python.tar.gz`` (downloaded when online, or given).

    Returns {'x_train': (N, 32, 32, 3) uint8, 'y_train', 'x_test', 'y_test'}.
    """
    if archive is None:
        archive = data_dir / "cifar10" / "cifar-10-python.tar.gz"
        try:
            url_download(CIFAR10_URL, archive, CIFAR10_MD5, algo="md5")
        except DataUnavailableError as e:
            raise DataUnavailableError(
                f"CIFAR-10 needs internet for its first download ({e}). Offline, use the 'cpu' profile "
                f"(Fashion-MNIST), or copy cifar-10-python.tar.gz to {archive}."
            ) from e
    parts = {"train": [], "test": []}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                name = Path(m.name).name
                split = "train" if name.startswith("data_batch_") else "test" if name == "test_batch" else None
                if split:
                    batch = pickle.load(tar.extractfile(m), encoding="bytes")
                    parts[split].append(batch)
    except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError, zlib.error) as e:  # never half-used
        raise DataUnavailableError(f"{archive}: truncated or corrupt CIFAR-10 archive ({type(e).__name__}: {e}); "
                                   "expected the canonical cifar-10-python.tar.gz: delete it and fetch it again") from e
    if len(parts["train"]) == 0 or len(parts["test"]) == 0:
        raise ValueError(f"{archive}: no data_batch_* / test_batch members: not a CIFAR-10 python archive")
    out = {}
    for split, batches in parts.items():
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out[f"x_{split}"] = np.ascontiguousarray(x)
        out[f"y_{split}"] = np.concatenate([np.asarray(b[b"labels"]) for b in batches]).astype(np.int64)
    return out
