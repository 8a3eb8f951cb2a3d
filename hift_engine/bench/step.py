"""Step time and tokens/s, in one run on one device, of:
  offload   HiFT, state streamed through the store on side streams (native C++ store by default)
  resident  HiFT, all state on the GPU (no transfers)
  official  HiFT moving state as the official code does: synchronous pageable .to() + empty_cache() per step
  standard  full fine-tuning with torch.optim.AdamW(fused=True)
on a 7B-width model with fewer layers (--layers-small, where all four fit), and the HiFT modes at full 7B
where they fit. Times are averaged over whole cycles (top and bottom groups both count) with one device
sync per measured window, so transfers overlapping the next step are not serialised by the measurement.
Also reports PCIe bytes per step and, with --profile, a torch.profiler trace of one cycle per HiFT mode
(gzipped beside the JSON) with a summary in the row: compute-stream gaps and what followed them, the copies
on each stream, and blocking runtime calls (see trace.py).
"""

from __future__ import annotations

import gc
import gzip
import os
import shutil
import time

import torch

from .common import gib, print_table, require_cuda, write_result
from ..precision import compute_dtype
from .model_factory import build_llama, random_batch


def add_arguments(p) -> None:
    p.add_argument("--layers-small", type=int, default=16, help="7B-width model where all four modes fit (16: 3.50 B)")
    p.add_argument("--layers-full", type=int, default=32, help="0 skips the full-size runs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--cycles", type=int, default=2, help="measured cycles on the small model (after one warm-up cycle)")
    p.add_argument("--cycles-full", type=int, default=1, help="measured cycles at full size (the official baseline takes ~2 s/step)")
    p.add_argument("--cycles-official", type=int, default=1, help="measured cycles of the official-style mode (it is ~20x slower)")
    p.add_argument("--modes", default="offload,resident,official,standard")
    p.add_argument("--store", default="native", choices=("native", "torch"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16-mixed", "fp16-mixed"),
                   help="HiFT modes' precision (bf16-mixed: bf16 model, fp32 masters; standard stays fp32 AdamW)")
    p.add_argument("--profile", action="store_true", help="trace one cycle of each HiFT mode with torch.profiler")
    p.add_argument("--chunk-mib", default="", help="comma-separated transfer_chunk_mib values for the offload mode "
                   "(e.g. 0,64: measures both in the same run; the first is the 'offload' row); default: the engine's")


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _hift(model, mode, store_kind, chunk_mib=None, **overrides):
    from ..optimizer import HiFTOptimizer
    from .baselines import OfficialStyleStore

    store = {"offload": store_kind, "resident": "resident", "official": "resident"}[mode]
    kwargs = {"lr": 1e-5, "weight_decay": 0.0, "state_store": store, "max_grad_norm": 1.0, **overrides}
    if chunk_mib is not None:  # None: the engine's default
        kwargs["transfer_chunk_mib"] = chunk_mib
    if mode != "official":
        return HiFTOptimizer(model, "adamw", **kwargs)
    return HiFTOptimizer(model, "adamw", **kwargs, store=lambda layouts, device: OfficialStyleStore(
        [lay.state_numel for lay in layouts], device, [lay.num_state * len(lay.params) for lay in layouts]))


def _loop(model, opt, batches, steps):
    for i in range(steps):
        loss = model(**batches[i % len(batches)]).loss
        getattr(opt, "scale_loss", lambda x: x)(loss).backward()  # standard mode: a torch optimizer
        opt.step()
        opt.zero_grad()


def _measure(model, mode, args, dev, cycles, k_hint=None, profile_dir=None, chunk_mib=None, label=None, **overrides) -> dict:
    batches = [random_batch(args.batch, args.seq, dev, seed=s) for s in range(4)]
    if mode == "standard":
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
        k = k_hint or 1
    else:
        opt = _hift(model, mode, args.store, chunk_mib, precision=args.precision, **overrides)
        k = opt.num_groups
    label = label or mode
    row = {"mode": label, "groups": k, "batch": args.batch, "seq": args.seq}
    if mode == "offload":
        row.update(store=opt.store.kind, transfer_chunk_mib=opt.config.transfer_chunk_mib)
    try:
        _loop(model, opt, batches, k)  # warm-up cycle: zero fills, compilation, host buffers
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        stats0 = _store_bytes(opt)
        n = k * cycles
        t0 = time.perf_counter()
        _loop(model, opt, batches, n)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        moved = _store_bytes(opt) - stats0
        row.update(
            step_ms=1e3 * seconds / n, tokens_per_s=n * args.batch * args.seq / seconds,
            peak_allocated_gib=gib(torch.cuda.max_memory_allocated(dev)), peak_reserved_gib=gib(torch.cuda.max_memory_reserved(dev)),
            pcie_gib_per_step=gib(moved / n), pcie_avg_GBps=moved / seconds / 1e9,
        )
        if profile_dir is not None and mode in ("offload", "resident"):
            row.update(_profile(model, opt, batches, k, profile_dir, label))
    except torch.OutOfMemoryError as e:
        row.update(step_ms=None, note=f"does not fit: {str(e).splitlines()[0][:100]}")
    finally:
        if mode == "standard":
            opt.zero_grad(set_to_none=True)
            opt.state.clear()
        else:
            opt.close()
        del opt
        _free()
    return row


def _store_bytes(opt) -> int:
    store = getattr(opt, "store", None)
    return (store.stats.bytes_h2d + store.stats.bytes_d2h) if store is not None else 0


def _profile(model, opt, batches, k, out_dir, label) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from .trace import summarize_trace

    steps = min(k, 12)
    before = _store_bytes(opt)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _loop(model, opt, batches, steps)
        torch.cuda.synchronize()
    moved = _store_bytes(opt) - before
    os.makedirs(out_dir, exist_ok=True)
    trace = os.path.join(out_dir, f"step-{label}-trace.json")
    prof.export_chrome_trace(trace)
    summary = summarize_trace(trace)
    with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(trace)
    return {"trace": trace + ".gz", "profiled_steps": steps, "profiled_pcie_bytes": moved, "trace_summary": summary}


def run(args) -> int:
    dev = require_cuda("step")
    modes = [m for m in args.modes.split(",") if m]
    rows = []
    runs = ((args.layers_small, modes, args.cycles), (args.layers_full, [m for m in modes if m != "standard"], args.cycles_full))
    chunks = [int(c) for c in args.chunk_mib.split(",") if c] if args.chunk_mib else [None]
    for layers, allowed, cycles in runs:
        if not layers:
            continue
        model = build_llama(layers, dev, dtype=compute_dtype(args.precision))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {layers} layers, {n_params / 1e9:.3f} B params", flush=True)
        for mode in allowed:
            for i, chunk in enumerate(chunks if mode == "offload" else [None]):
                label = mode if i == 0 else f"{mode}-chunk{chunk}"
                row = _measure(model, mode, args, dev, args.cycles_official if mode == "official" else cycles,
                               k_hint=layers + 2, profile_dir=args.out if args.profile else None,
                               chunk_mib=chunk, label=label)
                row.update(layers=layers, params=n_params)
                rows.append(row)
                print({k: v for k, v in row.items() if k != "trace_summary"}, flush=True)
        del model
        _free()
    cols = ["layers", "mode", "groups", "step_ms", "tokens_per_s", "peak_allocated_gib", "peak_reserved_gib", "pcie_gib_per_step", "pcie_avg_GBps", "note"]
    print_table(rows, cols, title=f"hift bench step: batch {args.batch} x {args.seq} tokens, {args.precision} AdamW")

    def get(layers, mode, key="step_ms"):
        return next((r.get(key) for r in rows if r["layers"] == layers and r["mode"] == mode), None)

    summary = {}
    for layers in sorted({r["layers"] for r in rows}):
        off, res, off_peak = get(layers, "offload"), get(layers, "resident"), get(layers, "offload", "peak_reserved_gib")
        official, std_peak = get(layers, "official"), get(layers, "standard", "peak_reserved_gib")
        off_alloc, std_alloc = get(layers, "offload", "peak_allocated_gib"), get(layers, "standard", "peak_allocated_gib")
        summary[f"{layers}_layers"] = {
            "offload_over_resident": off / res if off and res else None,
            "official_over_offload": official / off if off and official else None,
            "hift_peak_over_standard_peak": off_peak / std_peak if off_peak and std_peak else None,
            "hift_peak_allocated_over_standard": off_alloc / std_alloc if off_alloc and std_alloc else None,
        }
        for r in rows:  # every other offload variant measured (--chunk-mib) against resident
            if r["layers"] == layers and r["mode"].startswith("offload-") and r.get("step_ms") and res:
                summary[f"{layers}_layers"][f"{r['mode']}_over_resident"] = r["step_ms"] / res
    print(summary)
    write_result(args.out, "step", rows, summary, precision=args.precision)
    return 0
