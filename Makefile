# Everything runs from the repo-local virtual environment .venv (created on first use).
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test lint bench clean

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch first, pinned to the CPU wheel: an unbounded resolve pulls a multi-GB CUDA build.
	$(PY) -m pip install -q "torch>=2.4,<2.14"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(VENV_STAMP)

install: $(VENV_STAMP)

quickstart: $(VENV_STAMP)
	$(PY) train.py --config configs/quickstart.yaml --run_name quickstart
	$(PY) evaluate.py --ckpt checkpoints/quickstart/best.ckpt
	@echo
	@echo "Results:     logs/quickstart/probe_accuracies.json, logs/quickstart/visualizations/probe_accuracy.png"
	@echo "Checkpoints: checkpoints/quickstart/ (best.ckpt, last.ckpt)"
	@echo "TensorBoard: .venv/bin/tensorboard --logdir logs"

test: $(VENV_STAMP)
	$(PY) -m pytest -q

lint: $(VENV_STAMP)
	$(PY) -m ruff check .

bench: $(VENV_STAMP)
	$(PY) bench/extraction.py

clean:
	rm -rf checkpoints/* logs/* .pytest_cache
	touch checkpoints/.gitkeep logs/.gitkeep
