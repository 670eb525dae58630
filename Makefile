# Two entry points for a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH_INDEX ?=
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export CREMA_SHARED_DATA ?= $(abspath ../shared/data)

.PHONY: demo test test-fast lint bench install clean image image-name

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that the project's `torch>=` range installs nothing more. Where PyPI's torch is
	# a CUDA build (Linux x86_64), TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU one instead.
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/crema demo --workdir demo-output

# Lint and types first (configs in pyproject.toml: [tool.ruff], [tool.mypy]), then the suite.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q --durations=15 tests

# The developer's tier: no Ray cluster, no S3 server, no test marked slow (tests/conftest.py marks by fixture).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check crema tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.ingest
	$(BIN)/python -m benchmarks.pretrain
	$(BIN)/python -m benchmarks.probe

# The cluster image (infra/Dockerfile), tagged with the project version; push it to $(REGISTRY) for the cluster:
#   make image REGISTRY=123456789012.dkr.ecr.eu-west-1.amazonaws.com && docker push $$(make -s image-name REGISTRY=...)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
REGISTRY ?=
IMAGE ?= $(if $(REGISTRY),$(REGISTRY)/,)crema:$(VERSION)

image:
	@command -v docker >/dev/null 2>&1 || { echo "make image: docker is not installed here; build on a machine with Docker (BuildKit), see infra/README.md"; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make image: docker is installed but its daemon is not reachable (is dockerd running, may this user use it?)"; exit 1; }
	DOCKER_BUILDKIT=1 docker build -f infra/Dockerfile -t $(IMAGE) .
	@echo "built $(IMAGE)"

image-name:
	@echo $(IMAGE)

clean:
	rm -rf demo-output .pytest_cache
