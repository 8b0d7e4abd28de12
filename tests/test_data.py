"""Data layer: registry, checksums, the offline sources (as fetched by `make data`), online loaders on
fixture files of the real formats, and clear errors offline."""
import gzip
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from lrkit import data
from lrkit.data import ChecksumError, CorruptCacheError, DataUnavailableError
from lrkit.data._fetch import verify
from lrkit.data.text import _byte_bpe, load_c4_corpus, load_shakespeare, read_c4_shard
from lrkit.data.vision import FASHION_DEBIAN_DIR, load_cifar10, read_idx

FIXTURES = Path(__file__).parent / "fixtures"


def test_registry_lists_every_source_and_rejects_unknown_names():
    assert {"shakespeare", "fashion_mnist", "tweets_sentiment", "minilm", "least_squares", "c4",
            "cifar10"} <= set(data.REGISTRY)
    with pytest.raises(ValueError, match="Invalid dataset: 'mnist'.*expected one of"):
        data.load("mnist")


def test_checksum_mismatch_is_an_error_and_keeps_the_file(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"not the release")
    with pytest.raises(ChecksumError, match="sha256 is .* expected 00"):
        verify(f, "00" * 32)
    assert f.read_bytes() == b"not the release"


def test_shakespeare_is_split_by_work_and_tokenized():
    c = data.load("shakespeare", vocab_size=4096)
    assert not set(c.train_works) & set(c.val_works)
    assert len(c.train_works) + len(c.val_works) == 42 and len(c.val_works) == 6
    assert c.train.max() < 4096 and c.val.max() < 4096 and len(c.train) > 5 * len(c.val)
    assert c.tokenizer.get_vocab_size() == 4096
    # Round trip through the byte-level BPE is lossless.
    text = "To be, or not to be, that is the question:"
    assert c.tokenizer.decode(c.tokenizer.encode(text).ids) == text
    # The baseline is the entropy of the validation unigram distribution.
    p = np.bincount(c.val, minlength=4096) / len(c.val)
    p = p[p > 0]
    assert c.unigram_entropy() == pytest.approx(-(p * np.log(p)).sum())
    with pytest.raises(ValueError, match="Invalid vocab_size: 100"):
        data.load("shakespeare", vocab_size=100)


