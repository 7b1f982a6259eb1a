#!/usr/bin/env bash
# Runs on the GPU machine, in a copy of this checkout (bench/gpu/README.md says
# how to call it): takes the payload pieces in, unpacks them, and runs the GPU
# checks and the benchmark in the background, logging to /tmp/run.
#
#     bench/gpu/device.sh piece N      # move payload piece N (.cN) to /tmp/chunks
#     bench/gpu/device.sh unpack       # check and unpack the pieces into /tmp/site
#     bench/gpu/device.sh start [STEP..] # run `all` (or these of its steps:
#                                      # machine smoke bench tests) in the background
#     bench/gpu/device.sh wait SECONDS # wait for it (or SECONDS), then copy what it wrote to $OUT
#     bench/gpu/device.sh all          # the run itself: smoke, long prefill, benchmark, tests
#     bench/gpu/device.sh smoke        # only the smoke and long prefill, in the foreground
#                                      # (SMOKE_FLAGS: engine flags, e.g. --enforce-eager)
#     bench/gpu/device.sh tests FILE.. # only those tests, in the foreground
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
RUN=/tmp/run
SITE=/tmp/site
MODEL=/tmp/models/llama-1b
export PYTHONPATH=$SITE:$REPO:$REPO/clients/python PYTHONUNBUFFERED=1
# flashinfer is not carried: vLLM's own top-k/top-p sampler.
export VLLM_USE_FLASHINFER_SAMPLER=0
PY=python3
# The benchmark runs one system at a time (bench.compare --apart), each with
# the GPU to itself at vLLM's defaults; BENCH_FLAGS adds engine flags.
BENCH_FLAGS=${BENCH_FLAGS:-}
# The test suite starts several tiny-model clusters at once on the GPU.
TEST_FLAGS="--enforce-eager --gpu-memory-utilization 0.04 --kv-cache-memory-bytes 2G"
TESTS="tests/test_generate.py tests/test_health_reflection.py tests/test_cancellation.py
  tests/test_failover.py"
# grpcurl is not carried (the reflection tests that use it run in CI).
DESELECT="--deselect tests/test_health_reflection.py::test_reflection_lists_and_describes_services
  --deselect tests/test_health_reflection.py::test_grpcurl_generate_and_health_without_protos"

step() { echo "== $(date -u +%H:%M:%S) $*"; }

smoke() {
  # What `make run` runs once set up, on the 1 B model: 2 ranks, the platform's
  # defaults (CUDA: the two share the GPU's memory), then the terminal client.
  local listen=127.0.0.1:50051 cli=("$PY" -m dprouter.cli)
  "$PY" -m tools.local_cluster --model "$MODEL" --ranks 2 --max-model-len 16384 \
    --listen "$listen" --engine-flags="${SMOKE_FLAGS:-}" > "$RUN/smoke-cluster.log" 2>&1 &
  local cluster=$!
  # Until every rank serves: the second starts once the first does.
  for _ in $(seq 600); do
    grep -q "dprouter is SERVING" "$RUN/smoke-cluster.log" && break
    kill -0 "$cluster" 2> /dev/null || { tail "$RUN/smoke-cluster.log"; return 1; }
    sleep 1
  done
  "${cli[@]}" health --address "$listen"
  "${cli[@]}" generate "The sea" --max-tokens 24 --ignore-eos --address "$listen"
  "${cli[@]}" ranks --address "$listen"
  step "long prefill"
  "$PY" -m bench.gpu.long_prefill "$listen" --context 16384 --vocab-size 1000 --ranks 2
  kill -INT "$cluster"
  local code=0
  wait "$cluster" || code=$?
  echo "local_cluster exited $code after Ctrl-C"
}

machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  "$PY" -c 'import sys, torch, vllm, transformers, grpc
print("python", sys.version.split()[0], "torch", torch.__version__, "vllm", vllm.__version__,
      "transformers", transformers.__version__, "grpcio", grpc.__version__)'
  git -C "$REPO" log -1 --format='commit %h %s' 2>/dev/null || true
}

