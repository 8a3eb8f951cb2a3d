#!/usr/bin/env bash
# How the committed results were produced on the GPU machine (the device tool's H100/H200, no network).
#   bash benchmarks/run_on_gpu.sh STAGE...   (several stages run in order, in one call)
#   check     install, environment, the native store's tests alone (a cuda-gdb backtrace if one crashes),
#             whole test suite, offload benchmark, the race test with one wait removed (must fail),
#             compute-sanitizer on the store tests
#   kernels   the kernel benchmark
#   kernels16 the AdamW kernel with bf16 moments (block-sized group; bf16-mixed and fp32 weights) vs a same-bytes copy
#   diagnose  offload vs resident step variants with profiler trace summaries (benchmarks/diagnose_offload.py)
#   offload   the offload (transfer bandwidth, pinned allocation) benchmark
#   memory    smoke runs, then the 7B memory benchmark
#   step      the step benchmark
#   verify    every CUDA test plus the precision/kernel/checkpointing tests on the GPU, then 2-layer smoke runs
#             of the mixed-precision, checkpointing and 13B benchmark paths and the mixed kernel row
#   mixed     precision comparisons at 7B: bf16-mixed vs pure bf16 vs fp32 at batch 4 x 512, tf32 vs fp32 at
#             batch 1 x 512 (offload and resident each), the mixed AdamW kernel at 7B size
#   long      activation checkpointing cost at 7B fp32 1 x 2048 under a 47.5 GiB cap; 13B bf16-mixed batches
#             in 47.5 GiB
#   ddp       (a 2-GPU kind) hift bench ddp at 7B fp32 batch 1 x 512 with 1 and then 2 processes
#   seqoffload the sequence probe again with activation_offload (recomputed blocks' inputs in host memory)
#   seqtiled  the sequence probe with every long-sequence option: always + activation_offload + checkpoint_active
#             + MLP chunks of 4096 tokens + LM head chunks of 2048: bf16-mixed in 23.5 GiB (target 16384)
#   seqtiled32 the same for tf32 in 47.5 GiB (16384, 24576, 32768)
#   seq16     bf16-mixed at 16384 tokens in 23.5 GiB with the seqtiled options, MLP/head chunks 4096/2048 and 2048/1024
#   firstcycle first cycle over later ones after a resident warm-up (bf16-mixed batch 4, fp32 batch 1), new and old
#             allocator settings; offloaded over resident for transfer pieces of 16/32/64 MiB and pace depth 2
#   pinprobe  where pinning host memory spends its time (benchmarks/pin_probe.cu), then the first cycle with the
#             allocator's own timings, default settings and 256 MiB registration pieces
#   firstcycle2 the first cycle on a warmed host: defaults, --prepin, 256 MiB pieces, bf16 moments; the seam copy
#   firstcycle3 the first cycle's pinning cost against transfer pacing, registration piece size, touch threads
#   firstcycle5 the default allocator's first cycle on a warmed machine (after one uncounted full run), twice
#   demoprecision benchmarks/demo_precision.py on the GPU: bf16-mixed vs fp32 on both demo tasks against a 1e-6 nudge
#   stallprobe what pinning on another thread (cudaHostRegister, cudaHostAlloc, a second context) does to CUDA
#             calls, queued kernels and copies (pin_probe.cu stall)
#   pinctx1   the pinning context: CUDA store/engine tests, then the first cycle of 7B bf16-mixed batch 4 with the
#             defaults (pinned from a second context) on a warmed machine after one uncounted run, twice
#   pinctx3   the pinning context on and off in turn (twice each), same warmed machine, serial allocator
#   stagetests the CUDA store/engine tests (every allocator shape)
#   stages    7B bf16-mixed batch 4 first cycles on a warmed machine (one uncounted run), in turn: the serial
#             allocator and two stages, both with 16 touch threads (REPS times, default 2; at 5609bbd also each
#             with HIFT_ALLOC_PREMAP=0, since removed: it changed nothing); fp32 batch 1, serial
#   touchthreads the two-stage allocator with 8 and 12 touch threads against the serial default (bf16-mixed batch 4)
#   touch6    two stages with 6 touch threads against the serial default, three rounds; fp32 batch 1 with it
#   affinity  CPU topology, then the 7B bf16-mixed batch 4 first cycle (offload only, 2 later cycles) with the
#             background allocator's threads on their own CPUs (HIFT_TOUCH_CPUS, another L3 where there is one)
#             and the training process on the rest (taskset), against the default placement, three rounds in turn
#             (at 58df2d7 this measured offload alone, without the resident run that warms kernels up first: its
#             first cycles carry compilation and are not comparable; affinity2 is the real comparison)
#   affinity2 the same after a resident run (the firstcycle stages' method): default placement, the allocator's
#             threads on the last 7 CPUs (HIFT_TOUCH_CPUS), and that plus the training process on the rest
#   paced     the CUDA store/engine tests, then the first cycle with the paced toucher (threads follow the lead over
#             the write-backs) against 6 fixed touch threads, three rounds in turn; fp32 batch 1 with the pacing
#   steptimes where the first cycle's extra time goes (per-step GPU/host timings, GPU-timed copies): defaults,
#             HIFT_PACE_POLL=spin, HIFT_ALLOC_SCHED=idle in turn twice, then --prepin; after the CUDA store tests
#             (at 596c1e4; the two settings changed nothing and were removed, so they are ignored now)
#   pinhold   the CUDA tests, then 7B bf16-mixed batch 4 first cycles with pinning held until the first update against
#             HIFT_PIN_FIRST=-1 (every buffer from construction), in turn; bf16-mixed and fp32 batch 1
#   firstprec the first cycle of 7B fp16-mixed batch 4 and tf32 batch 1 (warmed, one uncounted bf16-mixed run)
#   tf32b1    tf32 batch 1 first cycles: default, HIFT_PIN_FIRST=-1, --prepin (is firstprec's 1.080x the machine?)
#   waitprobe where the training thread waits in an offloaded tf32 batch-1 first cycle, by variant, sampled from /proc
#             (benchmarks/first_cycle_wait_probe.py; WAITPROBE_ARGS replaces its --rounds 2)
#   tf32b4    tf32 batch 4 first cycles twice (is tf32 batch 1's miss its host-bound step?), then tf32 batch 1 again
#   verifywait the CUDA store/engine tests, wait_host_memory's tests, then (VERIFY_BENCH=0: not) 7B tf32 batch 1 with
#             --prepin (which calls it)
#   firststep where the offloaded first step waits (benchmarks/first_step_probe.py: phase times, cudaMalloc counts, stacks)
#   nosync    the CUDA store/engine/bench tests, then (warmed, one uncounted run) the first cycle of 7B bf16-mixed
#             batch 4 three times with the kernel tables built at construction (no host sync in the first cycle)
#             and the pacer learning nothing from a job's first piece; bf16-mixed batch 1; fp32 batch 1
#   blocked   the no-sync CUDA tests, a traced bf16-mixed batch-1 resident cycle, then the batch-4 first cycle with
#             glibc's malloc kept from mmap/munmap against the defaults, in turn twice
#   gpuprobe  GPU kernels' time with work queued ahead while first touch, the store's allocator (touch + pin from
#             the pinning context) or device-to-host copies run beside them (benchmarks/gpu_interference_probe.py)
#   pinplan   the CUDA store/engine/auto-plan tests (the plans hold the pinning context first), then 7B bf16-mixed
#             batch 1 x 512 in 23.5 GiB (pynvml, the context included) under bench memory's cap
#   pinctx2   the same with pin_context=False (same machine, right after pinctx1), fp32 batch 1 with the defaults,
#             and 7B bf16-mixed batch 1 under the 23.5 GiB cap (pynvml, the pinning context included)
#   bf16state state_dtype="bf16": CUDA tests, 7B bf16-mixed batch 4 with fp32/bf16 moments, 13B bf16-mixed in 47.5 GiB
#   autocost  activation_checkpointing off vs auto at 7B fp32 1 x 2048 in 47.5 GiB
#   cudatests the CUDA tests of activation checkpointing, auto groups (tiled MLP included)
#   smoke     the new CUDA tests, then 2-layer runs of the groups and converge benchmarks (all methods)
#   groups    hift bench groups: layers_per_group="auto" at 7B, fp32 in 47.5/79 GiB, bf16-mixed in 23.5/47.5 GiB,
#             modelled vs measured peak, cycle time vs torchao's CPU-offloaded AdamW step
#   converge  hift bench converge at about 1B parameters under a 12 GiB cap (full AdamW does not fit there):
#             CPU-offloaded AdamW (torchao, if its wheel was installed), HiFT-1, HiFT-auto, BAdam-style, equal
#             wall-clock per method
#   seqprobe  the longest batch-1 sequence per checkpointing mode: 7B bf16-mixed in 23.5 GiB, 7B fp32 in 47.5
#             GiB (measured with TF32 matmuls: the same bytes, 3.7x faster)
# Output goes to $OUT (default ./gpu-out): one log per stage plus the benchmark JSON/PNG files.
set -uo pipefail
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
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

