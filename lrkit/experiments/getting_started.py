"""The getting-started notebook's one experiment: a small LLaMA trained with AdamW on Shakespeare (C4 at the
gpu and paper profiles), against the loss of the best context-free predictor (the unigram entropy of the
validation tokens)."""
from __future__ import annotations

from lrkit.claims import Claim
from lrkit.experiments import LMTrainConfig, lm_corpus, pretrain, run_all

CLAIMS = [
    Claim("uses-context", "A language model trained on the training works predicts unseen works better than "
          "token frequencies alone (the unigram entropy).", "kit sanity check", "below_unigram", ("adamw",),
          quantity="value", op=">", bound=0.0),
]


def run(out, *, seeds, model_size, vocab_size, steps, batch_size, seq_len, lr, warmup_frac, eval_every,
        eval_windows, device="auto", corpus="shakespeare", corpus_options=None):
    """AdamW (the kit's method "full") on every seed; each record's final dict gains ``unigram_entropy``
    and ``below_unigram`` (entropy minus final validation loss, nats/token). ``corpus``, ``corpus_options``:
    see ``lrkit.experiments.lm_corpus`` (Shakespeare by default). Returns (runs, entropy)."""
    corpus = lm_corpus(corpus, vocab_size, corpus_options)
    entropy = corpus.unigram_entropy("val")
    train = LMTrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_frac=warmup_frac,
                          eval_every=eval_every, eval_windows=eval_windows, device=device)

    def fn(name, **kw):
        r = pretrain(name, corpus, train, **kw)
        loss = r.final["val_loss"]
        r.final |= {"unigram_entropy": entropy, "below_unigram": None if loss is None else entropy - loss}
        return r

    print(f"train: {len(corpus.train):,} tokens from {len(corpus.train_works)} works; validation: "
          f"{len(corpus.val):,} tokens from {corpus.val_works}; unigram entropy {entropy:.4f} nats/token")
    return run_all(fn, {"adamw": dict(method="full", model_size=model_size)}, out, seeds=seeds), entropy
