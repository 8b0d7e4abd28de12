"""FeDLRT (Schotthoefer & Laiu 2024, arXiv 2406.17887): the paper's statements, the claims that
``notebooks/fedlrt/*.ipynb`` test, and their experiments, one call each.

* :data:`PAPER`: what the paper states that a notebook compares with, with its source. The paper gives
  no number the kit's small problems can be set beside (its vision results are ResNet18 / AlexNet / VGG16
  on CIFAR-10), so the margins the claims test are the kit's reading of its words, each with its reason
  (``Claim.margin_reason``; accuracy equivalence and non-inferiority use ``lrkit.claims.MARGINS["accuracy"]``).
* :data:`CLAIMS`: per notebook, the statements it tests (``lrkit.claims`` turns per-seed measurements
  into verdicts). tuning.ipynb has none: it only chooses learning rates.
* Experiments: :func:`tuning` (every learning-rate sweep of the folder), :func:`main` (fedlrt.ipynb: least
  squares, the MLP, and the CNN arm with every convolution and hidden dense layer factorised, :data:`CLAIMS_CNN`;
  its verdicts through :func:`main_verdicts`, which adds the horizon flags of :func:`horizon`),
  :func:`dynamic_rank`, :func:`initial_rank`, :func:`heterogeneity`; each builds its arms and calls
  ``lrkit.experiments.run_all`` (or ``tune``) with :class:`Vision` or :class:`LeastSquares`, which run one
  seed of one arm through ``lrkit.experiments.federated`` and add the read-outs the claims and tables name
  to the run's ``final`` dict.

Read-outs, per arm (the ablation plans' metrics): **final performance** ``accuracy_tail`` (mean test
accuracy of the last ``tail_rounds`` rounds: one round's accuracy jumps by a point or more);
**convergence rate** ``accuracy_auc`` (mean test accuracy over every round after the first, i.e. the area
under the accuracy curve per round: defined for every run that did not diverge, never capped at the run's
length); **memory** ``client_state_floats`` (floats a client holds while it trains: the model in its
training basis plus its correction state, analytic from the final model, see :func:`client_state_floats`);
**communication** ``bytes_per_client_round`` (counted on every tensor exchanged); **client compute**
``flops_per_client_round`` (analytic). Least squares is read as the relative excess of the final global
loss over the optimum (``excess_loss``), deterministic given the seed. A diverged run's accuracy read-outs
are None: ``lrkit.claims`` counts it at the worst value of its metric (never dropped).

Pairing: the seed draws the image subsample, the Dirichlet partition and the initial model (for least
squares: the problem and the initial model), so arms on the same seed see the same clients and start from
the same weights (a factorised model from the SVD of the same dense initialisation).

Equal freedom, equal budget (issue 19, item 1): every vision arm that a claim compares has exactly one tuned
knob, its learning rate, from one sweep in :func:`tuning` (same grid, same tuning seed 1000, scored on a
validation split carved from the training images, never on the test set the claims read; ``tune`` extends a
grid whose best rate sits at its edge). Every other knob is fixed for all arms alike: rounds, local steps,
batch size, clients, and FeDLRT's tau, initial rank and r_max (not tuned for any arm). Groups: "vision"
(FedAvg, FedLin, FeDLRT: fedlrt.ipynb; FeDLRT's rate is also the "dynamic rank" arm's and every initial
rank's), "dynamic rank" (the fixed ranks and the frozen basis of ablation_dynamic_rank.ipynb, each tuned
like the dynamic arm), "heterogeneity alpha=<a>" (FedAvg, FedLin, FeDLRT none / full at each label skew of
heterogeneity.ipynb). Least squares uses one step size for every arm (fixed for all): its claims are about
where each method's iteration settles at the same step size. Every run records where its learning rate
came from (``config["lr_from"]``: "<group>/<tuned arm>", None when set by hand), and :func:`flags` turns
that into the edge-of-grid flags the verdicts show.
"""
from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import torch

from lrkit import data, records
from lrkit.claims import MARGINS, Claim, interval
from lrkit.experiments import TUNING_SEED, Runs, edge_flags, federated, run_all, tail_mean, tune, tuned
from lrkit.fed import problems

# ------------------------------------------------------------------------------------------ the paper
PAPER = {
    # Abstract: "a reduction of client compute and communication costs by up to an order of magnitude with
    # minimal impacts on global accuracy" (computer-vision benchmarks, Sec. 4).
    "cost_reduction_up_to": 10.0,
    # Abstract / Sec. 3: variance correction gives "global loss descent and convergence to a stationary
    # point"; the linear least-squares test with a low-rank target (Sec. 4.1) shows the corrected method
    # converging where the uncorrected one stalls.
    "least_squares": "corrected FeDLRT converges to the optimum, uncorrected FeDLRT stalls (Sec. 4.1)",
}
PAPER_COST_SOURCE = ("Abstract ('up to an order of magnitude', the best case over ResNet18 / AlexNet / VGG16 on "
                     "CIFAR-10)")
# The kit's one margin for classifier accuracies (2 points, either side for "within" / "as accurate as",
# one side for "costs at most"), with its reason.
ACCURACY_MARGIN, ACCURACY_REASON = MARGINS["accuracy"]
# "Up to an order of magnitude" is the best case over the paper's benchmarks; the kit's bar for the
# 784-256-10 MLP, whose one factorised layer holds 98 % of the weights: at least 5x less communication.
COMMUNICATION_BAR = 5.0
# Least squares: "reaches the optimum" = relative excess of the final global loss below 1e-4; "stalls" =
# the uncorrected run ends at least 1e-3 (0.1 % of the optimal loss) above the corrected one.
LS_REACHED, LS_STALL = 1e-4, 1e-3
EXCESS_FLOOR = 1e-8  # relative excess floored here: below the float32 rounding of the loss (~6e-8)
RANK_TOLERANCE = 0.5  # ranks are integers: |final rank - target rank| < 0.5 means equal
SETTLED_RANK_RATIO = 1.5

# One registry of the vision methods: the tuning groups, the arms of fedlrt.ipynb and heterogeneity.ipynb.
METHODS = {"FedAvg": dict(method="fedavg"), "FedLin": dict(method="fedlin"),
           "FeDLRT": dict(method="fedlrt", variance_correction="full")}
HETEROGENEITY_METHODS = {"FedAvg": METHODS["FedAvg"], "FedLin": METHODS["FedLin"],
                         "FeDLRT none": METHODS["FeDLRT"] | {"variance_correction": "none"},
                         "FeDLRT full": METHODS["FeDLRT"]}
TUNING_GROUP = "vision"
DYNAMIC_RANK_GROUP = "dynamic rank"
CNN_GROUP = "cnn"  # fedlrt.ipynb part (c): CNN FedAvg and CNN FeDLRT on the CNN problem


def heterogeneity_group(alpha: float) -> str:
    """The tuning group of heterogeneity.ipynb's vision arms at Dirichlet ``alpha``."""
    return f"heterogeneity alpha={alpha:g}"


# ------------------------------------------------------------------------------------------ claims
CLAIMS_MAIN = [
    Claim("ls-full-reaches-optimum", "With full variance correction FeDLRT converges to the optimum of the "
          "least-squares problem with heterogeneous clients (relative excess of the global loss < 1e-4).",
          "Sec. 4.1; Abstract", "excess_loss", ("LS FeDLRT full",), quantity="value", op="<", bound=LS_REACHED,
          margin_reason="'converges to the optimum' read as ending within 0.01 % of the optimal loss: far above "
                        "the float32 rounding of the loss (~6e-8), ten times below the stall bar of ls-none-stalls"),
    Claim("ls-none-stalls", "Without variance correction FeDLRT stalls above the optimum: it ends at least "
          "0.1 % of the optimal loss higher than with full correction.", "Sec. 4.1", "excess_loss",
          ("LS FeDLRT none", "LS FeDLRT full"), op=">", bound=LS_STALL,
          margin_reason="a stall is a gap of at least 0.1 % of the optimal loss, ten times the 'reaches' bar, so "
                        "the two least-squares claims cannot both rest on the same rounding-level difference"),
    Claim("ls-finds-the-rank", "FeDLRT's truncation finds the optimum's rank (final rank minus the target's "
          "rank within +-0.5, i.e. equal), starting from another rank with r_max = n.", "Sec. 3 (truncation)",
          "rank_error", ("LS FeDLRT full",), quantity="value", op="between", bound=RANK_TOLERANCE,
          margin_reason="ranks are integers: a rank error inside (-0.5, 0.5) on every seed means the final rank "
                        "equals the optimum's; one rank too many or too few fails"),
    Claim("vision-accuracy", "FeDLRT's global test accuracy is within 2 points of FedAvg's, either side (the "
          "kit's reading of 'minimal impacts on global accuracy' as an equivalence), each at its tuned learning "
          "rate.", "Abstract; Sec. 4", "accuracy_tail", ("FeDLRT", "FedAvg"), op="between", bound=ACCURACY_MARGIN,
          lower_is_better=False, margin_reason=ACCURACY_REASON),
    Claim("vision-communication", "FeDLRT cuts the communication per client and round against FedAvg "
          "(the kit's bar at MLP scale: at least 5x; the paper: up to 10x).", "Abstract; Sec. 4",
          "bytes_per_client_round", ("FedAvg", "FeDLRT"), quantity="ratio", op=">", bound=COMMUNICATION_BAR,
          paper=PAPER["cost_reduction_up_to"], paper_source=PAPER_COST_SOURCE, accounting=True,
          margin_reason="5x, half the paper's best case: the MLP factorises one layer (98 % of the weights) at the "
                        "rank truncation picks, so an order of magnitude is not expected here"),
    Claim("vision-client-compute", "FeDLRT needs less client compute per round than FedAvg (FLOPs ratio "
          "FedAvg / FeDLRT > 1).", "Abstract; Sec. 4", "flops_per_client_round", ("FedAvg", "FeDLRT"),
          quantity="ratio", op=">", bound=1.0, paper=PAPER["cost_reduction_up_to"], paper_source=PAPER_COST_SOURCE,
          accounting=True, margin_reason="any saving: FeDLRT's clients also compute basis gradients every round, "
                                         "so less compute than FedAvg is not given"),
]