# A freshly started VM backs its memory on first touch, which slowed the first pinning runs: touch 96 GiB once first.
warm_host() { run $py -c "import torch, time; t = time.time(); x = torch.empty(96 << 30, dtype=torch.uint8); x.fill_(1); print(f'touched 96 GiB in {time.time() - t:.1f} s')"; }
step_7b="$py -m hift_engine.cli.main bench step --layers-small 0 --layers-full 32 --cycles-full 1 --modes resident,offload"
first_cycle_b4="$step_7b --batch 4 --precision bf16-mixed"
first_cycle_fp32_b1="$step_7b --batch 1 --precision fp32"
# the first-cycle stages' start: installed, host memory warmed, one uncounted bf16-mixed batch-4 run (a machine's
# first registration of its memory is slower); leaves $step set to that run's command
warmed_first_cycle() { ensure_installed; warm_host; step=$first_cycle_b4; run timeout 150 $step --out /tmp/warmup; }

first_cycle_offload_b4="$py -m hift_engine.cli.main bench step --layers-small 0 --layers-full 32 --cycles-full 2 --modes offload --batch 4 --precision bf16-mixed"
sysinfo() {
  run lscpu
  run sh -c 'grep -m1 "model name" /proc/cpuinfo; echo "L3 groups:"; cat /sys/devices/system/cpu/cpu*/cache/index3/shared_cpu_list | sort | uniq -c; echo "core siblings:"; cat /sys/devices/system/cpu/cpu*/topology/thread_siblings_list | sort | uniq -c; cat /sys/devices/system/node/node*/cpulist; grep -i huge /proc/meminfo'
}
# MAIN_CPUS for the training process, TOUCH_CPUS for the allocator: two L3 domains where the machine shows them
pick_cpu_sets() {
  local groups n
  groups=$(cat /sys/devices/system/cpu/cpu*/cache/index3/shared_cpu_list 2>/dev/null | sort -u)
  n=$(echo "$groups" | grep -c .)
  if [ "$n" -ge 2 ]; then MAIN_CPUS=$(echo "$groups" | head -1); TOUCH_CPUS=$(echo "$groups" | tail -1)
  else MAIN_CPUS=0-9; TOUCH_CPUS=10-15; fi
  echo "MAIN_CPUS=$MAIN_CPUS TOUCH_CPUS=$TOUCH_CPUS ($n L3 domains)" | tee -a "$log"
}
on_cpus() { local cpus=$1; shift; if command -v taskset >/dev/null; then taskset -c "$cpus" "$@"; else
  $py -c 'import os, sys; os.sched_setaffinity(0, {int(c) for part in sys.argv[1].split(",") for c in (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}); os.execvp(sys.argv[2], sys.argv[2:])' "$cpus" "$@"; fi; }
