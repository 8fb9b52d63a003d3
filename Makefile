# Every target creates the virtual environment first if it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 5000
STORE  := mlruns

# The README's first command: a real sweep of the study's conv depths (2 runs, 1 epoch each) into ./mlruns.
SWEEP ?= conv=2,3 epochs=1

DEBIAN_DATA := /usr/share/datasets/fashion-mnist

.PHONY: venv data sweep test ui bench clean

venv: $(STAMP)

# Fashion-MNIST from Debian's package when it is in neither ./data nor Debian's folder; the code
# itself also tries torchvision's download and says what to do when nothing works.
data:
	@if [ -n "$$(ls data/*idx3-ubyte* data/FashionMNIST/raw/*idx3-ubyte* $(DEBIAN_DATA)/*idx3-ubyte* 2>/dev/null)" ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "Fashion-MNIST not installed: fashioncnn will try torchvision's download into ./data"; fi

# pip (not uv/poetry): it finds the pinned torch wheels on local disk instead of downloading gigabytes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

sweep: $(STAMP) data
	$(BIN)/python -m fashioncnn -m $(SWEEP)
	@echo "Runs are in ./$(STORE). See them: make ui"

test: $(STAMP) data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

ui: $(STAMP)
	@mkdir -p $(STORE)
	@echo "MLflow UI: http://$(HOST):$(PORT)  (store: ./$(STORE)/mlflow.db, Ctrl-C to stop)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(STORE)/mlflow.db \
		--default-artifact-root ./$(STORE)/artifacts --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info outputs multirun

# The speed benchmark: the naive reference loop against the package's training path, alternating in one
# process, for M2.2.32.32, M3.3.32.32 and M1.3.32.32 (a few minutes on 2 cores). Writes
# benchmarks/results.json and redraws README.md's speed table. E.g. BENCH_ARGS="--full-epoch" or
# BENCH_ARGS="--threads 1 --out benchmarks/results-threads1.json".
BENCH_ARGS ?=

bench: $(STAMP) data
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)
