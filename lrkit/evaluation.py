"""Benchmarks through EleutherAI's lm-evaluation-harness (``lm-eval``): the AdaLomo paper's evaluation of
its instruction-tuned models (Sec. 4.1: MMLU, BBH, GSM8K, HumanEval, AlpacaFarm) and the kit's offline
stand-in, a cloze task on held-out Shakespeare written as a local lm-eval task file.

* :func:`run_lm_eval` evaluates a causal LM (a model object with its tokenizer, or a hub id / path) on
  lm-eval tasks: the harness's own (they download their data from the Hugging Face Hub: online, the
  ``paper`` profile) or local ones from ``include_path`` (offline: :func:`write_task`).
* :func:`write_task` writes an lm-eval task YAML and its documents (JSON lines) into a folder.
* :func:`cloze_docs` builds the offline task: a stretch of held-out text and four continuations, one of
  them the true one (chance = 25 %). A model trained from scratch on Shakespeare beats chance there; on
  MMLU, BBH and GSM8K such a model is at chance (or 0), so at the kit's cpu scale those numbers mean
  nothing and the notebooks say so.
* HumanEval: lm-eval's ``humaneval`` task executes the generated code (its ``code_eval`` metric, loaded
  from the Hub); :func:`run_lm_eval` runs it only with ``allow_code_execution=True``, which sets
  ``HF_ALLOW_CODE_EVAL=1`` and lm-eval's ``confirm_run_unsafe_code``: run it in a sandbox (a container
  without network or secrets). AlpacaFarm is not an lm-eval task: its win rate needs a judge model
  (GPT-4 in the paper, through a paid API) that the kit does not have; asking for it raises
  :class:`EvaluationUnavailableError` saying so.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

PAPER_TASKS = ("mmlu", "bbh", "gsm8k", "humaneval")  # AlpacaFarm: see JUDGE_TASKS
JUDGE_TASKS = ("alpacafarm", "alpaca_eval", "alpacaeval")
CODE_TASKS = ("humaneval",)
INSTALL_HELP = ("run_lm_eval needs EleutherAI's lm-evaluation-harness: `.venv/bin/pip install lm-eval==0.4.13`. "
                "Its own tasks download their data from the Hugging Face Hub, so they also need internet "
                "(the 'paper' profile); local task files (include_path) run offline.")
JUDGE_HELP = ("AlpacaFarm is scored by a judge model (the paper uses GPT-4 through a paid API) comparing each "
              "answer with a reference model's; the kit has no judge model and lm-eval has no such task, so it "
              "cannot be run here.")


class EvaluationUnavailableError(RuntimeError):
    """lm-eval is missing, the machine is offline, or the benchmark needs a service the kit lacks."""


def _offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def _local_tasks(include_path) -> set[str]:
    """Task names defined by the YAML files under ``include_path``."""
    import yaml

    names = set()
    for path in Path(include_path).rglob("*.yaml"):
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError:  # lm-eval's own YAML tags (!function): not one of ours
            continue
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            names.add(doc["task"])
    return names


def hf_tokenizer(tokenizer, eos: str = "\n"):
    """A ``transformers`` fast tokenizer around a ``tokenizers.Tokenizer`` (the kit's byte-level BPE),
    which lm-eval needs. The BPE has no special tokens, so the token of ``eos`` (a newline) stands in
    for end-of-text: lm-eval puts it before a context-free continuation and stops generation on it."""
    from transformers import PreTrainedTokenizerFast

    if hasattr(tokenizer, "convert_tokens_to_ids"):  # already a transformers tokenizer
        return tokenizer
    ids = tokenizer.encode(eos).ids
    if len(ids) != 1:
        raise ValueError(f"Invalid eos: {eos!r} is {len(ids)} tokens (expected one token of the vocabulary)")
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    tok.eos_token = tokenizer.id_to_token(ids[0])
    tok.pad_token = tok.eos_token
    return tok


def run_lm_eval(model, tokenizer=None, tasks=PAPER_TASKS, *, include_path=None, num_fewshot: int | None = None,
                batch_size: int = 8, limit: int | float | None = None, device: str | None = None,
                allow_code_execution: bool = False, max_length: int | None = None) -> dict:
    """Evaluate a causal language model on lm-eval ``tasks`` and return ``{task: {metric: value}}``
    (metric names without lm-eval's ",none" filter suffix; no bootstrap standard errors).

    ``model``: a Hugging Face causal LM object (with ``tokenizer``: a transformers tokenizer or a
    ``tokenizers.Tokenizer``, wrapped by :func:`hf_tokenizer`) or a hub id / local path.
    ``include_path``: a folder of local task YAMLs (:func:`write_task`); tasks found there run offline.
    ``num_fewshot`` None keeps each task's default; ``limit`` caps examples per task (a quick check).
    ``allow_code_execution``: needed for HumanEval, which runs the model's code (use a sandbox).
    Raises :class:`EvaluationUnavailableError` when lm-eval is not installed, when a task that needs the
    Hub is asked for while HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set (the Makefile sets HF_HUB_OFFLINE=1:
    run with HF_HUB_OFFLINE=0), or for AlpacaFarm (needs a judge model).
    """
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"Invalid tasks: {tasks!r} (expected a non-empty list of lm-eval task names)")
    if not isinstance(model, str) and tokenizer is None:
        raise ValueError("Invalid tokenizer: None (a model object needs its tokenizer; or pass a hub id / path)")
    judged = [t for t in tasks if t.lower() in JUDGE_TASKS]
    if judged:
        raise EvaluationUnavailableError(f"{judged}: {JUDGE_HELP}")
    code = [t for t in tasks if t.lower().startswith(CODE_TASKS)]
    if code and not allow_code_execution:
        raise ValueError(f"Invalid tasks: {code} execute the model's generated code; pass allow_code_execution=True "
                         "(and run in a sandbox without network or secrets)")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvaluationUnavailableError(INSTALL_HELP) from e
    local = _local_tasks(include_path) if include_path is not None else set()
    remote = [t for t in tasks if t not in local]
    var = _offline()
    if remote and var:
        raise EvaluationUnavailableError(f"{var} is set: lm-eval downloads the data of {remote} from the Hugging "
                                         f"Face Hub and needs internet (run with {var}=0). {INSTALL_HELP}")
    if code:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # HF evaluate's code_eval refuses to run without it
    kw = {"pretrained": model, "batch_size": batch_size}
    if tokenizer is not None:
        kw["tokenizer"] = hf_tokenizer(tokenizer)
    if device is not None:
        kw["device"] = device
    if max_length is not None:
        kw["max_length"] = max_length
    import logging
    import sys

    for name in ("lm-eval", "lm_eval"):  # its INFO lines per task would drown the notebook's output
        logging.getLogger(name).setLevel(logging.WARNING)
    import contextlib
    import io

    # lm-eval's progress bars (and its per-run notices), kept out of notebook output when not on a terminal
    quiet = contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())
    # indexing lm-eval's thousands of built-in task files takes ~20 s: skip it when every task is local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None,
                          include_defaults=bool(remote))
    with quiet:
        out = lm_eval.simple_evaluate(model=HFLM(**kw), tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, confirm_run_unsafe_code=bool(code), bootstrap_iters=0,
                                      log_samples=False)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.partition(",")[0]: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return results


# ------------------------------------------------------------------------------ local task files
def write_task(folder, name: str, docs: list[dict], *, output_type: str = "multiple_choice",
               metric: str | None = None, until=("\n",), max_gen_toks: int = 16) -> Path:
    """Write the lm-eval task ``name`` into ``folder``: ``<name>.jsonl`` (the documents) and
    ``<name>.yaml`` (pointing at it by absolute path). Returns the folder, the ``include_path``.

    ``multiple_choice`` docs: {"context", "choices": [str], "label": int}; the continuation is scored
    right after the context (no delimiter), metric ``acc``. ``generate_until`` docs: {"context",
    "answer"}; greedy generation until one of ``until``, metric ``exact_match`` (GSM8K-style)."""
    if output_type not in ("multiple_choice", "generate_until"):
        raise ValueError(f"Invalid output_type: {output_type!r} (expected 'multiple_choice' or 'generate_until')")
    need = {"context", "choices", "label"} if output_type == "multiple_choice" else {"context", "answer"}
    if not docs or any(not need <= set(d) for d in docs):
        raise ValueError(f"Invalid docs: every document needs the keys {sorted(need)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
           "test_split": "test", "output_type": output_type, "doc_to_text": "{{context}}",
           "target_delimiter": "", "metadata": {"version": 1.0}}
    if output_type == "multiple_choice":
        cfg |= {"doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
                "metric_list": [{"metric": metric or "acc", "aggregation": "mean", "higher_is_better": True}]}
    else:
        cfg |= {"doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False},
                "metric_list": [{"metric": metric or "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    import yaml

    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


def cloze_docs(ids: np.ndarray, tokenizer, n: int = 100, context_tokens: int = 32, choice_tokens: int = 8,
               choices: int = 4, seed: int = 0) -> list[dict]:
    """``n`` multiple-choice documents from a token stream (held-out text): a context of
    ``context_tokens`` tokens and ``choices`` continuations of ``choice_tokens`` tokens, the true one at
    a random position among spans drawn from elsewhere in the stream. Chance accuracy = 1 / choices."""
    if not (isinstance(n, int) and n >= 1 and choices >= 2 and context_tokens >= 1 and choice_tokens >= 1):
        raise ValueError(f"Invalid cloze task: n={n!r}, choices={choices!r}, context_tokens={context_tokens!r}, "
                         f"choice_tokens={choice_tokens!r} (expected positive sizes and at least 2 choices)")
    span = context_tokens + choice_tokens
    if len(ids) < (n + choices) * span:
        raise ValueError(f"Invalid cloze task: a stream of {len(ids)} tokens is too short for {n} documents")
    rng = np.random.default_rng(seed)
    starts = np.linspace(0, len(ids) - span, n).astype(np.int64)  # spread over the whole stream
    docs = []
    for s in starts:
        true = ids[s + context_tokens: s + span]
        others = []
        while len(others) < choices - 1:
            o = int(rng.integers(0, len(ids) - choice_tokens))
            if abs(o - (s + context_tokens)) >= span:  # not overlapping the true continuation
                others.append(ids[o: o + choice_tokens])
        label = int(rng.integers(0, choices))
        conts = others[:label] + [true] + others[label:]
        docs.append({"context": tokenizer.decode(ids[s: s + context_tokens].tolist()),
                     "choices": [tokenizer.decode(c.tolist()) for c in conts], "label": label})
    return docs


__all__ = ["run_lm_eval", "write_task", "cloze_docs", "hf_tokenizer", "EvaluationUnavailableError", "PAPER_TASKS",
           "JUDGE_TASKS", "INSTALL_HELP", "JUDGE_HELP"]