cpustat() { echo "cpustat $(grep '^cpu ' /proc/stat)" | tee -a "$log"; }

installed=0
# a warm machine keeps the previous call's install (and its native build); a fresh one installs
already_installed() { $py -c "import hift_engine, glob, os; assert glob.glob(os.path.join(os.path.dirname(hift_engine.__file__), '_C*.so'))" 2>/dev/null; }
ensure_installed() { [ $installed = 1 ] || { already_installed && echo "already installed" | tee -a "$log" || run install; installed=1; }; }
# torchao for the CPU-offloaded AdamW rows travels as a wheel in .whl/ (carry it); installed to /tmp/site
if ls .whl/torchao-*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
fi

for stage in "${@:-check}"; do
log="$OUT/$stage.log"
if [ "$stage" = check ]; then
  run nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
  ensure_installed
  run $py -m hift_engine.cli.main env
  if ! run timeout 60 $py -X faulthandler benchmarks/native_error_probe.py; then
    run gcc --version; run ldd hift_engine/_C*.so
    run timeout 150 cuda-gdb -batch -ex "set pagination off" -ex run -ex bt -ex "info sharedlibrary" --args $py benchmarks/native_error_probe.py
  fi
  run timeout 60 $py -X faulthandler -m pytest -q -p no:cacheprovider tests/store/test_native_store.py
  # the CPU-only tests run in CI; here: everything CUDA, and the native store (now a CUDA build) on CPU tensors too
  run timeout 330 $py -m pytest -q -p no:cacheprovider tests -m cuda -rs
  run timeout 120 $py -m pytest -q -p no:cacheprovider tests/store -m "not cuda"
  run timeout 120 $py -m hift_engine.cli.main bench offload --out "$OUT"
  for wait in wait_arrival mark_compute_done; do
    echo "--- race test with $wait removed: expected to FAIL" | tee -a "$log"
    HIFT_TEST_SABOTAGE=$wait run timeout 60 $py -m pytest -q -p no:cacheprovider tests/store/test_cuda_stores.py -k race
  done
  for tool in memcheck racecheck; do
    HIFT_TEST_SMALL=1 run timeout 150 compute-sanitizer --tool $tool --print-limit 20 $py -m pytest -q -p no:cacheprovider tests/store/test_cuda_stores.py
  done
elif [ "$stage" = kernels ]; then
  ensure_installed
  run timeout 90 $py -m hift_engine.cli.main bench kernels --shape all --out "$OUT"
elif [ "$stage" = kernels16 ]; then
  # the AdamW kernel with bf16 moments (stochastic rounding) against a same-bytes copy, beside fp32 moments
  ensure_installed
  hb="$py -m hift_engine.cli.main bench kernels --shape block --optimizers adamw"
  run timeout 120 $hb --dtype bf16-mixed --state-dtype fp32 --out "$OUT"
  run timeout 120 $hb --dtype bf16-mixed --state-dtype bf16 --out "$OUT"
  run timeout 120 $hb --dtype fp32 --state-dtype bf16 --out "$OUT"
elif [ "$stage" = diagnose ]; then
  ensure_installed
  run timeout 300 $py benchmarks/diagnose_offload.py --layers 8 --profile --out "$OUT" --trace-dir /tmp/traces
elif [ "$stage" = offload ]; then
  ensure_installed
  run timeout 120 $py -m hift_engine.cli.main bench offload --out "$OUT"
elif [ "$stage" = memory ]; then
  ensure_installed
  # smoke runs on a 2-layer model first: a bug costs seconds, not the 7B run
  run timeout 120 $py -m hift_engine.cli.main bench memory --layers 2 --batches 1 --extra-steps 1 --flat-cycles 1 --seq-probe 1024 --out /tmp/smoke \
    && run timeout 420 $py -m hift_engine.cli.main bench memory --out "$OUT"
elif [ "$stage" = step ]; then
  ensure_installed
  run timeout 120 $py -m hift_engine.cli.main bench step --layers-small 2 --layers-full 0 --cycles 1 --out /tmp/smoke \
    && run timeout 420 $py -m hift_engine.cli.main bench step --out "$OUT"
