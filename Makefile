# Two entry points: `make demo` (set up, then the main job) and `make test` (set up, then every check).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
# The torch build that installs from this kind of machine's disk (see README, "Installing").
ifeq ($(ARCH),aarch64)
TORCH ?= torch==2.9.1 torchvision==0.24.1
else
TORCH ?= torch==2.14.1 torchvision==0.29.1
endif
SHARED_CIFAR ?= ../shared/data/cifar10-jpeg.tar.gz

.PHONY: setup demo test test-data test-services lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test,dev,ray,postgres,tensorboard]'
	touch $@

setup: $(BIN)/.installed

# The demo may import the shared CIFAR-10 JPEG copy; the product itself never looks there.
demo: setup
	@if ! $(BIN)/mesa-tui data ls --json | $(BIN)/python -c "import json,sys; sys.exit(0 if any(d['name']=='cifar10' and d['status'] in ('imported','cached') for d in json.load(sys.stdin)['datasets']) else 1)"; then \
		if [ -f $(SHARED_CIFAR) ]; then $(BIN)/mesa-tui data import $(SHARED_CIFAR) --name cifar10; fi; \
	fi
	$(BIN)/mesa-tui engine start --detach --cpu-slots 1
	$(BIN)/mesa-tui submit pipeline --preset cpu-quick --trigger bw:170 --target 0 --methods mesa,finetune --follow; \
		status=$$?; $(BIN)/mesa-tui engine stop; exit $$status

# Debian's Fashion-MNIST feeds the MNIST-format loader tests (skipped where it cannot be installed).
test-data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || echo "note: dataset-fashion-mnist not installed"; \
	fi

# A PostgreSQL server for the store and engine suites (tests/postgres.py starts a private one on
# loopback per run): Debian's package where initdb is missing. Without it those tests skip.
test-services:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			echo "installing the PostgreSQL server (Debian package postgresql) for the store tests"; \
			(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 || \
			 (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1)) || \
			echo "note: postgresql not installed; the PostgreSQL tests will skip"; \
		else \
			echo "note: no PostgreSQL server binaries and no root apt-get; the PostgreSQL tests will skip"; \
		fi; \
	fi

# Style, then the import layers and the types (pyproject.toml: [tool.importlinter], [tool.mypy]).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

test: setup test-data test-services lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile

bench: setup
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/cpu_quick.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
