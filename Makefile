# Every target builds .venv from requirements.lock when it is missing or the lock changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-from-lock
export PATH := $(CURDIR)/$(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: run test setup exiftool browser app screenshots bench bench-quality bench-features bench-train bench-decode bench-serving bench-team airflow team ui lint clean

setup: $(STAMP) exiftool

# `captioner tag` writes XMP with ExifTool (Debian's libimage-exiftool-perl): install it when
# missing and this user may (root, or sudo without a password); otherwise say how.
exiftool:
	@command -v exiftool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	    echo "warning: exiftool not found and no root: captioner tag and its tests need it (apt-get install libimage-exiftool-perl)"; exit 0; fi; \
	  echo "installing Debian's ExifTool for captioner tag"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends libimage-exiftool-perl >/dev/null; }

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { echo "error: Python 3.11 is needed (found: $(PYTHON)); install it or run make PYTHON=/path/to/python3.11"; exit 1; }
	@command -v java >/dev/null || echo "warning: java not found; METEOR/ROUGE/CIDEr scoring needs Java 17 (apt-get install openjdk-17-jre-headless)"
	@command -v git >/dev/null || { echo "error: git not found (DVC needs it)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	@touch $(STAMP)

# Runs the whole pipeline on the embedded synthetic dataset (offline), then captions a few test images.
run: setup
	$(BIN)/dvc repro
	$(BIN)/python -m pipeline.ops.run_summary

# Two pytest-xdist workers, a module at a time each (its fixtures built once): about half the
# wall time on 2 cores, as the end-to-end tests spend much of theirs waiting on services.
TEST_WORKERS ?= 2
test: $(STAMP) exiftool browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

# The browser tests drive Debian's chromium with Playwright (no browser download): install it
# when missing and this user may (root, or sudo without a password); otherwise say how.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	    echo "warning: chromium not found and no root: the browser tests will skip (apt-get install chromium)"; exit 0; fi; \
	  echo "installing Debian's chromium for the browser tests"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	@# axe-core, the accessibility engine the alt-text tests run in chromium, pinned in tests/axe/package-lock.json
	@test -f tests/axe/node_modules/axe-core/axe.min.js || { command -v npm >/dev/null && \
	  npm ci --prefix tests/axe --no-audit --no-fund --silent || echo "warning: npm not found: the axe-core test will fail"; }

bench: bench-features bench-train bench-decode bench-serving

bench-features: $(STAMP)
	$(BIN)/python benchmarks/bench_features.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

bench-decode: $(STAMP)
	$(BIN)/python benchmarks/bench_decode.py

# Real Flickr8k (../shared/flickr8k_real): train on train, score on dev with params.yaml.
bench-quality: $(STAMP)
	$(BIN)/python benchmarks/bench_quality.py

bench-serving: $(STAMP)
	$(BIN)/python benchmarks/bench_serving.py

# Needs the local Postgres and Redis: one DAG run on `make team` with 1 and with 2 workers.
bench-team: $(STAMP)
	$(BIN)/python benchmarks/bench_team.py

# Airflow 3 standalone on http://127.0.0.1:8080 with this project's DAG (Ctrl-C stops it all).
airflow: $(STAMP)
	$(BIN)/python -m pipeline.ops.launchers airflow

# The team stack without Docker: Airflow with Celery workers (each in its own clone) on the
# local Postgres + Redis, MLflow server with a Postgres store (Ctrl-C stops it all).
WORKERS ?= 2
team: $(STAMP)
	$(BIN)/python -m pipeline.ops.launchers team --workers $(WORKERS)

# The caption web app on http://127.0.0.1:8000 over models:/<register.model_name>@champion,
# swapping in a new champion without a restart (POLL seconds between checks).
POLL ?= 10
app: $(STAMP)
	$(BIN)/captioner app --poll-seconds $(POLL)

# The README's pictures, from the model `make run` trained (headless Debian chromium).
screenshots: $(STAMP) browser
	$(BIN)/python docs/take_screenshots.py

# MLflow UI / tracking server on http://127.0.0.1:5000 over the project's store.
ui: $(STAMP)
	$(BIN)/python -m pipeline.ops.launchers ui

lint: $(STAMP)
	$(BIN)/ruff check pipeline dags tests benchmarks

clean:
	rm -rf data/raw data/prepared data/features models metrics reports/*.json reports/*.parquet reports/*.html reports/*.csv reports/*.png
