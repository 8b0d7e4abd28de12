"""GaLore: Adam on low-rank projections of the gradient (Zhao et al., ICML 2024, arXiv 2403.03507).

Implements the paper's Algorithm 2 ("Adam with GaLore") with the "composition of low-rank subspaces"
of Sec. 4 (a projector refreshed every T = update_proj_gap steps), and the per-layer weight updates
and 8-bit states the paper combines it with. By default it follows the official code step for step
(github jiaweizzhao/GaLore, PyPI galore-torch 1.0); see docs/methods.md, section 1 (the kit's algorithm reference).
Knobs beyond the official code (all param-group keys):
  proj_method        "svd" | "eigh" (the same top-r singular vectors from the float64 eigendecomposition
                     of the smaller Gram matrix: faster than the fp32 SVD on CPU, more accurate, column
                     signs fixed) | "randomized_svd" | "random" | "online_pca" (Online Subspace Descent,
                     arXiv 2408.12857)
  switch_subspace    False = the projector of step 0 is kept for ever (fixed-subspace ablation)
  power_iters        power iterations of "randomized_svd" (2; 1 makes a refresh faster, see lrkit.bench)
  moments_on_switch  "keep" (official) | "reset" | "rotate" (the kit's own heuristic) | "ldadam"
                     (LDAdam's projection-aware rule, arXiv 2410.16103, Sec. 3.1)
Departures from galore-torch, all documented where they happen: non-2D parameters and a rank equal to
min(m, n) fall back to full-rank Adam (galore-torch crashes on the former), a rank above min(m, n) is an
error (galore-torch silently clamps it), and a non-finite gradient at a projector refresh raises
NonFiniteGradient naming the parameter and step (galore-torch: a bare LinAlgError); the state holds
only tensors and ints, so state_dict() survives torch.load(weights_only=True); per-layer mode steps
once per accumulated batch (GaLore issue #78) and clips by the true global norm.
"""
import math
import time
import warnings

import torch
from torch.optim import Optimizer

from lrkit.optim.in_backward import InBackwardOptimizer, NonFiniteGradient
from lrkit.utils import all_finite

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
PROJ_METHODS = ("svd", "eigh", "randomized_svd", "random", "online_pca")
MOMENT_POLICIES = ("keep", "reset", "rotate", "ldadam")


def projector_side(shape, proj_type):
    """Which side(s) of an m x n gradient get a projector: 'left' (P, m x r), 'right' (Q, r x n), 'full'."""
    m, n = shape
    if proj_type == "std":  # project the longer side away: keeps the smaller of P / Q (official rule)
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def project(G, P=None, Q=None):
    """R = P^T G Q^T, with either factor absent (identity)."""
    R = G if P is None else P.t() @ G
    return R if Q is None else R @ Q.t()


def project_back(N, P=None, Q=None, scale=1.0, out=None):
    """G_tilde = scale * P N Q, with either factor absent (identity). With ``out`` (a tensor of the full
    shape, fp32) the last product and the scaling are written into it: the same numbers, bit for bit,
    without allocating two full-size tensors per weight (the optimizer reuses one per shape in a step)."""
    if out is None or (P is None and Q is None):
        G = N if P is None else P @ N
        return (G if Q is None else G @ Q) * scale
    if Q is None:
        return torch.matmul(P, N, out=out).mul_(scale)
    return torch.matmul(N if P is None else P @ N, Q, out=out).mul_(scale)


def _draw_seed(seed, index, t):
    # torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so hash (seed + index, t)
    # into them with the splitmix64 finaliser instead of packing them side by side.
    mask, x = 2**64 - 1, (((seed + index) << 32) + t) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) & 0xFFFFFFFF


def _orthonormal(A):
    # QR with diag(R) > 0, so that a basis that barely moves keeps its column signs (and the moments
    # expressed in it stay meaningful); plain Householder QR may flip columns at random.
    Qm, R = torch.linalg.qr(A)
    return Qm * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Qm)


