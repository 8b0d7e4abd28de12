"""The federated problems: the least-squares test of arXiv 2406.17887 Sec. 4.1 (its generator is
``lrkit.data.synthetic.least_squares``, re-exported here), seeded image-classification subsets split across
clients by a Dirichlet label mix, and the models the paper trains on them (an MLP, ResNet18) plus a small CNN
(`cnn`) for CPU-scale runs with every convolution and dense layer but the head factorised.
"""
from __future__ import annotations

import torch

from lrkit.data.synthetic import least_squares, rank_constrained_minimiser  # the generator lives with the data

__all__ = ["least_squares", "rank_constrained_minimiser", "image_classification", "dirichlet_clients", "mlp",
           "resnet18", "RESNET18_DENSE", "cnn", "CNN_DENSE", "SmallCNN"]


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


# ResNet18 layers kept dense by FeDLRT: the stem (C_in * 9 inputs, too small to factorise) and the head.
RESNET18_DENSE = ("conv1", "fc")


class _Block(torch.nn.Module):
    """ResNet basic block (He et al. 2016) with GroupNorm in place of BatchNorm."""

    def __init__(self, c_in, c_out, stride, groups):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(groups, c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(torch.nn.Module):
    """CIFAR-style ResNet18: 3x3 stem without max-pool, four stages of two basic blocks (widths w, 2w, 4w,
    8w; strides 1, 2, 2, 2), global average pool, linear head. GroupNorm (2 groups) replaces BatchNorm:
    FeDLRT averages parameters, and BatchNorm's running statistics are buffers that federated averaging
    does not handle (Hsieh et al. 2020 use GroupNorm for the same reason). The kit's choice; the paper
    does not say how its ResNet18 normalises."""

    def __init__(self, in_channels: int = 3, classes: int = 10, width: int = 64, groups: int = 2):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, width)
        blocks, c = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2 ** i
            blocks += [_Block(c, c_out, stride, groups), _Block(c_out, c_out, 1, groups)]
            c = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layers(torch.relu(self.norm1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def resnet18(in_channels: int = 3, classes: int = 10, width: int = 64):
    """A builder for `ResNet18`; factorise with exclude=RESNET18_DENSE."""
    if width < 2 or width % 2:
        raise ValueError(f"Invalid width: {width!r} (expected an even int >= 2, for 2 GroupNorm groups)")
    return lambda: ResNet18(in_channels, classes, width)


# SmallCNN layers kept dense by FeDLRT: the classifier head only (every convolution and the hidden dense layer
# are factorised, as in the paper's vision networks, whose last layer stays full rank).
CNN_DENSE = ("head",)


class SmallCNN(torch.nn.Module):
    """conv3x3(C_in -> w) - ReLU - maxpool 2 - conv3x3(w -> 2w) - ReLU - maxpool 2 - Linear(2w (H/4)(W/4) ->
    hidden) - ReLU - Linear(hidden -> classes) ("head"). No normalisation layer (nothing for federated
    averaging to mishandle). A CPU-sized stand-in for the paper's AlexNet / VGG16 shape (convolutions, then
    dense layers); the paper's own networks are ResNet18 / AlexNet / VGG16 (`resnet18` here)."""

    def __init__(self, in_channels: int = 1, classes: int = 10, width: int = 8, hidden: int = 64,
                 image_size: int = 28):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, 1, 1)
        self.fc1 = nn.Linear(2 * width * (image_size // 4) ** 2, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.relu(self.fc1(x.flatten(1))))


def cnn(in_channels: int = 1, classes: int = 10, width: int = 8, hidden: int = 64, image_size: int = 28):
    """A builder for `SmallCNN`; factorise with exclude=CNN_DENSE."""
    for k, v in (("width", width), ("hidden", hidden), ("image_size", image_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (4 if k == "image_size" else 1):
            raise ValueError(f"Invalid {k}: {v!r} (expected an int >= {4 if k == 'image_size' else 1})")
    return lambda: SmallCNN(in_channels, classes, width, hidden, image_size)