elif [ "$stage" = verify ]; then
  ensure_installed
  run timeout 330 $py -m pytest -q -p no:cacheprovider tests -m cuda -rs
  run timeout 240 $py -m pytest -q -p no:cacheprovider tests/test_precision.py tests/kernels tests/test_activation.py tests/test_head_loss.py
  hb="$py -m hift_engine.cli.main bench"
  run timeout 120 $hb step --layers-small 2 --layers-full 0 --cycles 1 --precision fp32,bf16-mixed,bf16-pure,tf32 \
    --activation-checkpointing off,auto,always --head-chunk-tokens 1024 --modes offload,resident --out /tmp/smoke
  run timeout 120 $hb memory --layers 2 --batches 1 --extra-steps 1 --flat-cycles 1 --seq-probe 1024,2048 --precision bf16-mixed \
    --activation-checkpointing off,auto,always --head-chunk-tokens 1024 --cap-gib 23.5 --out /tmp/smoke
  run timeout 90 $hb memory --shape 13b --layers 2 --batches 1,2 --extra-steps 1 --flat-cycles 0 --seq-probe "" --precision bf16-mixed --out /tmp/smoke
  run timeout 120 $hb kernels --shape block --dtype bf16-mixed --optimizers adamw,sgd,adagrad --out "$OUT"
elif [ "$stage" = mixed ]; then
  ensure_installed
  hb="$py -m hift_engine.cli.main bench"
  run timeout 150 $hb kernels --shape all --dtype bf16-mixed --optimizers adamw --out "$OUT"
  run timeout 400 $hb step --layers-small 0 --layers-full 32 --cycles-full 1 --batch 4 --precision bf16-mixed,bf16-pure,fp32 \
    --modes offload,resident --out "$OUT"
  run timeout 200 $hb step --layers-small 0 --layers-full 32 --cycles-full 1 --batch 1 --precision fp32,tf32,bf16-mixed \
    --modes offload,resident --out "$OUT"
elif [ "$stage" = long ]; then
  ensure_installed
  hb="$py -m hift_engine.cli.main bench"
  run timeout 300 $hb step --layers-small 0 --layers-full 32 --cycles-full 1 --batch 1 --seq 2048 --precision fp32 --cap-gib 47.5 \
    --modes offload --activation-checkpointing off,auto,always --head-chunk-tokens 4096 --out "$OUT"
  run timeout 200 $hb memory --shape 13b --precision bf16-mixed --cap-gib 47.5 --batches 1,2,4,8 --flat-cycles 1 --seq-probe "" --out "$OUT"
elif [ "$stage" = seqprobe ]; then
  ensure_installed
  hb="$py -m hift_engine.cli.main bench"
  run timeout 280 $hb memory --precision bf16-mixed --cap-gib 23.5 --batches 1 --extra-steps 0 --flat-cycles 2 \
    --seq-probe 4096,8192,16384,24576 --activation-checkpointing off,auto,always --full-cycle-modes always \
    --head-chunk-tokens 4096 --out "$OUT"
  run timeout 240 $hb memory --precision tf32 --cap-gib 47.5 --batches "" --flat-cycles 0 --seq-probe 2048,4096,8192,16384,24576 \
    --activation-checkpointing off,auto,always --full-cycle-modes "" --head-chunk-tokens 4096 --out "$OUT"
elif [ "$stage" = seqoffload ]; then
  ensure_installed
  hb="$py -m hift_engine.cli.main bench"
  run timeout 280 $hb memory --precision tf32 --cap-gib 47.5 --batches "" --flat-cycles 0 --seq-probe 8192,12288,16384,24576 \
    --activation-checkpointing always,auto --activation-offload --full-cycle-modes "" --head-chunk-tokens 4096 --out "$OUT"
  run timeout 280 $hb memory --precision bf16-mixed --cap-gib 23.5 --batches 1 --extra-steps 0 --flat-cycles 1 \
    --seq-probe 4096,8192,12288,16384 --activation-checkpointing always --activation-offload --full-cycle-modes always \
    --head-chunk-tokens 4096 --out "$OUT"
elif [ "$stage" = seqtiled ]; then
  ensure_installed
  hb="$py -m hift_engine.cli.main bench"
  tiled="--activation-checkpointing always --activation-offload --checkpoint-active --mlp-chunk-tokens 4096 --head-chunk-tokens 2048"
  run timeout 280 $hb memory --precision bf16-mixed --cap-gib 23.5 --batches "" --flat-cycles 0 \
    --seq-probe 12288,16384,24576 $tiled --full-cycle-modes "" --out "$OUT"
elif [ "$stage" = seqtiled32 ]; then
  ensure_installed
  hb="$py -m hift_engine.cli.main bench"
  tiled="--activation-checkpointing always --activation-offload --checkpoint-active --mlp-chunk-tokens 4096 --head-chunk-tokens 2048"
  run timeout 280 $hb memory --precision tf32 --cap-gib 47.5 --batches "" --flat-cycles 0 \
    --seq-probe 16384,24576,32768 $tiled --full-cycle-modes "" --out "$OUT"
elif [ "$stage" = ddp ]; then
  ensure_installed
  # these machines' host memory grows as it is used: MemAvailable at start is far below the 256 GiB limit
  export HIFT_HOST_MEMORY_CHECK=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  run nvidia-smi --query-gpu=name,memory.total --format=csv
  grep -E "MemTotal|MemAvailable" /proc/meminfo | tee -a "$log"
  for n in 1 2; do
    run timeout 150 $py -m torch.distributed.run --nproc-per-node $n -m hift_engine.cli.main bench ddp --out "$OUT"
  done
  run timeout 150 $py -m torch.distributed.run --nproc-per-node 2 -m hift_engine.cli.main bench ddp --shard-state --out "$OUT"