# The CNN arm (fedlrt.ipynb part (c)): the same comparison on a network whose every convolution and hidden dense
# layer is factorised (lrkit.fed.problems.SmallCNN), the paper's kind of model at CPU width.
CNN_ARMS = ("CNN FedAvg", "CNN FeDLRT")
CLAIMS_CNN = [
    Claim("cnn-accuracy", "On a CNN with every convolution and hidden dense layer factorised, FeDLRT's global test "
          "accuracy is within 2 points of FedAvg's on the same CNN shape (dense), either side, each at its learning "
          "rate tuned in group 'cnn'.", "Abstract; Sec. 4 (factorised convolutional networks)", "accuracy_tail",
          ("CNN FeDLRT", "CNN FedAvg"), op="between", bound=ACCURACY_MARGIN, lower_is_better=False,
          margin_reason=ACCURACY_REASON),
    Claim("cnn-communication", "On the CNN FeDLRT cuts the communication per client and round against FedAvg "
          "(ratio FedAvg / FeDLRT > 1; the paper: up to 10x).", "Abstract; Sec. 4", "bytes_per_client_round",
          ("CNN FedAvg", "CNN FeDLRT"), quantity="ratio", op=">", bound=1.0, paper=PAPER["cost_reduction_up_to"],
          paper_source=PAPER_COST_SOURCE, accounting=True,
          margin_reason="any saving: at CPU width (8 and 16 channels) the convolutions are barely wider than the rank "
                        "truncation keeps, so the paper's order of magnitude is not expected"),
    Claim("cnn-client-compute", "On the CNN FeDLRT needs less client compute per round than FedAvg (FLOPs ratio "
          "FedAvg / FeDLRT > 1; the paper: up to 10x).", "Abstract; Sec. 4", "flops_per_client_round",
          ("CNN FedAvg", "CNN FeDLRT"), quantity="ratio", op=">", bound=1.0, paper=PAPER["cost_reduction_up_to"],
          paper_source=PAPER_COST_SOURCE, accounting=True,
          margin_reason="any saving: FeDLRT's clients also compute basis and correction gradients on all local "
                        "images every round, and a factorised 3x3 convolution is cheaper only when its rank is well "
                        "below half of min(out_channels, in_channels * 9)"),
]
CLAIMS_MAIN = CLAIMS_MAIN + CLAIMS_CNN

CLAIMS_DYNAMIC_RANK = [
    Claim("basis-learning-matters", "Learning the basis (augment with the basis gradients, truncate back to "
          "the same rank) is more accurate than training S in the frozen initial basis of the same rank, each at "
          "its tuned learning rate.", "Sec. 3 (basis augmentation)", "accuracy_tail",
          ("fixed at initial rank", "frozen basis"), op=">", bound=0.0, lower_is_better=False),
    Claim("rank-adaptivity-beats-initial-rank", "Letting the rank adapt (truncation at tau) is more accurate "
          "than keeping the initial rank fixed, both learning the basis, each at its tuned learning rate.",
          "Abstract; Sec. 3 (truncation)", "accuracy_tail", ("dynamic rank", "fixed at initial rank"), op=">",
          bound=0.0, lower_is_better=False),
    Claim("rank-adaptivity-matches-hindsight", "The dynamic rank is as accurate (within 2 points, either side) "
          "as a fixed rank chosen in hindsight: the fixed rank of the ablation nearest the rank the dynamic runs "
          "settle at, each at its tuned learning rate.", "Abstract ('automatically optimizes computing and "
          "communication resource utilization')", "accuracy_tail", ("dynamic rank", "fixed at settled rank"),
          op="between", bound=ACCURACY_MARGIN, lower_is_better=False, margin_reason=ACCURACY_REASON),
]

INITIAL_RANK_ENDS = ("r0=2", "r0=16")  # the claims compare the lowest and the highest initial rank
CLAIMS_INITIAL_RANK = [
    Claim("initial-rank-accuracy", "The final accuracy does not depend on the initial rank: starting at rank 2 "
          "or 16 ends within 2 accuracy points, either side.", "Sec. 3 (augmentation doubles the basis each round, "
          "truncation picks the rank)", "accuracy_tail", INITIAL_RANK_ENDS, op="between", bound=ACCURACY_MARGIN,
          lower_is_better=False, margin_reason=ACCURACY_REASON),
    Claim("initial-rank-settled-rank", "Runs started at different ranks settle at similar ranks (ratio of the "
          "final ranks within 1.5x, either way).", "Sec. 3 (truncation)", "mean_rank", INITIAL_RANK_ENDS[::-1],
          quantity="ratio", op="between", bound=SETTLED_RANK_RATIO,
          margin_reason="1.5x: the initial ranks double from one arm to the next, so final ranks within 1.5x are "
                        "nearer each other than neighbouring starting ranks; farther apart, the rank tracks where "
                        "the run started (the 8x spread of the starts)"),
]

CLAIMS_HETEROGENEITY = [
    Claim("vc-helps-fedlrt-skewed", "Under label-skewed clients variance correction raises FeDLRT's accuracy "
          "(full vs none, each at its own tuned learning rate).", "Sec. 3 (variance correction); Sec. 4",
          "accuracy_tail", ("FeDLRT full (skewed)", "FeDLRT none (skewed)"), op=">", bound=0.0,
          lower_is_better=False),
    Claim("vc-helps-fedavg-skewed", "Under label-skewed clients the same correction on full weights (FedLin) "
          "raises FedAvg's accuracy, each at its own tuned learning rate.", "Sec. 4 (FedLin baseline, Mitra et "
          "al. 2021)", "accuracy_tail", ("FedLin (skewed)", "FedAvg (skewed)"), op=">", bound=0.0,
          lower_is_better=False),
    Claim("vc-harmless-mild", "With mildly skewed clients variance correction costs FeDLRT at most 2 points "
          "(non-inferiority, each at its own tuned learning rate).", "kit (the control variate vanishes for "
          "identical clients)", "accuracy_tail", ("FeDLRT full (mild)", "FeDLRT none (mild)"), op=">",
          bound=-ACCURACY_MARGIN, lower_is_better=False, margin_reason=ACCURACY_REASON),
    Claim("ls-vc-helps-most-heterogeneous", "On least squares at the highest client heterogeneity of the sweep "
          "where no run of the tuning seed's problem diverged, full correction ends closer to the optimum than "
          "none.", "Sec. 4.1", "excess_loss",
          ("LS none (most heterogeneous stable)", "LS full (most heterogeneous stable)"), op=">", bound=0.0),
]

CLAIMS = {"tuning": [], "fedlrt": CLAIMS_MAIN, "ablation_dynamic_rank": CLAIMS_DYNAMIC_RANK,
          "ablation_initial_rank": CLAIMS_INITIAL_RANK, "heterogeneity": CLAIMS_HETEROGENEITY}


