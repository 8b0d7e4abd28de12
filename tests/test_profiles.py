"""The gpu and paper profiles: every notebook has its cpu, gpu and paper YAML, every key is a parameter of its
notebook, every paper key names its source, a missing file or an unknown key is an error, and each paper's main
notebook runs its paper-profile parameters end to end on CPU, overridden to tiny sizes, on the C4 and CIFAR-10
fixture files (so the gpu/paper code paths cannot rot without a GPU)."""
import dataclasses
import re
from pathlib import Path

import papermill
import pytest
import yaml

from helpers import tiny_notebook
from lrkit import data, experiments, records, reports
from lrkit.data.text import _byte_bpe, read_c4_shard

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
LAYERS = ("cpu", "gpu", "paper")


def _key(nb: Path) -> str:
    return reports.notebook_key(nb)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=_key)
def test_every_notebook_has_cpu_gpu_and_paper_configs_of_its_own_parameters(nb):
    for layer in LAYERS:
        assert (ROOT / "configs" / layer / f"{_key(nb)}.yaml").is_file(), f"configs/{layer}/{_key(nb)}.yaml missing"
    cpu, gpu, paper = (reports.notebook_parameters(nb, p) for p in LAYERS)  # raises on an unknown key
    assert gpu != cpu and paper != gpu, "a gpu or paper YAML that changes nothing reruns the smaller profile"


PAPER_YAMLS = sorted((ROOT / "configs" / "paper").rglob("*.yaml"))


