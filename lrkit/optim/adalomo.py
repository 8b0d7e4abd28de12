"""AdaLomo: "AdaLomo: Low-memory Optimization with Adaptive Learning Rate" (Lv et al., Findings of ACL
2024, arXiv 2310.10195), section 3 (the method, Algorithm 1): LOMO's fused update with a factored
(non-negative matrix factorisation) second moment and grouped update normalisation, no first moment.

Follows docs/methods.md, section 2 (the kit's algorithm reference), checked line by line against the official
`lomo_optim/adalomo.py` (OpenLMLab/LOMO, PyPI lomo-optim 0.1.1). Where they differ:
  * tensors with more than 2 dims: the official code allocates factors of length shape[0] and shape[1]
    and then fails on the first update (its row mean has shape shape[:-1]). The kit factors over the
    last two dims and treats leading dims as a batch, as HF/fairseq Adafactor, whose `_approx_sq_grad`
    the official code copies;
  * 0-dim parameters use the unfactored EMA (the official constructor indexes shape[0] and fails on them);
  * the step counter is per parameter (`state[p]["step"]`, as torch.optim.Adam): it equals the
    official global `step_num` whenever every parameter gets a gradient every step;
  * no fp16 loss scaling and no `clip_grad_value`; the learning rate comes from `param_groups`
    (the official one is passed to every `fused_backward(loss, lr)` call).

The hook machinery (fused/unfused modes, accumulation, two-pass or deferred clipping, the gradient
reduction under DDP, misuse errors, `paused()`) lives in `lrkit/optim/in_backward.py`, shared with
per-layer GaLore through `lrkit/optim/lomo.py:FusedOptimizer`; see its docstring for the rules.
"""
from __future__ import annotations

import math
import re
import warnings

import torch

from lrkit.optim.lomo import FusedOptimizer, _check

NORMALIZATIONS = ("grouped", "none", "global", "layer")
SECOND_MOMENTS = ("nmf", "svd", "qr", "full")
_BLOCK = re.compile(r"(^|\.)(layers|layer)\.(\d+)\.")  # as lrkit.methods: LLaMA "layers.3.", BERT "layer.3."


def adalomo_state_shapes(shape, second_moment: str = "nmf", factor_rank: int = 1) -> dict[str, tuple]:
    """Shapes of the fp32 state AdaLomo keeps for a parameter of ``shape`` (the step counter aside).

    Vectors (and ``second_moment="full"``) keep an EMA of their own shape; matrices, factored over the
    last two dims (n x m, leading dims a batch), keep a row factor (n) and a column factor (m) at rank 1
    ("nmf", the paper's default), or two rank-k factors: "nmf" A (n x k), B (m x k); "svd" P (n x k),
    Q (m x k); "qr" Q (n x k), W (k x m); k = min(factor_rank, n, m)."""
    shape = tuple(shape)
    if second_moment not in SECOND_MOMENTS:
        raise ValueError(f"Invalid second_moment: {second_moment!r} (expected one of {SECOND_MOMENTS})")
    if len(shape) < 2 or second_moment == "full":
        return {"v": shape}
    *b, n, m = shape
    b, k = tuple(b), min(factor_rank, n, m)
    if second_moment == "nmf" and k == 1:
        return {"r": b + (n,), "c": b + (m,)}
    if second_moment == "nmf":
        return {"A": b + (n, k), "B": b + (m, k)}
    if second_moment == "svd":
        return {"P": b + (n, k), "Q": b + (m, k)}  # V = P Q^T, singular values split over both
    return {"Q": b + (n, k), "W": b + (k, m)}  # qr: V = Q W with W = Q^T target