# ------------------------------------------------------------------------------------------ one run
def client_state_floats(model, method: str, knobs: dict) -> int:
    """Floats a client holds while it trains (the memory read-out), from the global ``model`` at the end of
    the run: FedAvg the P weights; FedLin 2P (weights and the control variate); FeDLRT per factorised
    n_out x n_in layer at rank r the training basis U, V and coefficients S at k = min(2r, n_out, n_in)
    (augmented; k = r for ``dynamic_rank=False``), plus the dense parameters, plus the correction state
    (full: as many floats as the trained coefficients and dense parameters; simplified: r x r per layer
    and the dense parameters; none: 0). Analytic, like the FLOPs: gradients and activations are left out
    (the same for every method up to the trained parameters' size)."""
    from lrkit.fed.layers import low_rank_layers

    layers = low_rank_layers(model)
    coef = {id(l.S) for l in layers.values()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in coef)
    if method in ("fedavg", "fedlin"):
        return dense * (2 if method == "fedlin" else 1)
    augment = knobs.get("dynamic_rank", True)
    held = trained = small = 0
    for l in layers.values():
        r = l.rank
        k = min(2 * r, l.n_out, l.n_in) if augment else r
        held, trained, small = held + (l.n_out + l.n_in) * k + k * k, trained + k * k, small + r * r
    correction = {"none": 0, "simplified": small + dense, "full": trained + dense}[
        knobs.get("variance_correction", "full")]
    return held + dense + correction


MODELS = ("mlp", "cnn", "resnet18")


class Vision:
    """``fn(name, seed=..., method=..., lr=..., **knobs)`` for ``run_all`` / ``tune``: one federated run on
    the seed's image problem with ``model`` one of :data:`MODELS` ("mlp": input-``hidden``-10, head dense; "cnn":
    ``lrkit.fed.problems.SmallCNN`` of ``cnn_width`` / ``cnn_hidden``, every layer but the head factorised;
    "resnet18" of ``resnet_width``, stem and head dense), a seeded subsample of ``dataset`` over ``num_clients``
    Dirichlet(``alpha``) clients (an arm may override ``alpha``). ``validation``: evaluate on images held out of
    the training split (never the test split) instead of the test set (for tuning). ``lr_from``: where the rate
    came from ("<group>/<arm>" of the tuning record, or None), kept in the run's config. Adds to ``final``:
    ``accuracy_tail``, ``accuracy_auc``, ``client_state_floats`` (see the module docstring; the accuracy
    read-outs are None for a diverged run), ``mean_rank`` (FeDLRT: mean final rank over factorised layers),
    and per history row ``mean_rank``."""

    def __init__(self, *, dataset="fashion_mnist", model="mlp", hidden=256, resnet_width=64, cnn_width=8,
                 cnn_hidden=64, train_size=3000, test_size=1000, num_clients=10, alpha=0.5, rounds=10, local_steps=5,
                 batch_size=32, tail_rounds=5, validation=False, device="cpu", chunk_size=None):
        if model not in MODELS:
            raise ValueError(f"Invalid model: {model!r} (expected one of {MODELS})")
        self.problem = dict(dataset=dataset, model=model, train_size=train_size, test_size=test_size,
                            num_clients=num_clients, alpha=alpha, validation=validation)
        if model == "cnn":
            self.problem |= dict(cnn_width=cnn_width, cnn_hidden=cnn_hidden)
        self.hidden, self.width, self.tail = hidden, resnet_width, tail_rounds
        self.cnn = dict(width=cnn_width, hidden=cnn_hidden)
        self.run_kw = dict(rounds=rounds, local_steps=local_steps, batch_size=batch_size, weighted=True,
                           device=device, chunk_size=chunk_size)
        self._images, self._clients = {}, {}

    def split_indices(self, seed: int) -> dict:
        """{"train": indices into the data set's training split, "held": (split name, indices)}: the images
        a run on ``seed`` trains on and the ones it is scored on (the validation images come from the
        training split, after the training subsample; the claims' images are the test split). The same
        draw as ``lrkit.fed.problems.image_classification``."""
        p = self.problem
        d = data.load(p["dataset"])
        n = p["train_size"] + (p["test_size"] if p["validation"] else 0)
        if n > len(d["y_train"]):
            raise ValueError(f"Invalid sizes: train_size + test_size = {n} images for validation exceed the "
                             f"{len(d['y_train'])} of the training split")
        rng = np.random.default_rng(seed)
        tr = rng.permutation(len(d["y_train"]))[:n]
        te = rng.permutation(len(d["y_test"]))[:p["test_size"]]
        held = ("train", tr[p["train_size"]:]) if p["validation"] else ("test", te)
        return {"train": tr[:p["train_size"]], "held": held}

    def images(self, seed: int):
        if seed not in self._images:
            p = self.problem
            n = p["train_size"] + (p["test_size"] if p["validation"] else 0)
            im = problems.image_classification(p["dataset"], n, p["test_size"], seed=seed, flatten=p["model"] == "mlp")
            if len(im["y"]) < n:
                raise ValueError(f"Invalid sizes: train_size {p['train_size']} + test_size {p['test_size']} images for "
                                 f"validation exceed the {len(im['y'])} of {p['dataset']!r}'s training split")
            X, y = im["X"][:p["train_size"]], im["y"][:p["train_size"]]
            held = ((im["X"][p["train_size"]:], im["y"][p["train_size"]:]) if p["validation"]
                    else (im["X_test"], im["y_test"]))
            self._images[seed] = (X, y, held)
        return self._images[seed]

    def clients(self, seed: int, alpha: float):
        if (seed, alpha) not in self._clients:
            X, y, _ = self.images(seed)
            self._clients[(seed, alpha)] = problems.dirichlet_clients(X, y, self.problem["num_clients"], alpha,
                                                                      seed=seed)
        return self._clients[(seed, alpha)]

    def model_fn(self, X):
        if self.problem["model"] == "mlp":
            return problems.mlp(X.shape[1], self.hidden), ["2"]  # the classifier head stays dense
        if self.problem["model"] == "cnn":  # every convolution and the hidden dense layer factorised, head dense
            fn = problems.cnn(X.shape[1], width=self.cnn["width"], hidden=self.cnn["hidden"], image_size=X.shape[-1])
            return fn, list(problems.CNN_DENSE)
        return problems.resnet18(X.shape[1], width=self.width), list(problems.RESNET18_DENSE)

    def __call__(self, name, *, seed, method, lr, alpha=None, lr_from=None, **knobs):
        alpha = self.problem["alpha"] if alpha is None else alpha
        X, _, held = self.images(seed)
        model_fn, dense = self.model_fn(X)
        if method == "fedlrt":
            knobs = {"exclude": dense} | knobs
        config = dict(self.problem) | {"alpha": alpha, "hidden": self.hidden, "tail_rounds": self.tail,
                                       "lr_from": lr_from}
        r = federated(name, method=method, model_fn=model_fn, clients=self.clients(seed, alpha), seed=seed, lr=lr,
                      eval_data=held, config=config, **self.run_kw, **knobs)
        r.final["client_state_floats"] = client_state_floats(r.model, method, knobs)
        r.model = None  # the trained network is not needed after the run (memory across many runs)
        for h in r.history:
            h["mean_rank"] = float(np.mean(list(h["ranks"].values()))) if h["ranks"] else None
        r.final["mean_rank"] = r.history[-1]["mean_rank"]
        # a diverged run has no read-out: the claims rule counts it at the worst value; tables count it
        ok = not r.final["diverged"]
        r.final["accuracy_tail"] = tail_mean("test_accuracy", self.tail)(r) if ok else None
        r.final["accuracy_auc"] = accuracy_auc(r) if ok else None
        return r


def accuracy_auc(r) -> float | None:
    """The convergence-rate read-out: mean test accuracy over every evaluated round after round 0 (the area
    under the accuracy-per-round curve divided by the rounds). None if a round has no finite accuracy."""
    acc = [h.get("test_accuracy") for h in r.history if h["round"] >= 1]
    if not acc or any(a is None or not math.isfinite(a) for a in acc):
        return None
    return float(np.mean(acc))


