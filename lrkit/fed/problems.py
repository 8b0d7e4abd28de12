"""Synthetic federated problems. The least-squares test of arXiv 2406.17887 (Sec. 4.1, the kit's
version): a rank-r linear target and heterogeneous clients, where variance correction decides whether
the global loss keeps descending.

Client c draws inputs x = D_c z + m_c with z ~ N(0, I), a client-specific diagonal scaling D_c
(log-normal with spread `heterogeneity`) and mean shift m_c: the clients' Hessians X_c^T X_c differ.
Targets y = W_star x + noise with W_star = U diag(s) V^T of rank r. The noise matters: without it every
client's minimiser is W_star and plain FedAvg has no drift to correct; with it the local minimisers
differ and, with many local steps, uncorrected averaging settles away from the global minimiser.
"""
from __future__ import annotations

import torch

__all__ = ["least_squares", "image_classification", "dirichlet_clients", "mlp"]


def least_squares(n: int = 20, rank: int = 2, num_clients: int = 4, samples_per_client: int = 40,
                  heterogeneity: float = 1.0, noise: float = 0.5, seed: int = 0) -> dict:
    """Returns {"clients": [(X_c, Y_c)], "W_star", "W_ls" (pooled least-squares minimiser of the global
    loss), "loss_ls" (its global mean-squared error, the floor)}; float32, X_c: m x n, Y_c: m x n."""
    if not 1 <= rank <= n:
        raise ValueError(f"Invalid rank: {rank!r} (expected 1 <= rank <= n = {n})")
    if num_clients < 1 or samples_per_client < 1:
        raise ValueError(f"Invalid sizes: num_clients={num_clients}, samples_per_client={samples_per_client} "
                         "(expected positive ints)")
    if heterogeneity < 0 or noise < 0:
        raise ValueError(f"Invalid heterogeneity={heterogeneity} / noise={noise} (expected >= 0)")
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
    W_star = U @ torch.diag(torch.linspace(2.0, 1.0, rank, dtype=torch.float64)) @ V.T
    clients = []
    for _ in range(num_clients):
        D = torch.exp(heterogeneity * torch.randn(n, generator=g, dtype=torch.float64))
        m = heterogeneity * torch.randn(n, generator=g, dtype=torch.float64)
        X = torch.randn(samples_per_client, n, generator=g, dtype=torch.float64) * D + m
        Y = X @ W_star.T + noise * torch.randn(samples_per_client, n, generator=g, dtype=torch.float64)
        clients.append((X, Y))
    # Global loss = mean over clients of each client's mean squared error (equal client sizes: the pooled
    # MSE), so its minimiser is the pooled least-squares solution.
    X_all, Y_all = torch.cat([c[0] for c in clients]), torch.cat([c[1] for c in clients])
    W_ls = torch.linalg.lstsq(X_all, Y_all).solution.T
    loss_ls = float(((X_all @ W_ls.T - Y_all) ** 2).mean())
    return {"clients": [(X.float(), Y.float()) for X, Y in clients], "W_star": W_star.float(),
            "W_ls": W_ls.float(), "loss_ls": loss_ls}


def image_classification(dataset: str = "fashion_mnist", train_size: int = 6000, test_size: int = 2000,
                         seed: int = 0, flatten: bool = True) -> dict:
    """A seeded subsample of an image data set as float tensors in [0, 1]: {"X", "y", "X_test", "y_test"}.

    ``flatten``: (N, H*W*C) vectors for MLPs; else NCHW images (Fashion-MNIST gains a channel axis,
    CIFAR-10's NHWC is permuted)."""
    import numpy as np

    from lrkit import data

    if dataset not in ("fashion_mnist", "cifar10"):
        raise ValueError(f"Invalid dataset: {dataset!r} (expected 'fashion_mnist' or 'cifar10')")
    d = data.load(dataset)
    rng = np.random.default_rng(seed)
    tr = rng.permutation(len(d["y_train"]))[:train_size]
    te = rng.permutation(len(d["y_test"]))[:test_size]

    def images(x):
        x = torch.tensor(x / 255.0, dtype=torch.float32)
        if flatten:
            return x.reshape(len(x), -1)
        return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)

    return {"X": images(d["x_train"][tr]), "y": torch.tensor(d["y_train"][tr]),
            "X_test": images(d["x_test"][te]), "y_test": torch.tensor(d["y_test"][te])}


def dirichlet_clients(X: torch.Tensor, y: torch.Tensor, num_clients: int, alpha: float, seed: int = 0) -> list:
    """[(X_c, y_c)] for ``num_clients`` clients whose label mix is Dirichlet(``alpha``) (lrkit.fed.partition)."""
    from lrkit.fed.partition import dirichlet

    return [(X[p], y[p]) for p in dirichlet(y.numpy(), num_clients, alpha, seed=seed)]


def mlp(input_dim: int, hidden: int, classes: int = 10):
    """A builder for the vision MLP input -> hidden -> classes; its head is module "2" (kept dense)."""
    return lambda: torch.nn.Sequential(torch.nn.Linear(input_dim, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, classes))