def _randomized_svd(G, rank, generator, oversample=5, niter=2):
    # niter = the group's power_iters (2 by default: the numbers every committed result was run with)
    # Halko et al. 2011 range finder with power iterations (what torch.svd_lowrank does), but drawing
    # the sketch from our generator so that runs are reproducible and the global RNG is untouched.
    m, n = G.shape
    k = min(rank + oversample, m, n)
    Y = G @ torch.randn(n, k, generator=generator).to(G)
    for _ in range(niter):
        Y = G @ (G.t() @ _orthonormal(Y))
    Y = _orthonormal(Y)
    Ub, _, Vh = torch.linalg.svd(Y.t() @ G, full_matrices=False)
    return Y @ Ub, Vh


def gram_eigh(G, rank, side):
    """The top-``rank`` left ('left': m x r, the U[:, :r] of svd(G)) or right ('right': r x n, Vh[:r]) singular
    vectors of G from the eigendecomposition of the Gram matrix of that side (G G^T or G^T G), formed and
    decomposed in float64 and returned in G's dtype.

    Squaring G squares its condition number, hence float64: for a float32 gradient the Gram matrix is then
    exact to ~1e-16 relative and the eigenvectors are more accurate than those of the float32 SVD (whose
    error is ~1e-7 relative), while on a CPU the float64 eigendecomposition of a 512 x 512 Gram matrix is
    faster than the float32 SVD of the 512 x 1376 gradient it came from (lrkit.bench, "refresh"). Each
    column's sign is fixed (its entry of largest magnitude is positive), a function of G alone; the SVD's
    signs are whatever LAPACK returns. So the subspace is the SVD's, the column signs may differ: the
    trajectory equals proj_method "svd"'s until a refresh carries moments into a basis whose column flipped.
    """
    A = G.double() if side == "left" else G.double().t()
    _, vectors = torch.linalg.eigh(A @ A.t())  # ascending eigenvalues: the top ones are the last columns
    top = vectors[:, -rank:].flip(1)
    peak = top.gather(0, top.abs().argmax(dim=0, keepdim=True))
    top = (top * torch.where(peak < 0, -1.0, 1.0).to(top)).to(G.dtype)
    return top if side == "left" else top.t()


def _online_pca_step(B, A, pca_lr):
    # One gradient step on f(B) = ||A - B B^T A||_F^2 for B with orthonormal columns, where
    # grad f = -2 (I - B B^T) A A^T B; the step size pca_lr / (2 ||A||_F^2) makes the move independent of
    # the gradient's scale and bounds it by pca_lr (||(I - BB^T) A A^T B||_2 <= ||A||_2^2 <= ||A||_F^2).
    AAtB = A @ (A.t() @ B)
    direction = AAtB - B @ (B.t() @ AAtB)
    return _orthonormal(B + pca_lr * direction / A.square().sum().clamp_min(1e-30))


def _check(cond, what, value, expected):
    if not cond:
        raise ValueError(f"Invalid {what}: {value!r} ({expected})")


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def _validate(g):
    _check(_finite(g["lr"]) and g["lr"] >= 0, "learning rate", g["lr"], "expected a finite number >= 0")
    for i, b in enumerate(g["betas"]):
        _check(_finite(b) and 0.0 <= b < 1.0, f"beta parameter at index {i}", b, "expected 0 <= beta < 1")
    _check(_finite(g["eps"]) and g["eps"] >= 0, "epsilon value", g["eps"], "expected >= 0")
    _check(_finite(g["weight_decay"]) and g["weight_decay"] >= 0, "weight_decay value", g["weight_decay"],
           "expected >= 0")
    if "rank" in g:
        _check(isinstance(g["rank"], int) and g["rank"] >= 1, "rank", g["rank"], "expected an int >= 1")
    _check(isinstance(g["update_proj_gap"], int) and g["update_proj_gap"] >= 1, "update_proj_gap",
           g["update_proj_gap"], "expected an int >= 1")
    _check(_finite(g["scale"]) and g["scale"] > 0, "scale", g["scale"], "expected a finite number > 0")
    _check(g["proj_type"] in PROJ_TYPES, "proj_type", g["proj_type"], f"expected one of {PROJ_TYPES}")
    _check(g["proj_method"] in PROJ_METHODS, "proj_method", g["proj_method"], f"expected one of {PROJ_METHODS}")
    _check(g["moments_on_switch"] in MOMENT_POLICIES, "moments_on_switch", g["moments_on_switch"],
           f"expected one of {MOMENT_POLICIES}")
    _check(isinstance(g["switch_subspace"], bool), "switch_subspace", g["switch_subspace"], "expected a bool")
    _check(_finite(g["pca_lr"]) and g["pca_lr"] > 0, "pca_lr", g["pca_lr"], "expected a finite number > 0")
    _check(isinstance(g["power_iters"], int) and not isinstance(g["power_iters"], bool) and g["power_iters"] >= 0,
           "power_iters", g["power_iters"], "expected an int >= 0")