elif [ "$stage" = seq16 ]; then
  # bf16-mixed at 16384 tokens in 23.5 GiB: the seqtiled settings, then smaller head and MLP chunks
  ensure_installed
  hb="$py -m hift_engine.cli.main bench"
  for chunks in "4096 2048" "2048 1024"; do
    set -- $chunks
    run timeout 150 $hb memory --precision bf16-mixed --cap-gib 23.5 --batches "" --flat-cycles 0 --seq-probe 16384 \
      --activation-checkpointing always --activation-offload --checkpoint-active --mlp-chunk-tokens $1 \
      --head-chunk-tokens $2 --full-cycle-modes always --out "$OUT"
  done
elif [ "$stage" = firstcycle ]; then
  # first cycle over later cycles with the resident mode measured first (it compiles the kernels and warms
  # cuBLAS, so the offload rows' first cycles hold only what the store adds), bf16-mixed batch 4 x 512 and fp32
  # batch 1 x 512; then the allocator as it was (one registration per buffer, normal priority) in the same way;
  # and the transfer piece size and pace depth at bf16-mixed batch 4 (offloaded over resident)
  ensure_installed
  hb="$py -m hift_engine.cli.main bench"
  step="$hb step --layers-small 0 --layers-full 32 --cycles-full 1 --modes resident,offload"
  HIFT_REGISTER_PIECE_MIB=256 run timeout 150 $step --batch 4 --precision bf16-mixed --chunk-mib 16,32,64 --out "$OUT"
  HIFT_REGISTER_PIECE_MIB=0 HIFT_ALLOC_NICE=0 run timeout 120 $step --batch 4 --precision bf16-mixed --out "$OUT"
  run timeout 120 $step --batch 4 --precision bf16-mixed --out "$OUT"  # the defaults: whole registration, nice 19
  HIFT_PACE_DEPTH=2 run timeout 120 $step --batch 4 --precision bf16-mixed --chunk-mib 16,64 --out "$OUT"
  HIFT_REGISTER_PIECE_MIB=256 run timeout 150 $step --batch 1 --precision fp32 --out "$OUT"
  run timeout 150 $step --batch 1 --precision fp32 --out "$OUT"
elif [ "$stage" = pinprobe ]; then
  # where pinning time goes (benchmarks/pin_probe.cu: first touch, cudaHostRegister, in parallel, across a seam
  # between two registrations), then the first cycle with the allocator's timings (alloc_* columns), defaults
  # and 256 MiB registration pieces, bf16-mixed batch 4 and fp32 batch 1
  run nvcc -O2 -std=c++17 benchmarks/pin_probe.cu -lcuda -o /tmp/pin_probe && run timeout 200 /tmp/pin_probe 8
  ensure_installed
  run timeout 120 $py -m pytest -q -p no:cacheprovider tests/store -m cuda -rs
  step=$step_7b
  run timeout 150 $step --batch 4 --precision bf16-mixed --out "$OUT"
  HIFT_REGISTER_PIECE_MIB=256 run timeout 150 $step --batch 4 --precision bf16-mixed --out "$OUT"
  run timeout 150 $step --batch 1 --precision fp32 --out "$OUT"
elif [ "$stage" = firstcycle2 ]; then
  # the first cycle on a warm host: touch 96 GiB of host memory once first (a fresh VM backs its memory on first
  # touch at about 8 GiB/s, which the first run after boot would otherwise pay); then bf16-mixed batch 4 with the
  # defaults, with every buffer pinned before the first cycle (--prepin: what is left is not pinning), with
  # 256 MiB registration pieces, and with bf16 moments; and whether a copy across two registrations works
  warm_host
  run nvcc -O2 -std=c++17 benchmarks/pin_probe.cu -lcuda -o /tmp/pin_probe && run timeout 60 /tmp/pin_probe 1 seam
  ensure_installed
  step=$step_7b
  run timeout 150 $step --batch 4 --precision bf16-mixed --out "$OUT"
  run timeout 150 $step --batch 4 --precision bf16-mixed --prepin --out "$OUT"
  HIFT_REGISTER_PIECE_MIB=256 run timeout 150 $step --batch 4 --precision bf16-mixed --out "$OUT"
  run timeout 150 $step --batch 4 --precision bf16-mixed --state-dtype bf16 --out "$OUT"
elif [ "$stage" = firstcycle3 ]; then
  # what the first cycle's pinning cost depends on (bf16-mixed batch 4, warmed host): the defaults; unpaced
  # transfers (one copy per group: the training thread never waits for a pacer); registration pieces of
  # 16 and 64 MiB; 4 first-touch threads instead of 16
  warm_host
  ensure_installed
  step=$first_cycle_b4
  run timeout 150 $step --out "$OUT"
  run timeout 150 $step --chunk-mib 0 --out "$OUT"
  HIFT_REGISTER_PIECE_MIB=16 run timeout 150 $step --out "$OUT"
  HIFT_REGISTER_PIECE_MIB=64 run timeout 150 $step --out "$OUT"
  HIFT_TOUCH_THREADS=4 run timeout 150 $step --out "$OUT"
elif [ "$stage" = firstcycle5 ]; then
  # the default allocator on a warmed machine: 96 GiB touched, then one full bf16-mixed batch-4 run that is not
  # counted (the first registration of a fresh machine's memory is slower), then the defaults twice
  warm_host
  ensure_installed
  step=$first_cycle_b4
  run timeout 150 $step --out /tmp/warmup
  run timeout 150 $step --out "$OUT"
  run timeout 150 $step --out "$OUT"
elif [ "$stage" = demoprecision ]; then
  # the demo's bf16-mixed vs fp32 final loss against a 1e-6 nudge of the initial weights, on the GPU (4 at once)
  ensure_installed
  run timeout 240 $py benchmarks/demo_precision.py --task text --device cuda --workers 4 --out "$OUT"
  run timeout 300 $py benchmarks/demo_precision.py --task arithmetic --device cuda --workers 4 --out "$OUT"
