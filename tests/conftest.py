"""Session-wide test settings, applied before any test module is imported.

* Hugging Face offline: huggingface_hub, transformers and datasets read HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE and
  HF_DATASETS_OFFLINE once, when they are first imported (huggingface_hub.constants, datasets.config), so a test
  that sets them later (monkeypatch.setenv) changes nothing if any earlier test imported the libraries: it would
  then reach for the network. They are set here, first, for the whole session and every subprocess it starts (the
  tests never need the network; the tests of the offline errors rely on this). `make test` exports
  HF_HUB_OFFLINE=1 too; running pytest directly must behave the same.
* One torch thread: several tests compare two computations bit for bit (the Flower engine against the in-process
  simulator, whose clients run in Ray workers or SuperNode processes with one thread; the FeDLRT references).
  A float reduction split over threads sums in another order, so those comparisons hold only with one thread
  here too. Before, they held only when a module that calls torch.set_num_threads(1) at import
  (tests/test_fedlrt.py, ...) had been collected: running one test alone used every core. Set once here.
"""
import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


# Longest first: pytest-xdist hands tests to its workers in collection order, and these modules' tests (real
# Flower, torchrun and Jupyter processes, whole notebooks) take 10 to 110 s each; collected in name order, some
# started last and left one worker running alone at the end.
LONG_FIRST = ("test_flower.py", "test_notebooks.py", "test_fsdp.py", "test_rerun.py", "test_lab.py",
              "test_report_pages.py", "test_train_resume.py", "test_distributed.py", "test_gpu_check.py",
              "test_experiments_fedlrt.py", "test_experiments_adalomo.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: LONG_FIRST.index(item.path.name) if item.path.name in LONG_FIRST else len(LONG_FIRST))
    # CUDA tests are marked and skipped on CPU machines (CI has no GPU).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