class LeastSquares:
    """``fn(name, seed=..., method=..., **knobs)``: one federated run on the seed's least-squares problem
    (``lrkit.fed.problems.least_squares`` with ``low_rank_noise=True``: the global optimum W_ls has the
    target's rank, see there); an arm may override ``heterogeneity`` and ``num_clients``. Adds to
    ``final`` and every history row ``excess_loss`` = (loss - loss_ls) / loss_ls (floored at
    :data:`EXCESS_FLOOR`; None in ``final`` for a diverged run), to ``final`` ``rel_error_W`` =
    ||W - W_ls|| / ||W_ls||, ``rank`` (FeDLRT's final rank) and ``rank_error`` (that minus the target's rank)."""

    def __init__(self, *, n=8, rank=2, num_clients=4, samples=10, heterogeneity=0.5, noise=1.0, rounds=30,
                 lr=0.06, local_steps=30):
        self.problem = dict(n=n, rank=rank, num_clients=num_clients, samples_per_client=samples,
                            heterogeneity=heterogeneity, noise=noise)
        self.run_kw = dict(rounds=rounds, lr=lr, local_steps=local_steps)

    def __call__(self, name, *, seed, method, **knobs):
        p = self.problem | {k: knobs.pop(k) for k in ("heterogeneity", "num_clients") if k in knobs}
        P = data.load("least_squares", **p, seed=seed, low_rank_noise=True)
        n = p["n"]
        r = federated(name, method=method, model_fn=lambda: torch.nn.Linear(n, n, bias=False), clients=P["clients"],
                      seed=seed, config={"problem": "least_squares", **p, "low_rank_noise": True},
                      **self.run_kw, **knobs)
        floor = P["loss_ls"]
        for h in r.history:
            h["excess_loss"] = max((h["loss"] - floor) / floor, EXCESS_FLOOR) if math.isfinite(h["loss"]) else None
            h["mean_rank"] = float(np.mean(list(h["ranks"].values()))) if h["ranks"] else None
        W = r.model(torch.eye(n)).T.detach()  # bias-free linear map: model(I) = W^T
        rank = r.final["ranks"].get("") if r.final["ranks"] else None
        ok = not r.final["diverged"]
        r.final |= {"excess_loss": r.history[-1]["excess_loss"] if ok else None, "loss_optimum": floor,
                    "rel_error_W": float((W - P["W_ls"]).norm() / P["W_ls"].norm()) if ok else None,
                    "rank": rank, "rank_error": None if rank is None else rank - p["rank"]}
        r.model = None
        return r


# ------------------------------------------------------------------------------------------ tuning.ipynb
def vision_arms(initial_rank: int, tau: float, r_max: int, methods=tuple(METHODS)) -> dict:
    """{method: kwargs without lr}: FedAvg, FedLin, and FeDLRT with full correction at these knobs."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"Invalid methods: {bad!r} (expected some of {list(METHODS)})")
    fed = dict(initial_rank=initial_rank, tau=tau, r_max=r_max)
    return {m: METHODS[m] | (fed if METHODS[m]["method"] == "fedlrt" else {}) for m in methods}


def rank_arms(initial_rank: int, tau: float, r_max: int, fixed_ranks) -> dict:
    """The arms of ablation_dynamic_rank.ipynb (kwargs without lr), all FeDLRT with full correction:
    "dynamic rank" (= fedlrt.ipynb's FeDLRT: start at ``initial_rank``, truncate at ``tau``, at most
    ``r_max``), "fixed r=<r>" for each of ``fixed_ranks`` (augment, train, truncate back to r every round:
    r_min = r_max = r, the basis moves, the rank does not), "frozen basis" (no augmentation at
    ``initial_rank``: only S trains, in the initial basis)."""
    ranks = list(fixed_ranks)
    if not ranks or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks) \
            or initial_rank not in ranks:
        raise ValueError(f"Invalid fixed_ranks: {ranks!r} (expected positive ints including initial_rank="
                         f"{initial_rank!r}: the fixed-rank arm the claims compare with)")
    base = dict(METHODS["FeDLRT"], tau=tau)
    return ({"dynamic rank": base | dict(initial_rank=initial_rank, r_max=r_max)}
            | {f"fixed r={r}": base | dict(initial_rank=r, r_min=r, r_max=r) for r in ranks}
            | {"frozen basis": base | dict(initial_rank=initial_rank, dynamic_rank=False)})


def heterogeneity_arms(initial_rank: int, tau: float, r_max: int) -> dict:
    """{method: kwargs without lr} of heterogeneity.ipynb's vision cells: FedAvg, FedLin, FeDLRT none / full."""
    fed = dict(initial_rank=initial_rank, r_max=r_max, tau=tau)
    return {m: kw | (fed if kw["method"] == "fedlrt" else {}) for m, kw in HETEROGENEITY_METHODS.items()}


def tuning(out, *, center: float, points: int, factor: float, tail_rounds: int, initial_rank: int,
           tau: float, r_max: int, fixed_ranks, het_alphas, het_train_size: int, het_rounds: int,
           cnn: dict | None = None, **vision) -> dict:
    """Every learning-rate sweep of the folder (``tuning.ipynb``), each through ``lrkit.experiments.tune``
    on the same ``points``-point grid ``factor`` apart around ``center`` (extended while the best rate sits at
    an edge), with the tuning seed, scored by the validation accuracy (mean of the last ``tail_rounds``
    rounds, on images held out of the training split, never the test split the claims read). Groups:
    "vision" (FedAvg, FedLin, FeDLRT on ``vision``: fedlrt.ipynb's problem); "dynamic rank" (the fixed
    ranks ``fixed_ranks`` and the frozen basis, same problem; the dynamic arm is "vision"'s FeDLRT);
    "heterogeneity alpha=<a>" for each of ``het_alphas`` (FedAvg, FedLin, FeDLRT none / full on the
    heterogeneity problem: ``vision`` with ``het_train_size`` images and ``het_rounds`` rounds); with ``cnn``
    (keys :data:`CNN_TUNING_KEYS`), "cnn" (CNN FedAvg and CNN FeDLRT on the CNN problem of fedlrt.ipynb part (c),
    :func:`cnn_sizes`, on ``cnn["points"]`` rates: both arms the same grid). Returns
    {group: {arm: chosen}} for ``records.save_summary(..., tuned=...)``; each chosen dict also names its
    ``problem``."""
    if cnn is not None:
        _check_keys("cnn", cnn, CNN_TUNING_KEYS)
    sweep = dict(metric="accuracy_tail", factor=factor, lower_is_better=False)

    def run(fn, arms, group, problem, n=points):
        chosen = tune(fn, arms, out, centers={m: center for m in arms}, group=group, points=n, **sweep)
        return {m: c | {"problem": problem} for m, c in chosen.items()}

    main_problem = {k: vision[k] for k in ("train_size", "rounds") if k in vision} | {"alpha": vision.get("alpha")}
    fn = Vision(validation=True, tail_rounds=tail_rounds, **vision)
    groups = {TUNING_GROUP: run(fn, vision_arms(initial_rank, tau, r_max), TUNING_GROUP, main_problem)}
    arms = {a: kw for a, kw in rank_arms(initial_rank, tau, r_max, fixed_ranks).items() if a != "dynamic rank"}
    groups[DYNAMIC_RANK_GROUP] = run(fn, arms, DYNAMIC_RANK_GROUP, main_problem)
    het = Vision(validation=True, tail_rounds=tail_rounds, **(vision | dict(train_size=het_train_size,
                                                                              rounds=het_rounds)))
    for a in het_alphas:
        arms = {m: kw | {"alpha": a} for m, kw in heterogeneity_arms(initial_rank, tau, r_max).items()}
        groups[heterogeneity_group(a)] = run(het, arms, heterogeneity_group(a),
                                             dict(train_size=het_train_size, rounds=het_rounds, alpha=a))
    if cnn is not None:
        sizes = cnn_sizes(cnn)
        groups[CNN_GROUP] = run(Vision(validation=True, tail_rounds=tail_rounds, **(vision | sizes)),
                                cnn_arms(initial_rank, tau, r_max), CNN_GROUP,
                                {k: sizes[k] for k in ("train_size", "rounds", "cnn_width", "cnn_hidden")},
                                n=cnn["points"])
    return groups


def sweep_table(chosen: dict) -> pd.DataFrame:
    """One row per (group, method, lr) of the sweep: the validation score, whether it was chosen, whether the
    rate was added by the extension rule, the arm's final edge state and its number of tuning runs."""
    return pd.DataFrame([{"group": g, "method": m, "lr": lr, "val_accuracy_tail": s, "chosen": lr == c["lr"],
                          "added": any(math.isclose(lr, e) for e in c.get("extended", [])), "at_edge": c["at_edge"],
                          "edge_reason": c.get("edge_reason", ""), "runs": c.get("runs", len(c["grid"]))}
                         for g, arms in chosen.items() for m, c in arms.items()
                         for lr, s in zip(c["grid"], c["scores"])])


def tuning_notes(chosen: dict) -> list[str]:
    """Plain facts of the sweeps: per group the chosen rates, the tuning runs per arm, the extensions and
    the rates still at the grid's edge (with why)."""
    notes = []
    for g, arms in chosen.items():
        c0 = next(iter(arms.values()))
        notes.append(f"Group {g!r}, {c0['budget']}, the same grid for " + ", ".join(arms) + ": chosen "
                     + ", ".join(f"{m} lr {c['lr']:.3g} ({c.get('runs', len(c['grid']))} runs)"
                                 for m, c in arms.items()) + ".")
        ext = [f"{m} (+{', '.join(f'{e:.3g}' for e in c['extended'])})" for m, c in arms.items() if c.get("extended")]
        if ext:
            notes.append(f"Group {g!r}, rates added because the best sat at the grid's edge: " + "; ".join(ext) + ".")
        edge = [f"{m} ({c.get('edge_reason') or 'at the edge'})" for m, c in arms.items() if c["at_edge"]]
        if edge:
            notes.append(f"Group {g!r}, best rate still at the edge of its grid (verdicts reading it are flagged): "
                         + ", ".join(edge) + ".")
    return notes


