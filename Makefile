# The two commands of the README: `make serve` and `make test`. Everything sets itself up in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL_REPOSITORY ?= models
DEFAULT_MODEL ?= deepvit_S
EXTRAS ?= train,dev

.PHONY: help serve test lint pytest dev default-model bench clean

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

pytest: dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint pytest

bench: default-model
	$(BIN)/deepvit bench --model-repository $(MODEL_REPOSITORY)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