class GaLoreAdamW(Optimizer):
    r"""AdamW with GaLore gradient projection (arXiv 2403.03507), a drop-in for galore_torch.GaLoreAdamW.

    A param group is projected when it has a ``rank`` key. For a 2-D weight W (m x n), gradient G_t,
    step t = 0, 1, ... (per parameter), rank r, T = update_proj_gap, alpha = scale:

    .. math::
        \begin{aligned}
        &\text{if } t \bmod T = 0:\ U \Sigma V^\top = \mathrm{svd}(G_t),\quad
            Q = V^\top_{[:r,:]} \ (m \ge n) \quad\text{or}\quad P = U_{[:, :r]} \ (m < n) \\
        &R_t = G_t Q^\top \ \text{ or } \ P^\top G_t                  \qquad\text{(project)}\\
        &M_t = \beta_1 M_{t-1} + (1-\beta_1) R_t,\qquad V_t = \beta_2 V_{t-1} + (1-\beta_2) R_t^2 \\
        &\eta_t = \mathrm{lr}\,\sqrt{1-\beta_2^{t+1}} / (1-\beta_1^{t+1}),\qquad N_t = M_t / (\sqrt{V_t} + \epsilon)\\
        &W \leftarrow W - \eta_t\, \alpha\, (N_t Q \ \text{ or } \ P N_t)      \qquad\text{(project\_back)}\\
        &W \leftarrow W - \mathrm{lr}\,\lambda\, W  \qquad\text{(decoupled decay, after the update, on the new } W)
        \end{aligned}

    Groups without ``rank`` (and non-2-D parameters, and weights with r = min(m, n); r > min(m, n) is an
    error) run the same
    rule with R_t = G_t and no projection: the Hugging Face-style AdamW galore-torch copies, whose eps is
    added to sqrt(V_t) *before* bias correction is folded into eta_t (torch.optim.AdamW adds eps to
    sqrt(V_hat_t)), so its effective eps is eps / sqrt(1 - beta2^t). Defaults are galore-torch's.

    Group keys (constructor arguments set their defaults): ``rank``, ``update_proj_gap`` (200), ``scale``
    (1.0), ``proj_type`` ('std' as above; 'reverse_std' swaps the sides; 'left', 'right'; 'full' uses
    both, R = P^T G Q^T), ``proj_method`` ('svd'; 'eigh': the same singular vectors from the float64
    eigendecomposition of the smaller Gram matrix, see :func:`gram_eigh`; 'randomized_svd': a Halko range finder; 'random':
    Gaussian matrices orthonormalised by QR; 'online_pca': P moved every step by one normalised
    gradient step of size ``pca_lr`` on ||G - P P^T G||_F^2, then QR, SVD at step 0; this ignores
    T), ``switch_subspace`` (True), ``moments_on_switch``: what happens to M, V when the projector
    changes (every step where it changes after step 0), with the change of basis
    C_L = P_new^T P_old (left) and C_R = Q_old Q_new^T (right), absent sides being identities:

    * 'keep' (galore-torch): M, V stay as they are, coordinates of the old basis;
    * 'reset': zero M, V and restart bias correction;
    * 'rotate' (the kit's own heuristic, from no paper): M <- C_L M C_R and V <- max(C_L V C_R, 0),
      i.e. V moved by the same linear map as M (wrong for element-wise second moments, hence the clamp);
    * 'ldadam': LDAdam's projection-aware rule (Robert et al., ICLR 2025, arXiv 2410.16103, Sec. 3.1;
      github IST-DASLab/LDAdam): with t = steps since the moments started, c1 = 1 - beta1^t,
      c2 = 1 - beta2^t (1 without ``correct_bias``), M_new = C_L M C_R and, treating the coordinates'
      gradient noise as independent, the bias-corrected variance moves with the element-wise squares:

      .. math::
          V_{new} = c_2 \left| (C_L \odot C_L) \left(\frac{V}{c_2} - \frac{M \odot M}{c_1^2}\right)
                    (C_R \odot C_R) + \frac{M_{new} \odot M_{new}}{c_1^2} \right|

      LDAdam writes one side; with both projectors ('full') each side gets its own factor. Only the
      moment transport is LDAdam's: its error feedback and per-step power-iteration subspace are not
      part of this optimizer (here the subspace still changes every T steps).
    Random draws use a per-optimizer torch.Generator reseeded from a hash of (seed + i, t) for the i-th
    parameter (state_dict order) at step t: reproducible, and no RNG state needs checkpointing.

    State per parameter: ``step``, ``moment_step`` (ints), ``exp_avg``, ``exp_avg_sq``, and ``P`` and/or
    ``Q``, all in the parameter's dtype (as galore-torch, so memory matches); the arithmetic runs in fp32.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 *, update_proj_gap=200, scale=1.0, proj_type="std", proj_method="svd", switch_subspace=True,
                 moments_on_switch="keep", pca_lr=0.1, power_iters=2, seed=0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        proj_method=proj_method, switch_subspace=switch_subspace,
                        moments_on_switch=moments_on_switch, pca_lr=pca_lr, power_iters=power_iters)
        _validate(defaults)
        _check(isinstance(seed, int) and seed >= 0, "seed", seed, "expected an int >= 0")
        self.seed = seed
        self._generator = torch.Generator()  # CPU: the same draws whatever the parameters' device
        self._warned_full_rank = False
        self.projector_time_s = 0.0  # wall time spent computing projectors (SVD etc.): the switching overhead
        self._buffers = None  # during step(): fp32 scratch tensors by (use, shape, device), see _buffer
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)  # fills in the defaults
        group = self.param_groups[-1]
        _validate(group)
        if "rank" in group:  # a rank no m x n weight can hold is an error, not a silent full-rank run
            for p in group["params"]:
                _check(p.dim() != 2 or group["rank"] <= min(p.shape), "rank", group["rank"],
                       f"for a {tuple(p.shape)} weight expected at most min(m, n) = {min(p.shape)}; "
                       "at min(m, n) the weight uses full-rank Adam")
        if "rank" in group and not self._warned_full_rank:
            if any(p.dim() == 2 and group["rank"] >= min(p.shape) for p in group["params"]):
                warnings.warn(f"GaLoreAdamW: rank {group['rank']} >= min(m, n) of some weight; "
                              "those weights use full-rank Adam (no projection).", stacklevel=3)
                self._warned_full_rank = True

    def timings(self) -> dict:
        """Measured overheads for run records (CPU wall time; on CUDA the kernels are asynchronous, so
        this times their launch plus any synchronising linear algebra)."""
        return {"projector_time_s": self.projector_time_s}

    @staticmethod
    def is_projected(p, group):
        return "rank" in group and p.dim() == 2 and group["rank"] < min(p.shape)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0  # position in state_dict order: seeds this parameter's random draws
        self._buffers = {}  # freed at the end of the step, so memory between steps is as before
        try:
            for group in self.param_groups:
                for p in group["params"]:
                    index += 1
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                    self._update(p, group, index - 1)
        finally:
            self._buffers = None
        return loss

    def _buffer(self, use, like):
        # an fp32 scratch tensor of like's shape, shared by the step's weights of that shape, for one use
        # ("update": project_back's output, "denom": sqrt(V) + eps then M / it): the same arithmetic as
        # fresh tensors without allocating (and page-faulting) two or three of them per weight and step.
        # None outside step() (per-layer hooks update one weight at a time and keep no buffers).
        if self._buffers is None:
            return None
        key = (use, tuple(like.shape), like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return self._buffers[key]

    def _update(self, p, group, index, grad=None):
        state = self.state[p]
        if not state:
            state["step"] = 0  # steps taken: drives the projector schedule, as galore-torch
            state["moment_step"] = 0  # steps since M, V (re)started: drives bias correction
        # p.grad, or the final gradient an in-backward subclass passes (reduced, clipped)
        grad = (p.grad if grad is None else grad).float()  # a no-op in fp32: galore-torch's arithmetic, op for op
        projected = self.is_projected(p, group)
        if projected:
            t0 = time.perf_counter()
            self._refresh_projector(p, group, state, grad, index)
            self.projector_time_s += time.perf_counter() - t0
            grad = project(grad, *self._projectors(state))
        m, v, step_size = self._moments(state, group, grad, p.dtype)
        buf = self._buffer("denom", v)
        denom = (v.sqrt() if buf is None else torch.sqrt(v, out=buf)).add_(group["eps"])
        norm_grad = m / denom if buf is None else torch.div(m, denom, out=denom)
        if projected:
            norm_grad = project_back(norm_grad, *self._projectors(state), group["scale"], out=self._buffer("update", p))
        self._apply(p, norm_grad, step_size, group)

    @staticmethod
    def _moments(state, group, grad, dtype):
        """Adam's moments of ``grad`` (the projected gradient, or the gradient), created in ``dtype`` on the first
        step, updated in fp32; advances the step counters. Returns (M, V) in fp32 and the step size with the
        HF-style bias correction folded in."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=dtype)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        m, v = exp_avg.float(), exp_avg_sq.float()  # aliases in fp32; working copies for bf16 states
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["moment_step"] += 1
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if m is not exp_avg:
            exp_avg.copy_(m)
            exp_avg_sq.copy_(v)
        step_size = group["lr"]
        if group["correct_bias"]:  # HF-style: bias correction folded into the step size
            t = state["moment_step"]
            step_size = step_size * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        return m, v, step_size

    @staticmethod
    def _apply(w, norm_grad, step_size, group):
        """W <- W - step_size * update, then galore-torch's decoupled decay of the *updated* weight (base lr)."""
        w.add_(norm_grad.to(w.dtype), alpha=-step_size)
        if group["weight_decay"] > 0.0:
            w.add_(w, alpha=-group["lr"] * group["weight_decay"])

    @staticmethod
    def _projectors(state):  # (P, Q) in fp32, None where absent
        return tuple(state[k].float() if k in state else None for k in ("P", "Q"))

    def _refresh_projector(self, p, group, state, G, index):
        t, first, method = state["step"], "P" not in state and "Q" not in state, group["proj_method"]
        due = method == "online_pca" or t % group["update_proj_gap"] == 0
        if not first and not (group["switch_subspace"] and due):
            return
        if not all_finite(G):  # the SVD would raise a bare LinAlgError (or, on CUDA, return NaN)
            raise NonFiniteGradient(p, f"non-finite gradient (NaN or Inf) in a {tuple(p.shape)} parameter, index "
                                       f"{index} of the optimizer's parameters, at step {t} (a projector refresh)")
        side, r = projector_side(G.shape, group["proj_type"]), group["rank"]
        old = {k: state[k].float() for k in ("P", "Q") if k in state}
        new = {}
        if method == "online_pca" and not first:
            if "P" in old:
                new["P"] = _online_pca_step(old["P"], G, group["pca_lr"])
            if "Q" in old:  # Q^T spans the row space: the same problem on G^T
                new["Q"] = _online_pca_step(old["Q"].t(), G.t(), group["pca_lr"]).t()
        elif method == "random":
            self._generator.manual_seed(_draw_seed(self.seed, index, t))
            if side in ("left", "full"):
                new["P"] = _orthonormal(torch.randn(G.shape[0], r, generator=self._generator).to(G))
            if side in ("right", "full"):
                new["Q"] = _orthonormal(torch.randn(G.shape[1], r, generator=self._generator).to(G)).t()
        elif method == "eigh":
            if side in ("left", "full"):
                new["P"] = gram_eigh(G, r, "left")
            if side in ("right", "full"):
                new["Q"] = gram_eigh(G, r, "right")
        else:  # "svd", "randomized_svd", and step 0 of "online_pca"
            if method == "randomized_svd":
                self._generator.manual_seed(_draw_seed(self.seed, index, t))
                U, Vh = _randomized_svd(G, r, self._generator, niter=group.get("power_iters", 2))
            else:
                U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            if side in ("left", "full"):
                new["P"] = U[:, :r]
            if side in ("right", "full"):
                new["Q"] = Vh[:r, :]
        for k, X in new.items():
            state[k] = X.to(p.dtype).contiguous()
        if old and "exp_avg" in state:
            self._switch_moments(group, state, old)

    @staticmethod
    def _switch_moments(group, state, old):
        policy = group["moments_on_switch"]
        if policy == "keep":  # galore-torch: the moments stay in the old basis
            return
        if policy == "reset":
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["moment_step"] = 0
            return
        # change of basis: R_new ~ (P_new^T P_old) R_old (Q_old Q_new^T)
        P, Q = GaLoreAdamW._projectors(state)
        L = P.t() @ old["P"] if P is not None else None
        Rt = old["Q"] @ Q.t() if Q is not None else None

        def move(X, left, right):
            X = X if left is None else left @ X
            return X if right is None else X @ right

        M, V = state["exp_avg"].float(), state["exp_avg_sq"].float()
        M_new = move(M, L, Rt)
        if policy == "rotate":  # the kit's heuristic: V by the same linear map as M
            V_new = move(V, L, Rt).clamp_min(0)
        else:  # "ldadam": the variance moves with the squared change of basis, the mean with M
            t, (beta1, beta2) = state["moment_step"], group["betas"]
            c1, c2 = (1.0 - beta1 ** t, 1.0 - beta2 ** t) if group["correct_bias"] else (1.0, 1.0)
            var = move(V / c2 - M.square() / c1 ** 2, None if L is None else L.square(),
                       None if Rt is None else Rt.square())
            V_new = (var + M_new.square() / c1 ** 2).abs() * c2
        state["exp_avg"].copy_(M_new)
        state["exp_avg_sq"].copy_(V_new)