def adalomo_state_numel(shape, second_moment: str = "nmf", factor_rank: int = 1) -> int:
    """fp32 state elements AdaLomo keeps for one parameter: n + m for an n x m matrix at the default
    rank-1 factorisation (times any leading batch dims), numel for a vector. Sum it over a model's
    weight shapes (e.g. ``lrkit.memory.llama_weight_shapes``) for the paper's memory figures."""
    return sum(math.prod(s) for s in adalomo_state_shapes(shape, second_moment, factor_rank).values())


def layer_groups(model: torch.nn.Module) -> list[dict]:
    """Param groups for ``normalization="layer"``: one per transformer block (parameters named
    ``...layers.N.``; BERT ``layer.N.``), in block order, then one group with everything else
    (embeddings, final norm, head) -- the "layer" of the ablation is one block. Each group carries a
    ``name`` key ("layers.0", ..., "rest"); only parameters that require grad are included, tied
    weights once."""
    blocks: dict[int, list] = {}
    rest = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = _BLOCK.search(name)
        (blocks.setdefault(int(m.group(3)), []) if m else rest).append(p)
    groups = [{"params": blocks[i], "name": f"layers.{i}"} for i in sorted(blocks)]
    if rest:
        groups.append({"params": rest, "name": "rest"})
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm() / math.sqrt(x.numel())


def nmf_refine(T: torch.Tensor, A: torch.Tensor, B: torch.Tensor, iters: int):
    """Multiplicative updates (Lee & Seung, generalised KL divergence) of T ~ A B^T with A, B >= 0,
    warm-started from A, B; batched over leading dims. KL is the divergence under which Adafactor's
    rank-1 factors are optimal, so at rank 1 one iteration lands exactly on the closed form."""
    tiny = torch.finfo(T.dtype).tiny
    for _ in range(iters):
        R = (A @ B.mT).clamp_min_(tiny).reciprocal_().mul_(T)  # T / (A B^T), one dense temporary
        A = A * (R @ B) / B.sum(-2, keepdim=True).clamp_min(tiny)
        R = (A @ B.mT).clamp_min_(tiny).reciprocal_().mul_(T)
        B = B * (R.mT @ A) / A.sum(-2, keepdim=True).clamp_min(tiny)
    return A, B


def pivoted_qr(T: torch.Tensor, k: int):
    """The first ``k`` steps of QR with column pivoting (Businger & Golub 1965, LAPACK ``geqp3``) of
    ``T`` (..., n, m), batched over leading dims: each step takes the column with the largest residual
    norm, orthogonalises it against the columns taken so far (twice, for accuracy) and removes it from
    the residual. Returns Q (..., n, k) with orthonormal columns, R (..., k, m) = Q^T T in T's own column
    order (so Q R is the rank-k approximation Q Q^T T) and the pivots (..., k). A rank-deficient T gets
    zero columns in Q past its rank. torch.linalg.qr has no pivoting; this runs on any device."""
    *b, n, m = T.shape
    k = min(k, n, m)
    T3 = T.reshape(-1, n, m)
    # pivots and Q do not depend on T's scale; scaling to max 1 keeps squared norms clear of underflow
    scale = T3.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(T.dtype).tiny)
    X = T3 / scale  # the residual, updated in place
    Q = X.new_zeros(X.shape[0], n, k)
    piv = torch.empty(X.shape[0], k, dtype=torch.long, device=T.device)
    rows = torch.arange(X.shape[0], device=T.device)
    for j in range(k):
        p = torch.linalg.vector_norm(X, dim=-2).argmax(-1)
        piv[:, j] = p
        q = X[rows, :, p]
        for _ in range(2):
            q = q - (Q[..., :j] @ (Q[..., :j].mT @ q.unsqueeze(-1))).squeeze(-1)
        # a residual at rounding level (T of rank < j + 1; |T| <= 1 after scaling) gives a zero column
        norm = q.norm(dim=-1, keepdim=True)
        q = torch.where(norm > max(n, m) * torch.finfo(T.dtype).eps, q / norm, torch.zeros_like(q))
        Q[..., j] = q
        X.baddbmm_(q.unsqueeze(-1), q.unsqueeze(-2) @ X, alpha=-1)
    R = Q.mT @ T3
    return Q.reshape(*b, n, k), R.reshape(*b, k, m), piv.reshape(*b, k)


