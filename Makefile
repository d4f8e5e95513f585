# Everything runs from the repo-local virtual environment .venv (created on first use).
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test lint bench bench-gpu clean

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch first, pinned to the CPU wheel: an unbounded resolve pulls a multi-GB CUDA build.
	$(PY) -m pip install -q "torch>=2.4,<2.14"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(VENV_STAMP)

install: $(VENV_STAMP)

# One intra-op thread: the tiny backbone and the probes are dispatch-bound (idle, 1 or 2 threads: same time), but
# on a 2-core machine busy with other jobs two OpenMP threads wait on each other: train.py took 219 s instead
# of ~20 s, most of it in 0.5 s backward passes of an 8K-parameter probe.
# Override: make quickstart OMP_NUM_THREADS=N.
quickstart: export OMP_NUM_THREADS ?= 1
# The trained toy reasoner (configs/probes_toy.yaml): the first run builds toy-qwq once (~3 min on 2 cores).
quickstart: $(VENV_STAMP)
	$(PY) train.py --config configs/probes_toy.yaml --run_name quickstart --overwrite true
	$(PY) evaluate.py --ckpt checkpoints/quickstart/best.ckpt
	@echo
	@echo "Results:     logs/quickstart/probe_accuracies.json, logs/quickstart/visualizations/probe_accuracy.png"
	@echo "Checkpoints: checkpoints/quickstart/ (best.ckpt, last.ckpt)"
	@echo "TensorBoard: .venv/bin/tensorboard --logdir logs"

# The report's browser tests (tests/test_report_html.py) drive Debian's chromium through selenium: installed here when
# missing and apt and root are at hand (~35 s), else those tests skip and say why.
BROWSER_STAMP := .venv/.browser
$(BROWSER_STAMP): $(VENV_STAMP)
	command -v chromedriver >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  DEBIAN_FRONTEND=noninteractive timeout 600 sh -c 'apt-get update -q && apt-get install -y -q chromium chromium-driver' \
	  >/dev/null; } || echo "no chromium: the report's browser tests will skip"
	touch $(BROWSER_STAMP)

# pytest-xdist: one worker per core (PYTEST_WORKERS=0 runs in one process, e.g. for pdb).
PYTEST_WORKERS ?= auto
test: $(VENV_STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS)

lint: $(VENV_STAMP)
	$(PY) -m ruff check .

# One table on stdout and bench/results.json (bench/suite.py). The peers (TransformerLens, nnsight) are timed when
# installed: .venv/bin/pip install -e '.[peers]' (~1.6 GB); otherwise their rows say so.
bench: $(VENV_STAMP)
	$(PY) bench/suite.py

# The GPU part (bench/gpu.py: QwQ-32B's shape in bf16, MFU, peak memory), under 8 minutes on a machine with a GPU.
bench-gpu: $(VENV_STAMP)
	PY=$(PY) bash bench/gpu.sh

clean:
	rm -rf checkpoints/* logs/* .pytest_cache
	touch checkpoints/.gitkeep logs/.gitkeep
