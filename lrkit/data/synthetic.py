"""Synthetic data: the least-squares test of arXiv 2406.17887 (Sec. 4.1, the kit's
version): a rank-r linear target and heterogeneous clients, where variance correction decides whether
the global loss keeps descending.

Client c draws inputs x = D_c z + m_c with z ~ N(0, I), a client-specific diagonal scaling D_c
(log-normal with spread `heterogeneity`) and mean shift m_c: the clients' Hessians X_c^T X_c differ.
Targets y = W_star x + noise with W_star = U diag(s) V^T of rank r. The noise matters: without it every
client's minimiser is W_star and plain FedAvg has no drift to correct; with it the local minimisers
differ and, with many local steps, uncorrected averaging settles away from the global minimiser.

Isotropic noise in all n outputs makes the global minimiser W_ls full rank (n), so a method that reaches
it is tested as a full-rank method. With ``low_rank_noise=True`` the noise lies in the target's own
r-dimensional output space, y = U (diag(s) V^T x + noise z) with z ~ N(0, I_r): the clients' minimisers
still differ (drift), but every one of them and the global W_ls have rank r. That is the problem on
which a low-rank method must find both the rank and the optimum.
"""
from __future__ import annotations

import math

import torch

__all__ = ["least_squares", "rank_constrained_minimiser"]


def least_squares(n: int = 20, rank: int = 2, num_clients: int = 4, samples_per_client: int = 40,
                  heterogeneity: float = 1.0, noise: float = 0.5, seed: int = 0,
                  low_rank_noise: bool = False) -> dict:
    """Returns {"clients": [(X_c, Y_c)], "W_star", "W_ls" (pooled least-squares minimiser of the global
    loss), "loss_ls" (its global mean-squared error, the floor), "W_r" / "loss_r" (the minimiser of the
    global loss among matrices of rank <= `rank`, and its loss: the floor of a rank-`rank` model)};
    float32, X_c: m x n, Y_c: m x n. ``low_rank_noise``: noise in the target's r-dimensional output space
    (W_ls then has rank r and equals W_r), else isotropic (W_ls full rank); see the module docstring."""
    if not 1 <= rank <= n:
        raise ValueError(f"Invalid rank: {rank!r} (expected 1 <= rank <= n = {n})")
    if num_clients < 1 or samples_per_client < 1:
        raise ValueError(f"Invalid sizes: num_clients={num_clients}, samples_per_client={samples_per_client} "
                         "(expected positive ints)")
    for name, v in (("heterogeneity", heterogeneity), ("noise", noise)):
        # NaN passes a "< 0" test and reached torch.linalg.lstsq as an internal assert; inf made NaN data
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
            raise ValueError(f"Invalid {name}: {v!r} (expected a finite number >= 0)")
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
    W_star = U @ torch.diag(torch.linspace(2.0, 1.0, rank, dtype=torch.float64)) @ V.T
    clients = []
    for _ in range(num_clients):
        D = torch.exp(heterogeneity * torch.randn(n, generator=g, dtype=torch.float64))
        m = heterogeneity * torch.randn(n, generator=g, dtype=torch.float64)
        X = torch.randn(samples_per_client, n, generator=g, dtype=torch.float64) * D + m
        if low_rank_noise:
            Y = X @ W_star.T + noise * torch.randn(samples_per_client, rank, generator=g, dtype=torch.float64) @ U.T
        else:
            Y = X @ W_star.T + noise * torch.randn(samples_per_client, n, generator=g, dtype=torch.float64)
        clients.append((X, Y))
    # Global loss = mean over clients of each client's mean squared error (equal client sizes: the pooled
    # MSE), so its minimiser is the pooled least-squares solution.
    X_all, Y_all = torch.cat([c[0] for c in clients]), torch.cat([c[1] for c in clients])
    W_ls = torch.linalg.lstsq(X_all, Y_all).solution.T
    W_r = rank_constrained_minimiser(X_all, W_ls, rank)
    mse = lambda W: float(((X_all @ W.T - Y_all) ** 2).mean())
    return {"clients": [(X.float(), Y.float()) for X, Y in clients], "W_star": W_star.float(),
            "W_ls": W_ls.float(), "loss_ls": mse(W_ls), "W_r": W_r.float(), "loss_r": mse(W_r)}


def rank_constrained_minimiser(X: torch.Tensor, W_ls: torch.Tensor, rank: int) -> torch.Tensor:
    """argmin_{rank(W) <= rank} ||X W^T - Y||_F^2 given the unconstrained minimiser W_ls (reduced-rank
    regression, Izenman 1975): with the fitted values X W_ls^T = P diag(s) Q^T, W_r = Q_r Q_r^T W_ls.

    Why: the residual Y - X W_ls^T is orthogonal to the column space of X, so the loss is that residual
    plus ||X W_ls^T - X W^T||_F^2, and the best rank-r approximation of X W_ls^T (Eckart-Young) is
    X W_ls^T Q_r Q_r^T, reached by W = Q_r Q_r^T W_ls. This is the optimum FeDLRT can reach with
    r_max = rank; W_ls, the full-rank optimum, is the one FedAvg / FedLin can reach."""
    Q = torch.linalg.svd(X @ W_ls.T, full_matrices=False)[2][:rank].T  # top right singular vectors: n x r
    return Q @ Q.T @ W_ls