elif [ "$stage" = pinctx1 ]; then
  ensure_installed
  run timeout 200 $py -m pytest -q -p no:cacheprovider tests/store tests/test_cuda_engine.py -m cuda -rs
  warm_host
  step=$first_cycle_b4
  run timeout 150 $step --out /tmp/warmup
  run timeout 150 $step --out "$OUT"
  run timeout 150 $step --out "$OUT"
elif [ "$stage" = pinctx2 ]; then
  ensure_installed
  step=$step_7b
  run timeout 150 $step --batch 4 --precision bf16-mixed --no-pin-context --out "$OUT"
  run timeout 280 $py -m hift_engine.cli.main bench memory --precision bf16-mixed --cap-gib 23.5 --batches 1 --extra-steps 0 \
    --flat-cycles 2 --seq-probe "" --head-chunk-tokens 4096 --out "$OUT"
  run timeout 150 $step --batch 1 --precision fp32 --out "$OUT"
elif [ "$stage" = stagetests ]; then
  ensure_installed
  run timeout 240 $py -m pytest -q -p no:cacheprovider tests/store tests/test_cuda_engine.py -m cuda -rs
  HIFT_ALLOC_STAGES=1 run timeout 120 $py -m pytest -q -p no:cacheprovider tests/store -m cuda -rs
elif [ "$stage" = stages ]; then
  warmed_first_cycle
  for i in $(seq "${REPS:-2}"); do  # (at 5609bbd each also ran with HIFT_ALLOC_PREMAP=0, a setting since removed)
    HIFT_ALLOC_STAGES=1 HIFT_TOUCH_THREADS=16 run timeout 150 $step --out "$OUT"
    HIFT_ALLOC_STAGES=2 HIFT_TOUCH_THREADS=16 run timeout 150 $step --out "$OUT"
  done
  HIFT_ALLOC_STAGES=1 HIFT_TOUCH_THREADS=16 run timeout 150 $first_cycle_fp32_b1 --out "$OUT"
elif [ "$stage" = touchthreads ]; then
  # is the two-stage allocator's cost to training the cores its 16 touch threads take? 8 and 12 touch threads
  # (enough to keep pace) against the serial default, in turn on one warmed machine after one uncounted run
  warmed_first_cycle
  for i in 1 2; do
    HIFT_ALLOC_STAGES=2 HIFT_TOUCH_THREADS=8 run timeout 150 $step --out "$OUT"
    HIFT_ALLOC_STAGES=1 HIFT_TOUCH_THREADS=16 run timeout 150 $step --out "$OUT"  # the serial default then
  done
  HIFT_ALLOC_STAGES=2 HIFT_TOUCH_THREADS=12 run timeout 150 $step --out "$OUT"
elif [ "$stage" = touch6 ]; then
  # two stages with 6 touch threads (the best single run of touchthreads) against the serial default, three rounds
  # in turn on one warmed machine after one uncounted run; then fp32 batch 1 with that setting
  warmed_first_cycle
  for i in 1 2 3; do
    HIFT_ALLOC_STAGES=2 HIFT_TOUCH_THREADS=6 run timeout 150 $step --out "$OUT"
    HIFT_ALLOC_STAGES=1 HIFT_TOUCH_THREADS=16 run timeout 150 $step --out "$OUT"  # the serial default then
  done
  HIFT_ALLOC_STAGES=2 HIFT_TOUCH_THREADS=6 run timeout 150 $first_cycle_fp32_b1 --out "$OUT"
elif [ "$stage" = affinity ]; then
  sysinfo
  warmed_first_cycle
  pick_cpu_sets
  off=$first_cycle_offload_b4
  for i in 1 2 3; do
    cpustat; run timeout 150 $off --out "$OUT"; cpustat
    cpustat; HIFT_TOUCH_CPUS=$TOUCH_CPUS run on_cpus "$MAIN_CPUS" timeout 150 $off --out "$OUT"; cpustat
  done
  HIFT_TOUCH_CPUS=$TOUCH_CPUS HIFT_TOUCH_THREADS=8 run on_cpus "$MAIN_CPUS" timeout 150 $off --out "$OUT"
  run on_cpus "$MAIN_CPUS" timeout 150 $off --out "$OUT"  # control: the allocator on the training process's CPUs
elif [ "$stage" = affinity2 ]; then
  warmed_first_cycle
  for i in 1 2 3; do
    run timeout 150 $step --out "$OUT"
    HIFT_TOUCH_CPUS=9-15 run timeout 150 $step --out "$OUT"
    [ $i = 3 ] || HIFT_TOUCH_CPUS=9-15 run on_cpus 0-8 timeout 150 $step --out "$OUT"
  done
elif [ "$stage" = paced ]; then
  ensure_installed
  run timeout 200 $py -m pytest -q -p no:cacheprovider tests/store tests/test_cuda_engine.py -m cuda -rs
  warmed_first_cycle
  for i in 1 2 3; do
    run timeout 150 $step --out "$OUT"
    HIFT_TOUCH_THREADS=6 run timeout 150 $step --out "$OUT"
  done
  run timeout 150 $first_cycle_fp32_b1 --out "$OUT"
