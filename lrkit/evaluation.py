"""Paper-scale benchmarks through EleutherAI's lm-evaluation-harness (``lm-eval``): the AdaLomo paper's
instruction-tuning evaluation (Sec. 4.2: MMLU, BBH, GSM8K), run by the ``paper`` profile only.

lm-eval is not a dependency of the kit and its tasks download their data from the Hugging Face Hub, so
:func:`run_lm_eval` imports it lazily and fails with a message that says what to install and that it
needs internet. HumanEval (needs a sandbox that executes generated code) and AlpacaFarm (needs a GPT-4
judge through a paid API) are out of scope.
"""
from __future__ import annotations

import os

PAPER_TASKS = ("mmlu", "bbh", "gsm8k")
INSTALL_HELP = ("run_lm_eval needs EleutherAI's lm-evaluation-harness: `.venv/bin/pip install lm-eval`. "
                "Its tasks download their data from the Hugging Face Hub, so it also needs internet; it is "
                "meant for the 'paper' profile only (offline profiles skip it).")


class EvaluationUnavailableError(RuntimeError):
    """lm-eval is missing or the machine is offline: the benchmark cannot run here."""


def _offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def run_lm_eval(model, tokenizer=None, tasks=PAPER_TASKS, *, num_fewshot: int | None = None,
                batch_size: int = 8, limit: int | float | None = None, device: str | None = None) -> dict:
    """Evaluate a causal language model on lm-eval ``tasks`` and return ``{task: {metric: value}}``.

    ``model``: a Hugging Face model object (with ``tokenizer``) or a hub id / local path. ``num_fewshot``
    None keeps each task's default; ``limit`` caps examples per task (for a quick check). Raises
    :class:`EvaluationUnavailableError` when lm-eval is not installed or HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE is set (the Makefile sets HF_HUB_OFFLINE=1: run with HF_HUB_OFFLINE=0).
    """
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"Invalid tasks: {tasks!r} (expected a non-empty list of lm-eval task names)")
    if not isinstance(model, str) and tokenizer is None:
        raise ValueError("Invalid tokenizer: None (a model object needs its tokenizer; or pass a hub id / path)")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise EvaluationUnavailableError(INSTALL_HELP) from e
    var = _offline()
    if var:
        raise EvaluationUnavailableError(f"{var} is set: lm-eval downloads its task data from the Hugging Face "
                                         f"Hub and needs internet (run with {var}=0). {INSTALL_HELP}")
    kw = {"pretrained": model, "batch_size": batch_size}
    if tokenizer is not None:
        kw["tokenizer"] = tokenizer
    if device is not None:
        kw["device"] = device
    out = lm_eval.simple_evaluate(model=HFLM(**kw), tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}
