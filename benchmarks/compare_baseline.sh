#!/usr/bin/env bash
# Before/after in one run on the GPU machine: the step benchmark (offload vs resident) and the offload benchmark
# of a baseline source tree and of this tree, back to back on the same device.
#   bash benchmarks/compare_baseline.sh BASELINE_DIR [LAYERS]
# BASELINE_DIR: an exported older commit (git archive <rev> | tar -x -C DIR). This tree must be installed
# (run_on_gpu.sh does it); the baseline runs from its source directory with its own JIT-built extension.
set -uo pipefail
base=$(cd "$1" && pwd); layers=${2:-16}
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT/baseline" "$OUT/current"
log="$OUT/compare.log"
run() { echo "=== $* ($(date +%T))" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; return "${PIPESTATUS[0]}"; }
# The baseline must not reach this tree's editable install (its finder would hand it this tree's hift_engine._C).
baseline_py=(python3 -c "import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; runpy.run_module('hift_engine.cli.main', run_name='__main__')")
step_args=(bench step --layers-small "$layers" --layers-full 0 --modes offload,resident --cycles 2)
for round in 1 2; do  # alternate, so that drift of the device does not favour one side
  (cd "$base" && ln -sfn ../kernels hift_engine/kernels && export PYTHONPATH=$base HIFT_BUILD_DIR=/tmp/hift-baseline-build HIFT_COMMIT=baseline \
    && run timeout 240 "${baseline_py[@]}" "${step_args[@]}" --out "$OUT/baseline")
  run timeout 240 python3 -m hift_engine.cli.main "${step_args[@]}" --out "$OUT/current"
done
(cd "$base" && export PYTHONPATH=$base HIFT_BUILD_DIR=/tmp/hift-baseline-build HIFT_COMMIT=baseline \
  && run timeout 120 "${baseline_py[@]}" bench offload --out "$OUT/baseline")
run timeout 120 python3 -m hift_engine.cli.main bench offload --out "$OUT/current"
