"""Client data partitions for the federated experiments (arXiv 2406.17887, Sec. 4 uses iid and
heterogeneous splits of CIFAR-10). Pure functions: labels in, one index array per client out; the same
seed gives the same split, and every index is assigned to exactly one client.

  iid            shuffle, then cut into near-equal parts
  dirichlet      per class, split its indices by proportions ~ Dir(alpha) (Hsu et al. 2019);
                 small alpha = strongly heterogeneous, large alpha -> iid
  k_classes      each client holds k classes (class c goes to clients whose k-slot list contains it);
                 each class's indices are cut evenly among the clients holding it (McMahan et al. 2017's
                 "pathological non-iid" split, generalised)
"""
from __future__ import annotations

import numpy as np

__all__ = ["iid", "dirichlet", "k_classes"]


def _check(labels, num_clients):
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"Invalid labels: shape {labels.shape} (expected a non-empty 1-D array)")
    if not isinstance(num_clients, (int, np.integer)) or not 1 <= num_clients <= len(labels):
        raise ValueError(f"Invalid num_clients: {num_clients!r} (expected an int in [1, {len(labels)}])")
    return labels


def iid(labels, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Uniformly random split into num_clients parts of near-equal size."""
    labels = _check(labels, num_clients)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(labels, num_clients: int, alpha: float, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Label-skewed split: class c's indices are divided with proportions p_c ~ Dir(alpha * 1).

    Redraws (same seeded stream) until every client has at least min_size samples, giving up with
    ValueError after 1000 tries (alpha too small for this many clients)."""
    labels = _check(labels, num_clients)
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"Invalid alpha: {alpha!r} (expected a positive float)")
    if min_size * num_clients > len(labels):
        raise ValueError(f"Invalid min_size: {min_size} (num_clients * min_size exceeds {len(labels)} samples)")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(alpha * np.ones(num_clients)))[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        parts = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(f"Invalid alpha: {alpha} gives a client fewer than {min_size} samples in 1000 draws")


def k_classes(labels, num_clients: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """Each client gets k distinct classes; class assignment cycles through a seeded class permutation so
    every class is held by some client when num_clients * k >= num_classes."""
    labels = _check(labels, num_clients)
    classes = np.unique(labels)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= len(classes):
        raise ValueError(f"Invalid k: {k!r} (expected an int in [1, {len(classes)}] = number of classes)")
    if num_clients * k < len(classes):
        raise ValueError(f"Invalid k: {k} (num_clients * k = {num_clients * k} < {len(classes)} classes: "
                         "some samples would belong to no client)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    # client i holds classes order[(i*k + j) mod C], j < k: consecutive slots, distinct while k <= C
    held = [[order[(i * k + j) % len(classes)] for j in range(k)] for i in range(num_clients)]
    parts = [[] for _ in range(num_clients)]
    for c in classes:
        owners = [i for i in range(num_clients) if c in held[i]]
        idx = rng.permutation(np.flatnonzero(labels == c))
        for i, chunk in zip(owners, np.array_split(idx, len(owners))):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.array([], dtype=int) for p in parts]
