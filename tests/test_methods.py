"""The GaLore paper's methods on one model: what each trains, ReLoRA's merge, memory accounting."""
import pytest
import torch

from lrkit.memory import GradientPeak, llama_weight_shapes, optimizer_state_numel, parameter_count
from lrkit.methods import block_linears, prepare
from lrkit.models import build_llama, count_parameters
from lrkit.optim.galore import optimizer_state_bytes
from lrkit.train import lm_loss

VOCAB = 256


def _model():
    return build_llama("nano", VOCAB, 32, seed=0)


def _step(p, x, n=1):
    for s in range(1, n + 1):
        loss = lm_loss(p.model, x)
        if getattr(p.optimizer, "updates_in_backward", False):
            p.optimizer.backward(loss)
        else:
            loss.backward()
        p.optimizer.step()
        p.optimizer.zero_grad()
        for cb in p.callbacks:
            cb(s)
    return loss.item()


X = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(0))


def test_galore_projects_exactly_the_block_linears():
    m = _model()
    p = prepare("galore", m, lr=1e-3, rank=4)
    ranked = [g for g in p.optimizer.param_groups if "rank" in g]
    assert len(ranked) == 1 and {id(q) for q in ranked[0]["params"]} == {id(l.weight) for l in block_linears(m).values()}
    assert len(block_linears(m)) == 2 * 7  # two blocks of q, k, v, o, gate, up, down


def test_measured_state_bytes_equal_the_analytic_formula():
    for method, rank in (("full", None), ("galore", 4)):
        p = prepare(method, _model(), lr=1e-3, rank=rank)
        _step(p, X)
        assert optimizer_state_bytes(p.optimizer) == 4 * optimizer_state_numel("nano", method, rank, VOCAB)
    assert parameter_count("nano", VOCAB) == count_parameters(_model())
    assert len(llama_weight_shapes("nano", VOCAB)) == len(list(_model().parameters()))


def test_lora_freezes_the_base_and_trains_adapters_embeddings_norms():
    p = prepare("lora", _model(), lr=1e-3, rank=4)
    trainable = {n for n, q in p.model.named_parameters() if q.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("embed_tokens" in n for n in trainable)
    assert not any("base_layer" in n for n in trainable)
    assert any("norm" in n for n in trainable) and any("lm_head" in n for n in trainable)


def test_low_rank_factorises_every_block_linear():
    m = _model()
    p = prepare("low_rank", m, lr=1e-3, rank=4)
    q = p.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, torch.nn.Sequential) and q[0].weight.shape == (4, 64) and q[1].weight.shape == (64, 4)
    assert _step(p, X, 3) < lm_loss(_model(), X).item()


def test_relora_merge_keeps_the_function_and_restarts_adapters():
    p = prepare("relora", _model(), lr=1e-2, rank=4, relora_every=3)
    _step(p, X, 2)  # adapters are non-zero now
    merge = p.callbacks[0]
    with torch.no_grad():
        before = p.model(input_ids=X).logits
    merge(3)
    with torch.no_grad():
        after = p.model(input_ids=X).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert merge.merges == 1
    assert all(l.lora_B["default"].weight.abs().sum() == 0 for l in merge.layers)
    assert all(l.lora_A["default"].weight not in p.optimizer.state for l in merge.layers)


def test_per_layer_galore_frees_gradients_during_backward():
    full = prepare("galore", _model(), lr=1e-3, rank=4)
    per_layer = prepare("galore", _model(), lr=1e-3, rank=4, per_layer=True)
    peaks = []
    for p in (full, per_layer):
        with GradientPeak(p.model) as peak:
            _step(p, X)
        peaks.append(peak.peak)
    total = sum(q.numel() * 4 for q in full.model.parameters())
    assert peaks[0] == total and peaks[1] < total / 2
    for a, b in zip(full.model.parameters(), per_layer.model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "adam"}, "Invalid method: 'adam'"),
    ({"method": "galore"}, "Invalid rank: None for method 'galore'"),
    ({"method": "lora", "per_layer": True, "rank": 2}, "Invalid per_layer=True for method 'lora'"),
    ({"method": "relora", "rank": 2}, "Invalid relora_every: None"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        prepare(method, _model(), lr=1e-3, **kwargs)


@pytest.mark.parametrize("method, kw", [("adalomo", {}), ("adalomo", {"normalization": "global", "fused": False}),
                                        ("lomo", {}), ("adafactor", {})])
def test_adalomo_paper_optimizers_train(method, kw):
    p = prepare(method, _model(), lr=1e-2 if method != "lomo" else 0.5, **kw)
    before = lm_loss(_model(), X).item()
    after = _step(p, X, 5)
    assert after < before
    if method in ("adalomo", "lomo") and kw.get("fused", True):
        assert p.optimizer.updates_in_backward


def test_optimizer_options_only_where_accepted():
    with pytest.raises(ValueError, match="Invalid options \\['normalization'\\] for method 'galore'"):
        prepare("galore", _model(), lr=1e-3, rank=2, normalization="none")


def test_lora_fine_tuning_trains_adapters_and_head_only():
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2))
    p = prepare("lora", bert, lr=1e-3, rank=2, lora_trainable=("classifier",))
    trainable = {n for n, q in p.model.named_parameters() if q.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
