# Every target creates the virtual environment first if it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 5000
STORE  ?= mlruns

# The README's first command: a real sweep of the study's conv depths (2 runs, 1 epoch each) into ./mlruns.
SWEEP ?= conv=2,3 epochs=1

DEBIAN_DATA := /usr/share/datasets/fashion-mnist

.PHONY: venv data postgres chromium slurm-packages slurm sweep test test-quick ui server server-sqlite bench clean study study-report docs

venv: $(STAMP)

# $(call apt_install,test that it is there,what,apt-get install's arguments,what happens without it): installs
# Debian packages a target needs when they are missing, as root or through sudo, else says what goes without.
define apt_install
@if $(1); then :; \
elif command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null; }; then \
	as_root=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	echo "Installing $(2) (apt-get install $(3))"; \
	$$as_root apt-get update -qq && $$as_root apt-get install -y -qq $(3) >/dev/null; \
else echo "$(4)"; fi
endef

# Fashion-MNIST from Debian's package when it is in neither ./data nor Debian's folder; the code
# itself also tries torchvision's download and says what to do when nothing works.
data:
	$(call apt_install,[ -n "$$(ls data/*idx3-ubyte* data/FashionMNIST/raw/*idx3-ubyte* $(DEBIAN_DATA)/*idx3-ubyte* 2>/dev/null)" ],Fashion-MNIST,dataset-fashion-mnist,Fashion-MNIST not installed: fashioncnn will try torchvision's download into ./data)

# pip (not uv/poetry): it finds the pinned torch wheels on local disk instead of downloading gigabytes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# PostgreSQL, for the team tracking server and its test.
postgres:
	$(call apt_install,[ -n "$$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] || command -v initdb >/dev/null,PostgreSQL,postgresql,PostgreSQL not installed: the server test will be skipped)

# Chromium, for the test that opens the MLflow UI in a headless browser.
chromium:
	$(call apt_install,command -v chromium >/dev/null || command -v chromium-browser >/dev/null,Chromium,chromium,Chromium not installed: the browser test of the MLflow UI will be skipped)

# SLURM (slurmctld, slurmd) and munge, for the cluster tests and make slurm.
slurm-packages:
	$(call apt_install,command -v slurmctld >/dev/null || [ -x /usr/sbin/slurmctld ],SLURM,--no-install-recommends slurmctld slurmd munge,SLURM not installed: the cluster tests will be skipped)

# A single-node SLURM cluster on 127.0.0.1 (config, state and logs in ./slurm), in the foreground until
# Ctrl-C. It prints the `export SLURM_CONF=...` that sbatch, squeue and the submitit launcher need.
slurm: $(STAMP) slurm-packages data
	$(BIN)/python -m fashioncnn.slurm --dir slurm

# A shared MLflow tracking server on $(HOST):$(PORT): PostgreSQL (make server) or sqlite (make server-sqlite),
# database and artifacts in ./server. Add AUTH=--auth for MLflow's basic authentication.
server: $(STAMP) postgres
	$(BIN)/python -m fashioncnn.server --backend postgres --dir server --host $(HOST) --port $(PORT) $(AUTH)

server-sqlite: $(STAMP)
	$(BIN)/python -m fashioncnn.server --backend sqlite --dir server --host $(HOST) --port $(PORT) $(AUTH)

sweep: $(STAMP) data
	$(BIN)/python -m fashioncnn -m $(SWEEP)

# The study (docs/study.md): each step's preset (conf/study/) in the study's order, then the reports.
# STUDY_ARGS goes to every step, e.g. make study STUDY_ARGS="subset=2000 epochs=1" for a quick pass.
STUDY_STEPS ?= step1-conv step2-lin step3-channels step3-retrain30 step4-lr step4-retrain50 step4-lr-variations
STUDY_ARGS  ?=

study: $(STAMP) data
	@set -e; for step in $(STUDY_STEPS); do \
		echo "== study $$step: python -m fashioncnn -m +study=$$step $(STUDY_ARGS)"; \
		$(BIN)/python -m fashioncnn -m +study=$$step $(STUDY_ARGS); \
	done
	$(MAKE) --no-print-directory study-report

# One report per step in reports/<step>/, and the study's step-2 table (step 2 with step 1's M2.3, M3.3).
study-report: $(STAMP)
	@set -e; for step in $(STUDY_STEPS); do \
		$(BIN)/python -m fashioncnn.report study-$$step -o reports/$$step > /dev/null; \
		echo "reports/$$step/report.md"; \
	done
	@$(BIN)/python -m fashioncnn.report study-step1-conv study-step2-lin --filter model.conv=2,3 \
		--title "Step 2: linear depth, with step 1's M2.3 and M3.3" -o reports/step2-with-step1 > /dev/null
	@echo "reports/step2-with-step1/report.md"

test: $(STAMP) data postgres chromium slurm-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The edit-test loop: every test not marked slow (under 2 minutes on 2 cores).
test-quick: $(STAMP) data
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Prints the runs table of the latest sweep's experiment, in the UI's model-training view (fashioncnn/tracking/links.py).
# MLflow's job runner (GenAI scorers) stays off unless asked: seven processes and 1.5 GB that a UI of sweeps never uses.
ui: $(STAMP)
	@mkdir -p $(STORE)
	@url=$$($(BIN)/python -m fashioncnn.links --tracking-uri sqlite:///$(abspath $(STORE))/mlflow.db --base http://$(HOST):$(PORT)) && \
		echo "MLflow UI: $$url  (store: $(abspath $(STORE))/mlflow.db, Ctrl-C to stop)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} $(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(STORE))/mlflow.db \
		--default-artifact-root $(abspath $(STORE))/artifacts --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info outputs multirun site

# The documentation site (mkdocs.yml, docs/) into ./site, strictly: a broken link or reference fails the build.
# The configuration reference and the benchmarks page are generated from the code (docs/hooks.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

# The speed benchmark: the naive reference loop (in a worker process of its own) against the package's
# training path, alternating, for M2.2.32.32, M3.3.32.32 and M1.3.32.32 (a few minutes on 2 cores). Writes
# benchmarks/results.json and redraws the speed table in benchmarks/README.md. E.g. BENCH_ARGS="--full-epoch" or
# BENCH_ARGS="--threads 1 --out benchmarks/results-threads1.json".
BENCH_ARGS ?=

bench: $(STAMP) data
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)
