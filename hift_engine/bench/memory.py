"""7B fp32 HiFT AdamW (one block per group) under a hard cap that models a 48 GB card.

The cap: torch.cuda.set_per_process_memory_fraction, sized so the whole process (CUDA context included, as
pynvml reports device memory) stays under --cap-gib (default 47.5 GiB; an RTX A6000 has 49,140 MiB).
Reports, per group position: peak allocated, peak reserved, pynvml device memory, step time. Sweeps batch
1, 2, 4 at 512 tokens for a full cycle plus a few steps; checks that reserved memory stays flat over
several cycles; finds the longest sequence at batch 1 that fits (probing the deepest-backward groups, then
confirming with a full cycle). Writes JSON and a PNG (memory by group position, one line per batch size).
"""

from __future__ import annotations

import gc
import time

import torch

from .common import gib, print_table, require_cuda, write_result
from ..precision import compute_dtype
from .model_factory import build_llama, random_batch

ALIGN_SEQ = 64  # cheap steps that only move the group order to a cycle position


def add_arguments(p) -> None:
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = LLaMA-2-7B)")
    p.add_argument("--cap-gib", type=float, default=47.5, help="process memory cap, pynvml view (GiB)")
    p.add_argument("--batches", default="1,2,4", help="batch sizes at --seq tokens")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--extra-steps", type=int, default=3, help="steps after the first full cycle")
    p.add_argument("--flat-cycles", type=int, default=3, help="cycles at batch 1 to check reserved memory is flat")
    p.add_argument("--seq-probe", default="1024,2048,3072,4096,6144,8192", help="sequence lengths to try at batch 1 ('' skips)")
    p.add_argument("--store", default="native", choices=("native", "torch", "resident"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16-mixed", "fp16-mixed"),
                   help="bf16-mixed builds the model in bf16 and keeps fp32 masters with the streamed state")


class _Nvml:
    def __init__(self):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception as e:  # noqa: BLE001
            print(f"pynvml unavailable ({e}); device memory column will be empty")

    def used(self) -> int | None:
        """Device memory in use (the whole card: this process is its only user on the benchmark machine)."""
        if self.handle is None:
            return None
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)


def _set_cap(cap_gib: float, nvml: _Nvml, dev) -> dict:
    torch.empty(1, device=dev)  # create the context
    torch.cuda.synchronize()
    total = torch.cuda.get_device_properties(dev).total_memory
    used = nvml.used()
    overhead = (used - torch.cuda.memory_reserved(dev)) if used is not None else 600 * 2**20
    margin = 256 * 2**20  # cuBLAS/cuDNN handles and other non-caching-allocator memory created later
    budget = cap_gib * 2**30 - overhead - margin
    fraction = budget / total
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    return {"cap_gib": cap_gib, "context_overhead_gib": gib(overhead), "allocator_budget_gib": gib(budget), "fraction": fraction}


def _opt(model, store, precision="fp32"):
    from ..optimizer import HiFTOptimizer

    return HiFTOptimizer(model, "adamw", lr=1e-5, weight_decay=0.0, layers_per_group=1, state_store=store, max_grad_norm=1.0,
                         precision=precision)


def _steps(model, opt, batch, seq, n, nvml, dev, label) -> list[dict]:
    rows = []
    for i in range(n):
        data = random_batch(batch, seq, dev, seed=i)
        torch.cuda.reset_peak_memory_stats(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        group = opt.active_group
        start.record()
        loss = model(**data).loss
        opt.scale_loss(loss).backward()
        opt.step()
        opt.zero_grad()
        end.record()
        end.synchronize()
        rows.append({
            "run": label, "batch": batch, "seq": seq, "step": opt.global_step - 1, "cycle": opt.order.cycle if opt.order.position else opt.order.cycle - 1,
            "group": group, "peak_allocated_gib": gib(torch.cuda.max_memory_allocated(dev)),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved(dev)),
            "nvml_used_gib": gib(nvml.used()) if nvml.used() is not None else None,
            "step_ms": start.elapsed_time(end),
        })
        del loss, data
    return rows


def _oom_cleanup(opt) -> None:
    opt.zero_grad()
    gc.collect()
    torch.cuda.empty_cache()


