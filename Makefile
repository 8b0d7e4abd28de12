# lrkit: `make reproduce` and `make test` are all a fresh clone needs (they create .venv themselves).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lrkit-setup
PROFILE ?= auto
NOTEBOOKS := $(shell find notebooks -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | sort)
# Headless runs: no progress bars; no network lookups by Hugging Face libraries except on the paper
# profile, whose data (C4, CIFAR-10) and benchmarks (lm-eval) are online.
export LRKIT_HEADLESS := 1
export HF_HUB_OFFLINE := $(if $(filter paper,$(PROFILE)),0,1)
export TOKENIZERS_PARALLELISM := false
# One torch thread per notebook: results do not depend on the machine's core count (same seed, same
# numbers), and `make reproduce` runs JOBS notebooks side by side instead (default: one per core).
export OMP_NUM_THREADS ?= 1
JOBS ?= $(shell nproc 2>/dev/null || echo 2)


.PHONY: help setup lock data test unit nbval mutants reproduce tune seed-check index readme check-reports bench gpu-check lab strip clean
help:
	@echo "make reproduce [PROFILE=smoke|cpu|gpu|paper]  run every notebook, write reports/ (default: gpu if CUDA, else cpu)"
	@echo "                                              reruns only missing or stale results; FORCE=1 reruns all"
	@echo "make test                                     unit tests + nbval over every notebook at smoke size"
	@echo "make lab                                      JupyterLab on notebooks/"
	@echo "make data                                     fetch and verify every offline dataset into data/"
	@echo "make lock                                     refresh requirements.lock (exact versions + hashes) from pyproject.toml"
	@echo "make tune [PROFILE=...]                      run each paper's learning-rate sweep (notebooks/*/tuning.ipynb)"
	@echo "make seed-check NB=notebooks/x/y.ipynb SEEDS=5,6,7  rerun with other seeds, compare the verdicts"
	@echo "make check-reports                            diff fresh cpu results against the committed reference"
	@echo "make mutants                                  break the code on purpose (tests/mutants/*.yaml), check each guarding test fails"
	@echo "make bench                                    tokens/s and memory of every optimizer on this machine"
	@echo "make gpu-check [DRY_RUN=1]                    on a GPU: CUDA tests, bf16 memory/throughput -> reports/gpu-check/"

# ---- environment: created on first use from the lock (exact versions, sha256 hashes); redone when the
# lock, pyproject.toml or constraints.txt change. `make lock` refreshes the lock (needs PyPI).
LOCK := requirements.lock
setup: $(STAMP)
$(STAMP): pyproject.toml constraints.txt $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "cannot create $(VENV): install python3-venv (apt-get install python3-venv)"; exit 1; }
	@$(PY) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "3.11" else "$(LOCK) is for Python 3.11, this is " + v)'
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	set -o pipefail; $(PY) -m pip install -q --no-compile --require-hashes -r $(LOCK) 2>&1 | { grep -v "is ignored" || true; }
	@# bytecode on every core: pip compiles one file at a time (2 cores: 84 s install with it, 34 s + 34 s this way);
	@# the few files that are not Python 3 (templates, test data) fail to compile, as they do under pip
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
	set -o pipefail; $(PY) -m pip install -q --no-deps -e . 2>&1 | { grep -v "is ignored" || true; }
	@# Strip outputs from notebooks on commit (tags kept); executed copies live in reports/.
	@if git rev-parse --git-dir >/dev/null 2>&1; then $(VENV)/bin/nbstripout --install --attributes .gitattributes; fi
	@touch $@

# uv resolves; the CPU torch wheel comes from pip's find-links when the machine has one (constraints.txt).
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
lock:
	@test -x $(VENV)/tools/bin/uv || { $(PYTHON) -m venv $(VENV)/tools && $(VENV)/tools/bin/pip install -q uv; }
	$(VENV)/tools/bin/uv pip compile pyproject.toml --extra dev -c constraints.txt --generate-hashes \
	  --python-version 3.11.7 --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple \
	  $(addprefix --find-links ,$(FIND_LINKS)) --no-header --no-annotate $(LOCK_ARGS) -o $(LOCK).body
	{ echo "# $(LOCK): every package of the kit's environment (runtime and dev), exact versions and sha256 hashes."; \
	  echo "# Written by \`make lock\` (uv pip compile) from pyproject.toml and constraints.txt; \`make setup\` and CI install it."; \
	  echo "# inputs-sha256: $$($(PYTHON) lrkit/_lock.py)"; \
	  echo "# python 3.11, x86_64-manylinux_2_28; torch is the CPU build (GPU: README, GPU install)"; \
	  cat $(LOCK).body; } > $(LOCK).tmp && rm $(LOCK).body && mv $(LOCK).tmp $(LOCK)

data: setup
	$(PY) -m lrkit.data

