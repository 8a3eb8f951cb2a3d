"""What layers_per_group="auto" picks on capped cards, its memory model against measured peaks, and the time to
update every parameter once against CPU-offloaded full AdamW (torchao), in one run.

Per case (--cases, precision@cap_gib): a LLaMA-2-shaped model with random weights is built on the GPU, the
process is capped as on a smaller card (the CUDA context counted, as pynvml does), one step's activations are
measured (measure_activation_gib), and HiFTOptimizer(layers_per_group="auto") plans its groups under the cap.
After one warm-up cycle, --cycles full cycles are measured step by step: the peak allocated memory (against the
plan's modelled peak without its safety margin: the 5% check of issue 16), pynvml's device memory, the step
time and the cycle time (k steps: every parameter updated once).

--offload-baseline then runs torchao's CPUOffloadOptimizer around fused CPU AdamW (offload_gradients=True: the
GPU never holds all gradients) at the same width and cap, with as many layers as the host's available memory
holds (16 bytes per parameter in host memory: pinned weights and gradients, two fp32 moments), and reports its
step time: the time it takes to update every parameter once.
"""

from __future__ import annotations

import gc
import time

import torch

from ..precision import compute_dtype
from ..store import available_host_bytes
from .common import gib, print_table, require_cuda, write_result
from .model_factory import SHAPES, build_llama, random_batch

HOST_BYTES_PER_PARAM = 16  # torchao CPU offload of AdamW: pinned fp32 weights + pinned fp32 grads + 2 fp32 moments
HOST_HEADROOM = 8 * 2**30  # the process, the loader and the page cache


def add_arguments(p) -> None:
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's own)")
    p.add_argument("--cases", default="fp32@47.5,fp32@79,bf16-mixed@23.5,bf16-mixed@47.5",
                   help="comma-separated precision@cap_gib (pynvml view of the whole process)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--cycles", type=int, default=1, help="measured cycles per case, after one warm-up cycle")
    p.add_argument("--offload-baseline", action="store_true",
                   help="also time torchao's CPUOffloadOptimizer (AdamW) in fp32 under the first fp32 case's cap")
    p.add_argument("--baseline-steps", type=int, default=3, help="timed steps of the baseline, after one warm-up step")


def parse_cases(text: str) -> list[tuple[str, float]]:
    cases = []
    for item in (c.strip() for c in text.split(",") if c.strip()):
        precision, sep, cap = item.partition("@")
        try:
            if not sep or precision not in ("fp32", "tf32", "bf16-mixed", "fp16-mixed") or float(cap) <= 0:
                raise ValueError
            cases.append((precision, float(cap)))
        except ValueError:
            raise SystemExit(f"hift bench groups: --cases item {item!r}: use precision@cap_gib, e.g. fp32@47.5 "
                             "(precision one of fp32, tf32, bf16-mixed, fp16-mixed)") from None
    if not cases:
        raise SystemExit("hift bench groups: --cases is empty; give at least one precision@cap_gib")
    return cases


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _timed_step(fn, dev) -> tuple[float, int]:
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated(dev)