def tuned_rate(profile: str, group: str, arm: str) -> tuple[float, str]:
    """(lr, "<group>/<arm>"): the learning rate tuning.ipynb chose for ``arm`` in ``group``."""
    rates = tuned("fedlrt", profile, group)
    if arm not in rates:
        raise KeyError(f"tuning group {group!r} has no arm {arm!r} (it has {sorted(rates)}): rerun tuning.ipynb")
    return rates[arm], f"{group}/{arm}"


def flags(profile: str, runs: Runs) -> dict:
    """{arm: flag text} for ``claims.evaluate_all(..., flags=...)``: the arms of ``runs`` whose learning rate
    (``config["lr_from"]``, "<group>/<tuned arm>") is still at the edge of its tuning grid
    (``lrkit.experiments.edge_flags``); an arm whose rate was set by hand carries no flag."""
    by_group, out = {}, {}
    for (arm, _), r in runs.items():
        src = r.config.get("lr_from")
        if not src or arm in out:
            continue
        group, tuned_arm = src.rsplit("/", 1)
        if group not in by_group:
            by_group[group] = edge_flags("fedlrt", profile, group)
        if tuned_arm in by_group[group]:
            text = by_group[group][tuned_arm]
            out[arm] = text if arm == tuned_arm else f"{arm} (rate of {group}/{text})"
    return out


def budget(profile: str, groups, problem: dict | None = None) -> str:
    """The tuning budget behind the learning rates in words, for the notes beside every comparison; with
    ``problem`` ({"train_size", "rounds", ...} of the notebook), also where the tuned problem differs."""
    path = records.tuning_record("fedlrt", profile)
    if path is None:
        return "no tuning record"
    rec = records.load(path)["summary"]["tuned"]
    parts = []
    for g in groups:
        if g in rec:
            arms = rec[g]
            c0 = next(iter(arms.values()))
            parts.append(f"group {g!r} ({c0['budget']}; tuning runs " + ", ".join(
                f"{m} {c.get('runs', len(c['grid']))}" for m, c in arms.items()) + ")")
            diff = {k: (v, c0.get("problem", {}).get(k)) for k, v in (problem or {}).items()
                    if k in c0.get("problem", {}) and c0["problem"][k] != v}
            if diff:
                parts[-1] += (", tuned on a different problem: " + ", ".join(
                    f"{k} {t!r} (here {v!r})" for k, (v, t) in diff.items()))
    return f"learning rates from tuning.ipynb ({path.parent.name} record): " + "; ".join(parts)


# ------------------------------------------------------------------------------------------ fedlrt.ipynb
LS_ARMS = {"LS FedAvg": dict(method="fedavg"), "LS FedLin": dict(method="fedlin")}


def ls_arms(initial_rank: int, tau: float, corrections=("none", "simplified", "full")) -> dict:
    """FedAvg, FedLin and FeDLRT with each variance correction on least squares (r_max = n: the rank is
    free, truncation must find it)."""
    from lrkit.fed.fedlrt import VARIANCE_CORRECTIONS

    bad = [vc for vc in corrections if vc not in VARIANCE_CORRECTIONS]
    if bad:
        raise ValueError(f"Invalid corrections: {bad!r} (expected some of {list(VARIANCE_CORRECTIONS)})")
    return LS_ARMS | {f"LS FeDLRT {vc}": dict(method="fedlrt", variance_correction=vc, initial_rank=initial_rank,
                                              tau=tau) for vc in corrections}


def cnn_arms(initial_rank: int, tau: float, r_max: int) -> dict:
    """{arm: kwargs without lr}: the CNN arms of fedlrt.ipynb part (c), "CNN FedAvg" (the dense CNN) and "CNN
    FeDLRT" (every convolution and the hidden dense layer factorised, full correction, the MLP arm's initial rank,
    tau and r_max)."""
    return {f"CNN {m}": kw for m, kw in vision_arms(initial_rank, tau, r_max, ("FedAvg", "FeDLRT")).items()}


def cnn_sizes(cnn: dict) -> dict:
    """:class:`Vision` keywords of the CNN problem from a ``cnn`` config (``width``, ``hidden``, ``train_size``,
    ``test_size``, ``rounds``); every other size is the vision problem's."""
    return dict(model="cnn", cnn_width=cnn["width"], cnn_hidden=cnn["hidden"], train_size=cnn["train_size"],
                test_size=cnn["test_size"], rounds=cnn["rounds"])


CNN_KEYS = ("width", "hidden", "train_size", "test_size", "rounds", "lr", "seeds")  # fedlrt.ipynb's cnn
CNN_TUNING_KEYS = ("width", "hidden", "train_size", "test_size", "rounds", "points")  # tuning.ipynb's cnn


def _check_keys(name: str, d: dict, keys) -> None:
    if not isinstance(d, dict) or set(d) != set(keys):
        got = sorted(d) if isinstance(d, dict) else repr(d)
        raise ValueError(f"Invalid {name}: keys {got} (expected exactly {list(keys)})")


def main(out, *, profile: str, seeds, ls: dict, ls_initial_rank: int, ls_tau: float, vision: dict, lrs: dict,
         initial_rank: int, tau: float, r_max: int, cnn: dict | None = None) -> Runs:
    """``fedlrt.ipynb``: (a) least squares (``ls``: :class:`LeastSquares` sizes) with every method; (b) the
    vision problem (``vision``: :class:`Vision` sizes) with FedAvg, FedLin and FeDLRT (full correction) at
    ``lrs`` ({method: lr or None = tuned, group "vision"}); (c) with ``cnn`` (keys :data:`CNN_KEYS`; every other
    size from ``vision``), :func:`cnn_arms` on the :class:`Vision` problem with model "cnn" (:func:`cnn_sizes`)
    on ``cnn["seeds"]``, both arms at their rates tuned in group "cnn" (``cnn["lr"]`` None) or both at the one
    hand-set rate ``cnn["lr"]``. Every arm on every seed. Returns one Runs (arms "LS ...", the method names and
    "CNN ...")."""
    if cnn is not None:
        _check_keys("cnn", cnn, CNN_KEYS)
        lr = cnn["lr"]
        if lr is not None and not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
            raise ValueError(f"Invalid cnn lr: {lr!r} (expected None = tuned in group {CNN_GROUP!r}, or a positive "
                             "float, the same for both CNN arms)")
    rates = {m: (lr, None) if lr is not None else tuned_rate(profile, TUNING_GROUP, m) for m, lr in lrs.items()}
    a = run_all(LeastSquares(**ls), ls_arms(ls_initial_rank, ls_tau), out, seeds=seeds)
    arms = {m: kw | {"lr": rates[m][0], "lr_from": rates[m][1]}
            for m, kw in vision_arms(initial_rank, tau, r_max, tuple(lrs)).items()}
    runs = a.merge(run_all(Vision(**vision), arms, out, seeds=seeds))
    if cnn is not None:
        arms = {}
        for m, kw in cnn_arms(initial_rank, tau, r_max).items():
            lr, src = (float(cnn["lr"]), None) if cnn["lr"] is not None else tuned_rate(profile, CNN_GROUP, m)
            arms[m] = kw | {"lr": lr, "lr_from": src}
        runs = runs.merge(run_all(Vision(**(vision | cnn_sizes(cnn))), arms, out, seeds=cnn["seeds"]))
    return runs


# The horizon check of the vision accuracy claims: an arm has converged when the 95 % interval of the last-quarter
# change of its test accuracy lies inside +-HORIZON_TOL, a quarter of the accuracy margin the claims test.
HORIZON_TOL = ACCURACY_MARGIN / 4
HORIZON_CLAIMS = ("vision-accuracy", "cnn-accuracy")


def horizon(runs: Runs, arms, tol: float = HORIZON_TOL) -> tuple[pd.DataFrame, dict]:
    """``lrkit.analysis.horizon`` on the per-round test accuracy of ``arms`` (x = round). Returns (a table:
    arm, last-quarter change of the test accuracy in points, its 95 % interval, n, converged) and {arm: flag}
    for the arms not shown converged (inside +-``tol``)."""
    from lrkit import analysis

    arms = [a for a in arms if a in runs.arms]
    changes, flags_ = analysis.horizon({a: runs.arm(a) for a in arms}, "test_accuracy", tol, x="round")
    rows = [{"arm": a, "last_quarter_change_points": 100 * m, "lo": 100 * lo, "hi": 100 * hi, "n": n,
             "tol_points": 100 * tol, "converged": a not in flags_} for a, (m, lo, hi, n) in changes.items()]
    return pd.DataFrame(rows), flags_


