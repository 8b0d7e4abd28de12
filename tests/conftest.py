import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # CUDA tests are marked and skipped on CPU machines (CI has no GPU).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