@pytest.mark.parametrize("cfg", PAPER_YAMLS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_key_of_a_paper_yaml_names_its_source(cfg):
    text = cfg.read_text()
    keys = set(yaml.safe_load(text) or {})
    commented = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s*(.*?)\s+#\s*(.*)$", line)
        if m:
            commented[m.group(1)] = m.group(3)
    missing = sorted(k for k in keys if len(commented.get(k, "")) < 8)
    assert keys and not missing, f"{cfg}: keys without a source comment on their line: {missing}"


def _sandbox_notebook(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(reports, "NOTEBOOKS_DIR", tmp_path / "notebooks")
    monkeypatch.setattr(reports, "CONFIGS_DIR", tmp_path / "configs")
    return tiny_notebook(tmp_path, {"cpu": "steps: 10\n", "gpu": "steps: 100\n"})


def test_a_profile_without_its_config_is_an_error_naming_the_file(tmp_path, monkeypatch):
    nb = _sandbox_notebook(tmp_path, monkeypatch)
    assert reports.notebook_parameters(nb, "smoke") == {}
    assert reports.notebook_parameters(nb, "gpu") == {"steps": 100}
    missing = tmp_path / "configs" / "paper" / "demo" / "tiny.yaml"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        reports.notebook_parameters(nb, "paper")  # never the gpu parameters instead
    (tmp_path / "configs" / "cpu" / "demo" / "tiny.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "configs" / "cpu" / "demo" / "tiny.yaml"))):
        reports.notebook_parameters(nb, "gpu")  # every layer below is required too


def test_an_unknown_key_is_an_error_naming_it_and_the_parameters(tmp_path, monkeypatch):
    nb = _sandbox_notebook(tmp_path, monkeypatch)
    (tmp_path / "configs" / "paper" / "demo").mkdir(parents=True)
    (tmp_path / "configs" / "paper" / "demo" / "tiny.yaml").write_text("steps: 1000\nlearning_rate: 0.01\n")
    with pytest.raises(ValueError, match=r"\['learning_rate'\].*not parameters of tiny.ipynb.*\['lr', 'seeds', 'steps'\]"):
        reports.notebook_parameters(nb, "paper")
    (tmp_path / "configs" / "paper" / "demo" / "tiny.yaml").write_text("profile: cpu\n")
    with pytest.raises(ValueError, match=r"\['profile'\]"):
        reports.notebook_parameters(nb, "paper")


def test_lm_corpus_rejects_an_unknown_corpus():
    with pytest.raises(ValueError, match="Invalid corpus: 'wikitext'"):
        experiments.lm_corpus("wikitext", 1024)
    with pytest.raises(ValueError, match="Invalid corpus_options"):
        experiments.lm_corpus("shakespeare", 1024, ["c4.json.gz"])


# ------------------------------------------------------------------ the gpu/paper paths end to end, tiny
C4_SHARD = FIXTURES / "c4-validation.00000-of-00008.json.gz"
LM_TINY = dict(model_size="nano", steps=2, batch_size=2, seq_len=8, eval_every=2, eval_windows=2, seeds=[0])


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Records and data caches under tmp_path, C4 from the fixture shard with a BPE trained on it, CIFAR-10 from
    the fixture archive. Returns the tiny overrides of an LM notebook's parameters."""
    monkeypatch.setattr(records, "REPORTS_DIR", tmp_path / "reports")
    monkeypatch.setattr(data, "DATA_DIR", tmp_path / "data")
    tok = tmp_path / "tok.json"
    _byte_bpe(tok, "\n\n".join(r["text"] for r in read_c4_shard(C4_SHARD)), 300)
    src = data.REGISTRY["cifar10"]
    monkeypatch.setitem(data.REGISTRY, "cifar10", dataclasses.replace(
        src, loader=lambda data_dir: src.loader(data_dir, archive=FIXTURES / "cifar-10-python.tar.gz")))
    return {**LM_TINY, "vocab_size": 300,
            # the shard as both splits: its every-8th-document hold-out is 15 tokens, too short for the tuning
            # split's windows (two disjoint ones beside the claims'); overlap is harmless in a test that runs
            "c4": dict(data_files={"train": [str(C4_SHARD)], "validation": [str(C4_SHARD)]}, tokenizer=str(tok),
                       train_tokens=4000, val_tokens=1000)}


def _paper(nb: str, tiny: dict, **more) -> dict:
    """The notebook's paper-profile parameters (its defaults under the layered YAMLs) with the tiny overrides; C4 stays the corpus, its options
    pointed at the fixture."""
    path = ROOT / "notebooks" / nb
    defaults = {k: eval(v["default"]) for k, v in papermill.inspect_notebook(str(path)).items()
                if k not in ("profile", "report_dir")}
    p = defaults | reports.notebook_parameters(path, "paper")
    if "corpus" in p:
        assert p["corpus"] == "c4", f"{nb}: the paper profile trains on C4"
        p["corpus_options"] = p["corpus_options"] | tiny["c4"]
    return p | {k: v for k, v in tiny.items() if k != "c4" and k in p} | more


def _c4_runs(runs):
    rs = list(runs.values())
    assert rs and all(r.final["val_loss"] is not None for r in rs)
    return rs


def test_galore_paper_profile_runs_on_c4(offline):
    from lrkit.experiments import galore as suite

    tiny = offline | {"rank": 4}
    t = _paper("galore/tuning.ipynb", tiny, points=1, tasks=[])
    t.pop("seeds", None)  # tuning runs use the tuning seed
    chosen = suite.run_tuning(records.report_dir("galore/tuning", "paper"), profile="paper", **t)
    experiments.report(records.report_dir("galore/tuning", "paper"), [], suite.tuning_table(chosen), tuned=chosen)
    p = _paper("galore/galore.ipynb", tiny, tasks=[], other_seeds=[0])
    runs = suite.run_galore(None, profile="paper", **p)
    rs = _c4_runs(runs)
    assert set(runs.arms) == {"full-rank", "galore", suite.REFERENCE, "lora", "low-rank"}
    assert {r.config["vocab_size"] for r in rs} == {300} and rs[0].config["model_size"] == "nano"


def test_adalomo_paper_profile_runs_on_c4(offline):
    from lrkit.experiments import adalomo as suite

    p = _paper("adalomo/adalomo.ipynb", offline)
    corpus = experiments.lm_corpus(p["corpus"], p["vocab_size"], p["corpus_options"])
    assert corpus.name == "c4"
    train = experiments.LMTrainConfig(steps=p["steps"], batch_size=p["batch_size"], seq_len=p["seq_len"],
                                      eval_every=p["eval_every"], eval_windows=p["eval_windows"])
    out = records.report_dir("adalomo/tuning", "paper")
    chosen = suite.tuning(out, corpus=corpus, train=train, model_size=p["model_size"], points=1)
    experiments.report(out, [], suite.sweep_table(chosen), tuned=chosen)
    pre, fine, mem = suite.main(None, profile="paper", corpus=corpus, train=train, model_size=p["model_size"],
                                seeds=p["seeds"], memory_steps=1)
    assert fine is None and len(_c4_runs(pre)) == 3 and len(mem) == 3


def test_getting_started_paper_profile_runs_on_c4(offline):
    from lrkit.experiments import getting_started as gs

    p = _paper("getting_started.ipynb", offline, device="cpu")
    runs, entropy = gs.run(None, **p)
    (r,) = _c4_runs(runs)
    assert r.config["vocab_size"] == 300 and entropy > 0 and r.final["below_unigram"] is not None


def test_fedlrt_paper_profile_runs_resnet18_on_cifar10(offline):
    from lrkit.experiments import fedlrt

    p = _paper("fedlrt/fedlrt.ipynb", {}, resnet_width=4, train_size=10, test_size=2, rounds=2, num_clients=2,
               local_steps=1, batch_size=4, tail_rounds=1, device="cpu", initial_rank=2, r_max=4, seeds=[0],
               ls_rounds=2, ls_clients=2, ls_local_steps=2)
    assert (p["dataset"], p["model"]) == ("cifar10", "resnet18")
    ls = dict(n=p["ls_n"], rank=p["ls_rank"], num_clients=p["ls_clients"], samples=p["ls_samples"],
              heterogeneity=p["ls_heterogeneity"], noise=p["ls_noise"], rounds=p["ls_rounds"], lr=p["ls_lr"],
              local_steps=p["ls_local_steps"])
    vision = {k: p[k] for k in ("dataset", "model", "hidden", "resnet_width", "train_size", "test_size",
                                "num_clients", "alpha", "rounds", "local_steps", "batch_size", "tail_rounds",
                                "device", "chunk_size")}
    lrs = {"FedAvg": p["lr_fedavg"], "FedLin": p["lr_fedlin"], "FeDLRT": p["lr_fedlrt"]}
    runs = fedlrt.main(None, profile="paper", seeds=p["seeds"], ls=ls, ls_initial_rank=p["ls_initial_rank"],
                       ls_tau=p["ls_tau"], vision=vision, lrs=lrs, initial_rank=p["initial_rank"], tau=p["tau"],
                       r_max=p["r_max"])
    vision_runs = [runs[(m, 0)] for m in ("FedAvg", "FedLin", "FeDLRT")]
    assert all(r.config.get("dataset", "cifar10") == "cifar10" for r in vision_runs)
    assert all(r.history and r.history[-1].get("test_accuracy") is not None for r in vision_runs)


def test_shakespeare_without_options_is_the_cpu_corpus_unchanged():
    """The cpu profile's numbers stay bit-identical: lm_corpus's default is the loader call the suites made."""
    a, b = experiments.lm_corpus("shakespeare", 1024, {}), data.load("shakespeare", vocab_size=1024)
    assert a.name == b.name == "shakespeare" and a.vocab_size == b.vocab_size == 1024
    assert (a.train == b.train).all() and (a.val == b.val).all() and a.val_works == b.val_works