elif [ "$stage" = steptimes ]; then
  # where the first cycle's extra time goes: per-step GPU/host timings and GPU-timed copies (now in every bench
  # step row), with the defaults, with the copy pacers polling without yielding (HIFT_PACE_POLL=spin), with the
  # allocator's threads under SCHED_IDLE (HIFT_ALLOC_SCHED=idle), and every buffer pinned first (--prepin), in turn
  ensure_installed
  run sh -c 'uname -r; cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag; nproc'
  run timeout 120 $py -m pytest -q -p no:cacheprovider tests/store/test_cuda_stores.py tests/test_bench.py -m cuda -rs
  warmed_first_cycle
  for i in 1 2; do
    run timeout 150 $step --out "$OUT"
    HIFT_PACE_POLL=spin run timeout 150 $step --out "$OUT"
    HIFT_ALLOC_SCHED=idle run timeout 150 $step --out "$OUT"
  done
  run timeout 150 $step --prepin --out "$OUT"
elif [ "$stage" = nosync ]; then
  ensure_installed
  run timeout 200 $py -m pytest -q -p no:cacheprovider tests/store tests/test_cuda_engine.py tests/test_bench.py -m cuda -rs
  warmed_first_cycle
  for i in 1 2 3; do run timeout 150 $step --out "$OUT"; done
  run timeout 150 $step_7b --batch 1 --precision bf16-mixed --out "$OUT"
  run timeout 200 $first_cycle_fp32_b1 --out "$OUT"
elif [ "$stage" = blocked ]; then
  # the no-sync tests; where bf16-mixed batch 1's host blocks (a traced cycle, resident); the first cycle of 7B
  # bf16-mixed batch 4 with glibc malloc kept from mmap/munmap (do the training thread's address-space changes wait
  # behind the allocator's pinning?) against the defaults, in turn
  ensure_installed
  run timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_cuda_engine.py tests/store/test_cuda_stores.py -m cuda -k "sync or copy_behind or race" -rs
  run timeout 150 $step_7b --batch 1 --precision bf16-mixed --modes resident --profile --out "$OUT"
  warmed_first_cycle
  for i in 1 2; do
    run timeout 150 $step --out "$OUT"
    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824 run timeout 150 $step --out "$OUT"
  done
elif [ "$stage" = waitprobe ]; then
  # the training thread's kernel-side waits in first and later cycles, variants in turn (first_cycle_wait_probe.py)
  ensure_installed
  warm_host
  run timeout 420 $py benchmarks/first_cycle_wait_probe.py ${WAITPROBE_ARGS:---rounds 2} --out "$OUT"
elif [ "$stage" = firststep ]; then
  # where the offloaded first step waits: its phases' host times and cudaMalloc counts, a stack sample, variants
  # (benchmarks/first_step_probe.py)
  ensure_installed
  warm_host
  run timeout 300 $py benchmarks/first_step_probe.py --out "$OUT"
elif [ "$stage" = pinhold ]; then
  # pinning held after the first buffer until the first update (HIFT_PIN_FIRST=1, the default) against pinning every
  # buffer from construction (-1, the earlier behaviour), in turn, after the CUDA store/engine/bench tests
  ensure_installed
  run timeout 200 $py -m pytest -q -p no:cacheprovider tests/store tests/test_cuda_engine.py tests/test_bench.py -m cuda -rs
  warmed_first_cycle
  for i in 1 2; do
    run timeout 150 $step --out "$OUT"
    HIFT_PIN_FIRST=-1 run timeout 150 $step --out "$OUT"
  done
  run timeout 150 $step --out "$OUT"
  run timeout 150 $step_7b --batch 1 --precision bf16-mixed --out "$OUT"
  run timeout 200 $first_cycle_fp32_b1 --out "$OUT"
elif [ "$stage" = firstprec ]; then
  # the first cycle in the precisions pinhold did not run: fp16-mixed at batch 4, tf32 at batch 1 (warmed machine)
  warmed_first_cycle
  run timeout 150 $step_7b --batch 4 --precision fp16-mixed --out "$OUT"
  run timeout 200 $step_7b --batch 1 --precision tf32 --out "$OUT"
elif [ "$stage" = tf32b1 ]; then
  # tf32 batch 1's first cycle (1.080x in firstprec-6f0aeb3's one run, on an erratic machine): the default, every
  # buffer pinned from construction (HIFT_PIN_FIRST=-1) and every buffer pinned before the cycle (--prepin), in turn
  warmed_first_cycle
  tf32_b1="$step_7b --batch 1 --precision tf32"
  for i in 1 2; do
    run timeout 200 $tf32_b1 --out "$OUT"
    HIFT_PIN_FIRST=-1 run timeout 200 $tf32_b1 --out "$OUT"
  done
  run timeout 200 $tf32_b1 --prepin --out "$OUT"
elif [ "$stage" = tf32b4 ]; then
  # at batch 4 the step is GPU-bound: does the allocator's page zeroing beside it still cost the first cycle?
  warmed_first_cycle
  for i in 1 2; do run timeout 200 $step_7b --batch 4 --precision tf32 --out "$OUT"; done
  run timeout 200 $step_7b --batch 1 --precision tf32 --out "$OUT"
elif [ "$stage" = verifywait ]; then
  ensure_installed
  run timeout 150 $py -m pytest -q -p no:cacheprovider tests/store tests/test_cuda_engine.py -m cuda -rs
  run timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_optimizer.py tests/store/test_offload_policy.py -k "wait_host_memory or wait_allocated" -rs
  [ "${VERIFY_BENCH:-1}" = 1 ] && run timeout 200 $step_7b --batch 1 --precision tf32 --prepin --out "$OUT"