def hand_set_flags(runs: Runs, arms=CNN_ARMS) -> dict:
    """{arm: flag} for the arms of ``arms`` in ``runs`` whose learning rate was set by hand (``config["lr_from"]``
    None): a CNN arm run at the one hand-set rate (``cnn["lr"]`` given) is not tuned, so every verdict reading it
    says so in its row."""
    out = {}
    for a in arms:
        rs = runs.arm(a) if a in runs.arms else []
        if rs and not rs[0].config.get("lr_from"):
            out[a] = (f"{a}: learning rate hand-set ({rs[0].config['lr']:g}, the same for both CNN arms), "
                      "untuned for both arms")
    return out


def main_verdicts(profile: str, runs: Runs, tol: float = HORIZON_TOL) -> tuple[list, pd.DataFrame]:
    """The verdicts of fedlrt.ipynb: every claim with the edge-of-grid flags (:func:`flags`); the accuracy
    claims (:data:`HORIZON_CLAIMS`) also with the horizon flags of their arms (:func:`horizon`: "not converged
    at this horizon" where the last-quarter change of the test accuracy is not shown inside +-``tol``). The cost
    rows do not read the accuracy, so they carry no horizon flag. Every row reading an arm with a hand-set rate
    (the CNN arms, :func:`hand_set_flags`) says so. Returns (verdicts, the horizon table)."""
    from lrkit import claims as claims_

    edge = flags(profile, runs)
    for a, text in hand_set_flags(runs).items():
        edge[a] = "; ".join(t for t in (edge.get(a), text) if t)
    acc = [c for c in CLAIMS["fedlrt"] if c.id in HORIZON_CLAIMS]
    table, hflags = horizon(runs, list(dict.fromkeys(a for c in acc for a in c.arms)), tol)
    merged = {a: "; ".join(t for t in (edge.get(a), hflags.get(a)) if t) for a in set(edge) | set(hflags)}
    by_id = {v.claim: v for v in claims_.evaluate_all(acc, runs.measure, flags=merged)}
    by_id |= {v.claim: v for v in claims_.evaluate_all([c for c in CLAIMS["fedlrt"] if c.id not in HORIZON_CLAIMS],
                                                       runs.measure, flags=edge)}
    return [by_id[c.id] for c in CLAIMS["fedlrt"]], table


def layer_ranks(runs: Runs, arm: str = "CNN FeDLRT") -> pd.DataFrame:
    """The rank each factorised layer of ``arm`` settles at: one row per layer with its shape as a matrix
    (n_out x n_in; convolutions out_channels x in_channels k k), the largest rank it can hold min(n_out, n_in),
    and the final rank's mean, min and max over seeds (round 0: the initial rank)."""
    from lrkit.fed.layers import low_rank_layers
    from lrkit.fed.simulate import build_model

    rs = [r for r in runs.arm(arm) if r.final.get("ranks")] if arm in runs.arms else []
    if not rs:
        return pd.DataFrame(columns=["layer", "n_out", "n_in", "full_rank", "initial_rank", "rank", "rank_min",
                                     "rank_max", "n"])
    c = rs[0].config
    channels, size = (1, 28) if c["dataset"] == "fashion_mnist" else (3, 32)
    fn = problems.cnn(channels, width=c["cnn_width"], hidden=c["cnn_hidden"], image_size=size)
    shapes = {n: (m.n_out, m.n_in) for n, m in low_rank_layers(
        build_model(fn, 0, initial_rank=1, exclude=list(problems.CNN_DENSE))).items()}
    rows = []
    for layer, (n_out, n_in) in shapes.items():
        final = [r.final["ranks"][layer] for r in rs]
        rows.append({"layer": layer, "n_out": n_out, "n_in": n_in, "full_rank": min(n_out, n_in),
                     "initial_rank": rs[0].history[0]["ranks"][layer], "rank": float(np.mean(final)),
                     "rank_min": min(final), "rank_max": max(final), "n": len(final)})
    return pd.DataFrame(rows)


def ls_table(runs: Runs) -> pd.DataFrame:
    """Least-squares arms: mean and 95 % interval over seeds of the relative excess loss, the relative error
    of W and the final rank, and the communication per client and round."""
    return runs.summary(["excess_loss", "rel_error_W", "rank", "bytes_per_client_round"],
                        arms=[a for a in runs.arms if a.startswith("LS ")])


VISION_METRICS = ("accuracy_tail", "accuracy_auc", "mean_rank", "client_state_floats", "bytes_per_client_round",
                  "flops_per_client_round")


def plot_vision(runs: Runs, table: pd.DataFrame, ranks: pd.DataFrame):
    """fedlrt.ipynb's vision figure: test accuracy over rounds (MLP arms; CNN arms), communication and client
    compute per client and round (every vision arm of ``table``, with 95 % intervals), the mean rank of the
    FeDLRT arms over rounds, and the final rank of each factorised CNN layer (``ranks``, :func:`layer_ranks`)
    against the largest it can hold. Returns the figure."""
    import matplotlib.pyplot as plt

    from lrkit import plots

    fig, ax = plt.subplots(2, 3, figsize=(20, 9))
    mlp = [a for a in table.arm if not a.startswith("CNN ")]
    plots.curves(runs, y="test_accuracy", x="round", ax=ax[0, 0], arms=mlp, title="Test accuracy (MLP)")
    plots.curves(runs, y="test_accuracy", x="round", ax=ax[0, 1], arms=[a for a in CNN_ARMS if a in runs.arms],
                 title="Test accuracy (CNN, every layer but the head factorised)")
    for a, col, what in ((ax[0, 2], "MB_per_client_round", "Communication"), (ax[1, 0], "MFLOPs_per_client_round",
                                                                               "Client compute")):
        plots.bars(table, x="arm", y=col, lo=col + "_lo", hi=col + "_hi", ax=a, title=f"{what} per client and round")
        a.set(xlabel="arm", ylabel=col.replace("_", " "))
        a.tick_params(axis="x", rotation=20)
    fed = [a for a in ("FeDLRT", "CNN FeDLRT") if a in runs.arms]
    plots.curves(runs, y="mean_rank", x="round", ax=ax[1, 1], arms=fed, title="FeDLRT rank over rounds")
    ax[1, 1].set_ylabel("mean rank of the factorised layers")
    if len(ranks):
        plots.bars(ranks, x="layer", y="rank", ax=ax[1, 2], title="CNN FeDLRT: final rank per layer (mean over seeds)")
        ax[1, 2].scatter(ranks.layer, ranks.full_rank, marker="_", s=400, color="black", zorder=3,
                         label="full rank min(n_out, n_in)")
        ax[1, 2].legend(fontsize=8)
        ax[1, 2].set_ylabel("rank")
    fig.tight_layout()
    return fig


def vision_table(runs: Runs, arms=None) -> pd.DataFrame:
    """Vision arms, the ablation plans' metrics per arm (mean and 95 % interval over seeds): final accuracy
    (tail mean), convergence rate (``accuracy_auc``), final mean rank, memory (client state in MB, float32),
    communication (MB per client and round), client compute (MFLOPs per client and round); wall time per run."""
    arms = arms or [a for a in runs.arms if not a.startswith("LS ")]
    t = runs.summary(list(VISION_METRICS), arms=arms)
    for k, unit in (("client_state_floats", 1e6 / 4), ("bytes_per_client_round", 1e6), ("flops_per_client_round", 1e6)):
        for s in ("", "_lo", "_hi"):
            t[k + s] = t[k + s] / unit
    t = t.rename(columns=lambda c: c.replace("bytes_per_client_round", "MB_per_client_round")
                 .replace("flops_per_client_round", "MFLOPs_per_client_round")
                 .replace("client_state_floats", "client_state_MB"))
    t["wall_s_per_run"] = [float(np.mean([r.wall_time_s for r in runs.arm(a)])) for a in arms]
    return t


