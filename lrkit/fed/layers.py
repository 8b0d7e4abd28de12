"""Low-rank layers W = U S V^T for FeDLRT (Schotthoefer & Laiu, arXiv 2406.17887, Sec. 2-3).

Each factorised layer holds
    U (n_out x r), V (n_in x r) with orthonormal columns -> buffers: clients never train them,
                                                            only the server rotates them (augment/truncate)
    S (r x r)                                            -> the only trained weight of the layer
    bias (n_out)                                         -> kept dense
Convolutions are factorised on the kernel reshaped to (out_channels x in_channels*k*k).

The forward never forms W: Linear computes ((x V) S^T) U^T, O(b r (n_in + r + n_out)) instead of
O(b n_in n_out); Conv2d convolves with the r kernels V^T and mixes channels with a 1x1 conv by U S.
The rank is read from the tensors' shapes, so the same module also runs with the augmented
(U_tilde, S_tilde, V_tilde) of shape (n_out x r+k_U, r+k_U x r+k_V, n_in x r+k_V) when the simulator
swaps them in with torch.func.functional_call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankLinear", "LowRankConv2d", "low_rank_layers", "to_low_rank"]


def _orthonormal(n: int, r: int, generator: torch.Generator | None) -> torch.Tensor:
    # QR of a Gaussian matrix; the sign fix makes the result unique (Haar-distributed) and seed-stable.
    Q, R = torch.linalg.qr(torch.randn(n, r, generator=generator))
    return Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(()))


class _LowRankMixin:
    """Shared factor handling; subclasses define n_out, n_in and forward."""

    def _init_factors(self, rank, r_min, r_max, seed, W=None):
        full = min(self.n_out, self.n_in)
        r_max = full if r_max is None else min(r_max, full)
        rank = min(rank, full)  # a rank above min(n_out, n_in) adds nothing (e.g. a 3-channel input conv)
        if not 1 <= r_min <= r_max:
            raise ValueError(f"Invalid rank bounds: r_min={r_min}, r_max={r_max} (need 1 <= r_min <= r_max)")
        if not r_min <= rank <= r_max:
            raise ValueError(f"Invalid rank: {rank} (expected r_min={r_min} <= rank <= r_max={r_max})")
        self.r_min, self.r_max = r_min, r_max
        if W is None:
            g = torch.Generator().manual_seed(seed)
            U, V = _orthonormal(self.n_out, rank, g), _orthonormal(self.n_in, rank, g)
            # Same Frobenius norm as PyTorch's default dense init (entries U(-1/sqrt(n_in), 1/sqrt(n_in))
            # have ||W||_F^2 ~ n_out / 3), spread evenly over the r singular values.
            S = torch.eye(rank) * math.sqrt(self.n_out / (3 * rank))
        else:  # best rank-r approximation (Eckart-Young): truncated SVD of the dense weight
            # in W's dtype (at least float32 for the SVD), so the factors match the layer's bias and input
            P, sigma, Qh = torch.linalg.svd(W.detach().to(torch.promote_types(W.dtype, torch.float32)),
                                            full_matrices=False)
            U, S, V = (t.to(W.dtype) for t in (P[:, :rank], torch.diag(sigma[:rank]), Qh[:rank].T))
        self.register_buffer("U", U.contiguous())
        self.register_buffer("V", V.contiguous())
        self.S = nn.Parameter(S.contiguous())

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    @torch.no_grad()
    def set_factors(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        """Replace the factors (the rank may change); S stays the trainable parameter."""
        if U.shape[0] != self.n_out or V.shape[0] != self.n_in or S.shape != (U.shape[1], V.shape[1]):
            raise ValueError(f"Invalid factor shapes U{tuple(U.shape)} S{tuple(S.shape)} V{tuple(V.shape)} "
                             f"for a layer with n_out={self.n_out}, n_in={self.n_in}")
        self.U, self.V = U.detach().clone(), V.detach().clone()
        self.S = nn.Parameter(S.detach().clone())

    def weight_matrix(self) -> torch.Tensor:
        """W = U S V^T (n_out x n_in); for tests and inspection only, the forward never builds it."""
        return self.U @ self.S @ self.V.T

    def extra_repr(self) -> str:
        return f"n_out={self.n_out}, n_in={self.n_in}, rank={self.rank}, r_min={self.r_min}, r_max={self.r_max}"


class LowRankLinear(_LowRankMixin, nn.Module):
    """y = x V S^T U^T + b, i.e. a Linear layer with weight U S V^T (never formed)."""

    def __init__(self, in_features, out_features, rank, bias=True, r_min=1, r_max=None, seed=0, _W=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.n_out, self.n_in = out_features, in_features
        self._init_factors(rank, r_min, r_max, seed, _W)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.S.dtype)) if bias else None

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int, r_min=1, r_max=None) -> "LowRankLinear":
        new = cls(layer.in_features, layer.out_features, rank, layer.bias is not None, r_min, r_max,
                  _W=layer.weight)
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        return new

    def forward(self, x):
        # Three thin products, cheapest order: (b x n_in)(n_in x r) -> (b x r)(r x r) -> (b x r)(r x n_out).
        return F.linear(F.linear(F.linear(x, self.V.T), self.S), self.U, self.bias)


class LowRankConv2d(_LowRankMixin, nn.Module):
    """Conv2d whose kernel, reshaped to (out_channels x in_channels*k*k), is U S V^T.

    conv(x, W) is linear in W, and W = (U S) V^T, so it equals a conv with the r kernels V^T
    (reshaped to r x in_channels x k x k) followed by a 1x1 conv with U S: rank-r cost, exact result.
    groups > 1 is not supported (the reshape would mix groups).
    """

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1,
                 bias=True, r_min=1, r_max=None, seed=0, _W=None):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.n_out, self.n_in = out_channels, in_channels * kh * kw
        self._init_factors(rank, r_min, r_max, seed, None if _W is None else _W.reshape(out_channels, -1))
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=self.S.dtype)) if bias else None

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, rank: int, r_min=1, r_max=None) -> "LowRankConv2d":
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError(f"Invalid conv for factorisation: groups={layer.groups}, padding={layer.padding!r}, "
                             f"padding_mode={layer.padding_mode!r} (expected groups=1, numeric zero padding)")
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, rank, layer.stride, layer.padding,
                  layer.dilation, layer.bias is not None, r_min, r_max, _W=layer.weight)
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        return new

    def forward(self, x):
        r_in, r_out = self.V.shape[1], self.U.shape[1]
        z = F.conv2d(x, self.V.T.reshape(r_in, self.in_channels, *self.kernel_size), None,
                     self.stride, self.padding, self.dilation)
        return F.conv2d(z, (self.U @ self.S).reshape(self.out_channels, r_in, 1, 1), self.bias)


def low_rank_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: layer} of the model's factorised layers, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankConv2d))}


def to_low_rank(model: nn.Module, rank: int, exclude=(), r_min: int = 1, r_max: int | None = None) -> nn.Module:
    """Replace every nn.Linear / nn.Conv2d (groups=1) by its rank-`rank` SVD truncation, in place.
    Use the return value: if the model itself is an nn.Linear / nn.Conv2d, a new module is returned.

    `exclude` holds qualified module names kept dense (commonly the classifier head, as in the paper's
    experiments where the last layer stays full rank). Returns the model.
    """
    exclude = set(exclude)
    unknown = exclude - {n for n, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"Invalid exclude: {sorted(unknown)} are not module names of the model")
    for name, module in list(model.named_modules()):
        if name in exclude:
            continue
        if isinstance(module, nn.Linear):
            new = LowRankLinear.from_dense(module, rank, r_min, r_max)
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            new = LowRankConv2d.from_dense(module, rank, r_min, r_max)
        else:
            continue
        if name == "":
            return new
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model
