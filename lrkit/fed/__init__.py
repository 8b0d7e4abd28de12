"""FeDLRT (Schotthoefer & Laiu, arXiv 2406.17887): low-rank layers, pure client/server steps, a
deterministic in-process simulator with FedAvg/FedLin baselines, data partitions and synthetic problems.
`lrkit.fed.flower` runs the same rounds on Flower (imported on demand: it needs `flwr`)."""
from lrkit.fed.layers import LowRankConv2d, LowRankLinear, low_rank_layers, to_low_rank
from lrkit.fed.fedlrt import aggregate, augment, truncate
from lrkit.fed.simulate import Channel, run_fedavg, run_fedlin, run_fedlrt, to_run_result
from lrkit.fed.problems import least_squares
from lrkit.fed import partition

__all__ = ["LowRankLinear", "LowRankConv2d", "low_rank_layers", "to_low_rank", "augment", "truncate",
           "aggregate", "Channel", "run_fedlrt", "run_fedavg", "run_fedlin", "to_run_result", "least_squares", "partition"]