def main_notes(runs: Runs, budget_words: str) -> list[str]:
    """Measured facts beside the claims: the budget, the final ranks, the paired accuracy gaps."""
    m = runs.measure("rank")
    ranks = {a: sorted({v for v in m[a].values() if v is not None}) for a in m if a.startswith("LS FeDLRT")}
    notes = [f"Vision: {budget_words}.",
             "Least squares, final FeDLRT rank over seeds (the optimum's rank is the target's): "
             + "; ".join(f"{a.removeprefix('LS ')}: {v}" for a, v in ranks.items()) + "."]
    if "CNN FeDLRT" in runs.arms and "CNN FedAvg" in runs.arms:
        cs = {a: runs.arm(a)[0].config for a in CNN_ARMS}  # lr and lr_from kept in config by `federated`
        c = cs["CNN FeDLRT"]
        how = (f"both arms at one hand-set learning rate {c['lr']:g} (untuned for both)" if not c.get("lr_from")
               else "learning rates tuned in group 'cnn' (" + ", ".join(f"{a} {v['lr']:.3g}" for a, v in cs.items())
               + ")")
        notes.append(f"CNN (part (c)): {how}, {c['rounds']} rounds, {c['train_size']} training images, width "
                     f"{c['cnn_width']}, hidden {c['cnn_hidden']}, {len(runs.arm('CNN FeDLRT'))} seed(s).")
        notes.append(paired_note(runs, "accuracy_tail", "CNN FeDLRT", "CNN FedAvg", scale=100, unit=" points"))
        notes.append(paired_note(runs, "accuracy_auc", "CNN FeDLRT", "CNN FedAvg", scale=100, unit=" points"))
    for a in ("FedLin", "FeDLRT"):
        if a in runs.arms:
            notes.append(paired_note(runs, "accuracy_tail", a, "FedAvg", scale=100, unit=" points"))
            notes.append(paired_note(runs, "accuracy_auc", a, "FedAvg", scale=100, unit=" points"))
    return notes


def paired_note(runs, metric, a, b, scale=1.0, unit="") -> str:
    """'<a> - <b> <metric>: mean [95 % CI] (n)' from paired seeds (a plain measured fact; a seed where
    either run has no value is left out of this note and counted in its text)."""
    va, vb = runs.measure(metric).get(a, {}), runs.measure(metric).get(b, {})
    d = [scale * (va[s] - vb[s]) for s in va if s in vb and va[s] is not None and vb[s] is not None]
    missing = sum(1 for s in va if s in vb) - len(d)
    mean, lo, hi, n = interval(d)
    ci = f"95% CI [{lo:+.3g}, {hi:+.3g}]" if n > 1 else "one seed, no interval"
    return (f"{a} - {b}, {metric}: {mean:+.3g}{unit} ({ci}, n={n}, paired by seed"
            + (f"; {missing} seed(s) without a value on one side" if missing else "") + ").")


# ------------------------------------------------------------------------------------------ ablation_dynamic_rank
def dynamic_rank(out, *, profile: str, seeds, vision: dict, initial_rank: int, tau: float, r_max: int, fixed_ranks,
                 lr=None) -> Runs:
    """``ablation_dynamic_rank.ipynb``: the arms of :func:`rank_arms`, every one at its own tuned learning
    rate (``lr`` None: "dynamic rank" at group "vision"'s FeDLRT rate, the others at group "dynamic rank";
    else ``lr`` for every arm, untuned). Use :func:`rank_claim_runs` for the arms the claims read."""
    arms = rank_arms(initial_rank, tau, r_max, fixed_ranks)
    if lr is None:  # first: a missing tuning record fails before any run
        rates = {a: tuned_rate(profile, TUNING_GROUP, "FeDLRT") if a == "dynamic rank"
                 else tuned_rate(profile, DYNAMIC_RANK_GROUP, a) for a in arms}
    else:
        rates = {a: (lr, None) for a in arms}
    return run_all(Vision(**vision), {a: kw | {"lr": rates[a][0], "lr_from": rates[a][1]} for a, kw in arms.items()},
                   out, seeds=seeds)


def rank_claim_runs(runs: Runs, initial_rank: int) -> tuple[Runs, dict]:
    """``runs`` plus the two named arms the claims read: "fixed at initial rank" (= "fixed r=<initial_rank>")
    and "fixed at settled rank" (= the fixed rank of the ablation nearest, on a log scale, the median final
    rank of the "dynamic rank" runs; ties go to the higher rank). Returns (those Runs, {"settled": median,
    "nearest": rank})."""
    fixed = sorted(int(a.removeprefix("fixed r=")) for a in runs.arms if a.startswith("fixed r="))
    ranks = [r.final["mean_rank"] for r in runs.arm("dynamic rank") if r.final.get("mean_rank") is not None]
    if not ranks or not fixed:
        raise ValueError(f"Invalid runs: need 'dynamic rank' runs with a final rank and fixed-rank arms "
                         f"(have {runs.arms})")
    settled = float(statistics.median(ranks))
    nearest = min(fixed, key=lambda r: (abs(math.log(r / settled)), -r))
    out = Runs(runs)
    for alias, r in (("fixed at initial rank", initial_rank), ("fixed at settled rank", nearest)):
        for s in runs.seeds:
            if (f"fixed r={r}", s) in runs:
                out[(alias, s)] = runs[(f"fixed r={r}", s)]
    return out, {"settled": settled, "nearest": nearest}


def dynamic_rank_notes(runs: Runs, picked: dict, budget_words: str) -> list[str]:
    """The budget, the settled rank and the arm standing for it, and the costs of the dynamic rank against
    the fixed ranks it is compared with."""
    notes = [budget_words + " (each arm at its own tuned rate).",
             f"The dynamic rank runs settle at median rank {picked['settled']:g}; the nearest fixed rank of the "
             f"ablation, r={picked['nearest']}, stands for 'fixed at settled rank'."]
    for b in ("fixed at initial rank", "fixed at settled rank"):
        for m, scale, unit in (("accuracy_auc", 100, " points"), ("bytes_per_client_round", 1e-6, " MB"),
                               ("flops_per_client_round", 1e-6, " MFLOPs"), ("client_state_floats", 4e-6, " MB")):
            notes.append(paired_note(runs, m, "dynamic rank", b, scale=scale, unit=unit))
    return notes


# ------------------------------------------------------------------------------------------ ablation_initial_rank
def initial_rank(out, *, profile: str, seeds, vision: dict, initial_ranks, lr=None, tau: float, r_max: int) -> Runs:
    """``ablation_initial_rank.ipynb``: FeDLRT (full correction) started at each of ``initial_ranks`` (arms
    "r0=<r>"), every arm at one learning rate: FeDLRT's from group "vision" (tuned at fedlrt.ipynb's
    initial rank, neither end of the claims; ``lr`` overrides it for every arm)."""
    ends = [a for a in INITIAL_RANK_ENDS if a not in {f"r0={r}" for r in initial_ranks}]
    if ends:
        raise ValueError(f"Invalid initial_ranks: {list(initial_ranks)!r} (the claims compare {INITIAL_RANK_ENDS}: "
                         f"missing {ends})")
    rate, src = tuned_rate(profile, TUNING_GROUP, "FeDLRT") if lr is None else (lr, None)
    arms = {f"r0={r0}": dict(METHODS["FeDLRT"], lr=rate, lr_from=src, initial_rank=r0, tau=tau, r_max=r_max)
            for r0 in initial_ranks}
    return run_all(Vision(**vision), arms, out, seeds=seeds)


# ------------------------------------------------------------------------------------------ heterogeneity
def heterogeneity(out, *, profile: str, seeds, ls: dict, ls_heterogeneities, ls_clients, ls_tau: float, corrections,
                  vision: dict, alphas, initial_rank: int, r_max: int, default_tau: float, taus, client_fractions,
                  lr=None) -> Runs:
    """``heterogeneity.ipynb``: (1) least squares, FeDLRT with each of ``corrections`` over client
    heterogeneity (at ``ls["num_clients"]``) and over the number of clients (at ``ls["heterogeneity"]``):
    arms "LS het=<h> C=<C> <correction>", on ``seeds`` and, for the cells at the default client count, on the
    tuning seed too (arms "select LS ...": the stable-cell choice reads those, never the claims' seeds);
    (2) vision, FedAvg, FedLin, FeDLRT none / full at each Dirichlet alpha, each at its tuned rate of group
    "heterogeneity alpha=<a>": arms "alpha=<a> <method>"; (3) FeDLRT full for each truncation tolerance
    ``taus`` and client fraction ``client_fractions`` (and the reference: default tau, every client) at ``lr``
    (None: group "vision"'s FeDLRT rate): arms "tau=<t> frac=<f>"."""
    fed_rate = tuned_rate(profile, TUNING_GROUP, "FeDLRT") if lr is None else (lr, None)  # first: fail early
    rates = {(a, m): tuned_rate(profile, heterogeneity_group(a), m) for a in alphas for m in HETEROGENEITY_METHODS}
    cells = [(h, ls["num_clients"]) for h in ls_heterogeneities] + [(ls["heterogeneity"], C) for C in ls_clients
                                                                     if C != ls["num_clients"]]
    ls_arms_ = {f"LS het={h:g} C={C} {vc}": dict(method="fedlrt", variance_correction=vc, initial_rank=ls["rank"],
                                                   tau=ls_tau, heterogeneity=h, num_clients=C)
                for h, C in cells for vc in corrections}
    fn = LeastSquares(**ls)
    runs = run_all(fn, ls_arms_, out, seeds=seeds)
    select = {f"select {a}": kw for a, kw in ls_arms_.items() if kw["num_clients"] == ls["num_clients"]}
    runs = runs.merge(run_all(fn, select, out, seeds=[TUNING_SEED]))
    arms = {f"alpha={a:g} {m}": kw | {"alpha": a, "lr": rates[(a, m)][0], "lr_from": rates[(a, m)][1]}
            for a in alphas for m, kw in heterogeneity_arms(initial_rank, default_tau, r_max).items()}
    cells = [(default_tau, 1.0)] + [(t, 1.0) for t in taus] + [(default_tau, f) for f in client_fractions]
    arms |= {f"tau={t:g} frac={f:g}": dict(METHODS["FeDLRT"], lr=fed_rate[0], lr_from=fed_rate[1],
                                            initial_rank=initial_rank, r_max=r_max, tau=t, client_fraction=f)
             for t, f in dict.fromkeys(cells)}
    return runs.merge(run_all(Vision(**vision), arms, out, seeds=seeds))


