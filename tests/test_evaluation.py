"""The lm-eval path (lrkit/evaluation.py), offline: a tiny LLaMA and a byte-level BPE made here, local task
files written by ``write_task``, and lm-eval's scores checked against the same scores computed directly
from the model (log-likelihoods of each choice; greedy continuations)."""
import sys
import types

import numpy as np
import pytest
import torch

from lrkit.evaluation import (EvaluationUnavailableError, cloze_docs, hf_tokenizer, run_lm_eval,
                              write_task)

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them.\n"
        "Now is the winter of our discontent made glorious summer by this sun of York.\n") * 4


@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("lm_eval")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lrkit.models import build_llama

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT.split("\n"), trainer=trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = build_llama("nano", tok.get_vocab_size(), 64, seed=0).eval()
    return model, tok


def _loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), split as lm-eval does: encode the whole string and
    take the tokens past the context's own encoding."""
    ctx, whole = tok.encode(context).ids, tok.encode(context + continuation).ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def _docs(tok, n=12, seed=0):
    ids = np.asarray(tok.encode(TEXT).ids)
    return cloze_docs(ids, tok, n=n, context_tokens=6, choice_tokens=3, seed=seed)


def test_multiple_choice_accuracy_equals_direct_loglikelihoods(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local tasks need no internet
    model, tok = lm
    docs = _docs(tok)
    best = [int(np.argmax([_loglik(model, tok, d["context"], c) for c in d["choices"]])) for d in docs]
    expect = np.mean([b == d["label"] for b, d in zip(best, docs)])
    cheat = [dict(d, label=b) for d, b in zip(docs, best)]  # the model's own choice: accuracy 1
    write_task(tmp_path, "cloze_given", docs)
    write_task(tmp_path, "cloze_own", cheat)
    res = run_lm_eval(model, tok, ["cloze_given", "cloze_own"], include_path=tmp_path, device="cpu", batch_size=4)
    assert res["cloze_given"]["acc"] == pytest.approx(expect, abs=1e-12)
    assert res["cloze_own"]["acc"] == 1.0
    assert res["cloze_given"]["sample_len"] == len(docs)


def test_generate_until_exact_match_equals_greedy_decoding(lm, tmp_path):
    model, tok = lm
    docs, hits = [], 0
    for i, d in enumerate(_docs(tok, n=6)):
        ids = torch.tensor([tok.encode(d["context"]).ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        greedy = tok.decode(out[0, ids.shape[1]:].tolist()).split("\n")[0]
        answer = greedy if i % 2 == 0 else greedy + "#"  # every other answer the model cannot produce
        docs.append({"context": d["context"], "answer": answer})
    write_task(tmp_path, "greedy", docs, output_type="generate_until", max_gen_toks=4)
    res = run_lm_eval(model, tok, ["greedy"], include_path=tmp_path, device="cpu")
    assert res["greedy"]["exact_match"] == pytest.approx(0.5)


def test_cloze_docs_chance_and_layout():
    class Tok:  # decode = the ids as text, so the spans can be checked
        def decode(self, ids):
            return " ".join(map(str, ids))

    ids = np.arange(2000)
    docs = cloze_docs(ids, Tok(), n=40, context_tokens=5, choice_tokens=3, choices=4, seed=1)
    labels = [d["label"] for d in docs]
    assert len(docs) == 40 and set(labels) <= {0, 1, 2, 3} and len(set(labels)) > 1
    for d in docs:
        ctx = list(map(int, d["context"].split()))
        true = list(map(int, d["choices"][d["label"]].split()))
        assert true == list(range(ctx[-1] + 1, ctx[-1] + 4)) and len(d["choices"]) == 4
        assert len({c for c in d["choices"]}) == 4
    assert docs == cloze_docs(ids, Tok(), n=40, context_tokens=5, choice_tokens=3, choices=4, seed=1)
    with pytest.raises(ValueError, match="too short"):
        cloze_docs(np.arange(50), Tok(), n=40)
    with pytest.raises(ValueError, match="Invalid cloze"):
        cloze_docs(ids, Tok(), n=0)


def test_write_task_validates(tmp_path):
    with pytest.raises(ValueError, match="Invalid output_type"):
        write_task(tmp_path, "t", [{"context": "a", "answer": "b"}], output_type="loglikelihood")
    with pytest.raises(ValueError, match="Invalid docs"):
        write_task(tmp_path, "t", [{"context": "a", "answer": "b"}])  # multiple choice needs choices, label


def test_hf_tokenizer_wraps_the_bpe(lm):
    _, tok = lm
    hf = hf_tokenizer(tok)
    assert hf("to be or not").input_ids == tok.encode("to be or not").ids
    assert hf.eos_token_id == tok.encode("\n").ids[0] and hf_tokenizer(hf) is hf
    with pytest.raises(ValueError, match="Invalid eos"):
        hf_tokenizer(tok, eos="question")


def test_run_lm_eval_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(EvaluationUnavailableError, match=r"pip install lm-eval.*internet"):
        run_lm_eval("some/model", tasks=["mmlu"])


def test_run_lm_eval_refusals(monkeypatch, tmp_path):
    fake = types.ModuleType("lm_eval")
    models, hf, tasks = (types.ModuleType(n) for n in ("lm_eval.models", "lm_eval.models.huggingface",
                                                        "lm_eval.tasks"))
    hf.HFLM, tasks.TaskManager = object, object
    for name, mod in (("lm_eval", fake), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf),
                      ("lm_eval.tasks", tasks)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvaluationUnavailableError, match=r"HF_HUB_OFFLINE is set.*\['gsm8k'\].*needs internet"):
        run_lm_eval("some/model", tasks=["gsm8k"])
    write_task(tmp_path, "local", [{"context": "a", "choices": ["b", "c"], "label": 0}])
    with pytest.raises(EvaluationUnavailableError, match=r"\['mmlu'\]"):  # the local one is fine, mmlu is not
        run_lm_eval("some/model", tasks=["local", "mmlu"], include_path=tmp_path)
    with pytest.raises(EvaluationUnavailableError, match="judge model"):
        run_lm_eval("some/model", tasks=["alpacafarm"])
    with pytest.raises(ValueError, match="allow_code_execution"):
        run_lm_eval("some/model", tasks=["humaneval"])
    with pytest.raises(ValueError, match="Invalid tasks"):
        run_lm_eval("some/model", tasks="mmlu")
    with pytest.raises(ValueError, match="Invalid tokenizer"):
        run_lm_eval(torch.nn.Linear(2, 2), tasks=["mmlu"])