class PerLayerGaLore(InBackwardOptimizer, GaLoreAdamW):
    """GaLoreAdamW that updates each parameter inside backward (per-layer weight updates, paper Sec. 4.2).

    One torch Optimizer (shared ``param_groups``, one ``state``, the ordinary ``state_dict()`` /
    ``load_state_dict()``, interchangeable with GaLoreAdamW's) on the hook base shared with LOMO and
    AdaLomo (`lrkit/optim/in_backward.py`, whose docstring has the rules): each trainable parameter's
    post-accumulate-grad hook runs GaLoreAdamW's update of that one parameter (same state, same seeds
    for random projections: the i-th parameter in state_dict order draws as in GaLoreAdamW) as soon as
    its gradient is final, and frees ``p.grad`` at once. Hyper-parameters are read from ``group`` when
    the update runs, so torch LR schedulers work: ``scheduler.step()`` after ``opt.step()`` sets the lr
    of the next step's hooks.

    Protocol: ``updates_in_backward = True``; ``backward(loss)`` is ``loss.backward()`` (plus a norm pass
    with ``clipping="two_pass"``); ``step()`` completes the step and is a no-op when the hooks did
    everything; ``zero_grad()`` as usual. Loop::

        opt.backward(loss); opt.step(); opt.zero_grad(); scheduler.step()

    Departures from the official per-layer mode: with ``accumulation_steps=k`` a parameter steps on its
    k-th hook only (GaLore issue #78; scale the loss by 1/k as usual; in between its ``.grad``
    accumulates and ``step()`` leaves it alone; ``zero_grad()`` discards a partial accumulation and
    restarts the count). ``max_grad_norm`` clips by the *true global* norm, as ``clip_grad_norm_`` +
    step (the coefficient multiplies the fp32 gradient): by default (``clipping="deferred"``) the hooks
    of the k-th backward only mark gradients ready and the last one to arrive clips them all and steps
    every parameter -- correct, but it keeps all gradients alive until the end of that backward, i.e.
    it gives up the per-layer memory saving; ``clipping="two_pass"`` (k = 1 only) keeps it at the cost
    of a second backward pass (LOMO's norm pass). Under DDP (``reduction="auto"``) each final gradient
    is averaged over the ranks before clipping and update, so every rank computes the same projector.

    ``step()`` also updates (and frees the gradient of) any parameter holding a ``.grad`` no hook has
    seen (set by hand, or after ``remove()``); such a gradient counts as complete (no accumulation
    count) and is clipped together with the rest. After ``remove()`` (alias ``remove_hooks()``) the
    optimizer therefore behaves as GaLoreAdamW with clipping inside ``step()``. Hooks hold the optimizer
    weakly: keep a reference to it (they are removed when it is garbage-collected).
    """

    _default_clipping = "deferred"

    def __init__(self, params, *args, accumulation_steps=1, max_grad_norm=None, clipping=None,
                 reduction="auto", **kwargs):
        self._init_in_backward(fused=True, max_grad_norm=max_grad_norm, clipping=clipping,
                               accumulation_steps=accumulation_steps, reduction=reduction)
        super().__init__(params, *args, **kwargs)  # calls add_param_group, which registers the hooks

    def _update_param(self, p, grad):
        if grad.is_sparse:
            raise RuntimeError("GaLoreAdamW does not support sparse gradients")
        group, index = self._where[id(p)]
        self._update(p, group, index, grad)

    def remove(self):
        """Detach the hooks: backward then only accumulates .grad and step() updates (GaLoreAdamW)."""
        self.remove_hooks()