# ---- tests: unit tests, then every notebook executed by nbval at its smoke defaults
# ... then the numeric guard: the smoke results nbval just computed must equal the committed smoke reference
# (same seed, one thread; to a relative 1e-9, since float64 BLAS can differ in the last bit between processes); a change that alters a number fails until `make reproduce PROFILE=smoke`
# regenerates and commits the reference.
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=600
# The unit tests and nbval run side by side (each one's output printed whole when it ends): the notebooks fill the
# CPU the unit tests leave idle while they wait on Flower's and torchrun's processes. Measured on a clean clone,
# 2 cores: 609 s for .ci/run against 657 s one after the other; nbval at nice 19 was slower (746 s: Jupyter
# kernels are sessions of their own, and at the lowest priority they got too little of the little idle CPU).
test: setup data
	@$(MAKE) --no-print-directory -j2 --output-sync=target unit nbval
	$(PY) -m lrkit.reports check --profile smoke
# TEST_JOBS pytest workers side by side (pytest-xdist; default one per core, TEST_JOBS=0 for none): unit tests
# one by one (tests sharing processes carry an xdist_group mark), each notebook whole on one worker.
# The unit tests get one worker more: the real-process Flower tests mostly wait on their processes (31 CPU-s in
# 150 s wall, measured alone), and a third worker fills the idle core (2 cores: 328 s against 378 s with two).
# Two more (four workers) was tried on 2026-12-07: Ray's raylet then timed out starting up (2 Flower tests failed).
TEST_JOBS ?= $(JOBS)
UNIT_JOBS ?= $(if $(filter 0,$(TEST_JOBS)),0,$(shell echo $$(($(TEST_JOBS) + 1))))
unit: setup data
	$(PY) -m pytest -q -n $(UNIT_JOBS) --dist loadgroup tests
nbval: setup data
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadfile $(NBVAL) notebooks
# Tests that can fail: each mutant in tests/mutants/*.yaml breaks the code once; its test must then fail.
mutants: setup data
	$(PY) tests/run_mutants.py

# ---- reproduce: one target per notebook, so `make -j2 reproduce` runs two at a time
# The longest notebooks (cpu run times in the folder READMEs) start first, so `-j` ends with short ones.
LONGEST := $(foreach n,galore/galore galore/scaling adalomo/scaling galore/ablation_rank getting_started galore/ablation_lora,$(filter notebooks/$(n).ipynb,$(NOTEBOOKS)))
# Only notebooks whose results are missing or stale run (lrkit.reports --if-stale: the notebook, its configs,
# the tuned rates it read, the lrkit code its kernel imported or the lock changed since this checkout ran it);
# FORCE=1 reruns all. `make -j4 reproduce` runs four at a time (the default: JOBS, one per core).
reproduce: setup data
	$(MAKE) --no-print-directory $(if $(filter -j%,$(MAKEFLAGS)),,-j $(JOBS)) $(addprefix run/,$(LONGEST) $(filter-out $(LONGEST),$(NOTEBOOKS)))
	$(PY) -m lrkit.reports index --profile $(PROFILE)
	@if [ "$$($(PY) -c 'from lrkit.reports import profile_settings as p; print(p("$(PROFILE)")["name"])')" = cpu ]; then $(PY) -m lrkit.reports readme; fi
readme: setup
	$(PY) -m lrkit.reports readme
run/%: setup
	$(PY) -m lrkit.reports run $* --profile $(PROFILE) $(if $(FORCE),,--if-stale)
# Each paper's tuning notebook chooses the learning rates the folder's other notebooks read: it runs first
# (the scaling notebooks tune themselves at every size and read no other record, so they need not wait).
TUNING := $(filter %/tuning.ipynb,$(NOTEBOOKS))
$(foreach t,$(TUNING),$(eval $(addprefix run/,$(filter-out $(t) %/scaling.ipynb,$(filter $(dir $(t))%,$(NOTEBOOKS)))): run/$(t)))
tune: setup data
	$(MAKE) --no-print-directory -j $(JOBS) $(addprefix run/,$(TUNING))
seed-check: setup data
	$(PY) -m lrkit.reports seed-check $(NB) --seeds $(SEEDS) --profile cpu

index: setup
	$(PY) -m lrkit.reports index --profile $(PROFILE)
check-reports: setup
	$(PY) -m lrkit.reports check --profile cpu

bench: setup
	$(PY) -m lrkit.bench
# On a lent GPU: the CUDA tests, bf16 memory and throughput side by side, a GaLore recipe run (< 8 min).
# `make gpu-check DRY_RUN=1` runs the same code at toy sizes anywhere (what the tests do).
gpu-check: setup data
	$(PY) -m lrkit.gpu_check $(if $(DRY_RUN),--dry-run)

# JupyterLab on loopback; it prints the URL (with its token) to open. --allow-root: containers and many GPU
# boxes run as root; no news prompt, no update check (configs/jupyterlab/overrides.json; no internet needed).
LAB_FLAGS := --notebook-dir=notebooks --ip=127.0.0.1 --no-browser --allow-root --LabApp.news_url=None \
  --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate --LabApp.app_settings_dir=configs/jupyterlab
lab: setup data
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) $(LAB_ARGS)

strip: setup
	$(VENV)/bin/nbstripout $(NOTEBOOKS)

clean:
	rm -rf reports/index.html reports/screenshots $$(find reports -name '*.html' -o -name '*.ipynb')