@pytest.mark.skipif(not FASHION_DEBIAN_DIR.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian():
    d = data.load("fashion_mnist")
    assert d["x_train"].shape == (60000, 28, 28) and d["x_test"].shape == (10000, 28, 28)
    assert d["x_train"].dtype == np.uint8
    assert np.bincount(d["y_train"]).tolist() == [6000] * 10


def test_fashion_mnist_missing_offline_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("lrkit.data.vision.FASHION_DEBIAN_DIR", tmp_path / "none")
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        data.REGISTRY["fashion_mnist"].loader(tmp_path, online=False)


def test_idx_reader(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\x00\x00\x08\x03" + b"".join(int(n).to_bytes(4, "big") for n in arr.shape) + arr.tobytes()
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_tweets_binary_and_three_way():
    d = data.load("tweets_sentiment", binary=True)
    n = len(d["train"]["text"]) + len(d["test"]["text"])
    assert d["labels"] == ["negative", "positive"] and set(np.unique(d["train"]["label"])) == {0, 1}
    d3 = data.load("tweets_sentiment", binary=False)
    assert len(d3["train"]["text"]) + len(d3["test"]["text"]) == 38158 > n
    assert data.load("tweets_sentiment", seed=0)["test"]["text"][:5] == d["test"]["text"][:5]


def test_minilm_loads_offline_by_path():
    from transformers import AutoConfig, AutoTokenizer

    path = data.load("minilm")
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.num_hidden_layers == 6 and cfg.hidden_size == 384
    assert AutoTokenizer.from_pretrained(path)("hello world")["input_ids"][0] == 101  # [CLS]


def _fixture_tokenizer(tmp_path):
    texts = [r["text"] for r in read_c4_shard(C4_SHARD)]
    return _byte_bpe(tmp_path / "tok.json", "\n\n".join(texts), 300)


C4_SHARD = FIXTURES / "c4-validation.00000-of-00008.json.gz"


def test_c4_corpus_on_a_fixture_shard_is_tokenized_once(tmp_path, monkeypatch):
    assert set(read_c4_shard(C4_SHARD)[0]) == {"text", "timestamp", "url"}
    tok = _fixture_tokenizer(tmp_path)
    c = load_c4_corpus(tmp_path, data_files=[C4_SHARD], tokenizer=tok, train_tokens=10**6, val_tokens=10**6)
    texts = [r["text"] for r in read_c4_shard(C4_SHARD)]
    # every 8th document held out: document 0 is validation, 1-5 train (no end-of-sequence id in a BPE)
    assert c.val.tolist() == tok.encode(texts[0]).ids
    assert c.train.tolist() == sum((tok.encode(t).ids for t in texts[1:]), [])
    assert c.vocab_size == tok.get_vocab_size() and c.name == "c4"
    # the cache is used: a second load does not read the shard again
    monkeypatch.setattr("lrkit.data.text.read_c4_shard", lambda p: pytest.fail("streamed C4 again"))
    again = load_c4_corpus(tmp_path, data_files=[C4_SHARD], tokenizer=tok, train_tokens=10**6, val_tokens=10**6)
    assert np.array_equal(again.train, c.train)
    # a token budget caps the cache, which then has its own key
    monkeypatch.undo()
    small = load_c4_corpus(tmp_path, data_files=[C4_SHARD], tokenizer=tok, train_tokens=7, val_tokens=5)
    assert len(small.train) == 7 and len(small.val) == 5 and small.train.tolist() == c.train[:7].tolist()
    assert not list((tmp_path / "c4").rglob(".*"))  # no temporary file left behind


def test_c4_corpus_trains_a_model(tmp_path):
    from lrkit.experiments import pretrain
    from lrkit.train import LMTrainConfig

    _fixture_tokenizer(tmp_path)
    c = load_c4_corpus(tmp_path, data_files=[str(C4_SHARD)], tokenizer=str(tmp_path / "tok.json"))  # as in a YAML
    r = pretrain("c4", c, LMTrainConfig(steps=2, batch_size=2, seq_len=8, eval_every=2, eval_windows=2),
                 method="full", model_size="nano", lr=1e-3)
    assert r.final["steps"] == 2 and np.isfinite(r.final["val_loss"])


def test_c4_corpus_bad_input(tmp_path):
    tok = _fixture_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="Invalid vocab_size: 10 .*expected at least"):
        load_c4_corpus(tmp_path, data_files=[C4_SHARD], tokenizer=tok, vocab_size=10)
    with pytest.raises(ValueError, match="Invalid data_files"):
        load_c4_corpus(tmp_path, data_files="c4.json.gz", tokenizer=tok)
    with pytest.raises(ValueError, match="Invalid train_tokens: 0"):
        load_c4_corpus(tmp_path, data_files=[C4_SHARD], tokenizer=tok, train_tokens=0)


def test_c4_offline_says_what_to_do(tmp_path):
    """Offline is set by tests/conftest.py before anything imports the Hugging Face libraries (they read the
    variables once, at import: a monkeypatch.setenv here would come too late once another test imported them)."""
    import datasets
    import huggingface_hub

    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE, \
        "the Hugging Face libraries must see offline mode (tests/conftest.py sets it before they are imported)"
    with pytest.raises(DataUnavailableError, match="needs internet.*'cpu' or 'smoke' profile"):
        load_c4_corpus(tmp_path)


def test_cifar10_loader_on_a_fixture_archive(tmp_path):
    d = load_cifar10(tmp_path, archive=FIXTURES / "cifar-10-python.tar.gz")
    assert d["x_train"].shape == (10, 32, 32, 3) and d["x_test"].shape == (2, 32, 32, 3)
    assert d["y_train"].dtype == np.int64 and d["y_train"].max() < 10


def test_cifar10_offline_says_what_to_do(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    with pytest.raises(DataUnavailableError, match="CIFAR-10 needs internet.*'cpu' profile"):
        load_cifar10(tmp_path)
    assert not any(tmp_path.rglob("*.part")), "a failed download must not leave a partial file"


def test_least_squares_is_seeded_and_low_rank():
    a = data.load("least_squares", n=8, rank=2, num_clients=3, seed=1)
    b = data.load("least_squares", n=8, rank=2, num_clients=3, seed=1)
    assert len(a["clients"]) == 3 and all((x == y).all() for (x, _), (y, _) in zip(a["clients"], b["clients"]))
    assert int(np.linalg.matrix_rank(a["W_star"].numpy(), tol=1e-5)) == 2


@pytest.mark.parametrize("bad", [dict(noise=math.nan), dict(noise=math.inf), dict(heterogeneity=math.nan),
                                 dict(heterogeneity=-1.0), dict(noise="0.5")])
def test_least_squares_rejects_non_finite_knobs(bad):
    """noise=nan passed the `< 0` check and hit a torch internal assert in torch.linalg.lstsq; inf made NaN data."""
    (name, value), = bad.items()
    with pytest.raises(ValueError, match=rf"Invalid {name}: {value!r} \(expected a finite number >= 0\)"):
        data.load("least_squares", n=4, rank=1, num_clients=1, samples_per_client=5, **bad)


# ---------------------------------------------------------------------------------------------- token caches

def _tiny_shakespeare(tmp):
    """load_shakespeare on 16 tiny stand-in works (the BPE of 300 tokens trains on them in milliseconds)."""
    works = {f"w{i:02d}": f"Work {i}: to be, or not to be, that is the question. " * 3 for i in range(16)}
    with mock.patch("lrkit.data.text.shakespeare_works", return_value=works):
        return load_shakespeare(tmp, vocab_size=300)


@pytest.mark.parametrize("kind", ["float64", "2-D", "out_of_vocabulary", "truncated", "pickle"])
def test_a_bad_token_cache_is_a_clear_error_not_token_ids(tmp_path, kind):
    """A cached train.npy of another dtype (float64 ids cast silently), rank (2-D windows), with an id outside the
    vocabulary (an embedding index error much later, a device assert on CUDA) or truncated: a ValueError naming the
    file, what it holds and what to do; the rebuilt cache after deleting it is the original."""
    good = _tiny_shakespeare(tmp_path)
    cache = tmp_path / "shakespeare" / "bpe300"
    ids = np.load(cache / "train.npy")
    assert ids.dtype == np.uint16 and ids.ndim == 1 and np.array_equal(ids, good.train)
    found = {"float64": r"a float64 array of shape \(%d,\), expected 1-D uint16 token ids, at least 2" % len(ids),
             "2-D": r"a uint16 array of shape \(2, %d\), expected 1-D uint16 token ids, at least 2" % (len(ids) // 2),
             "out_of_vocabulary": r"token id 300 at position 5, expected ids below vocab_size=300",
             "truncated": r"ValueError: .*", "pickle": r"ValueError: Object arrays cannot be loaded when allow_pickle=False"}[kind]
    if kind == "truncated":
        (cache / "train.npy").write_bytes((cache / "train.npy").read_bytes()[:-7])
    elif kind == "pickle":
        np.save(cache / "train.npy", np.array([ids], dtype=object), allow_pickle=True)
    else:
        bad = {"float64": ids.astype(np.float64), "2-D": ids[: len(ids) // 2 * 2].reshape(2, -1),
               "out_of_vocabulary": np.where(np.arange(len(ids)) == 5, 300, ids).astype(np.uint16)}[kind]
        np.save(cache / "train.npy", bad)
    with pytest.raises(CorruptCacheError, match=rf"bpe300/train\.npy: corrupt token cache \({found}\); "
                                                rf"delete .*bpe300 to rebuild it") as e:
        _tiny_shakespeare(tmp_path)
    assert isinstance(e.value, ValueError) and isinstance(e.value, DataUnavailableError)
    (cache / "train.npy").unlink()
    assert np.array_equal(_tiny_shakespeare(tmp_path).train, good.train)


def test_a_bad_c4_token_cache_is_a_clear_error(tmp_path):
    """The memory-mapped C4 caches: truncated (not a whole number of ids, or empty) or holding an id the tokenizer
    cannot have made is a ValueError naming the file; a smaller vocab_size than the data's ids stays a vocab error."""
    tok = _fixture_tokenizer(tmp_path)
    kw = dict(data_files=[C4_SHARD], tokenizer=tok, train_tokens=50, val_tokens=20)
    good = np.array(load_c4_corpus(tmp_path, **kw).train)  # a copy: the corpus maps the file overwritten below
    (path,) = (tmp_path / "c4").rglob("train.bin")
    raw = path.read_bytes()
    V = tok.get_vocab_size()  # 296: the fixture shard has too few merges for 300
    assert len(raw) == 2 * 50
    for bad, found in ((raw[:-1], "99 bytes: not a whole number of uint16 ids, a truncated file"),
                       (b"", "0 bytes: fewer than 2 uint16 ids, a truncated file"),
                       (np.where(np.arange(50) == 7, V, good).astype(np.uint16).tobytes(),
                        f"token id {V} at position 7, expected ids below the tokenizer's {V}")):
        path.write_bytes(bad)
        with pytest.raises(CorruptCacheError, match=rf"train\.bin: corrupt C4 train token cache \({found}\); "
                                                    "delete it to rebuild it"):
            load_c4_corpus(tmp_path, **kw)
    path.unlink()
    assert np.array_equal(load_c4_corpus(tmp_path, **kw).train, good)
    with pytest.raises(ValueError, match="Invalid vocab_size: 10 .*expected at least"):
        load_c4_corpus(tmp_path, vocab_size=10, **kw)


def test_an_interrupted_c4_tokenization_leaves_no_cache(tmp_path):
    """_write_tokens writes a temporary file renamed at the end: a tokenization that fails midway (the stream breaks)
    leaves neither a cache the next load would take as complete nor a temporary file."""
    from lrkit.data.text import _write_tokens

    def texts():
        yield "to be or not to be"
        raise ConnectionError("stream broke")

    path = tmp_path / "c4" / "key" / "train.bin"
    with pytest.raises(ConnectionError, match="stream broke"):
        _write_tokens(path, texts(), lambda t: list(range(len(t.split()))), None, 100, np.uint16)
    assert list(path.parent.iterdir()) == []
    _write_tokens(path, iter(["a b c"]), lambda t: list(range(len(t.split()))), None, 100, np.uint16)
    assert np.fromfile(path, dtype=np.uint16).tolist() == [0, 1, 2] and list(path.parent.iterdir()) == [path]


def test_an_unknown_loader_option_is_an_error_listing_the_options():
    """A misspelt corpus_options key (vocab instead of vocab_size) names the loader's options, not a TypeError."""
    from lrkit import data

    with pytest.raises(ValueError, match=r"Invalid option\(s\) \['vocab'\] for dataset 'shakespeare' "
                                         r"\(expected some of \['vocab_size'\]\)"):
        data.load("shakespeare", vocab=1024)
    with pytest.raises(ValueError, match=r"Invalid option\(s\) \['train_token'\] for dataset 'c4' .*'train_tokens'"):
        data.load("c4", train_token=10)