class AdaLomo(FusedOptimizer):
    r"""AdaLomo (arXiv 2310.10195), fused into backward by default.

    For a parameter :math:`\theta` with fp32 gradient :math:`G` at step :math:`t = 1, 2, \dots`:

    .. math::
        \beta_{2,t} &= 1 - t^{\text{decay\_rate}} \qquad (\beta_{2,1} = 0) \\
        S &= G \odot G + \epsilon_1 \\
        r &\leftarrow \beta_{2,t} r + (1-\beta_{2,t})\,\mathrm{mean}_{cols}(S), \quad
        c \leftarrow \beta_{2,t} c + (1-\beta_{2,t})\,\mathrm{mean}_{rows}(S), \quad
        \hat V = r c^\top / \mathrm{mean}(r) \quad \text{(matrices; vectors: } \hat V = v
            \leftarrow \beta_{2,t} v + (1-\beta_{2,t}) S) \\
        U &= G / \sqrt{\hat V}, \qquad \hat U = U / \max(1, \mathrm{RMS}(U) / d) \\
        \eta_t &= \mathrm{lr}\cdot\max(\epsilon_2, \mathrm{RMS}(\theta)), \qquad
        \theta \leftarrow \theta (1 - \eta_t\,\mathrm{wd}) - \eta_t \hat U

    computed in fp32 and written back into the parameter's dtype (bf16 weights, no master copy).
    Tensors with more than 2 dims are factored over their last two dims (leading dims = batch).

    Args:
        params: parameters or param groups. With ``normalization="layer"`` each param group is one
            "layer" (one group per transformer block: :func:`layer_groups`).
        lr, eps=(eps1, eps2), clip_threshold (d), decay_rate, weight_decay: as above (official defaults).
        fused: update inside backward and free each gradient at once (True), or in ``step()`` (False;
            or fused with ``accumulation_steps``, for gradient accumulation).
        normalization: "grouped" (per tensor, the paper's), "none", "global" (RMS over every update of
            the step), "layer" (RMS over one param group). "global"/"layer" must see all of their
            updates first, so in fused mode they are buffered in fp32 until the set's last gradient
            arrives (or ``step()``): "global" then holds a full fp32 update buffer, more memory than
            plain gradients -- it is an ablation, not a memory saver.
        second_moment: "nmf" (rank ``factor_rank``; rank 1 = the closed form above, rank k refined by
            ``nmf_iters`` multiplicative updates warm-started from the previous factors), "svd"
            (truncated SVD), "qr" (rank-revealing QR: column-pivoted, truncated to k columns,
            :func:`pivoted_qr`), "full" (unfactored EMA). Rank-k variants form the dense target
            beta2 * V_prev + (1 - beta2) S transiently;
            svd/qr results are clamped to >= eps1. factor_rank is capped at min(n, m).
        max_grad_norm: global gradient-norm clipping. Fused: two backward passes per step, see
            ``grad_norm_pass()`` / ``backward(loss)``; unfused: a plain clip inside ``step()``.
        accumulation_steps, clipping, reduction: the hook base's options (`lrkit/optim/in_backward.py`):
            update on every k-th backward (fused gradient accumulation), "two_pass" (default at k = 1)
            or "deferred" clipping, and the rank average of each gradient under DDP ("auto").
        seed: seeds the "nmf" rank-k initial factors (drawn on CPU, so every device sees the same
            numbers).
    """

    def __init__(self, params, lr: float = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, weight_decay: float = 0.0,
                 fused: bool = True, normalization: str = "grouped", second_moment: str = "nmf",
                 factor_rank: int = 1, max_grad_norm: float | None = None, nmf_iters: int = 3,
                 seed: int = 0, *, accumulation_steps: int = 1, clipping: str | None = None,
                 reduction: str = "auto"):
        num = (int, float)
        _check(isinstance(lr, num) and math.isfinite(lr) and lr >= 0, "learning rate", lr, "a finite number >= 0")
        def finite(x):
            return isinstance(x, num) and not isinstance(x, bool) and math.isfinite(x)

        _check(isinstance(eps, (tuple, list)) and len(eps) == 2
               and all(finite(e) and e >= 0 for e in eps), "eps", eps,
               "a pair (eps1, eps2) of finite numbers >= 0")
        _check(finite(clip_threshold) and clip_threshold > 0, "clip_threshold",
               clip_threshold, "a finite number > 0")
        _check(finite(decay_rate) and decay_rate <= 0, "decay_rate", decay_rate,
               "a finite number <= 0, so that beta2_t = 1 - t**decay_rate lies in [0, 1)")
        _check(finite(weight_decay) and weight_decay >= 0, "weight_decay", weight_decay,
               "a finite number >= 0")
        _check(normalization in NORMALIZATIONS, "normalization", normalization, f"one of {NORMALIZATIONS}")
        _check(second_moment in SECOND_MOMENTS, "second_moment", second_moment, f"one of {SECOND_MOMENTS}")
        _check(isinstance(factor_rank, int) and factor_rank >= 1, "factor_rank", factor_rank,
               "an int >= 1 (the ablations use 1, 2, 4)")
        _check(second_moment != "full" or factor_rank == 1, "factor_rank", factor_rank,
               "1 with second_moment='full' (the unfactored EMA has no rank)")
        _check(isinstance(nmf_iters, int) and nmf_iters >= 1, "nmf_iters", nmf_iters, "an int >= 1")
        _check(isinstance(seed, int) and seed >= 0, "seed", seed, "an int >= 0")
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate,
                        weight_decay=weight_decay, normalization=normalization,
                        second_moment=second_moment, factor_rank=factor_rank, nmf_iters=nmf_iters,
                        seed=seed)
        super().__init__(params, defaults, fused, max_grad_norm, accumulation_steps=accumulation_steps,
                         clipping=clipping, reduction=reduction)
        self._buffers: dict[object, tuple[int, list]] = {}  # "global"/"layer" updates awaiting their set
        layered = [g for g in self.param_groups if g["normalization"] == "layer"]
        if len(layered) == 1 and len(layered[0]["params"]) > 1:
            warnings.warn("normalization='layer' with a single param group normalises all of its parameters "
                          "together, which is 'global'; pass one group per transformer block "
                          "(lrkit.optim.adalomo.layer_groups(model))")

    # ---- second moment ---------------------------------------------------------------------------
    @staticmethod
    def _state_shapes(p: torch.Tensor, group: dict) -> dict[str, tuple]:
        return adalomo_state_shapes(p.shape, group["second_moment"], group["factor_rank"])

    def _generator(self, p: torch.Tensor, group: dict, t: int) -> torch.Generator:
        # one stream per (seed, parameter, step): reproducible, independent of hook firing order
        return torch.Generator().manual_seed(
            ((group["seed"] * 1_000_003 + self._order[id(p)]) * 1_000_003 + t) % 2**63)

    def _precondition(self, p, g, state, group) -> torch.Tensor:
        """Update the second-moment state with G and return U = G / sqrt(V_hat)."""
        t = state["step"] + 1
        beta2 = 1.0 - t ** group["decay_rate"]
        eps1 = group["eps"][0]
        S = g.square().add_(eps1)
        if "v" in state:
            v = state["v"].mul_(beta2).add_(S, alpha=1 - beta2)
            return v.rsqrt().mul_(g)
        if "r" in state:
            r = state["r"].mul_(beta2).add_(S.mean(-1), alpha=1 - beta2)
            c = state["c"].mul_(beta2).add_(S.mean(-2), alpha=1 - beta2)
            del S
            # the official expression (from fairseq's Adafactor): rsqrt(r / mean r) x rsqrt(c)
            return (r / r.mean(-1, keepdim=True)).rsqrt_().unsqueeze(-1).mul(c.unsqueeze(-2).rsqrt()).mul_(g)

        k = min(group["factor_rank"], *p.shape[-2:])
        kind = group["second_moment"]
        if kind == "nmf":
            A, B = state["A"], state["B"]
            if t == 1:  # nothing to warm-start from: positive jittered copies of the rank-1 answer
                gen = self._generator(p, group, t)
                r, c = S.mean(-1), S.mean(-2)
                A.copy_(r.unsqueeze(-1) * (0.5 + torch.rand(A.shape, generator=gen)).to(A))
                B.copy_((c / r.mean(-1, keepdim=True)).unsqueeze(-1)
                        * (0.5 + torch.rand(B.shape, generator=gen)).to(B) / k)
            T = (A @ B.mT).mul_(beta2).add_(S, alpha=1 - beta2)
            del S
            A2, B2 = nmf_refine(T, A, B, group["nmf_iters"])
            A.copy_(A2)
            B.copy_(B2)
            del T
            V = A @ B.mT  # non-negative by construction: no clamp, so rank 1 stays the closed form
        elif kind == "svd":
            P, Q = state["P"], state["Q"]
            T = (P @ Q.mT).mul_(beta2).add_(S, alpha=1 - beta2)
            del S
            Uk, s, Vh = torch.linalg.svd(T, full_matrices=False)
            sq = s[..., :k].sqrt().unsqueeze(-2)
            P.copy_(Uk[..., :k] * sq)
            Q.copy_(Vh[..., :k, :].mT * sq)
            del T, Uk, Vh
            V = self._clamp(P @ Q.mT, eps1, "svd", k)  # SVD factors can go negative
        else:  # "qr": rank-revealing QR (column pivoting) of the target, truncated to k columns
            Q, W = state["Q"], state["W"]
            T = (Q @ W).mul_(beta2).add_(S, alpha=1 - beta2)
            del S
            Qk, Rk, _ = pivoted_qr(T, k)
            Q.copy_(Qk)
            W.copy_(Rk)  # R's first k rows in the original column order: W = Q^T T
            del T, Qk, Rk
            V = self._clamp(Q @ W, eps1, "qr", k)  # Q Q^T T can go negative
        return V.rsqrt_().mul_(g)

    def _clamp(self, V: torch.Tensor, eps1: float, kind: str, k: int) -> torch.Tensor:
        """V clamped to >= eps1. At rank 1 the svd and qr factors of the non-negative target are non-negative
        (Perron-Frobenius; a pivoted column of T), so nothing is clamped; at rank >= 2 entries can go negative,
        and a clamped entry gets an update of order g / sqrt(eps1) that the normalisation then makes the whole
        update of its tensor: warned once per optimizer."""
        if k >= 2 and not getattr(self, "_warned_clamp", False) and bool((V < eps1).any()):
            self._warned_clamp = True
            warnings.warn(f"AdaLomo second_moment={kind!r} at rank {k}: {int((V < eps1).sum())} of {V.numel()} "
                          f"second-moment entries were negative or below eps1={eps1:g} and are clamped to it; those "
                          "entries then carry almost all of their tensor's normalised update (docs/methods.md, "
                          "AdaLomo rank-k second moments). Rank 1, or 'nmf' at any rank, has no such entries.",
                          stacklevel=2)
        return V.clamp_min_(eps1)

    # ---- update --------------------------------------------------------------------------------
    def _update(self, p, g, group):
        state = self.state[p]
        if not state:  # lazily, as torch.optim: fp32 factors on the parameter's device
            state["step"] = 0
            for name, shape in self._state_shapes(p, group).items():
                state[name] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        U = self._precondition(p, g, state, group)
        state["step"] += 1
        norm = group["normalization"]
        if norm not in ("global", "layer"):
            return self._finish([(p, U)])
        # buffer until every parameter of the set has its update (set = all "global" params / one group)
        key = "global" if norm == "global" else id(group)
        if key not in self._buffers:
            members = [q for gr in self.param_groups if (gr["normalization"] == "global" if key == "global"
                       else gr is group) for q in gr["params"] if q.requires_grad]
            self._buffers[key] = (len(members), [])
        expected, items = self._buffers[key]
        items.append((p, U))
        if len(items) == expected:
            self._finish(self._buffers.pop(key)[1])

    def _finish(self, items: list) -> None:
        """Normalise the updates of one set together, then apply theta(1 - eta wd) - eta U_hat."""
        norm = self._where[id(items[0][0])][0]["normalization"]
        if norm != "none":  # RMS over the whole set ("grouped": one tensor)
            rms = torch.stack([U.norm() for _, U in items]).norm() / math.sqrt(sum(U.numel() for _, U in items))
        for p, U in items:
            group = self._where[id(p)][0]
            if norm != "none":
                U.div_((rms / group["clip_threshold"]).clamp(min=1.0))
            p32 = p.to(torch.float32)  # p itself when fp32
            eta = group["lr"] * _rms(p32).clamp(min=group["eps"][1])  # relative step, RMS before decay
            if group["weight_decay"]:
                p32.mul_(1 - eta * group["weight_decay"])
            p32.sub_(U.mul_(eta))
            if p32 is not p:
                p.copy_(p32)  # fp32 arithmetic rounded once into the bf16/fp16 weight

    def _flush(self) -> None:
        # a set whose last gradient never came (frozen or unused parameter): finish with what arrived
        for _, items in self._buffers.values():
            self._finish(items)
        self._buffers.clear()

    # ---- memory accounting (for the notebooks) -----------------------------------------------------
    def _params(self):
        return ((p, g) for g in self.param_groups for p in g["params"] if p.requires_grad)

    def persistent_state_bytes(self) -> int:
        """Bytes of optimizer state kept between steps (fp32 factors), from shapes: exact, and known
        before the first step."""
        return 4 * sum(math.prod(s) for p, g in self._params() for s in self._state_shapes(p, g).values())

    def transient_peak_bytes(self) -> int:
        """Peak bytes of fp32 temporaries alive at once while this implementation updates one
        parameter, maximised over parameters, plus the largest "global"/"layer" buffer of updates.
        A model from shapes (N = numel): the fp32 gradient copy G and either S or U (2N); rank-k
        variants also hold the dense target (3N), svd adds its factors; a non-fp32 weight adds its
        fp32 copy at apply time. It is not a measurement: read torch.cuda.max_memory_allocated for that.
        """
        peak, sets = 0, {}
        for p, g in self._params():
            N, shapes = p.numel(), self._state_shapes(p, g)
            live = 2 * N if ("v" in shapes or "r" in shapes) else 3 * N
            if "P" in shapes:  # full SVD of T: U (n x mn) and Vh (mn x m) beside G and T
                *b, n, m = p.shape
                live = 2 * N + math.prod(b) * min(n, m) * (n + m)
            live = max(live, 2 * N + (N if p.dtype != torch.float32 else 0))  # apply: G, U, fp32 copy
            peak = max(peak, 4 * live)
            if g["normalization"] in ("global", "layer"):
                key = "global" if g["normalization"] == "global" else id(g)
                sets[key] = sets.get(key, 0) + 4 * N
        return peak + max(sets.values(), default=0)


__all__ = ["AdaLomo", "nmf_refine", "pivoted_qr", "adalomo_state_shapes", "adalomo_state_numel", "layer_groups",
           "NORMALIZATIONS", "SECOND_MOMENTS"]
