#!/usr/bin/env bash
# How the committed results were produced on the GPU machine (the device tool's H100/H200, no network).
#   bash benchmarks/run_on_gpu.sh check   install, environment, whole test suite, kernels + offload benchmarks,
#                                         the race test with one wait removed (must fail), compute-sanitizer
#   bash benchmarks/run_on_gpu.sh memory  smoke runs, then the 7B memory benchmark
#   bash benchmarks/run_on_gpu.sh step    the step benchmark, then the whole test suite
# Output goes to $OUT (default ./gpu-out): one log per stage plus the benchmark JSON/PNG files.
set -uo pipefail
stage=${1:-check}
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
log="$OUT/$stage.log"
run() { echo "=== $* ($(date +%T))" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; local rc=${PIPESTATUS[0]}; echo "=== rc=$rc" | tee -a "$log"; return $rc; }
py=python3

install() {
  if HIFT_BUILD_NATIVE=1 $py -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$log" 2>&1; then
    echo "installed with the ahead-of-time native build" | tee -a "$log"
  else
    echo "AOT install failed (see log); installing without it (JIT build on first use)" | tee -a "$log"
    HIFT_BUILD_NATIVE=0 $py -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$log" 2>&1 || {
      echo "pip install failed; using the source tree directly" | tee -a "$log"
      ln -sfn ../kernels hift_engine/kernels
      export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    }
  fi
}

if [ "$stage" = check ]; then
  run nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
  run install
  run $py -m hift_engine.cli.main env
  run timeout 240 $py -m pytest -q -x -p no:cacheprovider tests
  run timeout 90 $py -m hift_engine.cli.main bench kernels --shape all --out "$OUT"
  run timeout 120 $py -m hift_engine.cli.main bench offload --out "$OUT"
  for wait in wait_arrival mark_compute_done; do
    echo "--- race test with $wait removed: expected to FAIL" | tee -a "$log"
    HIFT_TEST_SABOTAGE=$wait run timeout 60 $py -m pytest -q -p no:cacheprovider tests/store/test_cuda_stores.py -k race
  done
  for tool in memcheck racecheck; do
    HIFT_TEST_SMALL=1 run timeout 150 compute-sanitizer --tool $tool --print-limit 20 $py -m pytest -q -p no:cacheprovider tests/store/test_cuda_stores.py
  done
elif [ "$stage" = memory ]; then
  run install
  # smoke runs on a 2-layer model first: a bug costs seconds, not the 7B run
  run timeout 120 $py -m hift_engine.cli.main bench memory --layers 2 --batches 1 --extra-steps 1 --flat-cycles 1 --seq-probe 1024 --out /tmp/smoke \
    && run timeout 120 $py -m hift_engine.cli.main bench step --layers-small 2 --layers-full 0 --cycles 1 --out /tmp/smoke \
    && run timeout 420 $py -m hift_engine.cli.main bench memory --out "$OUT"
elif [ "$stage" = step ]; then
  [ -d hift_engine.egg-info ] || run install
  run timeout 300 $py -m hift_engine.cli.main bench step --out "$OUT"
  run timeout 240 $py -m pytest -q -p no:cacheprovider tests
fi
