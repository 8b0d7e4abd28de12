import json

import pytest

from lrkit import bench


def test_quick_bench_measures_every_section_and_writes_record_figure_and_readme(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "REPORTS_DIR", tmp_path)
    assert bench.main(["--quick", "--device", "cpu"]) == 0
    doc = json.loads((tmp_path / "bench" / "cpu.json").read_text())
    assert (tmp_path / "bench" / "cpu.png").stat().st_size > 0
    assert [r["method"] for r in doc["steps"]] == list(bench.OPTIMIZERS)
    by = {r["method"]: r for r in doc["steps"]}
    # Same projected state in the kit and the official optimizer; fused optimizers hold fewer gradients.
    assert by["galore"]["optimizer_state_bytes"] == by["galore-torch"]["optimizer_state_bytes"]
    assert by["adalomo fused"]["grad_peak_bytes"] < by["adamw (torch)"]["grad_peak_bytes"]
    # in-backward optimizers have no separate optimizer step; GaLore's refresh makes T = 10 dearer than T = 200
    assert "opt_step_ms" not in by["lomo"] and "opt_step_ms" in by["adalomo unfused"]
    assert by["galore"]["opt_step_ms_T10"] > by["galore"]["opt_step_ms_T200"]
    assert set(doc["refresh"]["perplexity"]["val_ppl"]) == set(bench.REFRESH_METHODS) | {"svd (seed 1)"}
    assert all(r["svd_ms"] > 0 for r in doc["refresh"]["shapes"])
    # FedAvg sends the whole model both ways; FeDLRT's factors are fewer bytes at these widths
    assert all(r["bytes_ratio"] > 1 for r in doc["fed"])
    assert 0 < doc["ratios"]["galore_opt_step_vs_galore_torch_T200"] < 10
    lines = bench.readme_section(tmp_path)
    assert "![bench](bench/cpu.png)" in lines and any("| nano | galore |" in x for x in lines)
    assert "wrote" in capsys.readouterr().out


def test_bench_rejects_unknown_size(capsys):
    assert bench.main(["--quick", "--sizes", "huge", "--device", "cpu"]) == 2
    assert "error: Invalid size: 'huge'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Invalid size: 'huge'"):
        bench.main(["--quick", "--sizes", "huge", "--device", "cpu", "--debug"])


# ------------------------------------------------------------------ the speed knobs of lrkit/optim/galore.py
def test_project_back_into_a_buffer_is_bit_identical():
    import torch

    from lrkit.optim.galore import project_back

    g = torch.Generator().manual_seed(0)
    N, P, Q = torch.randn(6, 5, generator=g), torch.randn(40, 6, generator=g), torch.randn(5, 30, generator=g)
    left, right = torch.randn(6, 30, generator=g), torch.randn(40, 5, generator=g)
    for args in ((left, P, None), (right, None, Q), (N, P, Q)):  # P only, Q only, both
        out = torch.full((40, 30), float("nan"))
        assert torch.equal(project_back(*args, scale=0.25, out=out), project_back(*args, scale=0.25))


def test_power_iters_defaults_to_the_committed_two_and_is_validated():
    import torch

    from lrkit.optim.galore import GaLoreAdamW

    def trained(**kw):
        torch.manual_seed(0)
        W = torch.nn.Parameter(torch.randn(32, 24))
        opt = GaLoreAdamW([{"params": [W], "rank": 4, "proj_method": "randomized_svd", **kw}], lr=1e-2)
        for i in range(3):
            W.grad = torch.randn(32, 24, generator=torch.Generator().manual_seed(i))
            opt.step()
        return W.detach()

    assert torch.equal(trained(), trained(power_iters=2)) and not torch.equal(trained(), trained(power_iters=1))
    with pytest.raises(ValueError, match=r"Invalid power_iters: -1 \(expected an int >= 0\)"):
        GaLoreAdamW([torch.nn.Parameter(torch.zeros(2, 2))], power_iters=-1)
