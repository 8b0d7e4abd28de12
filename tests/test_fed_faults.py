"""Federated faults in the simulator (lrkit/fed/simulate.py, `drive_round`): a client that raises, replies NaN or Inf,
or computes past the round's deadline is left out of that round, the event is recorded, and training goes on; a round
with no valid reply is skipped. Each round with a fault is checked against the algebra: it equals a FeDLRT round
(docs/methods.md, section 3, steps 1-7, written out below from the pure steps of lrkit/fed/fedlrt.py) run with only the valid
clients, with the aggregation weights renormalised over them. The Flower engine's faults are in tests/test_flower.py."""
import math
import time

import pytest
import torch
from torch import nn

from lrkit.fed import fedlrt, simulate
from lrkit.fed.fedlrt import aggregate, key
from lrkit.fed.problems import least_squares
from lrkit.fed.simulate import build_model, check_faults, run_fedavg, run_fedlin, run_fedlrt, to_run_result

torch.set_num_threads(1)

N = 8
LIN = lambda: nn.Linear(N, N, bias=True)  # a bias: dense parameters ride along with the coefficients
KNOBS = dict(lr=0.05, local_steps=3, initial_rank=2, tau=0.01)


def _clients(dtype=torch.float64):
    """Three clients of unequal size (weighted aggregation then has unequal, renormalisable weights)."""
    P = least_squares(n=N, rank=2, num_clients=3, samples_per_client=12, heterogeneity=1.0, noise=0.5, seed=3)
    return [(X[:m].to(dtype), Y[:m].to(dtype)) for (X, Y), m in zip(P["clients"], (12, 7, 10))]


def _model_fn():
    return LIN().double()


def _reference_round(state, clients, variance_correction, weighted, tau=KNOBS["tau"]):
    """One FeDLRT round (dynamic rank, full-batch SGD) over `clients` only, straight from docs/methods.md, section 3."""
    model = build_model(_model_fn, 0, KNOBS["initial_rank"])
    layers = {"": (1, None)}
    loss = nn.functional.mse_loss
    w = [len(X) for X, _ in clients] if weighted else None
    simplified = variance_correction == "simplified"
    basis = [fedlrt.client_basis_gradients(model, state, d, loss, with_coefficients=simplified) for d in clients]
    G = aggregate(basis, w)  # step 2
    bars = fedlrt.server_augment(state, G, layers)  # step 3
    msg, own = dict(state) | bars, basis
    if variance_correction == "full":  # step 5: dL_c/dS_tilde at S_tilde = [[S, 0], [0, 0]]
        own = [fedlrt.client_coefficient_gradients(model, msg, d, loss) for d in clients]
        msg |= aggregate(own, w)
    elif simplified:
        msg |= {k: v for k, v in G.items() if k not in ("G_U", "G_V")}
    S_tilde = [fedlrt.client_coefficient_steps(model, msg, d, loss, KNOBS["local_steps"], KNOBS["lr"],
                                               own_grads=o if variance_correction != "none" else None)
               for d, o in zip(clients, own)]  # steps 4, 6
    return fedlrt.server_truncate(state, bars, aggregate(S_tilde, w), layers, tau)  # step 7


def _run(rounds, clients=None, **kw):
    return run_fedlrt(_model_fn, _clients() if clients is None else clients, rounds,
                      **(KNOBS | dict(variance_correction="full") | kw))