def _keyword_adamw8bit_class():
    """galore-torch 1.0's 8-bit GaLore AdamW with its bitsandbytes base called by keyword.

    galore-torch's ``AdamW8bit.__init__`` passes its arguments to bitsandbytes' ``Optimizer2State`` by
    position; in bitsandbytes >= 0.45 the slots after ``min_8bit_size`` are ``max_unorm, skip_zeros``, so its
    ``percentile_clipping=100`` becomes an update-norm cap of 100 and ``block_wise=True`` turns on
    ``skip_zeros``. This subclass keeps galore-torch's GaLore step and states and builds the base by keyword
    (no update-norm cap, zeros not skipped: bitsandbytes' AdamW8bit defaults)."""
    from bitsandbytes.optim.optimizer import Optimizer2State
    from galore_torch import GaLoreAdamW8bit as _Official

    class KeywordGaLoreAdamW8bit(_Official):
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, min_8bit_size=4096,
                     is_paged=False):
            Optimizer2State.__init__(self, "adam", params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                     optim_bits=8, min_8bit_size=min_8bit_size, is_paged=is_paged)

    return KeywordGaLoreAdamW8bit


def GaLoreAdamW8bit(params, **kwargs):
    """8-bit Adam states through bitsandbytes, CUDA only: galore-torch 1.0's GaLoreAdamW8bit with its
    bitsandbytes base built by keyword (see :func:`_keyword_adamw8bit_class`; galore-torch's positional call
    puts two arguments in the wrong slots).

    Its GaLore step is the official one (defaults: eps 1e-8, weight_decay 1e-2), so none of this module's
    extra keys apply and its state holds projector objects (no weights_only checkpoints).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("GaLoreAdamW8bit needs a CUDA device (bitsandbytes' 8-bit Adam kernels); "
                           "use GaLoreAdamW on CPU.")
    try:
        cls = _keyword_adamw8bit_class()
    except ImportError as e:
        raise ImportError("GaLoreAdamW8bit needs bitsandbytes and galore-torch==1.0 installed") from e
    return cls(params, **kwargs)


# ------------------------------------------------------------------------------------------ memory
def adam_state_numel(shape):
    """Full-rank Adam: the two moments M, V of the weight's shape."""
    return 2 * math.prod(shape)


def galore_state_numel(shape, rank=None, proj_type="std"):
    """Elements of state GaLoreAdamW (and galore-torch) keeps for one parameter: the projector(s) plus
    M, V of the low-rank shape; full-rank Adam where nothing is projected. Step counters are ints, not
    tensors. (galore-torch would instead keep a square projector at rank >= min(m, n).)"""
    if rank is None or len(shape) != 2 or rank >= min(shape):
        return adam_state_numel(shape)
    (m, n), side = shape, projector_side(shape, proj_type)
    left, right = side in ("left", "full"), side in ("right", "full")
    projector = m * rank * left + rank * n * right
    return projector + 2 * (rank if left else m) * (rank if right else n)


def optimizer_state_bytes(optimizer):
    """Bytes of every tensor in ``optimizer.state`` (PerLayerGaLore included: it is one optimizer); counts
    galore-torch's projector objects too, so the official optimizer can be measured the same way."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            tensors = [value] if torch.is_tensor(value) else []
            if hasattr(value, "ortho_matrix"):  # galore_torch.GaLoreProjector: a tensor or [P, Q]
                om = value.ortho_matrix
                tensors = list(om) if isinstance(om, (list, tuple)) else [om]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total