def ls_frame(runs: Runs, prefix: str = "LS het=") -> pd.DataFrame:
    """One row per least-squares run of heterogeneity.ipynb (arms starting with ``prefix``; "select LS het="
    for the tuning seed's): heterogeneity, clients, correction, seed, excess_loss, diverged."""
    rows = []
    for (arm, seed), r in runs.items():
        if arm.startswith(prefix):
            c = r.config
            rows.append({"arm": arm, "heterogeneity": c["heterogeneity"], "clients": c["num_clients"],
                         "correction": c["variance_correction"], "seed": seed, "excess_loss": r.final["excess_loss"],
                         "diverged": bool(r.final.get("diverged"))})
    return pd.DataFrame(rows, columns=["arm", "heterogeneity", "clients", "correction", "seed", "excess_loss",
                                       "diverged"])


def heterogeneity_claim_runs(runs: Runs, alphas, ls: dict) -> tuple[Runs, pd.DataFrame]:
    """The derived arms the heterogeneity claims read: "<method> (skewed)" / "(mild)" = the vision arm at the
    smallest / largest alpha (each at its tuned rate); "LS <correction> (most heterogeneous stable)" = the
    least-squares arms (default client count) at the highest heterogeneity where no run of the tuning seed
    diverged (chosen on the tuning seed's problem; the claims' seeds are read as they come, a diverged run
    counted by the claims rule). Returns (those Runs, a table of the derived arms and where they come from)."""
    out, rows = Runs(), []
    for label, a in (("skewed", min(alphas)), ("mild", max(alphas))):
        for m in HETEROGENEITY_METHODS:
            arm = f"alpha={a:g} {m}"
            for s in runs.seeds:
                if (arm, s) in runs:
                    out[(f"{m} ({label})", s)] = runs[(arm, s)]
            first = runs.arm(arm)[0]
            rows.append({"derived arm": f"{m} ({label})", "from": arm, "lr": first.config["lr"],
                         "lr_from": first.config.get("lr_from")})
    sel = ls_frame(runs, "select LS het=")
    sel = sel[sel.clients == ls["num_clients"]]
    if len(sel):
        stable = [h for h, g in sel.groupby("heterogeneity") if not g.diverged.any()]
        h = max(stable) if stable else min(sel.heterogeneity)
        for (arm, s), r in runs.items():
            if arm.startswith(f"LS het={h:g} C={ls['num_clients']} "):
                out[(f"LS {r.config['variance_correction']} (most heterogeneous stable)", s)] = r
        rows.append({"derived arm": "LS (most heterogeneous stable)", "from": f"LS het={h:g} C={ls['num_clients']}",
                     "lr": ls["lr"], "lr_from": "fixed for every arm",
                     "chosen on": f"tuning seed {TUNING_SEED}" + ("" if stable else " (every cell diverged: the least "
                                                                               "heterogeneous one)")})
    return out, pd.DataFrame(rows)


def heterogeneity_notes(runs: Runs, alphas, default_tau: float) -> list[str]:
    """Where the correction helps and where it breaks, as measured facts: per alpha the paired accuracy gain
    of the correction at the tuned rates (FeDLRT full - none, FedLin - FedAvg) with its 95 % interval; the
    runs that diverged; least squares per cell; tau and client fraction against the reference."""
    notes = []
    for a in alphas:
        for x, y in (("FeDLRT full", "FeDLRT none"), ("FedLin", "FedAvg")):
            for m in ("accuracy_tail", "accuracy_auc"):
                notes.append(paired_note(runs, m, f"alpha={a:g} {x}", f"alpha={a:g} {y}", scale=100, unit=" points"))
    div = {a: sum(bool(r.final.get("diverged")) for r in runs.arm(a)) for a in runs.arms if a.startswith("alpha=")}
    notes.append("Diverged vision runs (non-finite, or ended above the untrained loss; counted by the claims rule): "
                 + (", ".join(f"{a} ({n} of {len(runs.arm(a))} seeds)" for a, n in div.items() if n) or "none") + ".")
    for prefix, words in (("LS het=", "claims' seeds"), ("select LS het=", f"tuning seed {TUNING_SEED}")):
        lsf = ls_frame(runs, prefix)
        if len(lsf):
            g = lsf.groupby(["heterogeneity", "clients", "correction"], sort=True)
            notes.append(f"Least squares ({words}), mean relative excess loss over the finite seeds: " + "; ".join(
                f"het={h:g} C={C} {vc}: {x.excess_loss.mean():.1e}"
                + (f" ({int(x.diverged.sum())} diverged)" if x.diverged.any() else "")
                for (h, C, vc), x in g) + ".")
    ref = f"tau={default_tau:g} frac=1"
    if ref in runs.arms:
        for arm in [a for a in runs.arms if a.startswith("tau=") and a != ref]:
            notes.append(paired_note(runs, "accuracy_tail", arm, ref, scale=100, unit=" points"))
    return notes


def tuning_frame(profile: str, groups) -> pd.DataFrame:
    """The validation sweeps of ``groups`` from tuning.ipynb's record: group, method, lr, val_accuracy_tail
    (None for a diverged rate), chosen."""
    rec = records.load(records.tuning_record("fedlrt", profile))["summary"]["tuned"]
    return sweep_table({g: rec[g] for g in groups if g in rec})


def plot_lr_sweep(frame: pd.DataFrame, axes) -> None:
    """Validation accuracy against learning rate from the tuning record, one panel per group, one line per
    method; the chosen rate starred, a diverged rate drawn as a cross at the bottom."""
    import seaborn as sns

    for ax, (g, t) in zip(axes, frame.groupby("group", sort=False)):
        sns.lineplot(data=t.dropna(subset=["val_accuracy_tail"]), x="lr", y="val_accuracy_tail", hue="method",
                     marker="o", ax=ax)
        best = t[t.chosen]
        ax.scatter(best.lr, best.val_accuracy_tail, marker="*", s=150, color="black", zorder=3, label="chosen")
        bad = t[t.val_accuracy_tail.isna()]
        if len(bad):
            ax.scatter(bad.lr, [ax.get_ylim()[0]] * len(bad), marker="x", color="black", label="diverged")
        ax.set(xscale="log", xlabel="learning rate", ylabel="validation accuracy (tuning seed)", title=g)
        ax.legend(fontsize=8)


def plot_ls_heterogeneity(frame: pd.DataFrame, ax, clients: int) -> None:
    """Least squares at ``clients`` clients: relative excess loss against client heterogeneity, one line per
    correction (mean over seeds with a band from the lowest to the highest seed); diverged seeds as crosses
    at the top of the panel."""
    import seaborn as sns

    g = frame[frame.clients == clients]
    sns.lineplot(data=g[~g.diverged], x="heterogeneity", y="excess_loss", hue="correction", errorbar=("pi", 100),
                 marker="o", ax=ax)
    ax.set_yscale("log")
    bad = g[g.diverged]
    if len(bad):
        ax.scatter(bad.heterogeneity, [ax.get_ylim()[1]] * len(bad), marker="x", color="black", label="diverged run")
    ax.set(xlabel="client heterogeneity (spread of the clients' input scales)",
           ylabel="relative excess of the global loss", title=f"Least squares, {clients} clients")
    ax.legend(title=f"band: min-max over {g.seed.nunique()} seed(s)", fontsize=8, title_fontsize=8)