elif [ "$stage" = gpuprobe ]; then
  # does the allocator's work beside training slow the GPU's own kernels? (benchmarks/gpu_interference_probe.py)
  ensure_installed
  warm_host
  run timeout 300 $py benchmarks/gpu_interference_probe.py --kinds none,touch,store,d2h,store,none --gib 40 --iters 700 --out "$OUT"
elif [ "$stage" = pinplan ]; then
  ensure_installed
  run timeout 200 $py -m pytest -q -p no:cacheprovider tests/store tests/test_cuda_engine.py tests/test_auto_groups.py -m cuda -rs
  run timeout 280 $py -m hift_engine.cli.main bench memory --precision bf16-mixed --cap-gib 23.5 --batches 1 --extra-steps 0 \
    --flat-cycles 2 --seq-probe "" --head-chunk-tokens 4096 --out "$OUT"
elif [ "$stage" = pinctx3 ]; then
  # the same machine, warmed, one uncounted run, then the pinning context on and off in turn, twice each
  warmed_first_cycle
  for i in 1 2; do
    run timeout 150 $step --out "$OUT"
    run timeout 150 $step --no-pin-context --out "$OUT"
  done
elif [ "$stage" = stallprobe ]; then
  # is the first cycle's pinning cost the driver holding other threads' calls, the GPU slowing, or the copies?
  run nvcc -O2 -std=c++17 benchmarks/pin_probe.cu -lcuda -o /tmp/pin_probe && run timeout 200 /tmp/pin_probe 16 stall
elif [ "$stage" = bf16state ]; then
  # state_dtype="bf16" (AdamW moments in bf16): its CUDA tests, a 2-layer smoke, 7B bf16-mixed batch 4 with
  # fp32 and bf16 moments (offloaded and resident, same run), and 13B bf16-mixed in 47.5 GiB with bf16 moments
  ensure_installed
  hb="$py -m hift_engine.cli.main bench"
  run timeout 200 $py -m pytest -q -p no:cacheprovider tests/test_state_dtype.py tests/kernels/test_adamw_bf16_moments.py \
    tests/test_auto_groups.py -m cuda -rs
  run timeout 100 $hb step --layers-small 2 --layers-full 0 --cycles 1 --precision bf16-mixed --modes resident,offload \
    --state-dtype fp32,bf16 --out /tmp/smoke \
  && run timeout 200 $hb step --layers-small 0 --layers-full 32 --cycles-full 1 --batch 4 --precision bf16-mixed \
    --modes resident,offload --state-dtype fp32,bf16 --out "$OUT"
  run timeout 280 $hb memory --shape 13b --precision bf16-mixed --state-dtype bf16 --cap-gib 47.5 --batches 1,2,4 \
    --extra-steps 2 --flat-cycles 1 --seq-probe "" --out "$OUT"
elif [ "$stage" = autocost ]; then
  # activation_checkpointing="auto" at 7B fp32 1 x 2048 in 47.5 GiB: nothing needs recomputing there, so it
  # should cost (almost) nothing against "off" (same run)
  ensure_installed
  run timeout 300 $py -m hift_engine.cli.main bench step --layers-small 0 --layers-full 32 --cycles-full 1 --batch 1 \
    --seq 2048 --precision fp32 --cap-gib 47.5 --modes offload --activation-checkpointing off,auto --head-chunk-tokens 4096 \
    --out "$OUT"
elif [ "$stage" = cudatests ]; then
  ensure_installed
  run timeout 200 $py -m pytest -q -p no:cacheprovider tests/test_activation.py tests/test_auto_groups.py \
    tests/store/test_cuda_stores.py -m cuda -rs
elif [ "$stage" = smoke ]; then
  # seconds-long runs of the paths the long stages take, so a bug costs seconds (new CUDA tests first)
  ensure_installed
  run timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_activation.py tests/test_auto_groups.py -m cuda -rs
  hb="$py -m hift_engine.cli.main bench"
  run timeout 120 $hb groups --layers 2 --cases fp32@20,bf16-mixed@12 --offload-baseline --baseline-steps 1 --out /tmp/smoke
  run timeout 120 $hb converge --hidden 256 --layers 2 --seq 128 --batch 2 --pretrain-steps 5 --updates 2 --eval-points 2 \
    --eval-batches 2 --methods full,full-cpu-offload,hift-1,hift-auto,badam --cap-gib 4 --out /tmp/smoke
elif [ "$stage" = groups ]; then
  ensure_installed
  run timeout 420 $py -m hift_engine.cli.main bench groups --cases fp32@47.5,fp32@79,bf16-mixed@23.5,bf16-mixed@47.5 \
    --offload-baseline --out "$OUT"
elif [ "$stage" = converge ]; then
  ensure_installed
  # batch 2 x 512: at 8 x 512 this 0.9 B fp32 model's activations alone (about 11 GiB) would fill the 12 GiB card
  run timeout 560 $py -m hift_engine.cli.main bench converge --hidden 2048 --layers 18 --seq 512 --batch 2 --pretrain-steps 300 \
    --lr 2e-4 --methods full,hift-auto,hift-1,badam,full-cpu-offload --updates 400 --seconds 60 --eval-batches 16 \
    --cap-gib 12 --out "$OUT"
else
  echo "unknown stage: $stage (check, kernels16, smoke, groups, kernels, diagnose, offload, memory, step, verify, mixed, long, seqprobe, seqoffload, seqtiled, seqtiled32, seq16, firstcycle, bf16state, autocost, cudatests, ddp, converge)"; exit 2
fi
done
