# fedtune: every target sets up what it needs (idempotent; a second run reuses it all).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PY        := .venv/bin/python
DEPS_BIN  := .venv/deps/bin
CLUSTER   := $(PY) -m devcluster.cli
PYTEST_ARGS ?=
NODE      ?= process
# make demo MODEL=tiny|smollm2 (empty: the demo's default, see README.md); SITES=N: sites demo
MODEL     ?=

.PHONY: help install lock model binaries test test-unit lint fmt crds demo bench cluster-up cluster-down \
        cluster-status cluster-logs cluster-env images
CHART     := charts/fedtune-operator
HELM       = $$(tools/build-binaries.sh 2>/dev/null)/helm
# lint-imports run by the project's interpreter, the one that sees the fedtune packages (the
# console script sits in the dependency venv, which does not).
LINT_IMPORTS := $(PY) -c 'from importlinter.cli import lint_imports_command; lint_imports_command()'

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

install:  ## Python environment from uv.lock (cached outside the clone) and the devcluster binaries
	@tools/setup-python.sh
	@tools/build-binaries.sh >/dev/null

model: install  ## the pretrained SmolLM2-135M-Instruct as a Hugging Face directory (cached; prints it)
	@$(PY) -m devcluster.pretrained

lock:  ## re-resolve uv.lock (every Python dependency, hashed) and requirements/*.txt from it
	@tools/setup-python.sh --lock

binaries:  ## build kube-apiserver, kube-controller-manager, kubectl, etcd, helm, versitygw
	@tools/build-binaries.sh

# The slowest tests are printed at the end, so a CI log says where the time went.
test: install model  ## the whole suite: unit, integration (real S3, real training), e2e (devcluster)
	@set +e; OMP_NUM_THREADS=1 $(PY) -m pytest --durations=30 $(PYTEST_ARGS); rc=$$?; set -e; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: failing on purpose" >&2; exit 1; fi; \
	exit $$rc

test-unit: install  ## only the tests that need no devcluster
	@OMP_NUM_THREADS=1 $(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

lint: install  ## ruff check and format check, the import contracts (pyproject.toml), helm lint
	@$(DEPS_BIN)/ruff check .
	@$(DEPS_BIN)/ruff format --check .
	@$(LINT_IMPORTS) --no-cache
	@$(HELM) lint --strict $(CHART)

fmt: install  ## ruff format and autofix
	@$(DEPS_BIN)/ruff format .
	@$(DEPS_BIN)/ruff check --fix .

crds: install  ## regenerate the CRDs (and the chart's copies), docs/api.md and the chart's values schema
	@$(PY) -m fedtune_operator.crd > crds/fedtune.dev_federatedfinetunes.yaml
	@$(PY) -m fedtune_operator.crd --site > crds/fedtune.dev_federatedsites.yaml
	@cp crds/fedtune.dev_federatedfinetunes.yaml crds/fedtune.dev_federatedsites.yaml $(CHART)/crds/
	@$(PY) -m fedtune_operator.crd_docs > docs/api.md
	@$(PY) -m fedtune_operator.chart_schema > $(CHART)/values.schema.json

cluster-up: install  ## start the devcluster (NODE=real: kubelet+containerd); .devcluster/kubeconfig
	@$(CLUSTER) up --node $(NODE)

cluster-down:  ## stop the devcluster and every pod process
	@if [ -x $(PY) ]; then $(CLUSTER) down; fi

cluster-status:  ## one line per devcluster component
	@$(CLUSTER) status

cluster-logs:  ## the tail of every component and pod log
	@$(CLUSTER) logs

cluster-env:  ## shell exports for the devcluster: eval $$(make -s cluster-env)
	@$(CLUSTER) env

demo: install model  ## a whole federated fine-tune on the devcluster (MODEL=tiny|smollm2; SITES=N: N more clusters)
	@$(PY) -m devcluster.demo $(if $(MODEL),--model $(MODEL)) $(if $(SITES),--sites $(SITES))

bench: install model  ## benchmarks: tables on stdout, JSON in bench/results/
	@OMP_NUM_THREADS=2 $(PY) -m bench

images: install  ## build both images with podman (no Docker engine); push to a real-node registry
	@if registry=$$($(CLUSTER) registry 2>/dev/null); then tools/build-images.sh --push $$registry; \
	else tools/build-images.sh; fi