def run_case(args, precision: str, cap_gib: float, nvml, dev) -> dict:
    from ..auto_groups import measure_activation_gib
    from ..optimizer import HiFTOptimizer
    from .memory import _set_cap

    _release()
    cap = _set_cap(cap_gib, nvml, dev, pin_context=True)  # HiFT's native store pins from it
    layers = args.layers or SHAPES[args.shape][3]
    model = build_llama(layers, dev, dtype=compute_dtype(precision), shape=args.shape)
    n_params = sum(p.numel() for p in model.parameters())
    data = random_batch(args.batch, args.seq, dev)
    out = {"precision": precision, "cap_gib": cap_gib, "params": n_params, "layers": layers}
    opt = None
    try:
        act = measure_activation_gib(model, data)
        opt = HiFTOptimizer(model, "adamw", lr=1e-5, weight_decay=0.0, layers_per_group="auto", activation_gib=act,
                            precision=precision, max_grad_norm=1.0)
        plan, k = opt.group_plan, opt.num_groups
        print(opt.describe(), flush=True)

        def step():
            loss = model(**data).loss
            opt.scale_loss(loss).backward()
            opt.step()
            opt.zero_grad()

        first = [_timed_step(step, dev)[0] for _ in range(k)]
        steps = []
        for _ in range(args.cycles * k):
            group = opt.active_group
            s, peak = _timed_step(step, dev)
            steps.append({"group": group, "s": s, "peak": peak, "nvml": nvml.used()})
        worst = max(steps, key=lambda r: r["peak"])
        modelled = plan.peak_bytes - plan.parts["margin"]
        cycle_s = sum(r["s"] for r in steps) / args.cycles
        out.update({
            "k": k, "plan": plan.sizes, "activation_gib": act, "budget_gib": gib(plan.budget_bytes),
            "modelled_peak_gib": gib(modelled), "modelled_peak_with_margin_gib": gib(plan.peak_bytes),
            "measured_peak_gib": gib(worst["peak"]), "peak_group": worst["group"],
            "measured_over_modelled": worst["peak"] / modelled,
            "nvml_max_gib": gib(max((r["nvml"] or 0) for r in steps)), "mean_step_s": cycle_s / k,
            "cycle_s": cycle_s, "first_cycle_s": sum(first), "host_state_gib": gib(opt.store.stats.host_bytes) if opt.store else 0.0,
            "per_group": [{"group": r["group"], "s": r["s"], "peak_gib": gib(r["peak"])} for r in steps[:k]],
            "cap": cap,
        })
    except (torch.OutOfMemoryError, RuntimeError) as e:
        out["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        if opt is not None:
            opt.close()
        del model, opt
        _release()
    print(f"case {precision}@{cap_gib}: { {k: v for k, v in out.items() if k not in ('per_group', 'cap')} }", flush=True)
    return out


def offload_baseline(args, cap_gib: float, nvml, dev) -> dict:
    """torchao's CPUOffloadOptimizer (fused CPU AdamW) in fp32: its step time updates every parameter."""
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError as e:
        return {"method": "torchao-cpu-offload", "note": f"torchao not installed (pip install 'hift_engine[bench]'): {e}"}
    from .memory import _set_cap

    _release()
    full_layers = args.layers or SHAPES[args.shape][3]
    hidden, inter, _, _ = SHAPES[args.shape]
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    ends = 2 * 32000 * hidden + hidden
    available = available_host_bytes()
    if available is None:
        raise RuntimeError("MemAvailable not in /proc/meminfo")
    room = available - HOST_HEADROOM
    layers = min(full_layers, max(0, (room // HOST_BYTES_PER_PARAM - ends) // per_layer))
    out = {"method": "torchao-cpu-offload", "cap_gib": cap_gib, "layers": layers, "full_layers": full_layers,
           "host_available_gib": gib(room + HOST_HEADROOM)}
    if layers < 1:
        out["note"] = "not even one layer's CPU-offloaded AdamW fits the host's available memory"
        return out
    cap = _set_cap(cap_gib, nvml, dev)
    model = build_llama(layers, dev, shape=args.shape)
    n_params = sum(p.numel() for p in model.parameters())
    data = random_batch(args.batch, args.seq, dev)
    opt = None
    try:
        t0 = time.perf_counter()
        opt = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, offload_gradients=True, lr=1e-5, weight_decay=0.0)
        setup_s = time.perf_counter() - t0

        def step():
            model(**data).loss.backward()
            opt.step()
            opt.zero_grad()

        warm = _timed_step(step, dev)[0]
        timed = [_timed_step(step, dev) for _ in range(args.baseline_steps)]
        s = sum(t for t, _ in timed) / len(timed)
        out.update({"params": n_params, "setup_s": setup_s, "first_step_s": warm, "step_s": s,
                    "peak_allocated_gib": gib(max(p for _, p in timed)), "nvml_gib": gib(nvml.used() or 0), "cap": cap,
                    # only when the host could not hold every layer: the per-parameter cost scaled to the full model
                    "step_s_scaled_to_full": s * (ends + full_layers * per_layer) / n_params})
    except (torch.OutOfMemoryError, RuntimeError) as e:
        out["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        del model, opt
        _release()
    print(f"baseline: { {k: v for k, v in out.items() if k != 'cap'} }", flush=True)
    return out


def run(args) -> int:
    from .memory import _Nvml

    cases = parse_cases(args.cases)
    if args.cycles < 1 or args.baseline_steps < 1:
        raise SystemExit("hift bench groups: --cycles and --baseline-steps must be >= 1")
    dev = require_cuda("groups")
    nvml = _Nvml()
    results = [run_case(args, precision, cap, nvml, dev) for precision, cap in cases]
    print_table(results, ["precision", "cap_gib", "k", "plan", "modelled_peak_gib", "measured_peak_gib",
                          "measured_over_modelled", "nvml_max_gib", "mean_step_s", "cycle_s", "first_cycle_s", "note"],
                title=f"hift bench groups: layers_per_group='auto', {args.shape} shape, batch {args.batch} x {args.seq}")
    baseline = None
    if args.offload_baseline:
        fp32_caps = [cap for precision, cap in cases if precision in ("fp32", "tf32")]
        baseline = offload_baseline(args, fp32_caps[0] if fp32_caps else 0.0, nvml, dev) if fp32_caps else \
            {"note": "--offload-baseline needs an fp32 case (it runs fp32 AdamW under that case's cap)"}
        for r in results:
            if r["precision"] == "fp32" and r.get("cycle_s") and baseline.get("step_s"):
                ref = baseline["step_s"] if baseline["layers"] == baseline["full_layers"] else baseline["step_s_scaled_to_full"]
                r["cycle_over_offload_step"] = r["cycle_s"] / ref
        print_table([baseline], ["method", "layers", "full_layers", "step_s", "step_s_scaled_to_full", "first_step_s",
                                 "setup_s", "peak_allocated_gib", "note"], title="CPU-offloaded full AdamW (torchao)")
        print_table([r for r in results if "cycle_over_offload_step" in r],
                    ["precision", "cap_gib", "k", "cycle_s", "cycle_over_offload_step"],
                    title="time to update every parameter once: HiFT auto cycle / CPU-offloaded AdamW step")
    write_result(args.out, "groups", results, {"cases": results, "offload_baseline": baseline, "batch": args.batch,
                                               "seq": args.seq, "shape": args.shape})
    return 0