def run(args) -> int:
    dev = require_cuda("memory")
    nvml = _Nvml()
    cap = _set_cap(args.cap_gib, nvml, dev)
    print(f"cap: {cap}", flush=True)
    t0 = time.perf_counter()
    model = build_llama(args.layers, dev, dtype=compute_dtype(args.precision))
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} layers, {n_params:,} params, built in {build_s:.1f} s", flush=True)
    opt = _opt(model, args.store, args.precision)
    k = opt.num_groups
    rows, outcomes = [], []
    for batch in [int(b) for b in args.batches.split(",") if b]:
        label = f"batch{batch}x{args.seq}"
        try:
            rows += _steps(model, opt, batch, args.seq, k + args.extra_steps, nvml, dev, label)
            outcomes.append({"run": label, "fits": True})
        except torch.OutOfMemoryError as e:
            outcomes.append({"run": label, "fits": False, "error": str(e).splitlines()[0]})
            _oom_cleanup(opt)
        print(f"{label}: {outcomes[-1]}", flush=True)

    flat = []
    if args.flat_cycles:
        # align to a cycle start, then record reserved memory at the end of each cycle
        while opt.order.position != 0:
            _steps(model, opt, 1, ALIGN_SEQ, 1, nvml, dev, "align")
        for c in range(args.flat_cycles):
            torch.cuda.reset_peak_memory_stats(dev)
            cyc = _steps(model, opt, 1, args.seq, k, nvml, dev, f"flat{c}")
            flat.append({"cycle": c, "reserved_gib": gib(torch.cuda.memory_reserved(dev)),
                         "max_peak_reserved_gib": max(r["peak_reserved_gib"] for r in cyc),
                         "nvml_used_gib": gib(nvml.used()) if nvml.used() is not None else None})
        print(f"reserved per cycle: {flat}", flush=True)

    probes, longest = [], None
    seqs = [int(s) for s in args.seq_probe.split(",") if s]
    for seq in seqs:
        try:
            while opt.order.position > 2:  # probe the deepest-backward groups: embedding, block 0, block 1
                _steps(model, opt, 1, ALIGN_SEQ, 1, nvml, dev, "align")
            pr = _steps(model, opt, 1, seq, 3, nvml, dev, f"probe{seq}")
            probes.append({"seq": seq, "fits": True, "peak_reserved_gib": max(r["peak_reserved_gib"] for r in pr),
                           "nvml_used_gib": max((r["nvml_used_gib"] or 0) for r in pr)})
            longest = seq
        except torch.OutOfMemoryError as e:
            probes.append({"seq": seq, "fits": False, "error": str(e).splitlines()[0][:160]})
            _oom_cleanup(opt)
            break
        print(f"probe {probes[-1]}", flush=True)
    if longest is not None:
        while opt.order.position != 0:
            _steps(model, opt, 1, ALIGN_SEQ, 1, nvml, dev, "align")
        label = f"batch1x{longest}"
        try:
            rows += _steps(model, opt, 1, longest, k, nvml, dev, label)
            outcomes.append({"run": label, "fits": True, "full_cycle": True})
        except torch.OutOfMemoryError as e:
            outcomes.append({"run": label, "fits": False, "error": str(e).splitlines()[0]})
            _oom_cleanup(opt)

    per_run = {}
    for r in rows:
        agg = per_run.setdefault(r["run"], {"run": r["run"], "steps": 0, "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0, "nvml_used_gib": 0.0, "step_ms": []})
        agg["steps"] += 1
        for key in ("peak_allocated_gib", "peak_reserved_gib", "nvml_used_gib"):
            agg[key] = max(agg[key], r[key] or 0.0)
        agg["step_ms"].append(r["step_ms"])
    table = [{**v, "mean_step_ms": sum(v["step_ms"]) / len(v["step_ms"]), "step_ms": None} for v in per_run.values()]
    print_table(table, ["run", "steps", "peak_allocated_gib", "peak_reserved_gib", "nvml_used_gib", "mean_step_ms"],
                title=f"hift bench memory: {n_params / 1e9:.3f} B params {args.precision} AdamW, cap {args.cap_gib} GiB ({args.store} store)")
    summary = {
        "params": n_params, "num_groups": k, "cap": cap, "outcomes": outcomes, "flat_reserved": flat,
        "seq_probes": probes, "longest_seq_batch1": longest,
        "store": opt.store.kind if opt.store else None,
        "host_state_gib": gib(opt.store.stats.host_bytes) if opt.store else None,
    }
    path = write_result(args.out, "memory", rows, summary, precision=args.precision)
    try:
        from .plot import plot_memory

        print(f"wrote {plot_memory(path)}")
    except ImportError as e:
        print(f"plot skipped ({e}); run `python -m hift_engine.bench.plot {path}` where matplotlib is installed")
    opt.close()
    return 0