bench() {
  # Servers on cores 0-11, a load process per system on each of 12-15.
  taskset -c 0-11 "$PY" -m bench.compare --models "$MODEL" --apart \
    --systems dprouter "dprouter (token ids)" vllm-http vllm-grpc inprocess \
    --concurrency 1 16 64 256 1024 --rounds 2 --requests-per-stream 2 --min-requests 16 \
    --load-cores 12 13 14 15 --engine-flags="$BENCH_FLAGS" \
    --tag h200 --logs "$RUN/bench-logs" --out "$RUN/results" > "$RUN/bench.log" 2>&1 \
    || echo "benchmark failed: see bench.log"
}

tests() {
  DPROUTER_TEST_ENGINE_FLAGS="$TEST_FLAGS" DPROUTER_TEST_LOGS="$RUN/test-logs" \
    timeout 540 "$PY" -m pytest -p no:cacheprovider -q $TESTS $DESELECT > "$RUN/tests.log" 2>&1 \
    || echo "tests failed (exit $?): see tests.log"
  tail -3 "$RUN/tests.log"
}

all() {
  # The steps named, or every one.
  local steps=("${@:-machine smoke bench tests}")
  mkdir -p "$RUN"
  step "models"
  "$PY" -m tools.build_model tiny "$REPO/models/tiny-llama"
  "$PY" -m tools.build_model llama-1b "$MODEL"
  for name in ${steps[*]}; do
    step "$name"
    case "$name" in
      smoke)
        smoke > "$RUN/smoke.log" 2>&1 || echo "smoke failed: see smoke.log"
        grep -h "KV cache size" "$RUN/smoke-cluster.log" || true
        ;;
      machine | bench | tests) "$name" ;;
      *) echo "no step $name" ;;
    esac
  done
  step "done"
}

case "${1:-}" in
  piece)
    mkdir -p /tmp/chunks
    mv ".c$2"/site.* /tmp/chunks/
    if [ -d ".c$2/ipr" ]; then rm -rf /tmp/ipr && mv ".c$2/ipr" /tmp/ipr; fi
    ls -la /tmp/chunks
    ;;
  unpack)
    (cd /tmp/chunks && sha256sum -c site.sha256)
    mkdir -p "$SITE"
    cat /tmp/chunks/site.tar.xz.* | xz -d -T0 | tar -x -C "$SITE"
    du -sh "$SITE"
    if ! command -v ip > /dev/null; then
      # The loader's own library path is not inherited by what `ip netns exec` runs.
      printf '#!/bin/sh\nexec /lib64/ld-linux-x86-64.so.2 --library-path /tmp/ipr/lib /tmp/ipr/bin/ip "$@"\n' \
        > /usr/local/bin/ip
      chmod +x /usr/local/bin/ip
    fi
    ip -V
    ;;
  start)
    mkdir -p "$RUN"
    shift
    setsid nohup bash "$0" all "$@" > "$RUN/all.log" 2>&1 < /dev/null &
    ;;
  wait)
    end=$((SECONDS + $2))
    while ! grep -q "== .* done" "$RUN/all.log" 2>/dev/null && ((SECONDS < end)); do sleep 5; done
    cat "$RUN/all.log"
    cp "$RUN"/results/*.md "$OUT/" 2>/dev/null || true
    tar -czf "$OUT/run.tgz" -C "$RUN" --exclude='*.png' . 2>/dev/null || true
    ;;
  all) shift; all "$@" ;;
  smoke)
    "$PY" -m tools.build_model llama-1b "$MODEL" > /dev/null 2>&1
    mkdir -p "$RUN" && smoke
    grep -h "KV cache size" "$RUN/smoke-cluster.log"
    ;;
  tests)
    shift
    "$PY" -m tools.build_model tiny "$REPO/models/tiny-llama" > /dev/null 2>&1
    DPROUTER_TEST_ENGINE_FLAGS="$TEST_FLAGS" DPROUTER_TEST_LOGS="$RUN/test-logs" \
      "$PY" -m pytest -p no:cacheprovider -q "$@"
    ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