def _assert_state_equal(a, b, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("kind,stage,variance_correction,weighted", [
    ("raise", None, "full", False),           # raises in its first stage: simply left out
    ("nan", None, "full", True),              # non-finite basis gradients, weighted aggregation renormalised
    ("inf", "correction", "full", False),     # non-finite after the basis stage: the round restarts without it
    ("raise", "coefficients", "full", True),  # fails at the last stage: restart, weights renormalised
    ("nan", "coefficients", "simplified", False),
    ("raise", "coefficients", "none", False),
])
def test_a_faulty_client_is_left_out_and_the_round_equals_one_without_it(kind, stage, variance_correction, weighted):
    clients = _clients()
    fault = {"client": 1, "round": 2, "kind": kind, "stage": stage}
    kw = dict(variance_correction=variance_correction, weighted=weighted)
    with pytest.warns(RuntimeWarning, match="FeDLRT client 1 left out of the round at stage"):  # shown, not only kept
        faulty = _run(3, clients, faults=[fault], **kw)
    before = _run(1, clients, **kw)["state"]
    expected = _reference_round(before, [clients[0], clients[2]], variance_correction, weighted)
    _assert_state_equal(_run(2, clients, faults=[fault], **kw)["state"], expected)
    h = faulty["history"]
    dropped = h[2]["dropped_clients"]
    assert [d["client"] for d in dropped] == [1] and not h[2]["skipped"]
    assert dropped[0]["stage"] == (stage or ("basis"))
    reason = {"raise": "raised RuntimeError: injected fault: client 1, round 2", "nan": "non-finite reply",
              "inf": "non-finite reply"}[kind]
    assert dropped[0]["reason"].startswith(reason), dropped
    if kind != "raise":
        assert dropped[0]["reason"].endswith("NaN" if kind == "nan" else "Inf")
    assert "dropped_clients" not in h[1] and "dropped_clients" not in h[3]  # training goes on with every client
    assert h[3]["clients"] == [0, 1, 2] and math.isfinite(h[3]["loss"]) and faulty["diverged_at"] is None
    clean = _run(2, clients, **kw)["history"][2]
    if stage in ("correction", "coefficients"):  # the discarded attempt's traffic is counted
        assert h[2]["bytes_down"][0] > clean["bytes_down"][0]
    else:  # left out in the first stage: nothing resent; it got the first broadcast only and sent nothing
        assert [h[2]["bytes_down"][c] for c in (0, 2)] == [clean["bytes_down"][c] for c in (0, 2)]
        assert 0 < h[2]["bytes_down"][1] < clean["bytes_down"][1] and h[2]["bytes_up"][1] == 0
    final = to_run_result("faults", faulty, {"seed": 0}).final
    assert final["dropped_clients"] == 1 and final["skipped_rounds"] == 0 and not final["diverged"]


def test_reference_round_is_the_simulators_round():
    """The reference above is the simulator's round when nobody fails (else the fault test proves nothing)."""
    clients = _clients()
    for vc in ("none", "simplified", "full"):
        _assert_state_equal(_run(2, clients, variance_correction=vc)["state"],
                            _reference_round(_run(1, clients, variance_correction=vc)["state"], clients, vc, False))


def test_a_client_past_the_deadline_is_dropped():
    """client_timeout_s: an injected slow client (sleeps 1.5 s in round 2) is left out of that round only."""
    clients = _clients()
    slow = [{"client": 2, "round": 2, "kind": "slow", "seconds": 1.5, "stage": "coefficients"}]
    res = _run(3, clients, client_timeout_s=1.0, faults=slow)
    h = res["history"]
    assert [d["client"] for d in h[2]["dropped_clients"]] == [2]
    assert h[2]["dropped_clients"][0]["reason"].startswith("timed out: 1.5") and "client_timeout_s=1.0" in \
        h[2]["dropped_clients"][0]["reason"]
    assert h[2]["wall_time"][2] >= 1.5 and all("dropped_clients" not in r for r in h[:2] + h[3:])
    _assert_state_equal(_run(2, clients, client_timeout_s=1.0, faults=slow)["state"],
                        _reference_round(_run(1, clients)["state"], clients[:2], "full", False))
    # without a deadline the slow client is waited for
    assert "dropped_clients" not in _run(2, clients, faults=slow)["history"][2]


def test_the_deadline_is_on_the_rounds_total_not_on_each_stage():
    """client_timeout_s bounds a client's computation over the round: slow by 0.2 s in each of the three stages
    of a "full" round (basis, correction, coefficients), client 2 stays under the 0.5 s deadline in every stage
    but passes it in total, so it is dropped at the third stage and the round is the one of clients 0 and 1."""
    clients = _clients()
    slow = [{"client": 2, "round": 1, "kind": "slow", "seconds": 0.2}]  # no stage: every stage of round 1
    with pytest.warns(RuntimeWarning, match="client 2 left out of the round at stage 'coefficients': timed out"):
        res = _run(1, clients, client_timeout_s=0.5, faults=slow)
    (d,) = res["history"][1]["dropped_clients"]
    assert (d["client"], d["stage"]) == (2, "coefficients") and float(d["reason"].split()[2]) >= 0.6, d
    _assert_state_equal(res["state"], _reference_round(_run(0, clients)["state"], clients[:2], "full", False))


def test_torchs_one_off_imports_are_not_charged_to_the_first_client(monkeypatch):
    """The first torch.optim optimizer built in a process imports torch._dynamo (about 1.5 s on 2 cores): charged
    to client 0 of round 1, it passed a 1 s deadline in a fresh process or kernel. Stand-in: the first SGD built
    costs 0.6 s; with a 0.5 s deadline (each client computes for milliseconds) nobody may be dropped."""
    init, built = torch.optim.SGD.__init__, []

    def first_is_slow(self, *a, **k):
        if not built:
            time.sleep(0.6)
        built.append(1)
        init(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "__init__", first_is_slow)
    simulate.warm_up.cache_clear()  # as in a fresh process
    try:
        h = _run(1, client_timeout_s=0.5)["history"]
    finally:
        simulate.warm_up.cache_clear()
    assert built and "dropped_clients" not in h[1], h[1].get("dropped_clients")
    assert max(h[1]["wall_time"].values()) < 0.5


@pytest.mark.parametrize("run", [run_fedlrt, run_fedavg], ids=["fedlrt", "fedavg"])
@pytest.mark.parametrize("case,match", [pytest.param(case, match, id=case) for case, match in {
    "empty": r"Invalid data of client 1: no sample \(X has shape \(0, 8\); expected at least one",
    "nan_X": r"Invalid data of client 1: X has 8 non-finite entries \(NaN\) of 56 \(expected finite",
    "inf_y": r"Invalid data of client 1: y has 1 non-finite entries \(Inf\) of 56",
    "lengths": r"Invalid data of client 1: 7 inputs but 6 targets",
    "eval_nan": r"Invalid data of eval_data: y has 1 non-finite entries \(NaN\)",
}.items()])
def test_bad_client_data_is_an_input_error_not_divergence(run, case, match):
    """An empty client or NaN/Inf data trained to a NaN loss and was recorded as a diverged run (as if the lr were too
    large): a ValueError naming the client and what was found, before any round."""
    clients = _clients()
    X, Y = clients[1]
    eval_data = None
    if case == "empty":
        clients[1] = (X[:0], Y[:0])
    elif case == "nan_X":
        clients[1] = (torch.cat([X[:6], torch.full_like(X[6:7], math.nan)]), Y)
    elif case == "inf_y":
        Y = Y.clone()
        Y[3, 2] = math.inf
        clients[1] = (X, Y)
    elif case == "lengths":
        clients[1] = (X, Y[:6])
    else:
        eval_data = (X, Y.clone().index_fill_(0, torch.tensor([0]), 0.0))
        eval_data[1][0, 0] = math.nan
    kw = dict(lr=0.05, local_steps=1) if run is run_fedavg else KNOBS
    with pytest.raises(ValueError, match=match):
        run(_model_fn, clients, 1, eval_data=eval_data, **kw)


def test_a_round_without_a_valid_reply_is_skipped():
    """Every client fails (one raises, one replies NaN, one is late): the round is recorded and skipped, the global
    model is unchanged, and the next round trains from it with every client."""
    clients = _clients()
    faults = [{"client": 0, "round": 2, "kind": "raise"}, {"client": 1, "round": 2, "kind": "nan"},
              {"client": 2, "round": 2, "kind": "slow", "seconds": 1.5}]
    res = _run(3, clients, faults=faults, client_timeout_s=1.0)
    h = res["history"]
    assert h[2]["skipped"] and sorted(d["client"] for d in h[2]["dropped_clients"]) == [0, 1, 2]
    assert h[2]["loss"] == h[1]["loss"] and h[2]["ranks"] == h[1]["ranks"]
    after_1 = _run(1, clients)["state"]
    _assert_state_equal(_run(2, clients, faults=faults, client_timeout_s=1.0)["state"], after_1, atol=0)
    _assert_state_equal(res["state"], _reference_round(after_1, clients, "full", False))
    final = to_run_result("skipped", res, {"seed": 0}).final
    assert final["skipped_rounds"] == 1 and final["dropped_clients"] == 3 and final["rounds"] == 3
    # all clients raising at the last stage: skipped as well
    late = [{"client": c, "round": 1, "kind": "raise", "stage": "coefficients"} for c in range(3)]
    res = _run(1, clients, faults=late)
    assert res["history"][1]["skipped"] and len(res["history"][1]["dropped_clients"]) == 3
    _assert_state_equal(res["state"], _run(0, clients)["state"], atol=0)


def test_every_client_non_finite_is_divergence_not_a_fault():
    """The training blowing up on every client (a too large lr) stays a diverged run, as the sweeps record it."""
    res = _run(3, faults=[{"client": c, "round": 2, "kind": "nan"} for c in range(3)])
    assert res["diverged_at"] == 2 and len(res["history"]) == 3 and math.isnan(res["history"][2]["loss"])
    assert to_run_result("x", res, {"seed": 0}).final["diverged"]


@pytest.mark.parametrize("run", [run_fedavg, run_fedlin], ids=["fedavg", "fedlin"])
def test_dense_baselines_leave_a_faulty_client_out(run):
    """FedAvg (one stage) and FedLin (correction, then coefficients): a client failing in round 1 gives the round of
    the other two clients, i.e. a run on their data alone."""
    clients = _clients()
    for fault in ({"client": 1, "round": 1, "kind": "inf"},
                  {"client": 1, "round": 1, "kind": "raise", "stage": "coefficients"}):
        faulty = run(_model_fn, clients, 1, lr=0.05, local_steps=3, weighted=True, faults=[fault])
        alone = run(_model_fn, [clients[0], clients[2]], 1, lr=0.05, local_steps=3, weighted=True)
        _assert_state_equal(faulty["state"], alone["state"])
        assert [d["client"] for d in faulty["history"][1]["dropped_clients"]] == [1]


def test_fault_options_are_validated():
    with pytest.raises(ValueError, match="Invalid client_timeout_s: 0"):
        _run(1, client_timeout_s=0)
    with pytest.raises(ValueError, match="Invalid fault: .*'explode'"):
        check_faults([{"client": 0, "round": 1, "kind": "explode"}])
    with pytest.raises(ValueError, match="Invalid fault stage: 'train'"):
        check_faults([{"client": 0, "round": 1, "kind": "nan", "stage": "train"}])
    with pytest.raises(ValueError, match="Invalid fault seconds: None"):
        check_faults([{"client": 0, "round": 1, "kind": "slow"}])
    assert check_faults(None) == []


def test_a_client_that_dies_never_answers_again():
    """The "die" drill (on Flower: its SuperNode is killed): dropped from that stage on, in every later round."""
    clients = _clients()
    die = [{"client": 2, "round": 2, "kind": "die", "stage": "coefficients"}]
    res = _run(3, clients, faults=die)
    h = res["history"]
    assert [(d["client"], d["stage"]) for d in h[2]["dropped_clients"]] == [(2, "coefficients")]
    assert [(d["client"], d["stage"]) for d in h[3]["dropped_clients"]] == [(2, "basis")]
    assert h[3]["dropped_clients"][0]["reason"] == "no reply: the client's process died"
    _assert_state_equal(_run(2, clients, faults=die)["state"],
                        _reference_round(_run(1, clients)["state"], clients[:2], "full", False))
