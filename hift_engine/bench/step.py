"""Step time and tokens/s, in one run on one device, of:
  offload   HiFT, state streamed through the store on side streams (native C++ store by default)
  resident  HiFT, all state on the GPU (no transfers)
  official  HiFT moving state as the official code does: synchronous pageable .to() + empty_cache() per step
  standard  full fine-tuning with torch.optim.AdamW(fused=True)
on a 7B-width model with fewer layers (--layers-small, where all four fit), and the HiFT modes at full 7B
where they fit. Times are averaged over whole cycles (top and bottom groups both count) with one device
sync per measured window, so transfers overlapping the next step are not serialised by the measurement.
Also reports PCIe bytes per step and, with --profile, the copy bandwidth the side streams achieved
(from a torch.profiler trace, which is written beside the JSON).
"""

from __future__ import annotations

import gc
import time

import torch

from .common import gib, print_table, require_cuda, write_result
from .model_factory import build_llama, random_batch


def add_arguments(p) -> None:
    p.add_argument("--layers-small", type=int, default=8)
    p.add_argument("--layers-full", type=int, default=32, help="0 skips the full-size runs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--cycles", type=int, default=2, help="measured cycles on the small model (after one warm-up cycle)")
    p.add_argument("--cycles-full", type=int, default=1, help="measured cycles at full size (the official baseline takes ~1.5 s/step)")
    p.add_argument("--modes", default="offload,resident,official,standard")
    p.add_argument("--store", default="native", choices=("native", "torch"))
    p.add_argument("--profile", action="store_true", help="trace a few offloaded steps with torch.profiler")
    p.add_argument("--chunk-mib", default="0", help="comma-separated transfer_chunk_mib values for the offload mode "
                   "(e.g. 0,64: measures both in the same run)")


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _hift(model, mode, store_kind, chunk_mib=0):
    from ..optimizer import HiFTOptimizer
    from .baselines import OfficialStyleStore

    store = {"offload": store_kind, "resident": "resident", "official": "resident"}[mode]
    opt = HiFTOptimizer(
        model, "adamw", lr=1e-5, weight_decay=0.0, state_store=store, max_grad_norm=1.0, transfer_chunk_mib=chunk_mib
    )
    if mode == "official":
        opt.store.close()
        opt.store = OfficialStyleStore(
            [lay.state_numel for lay in opt.layouts], opt.device, [lay.num_state * len(lay.params) for lay in opt.layouts]
        )
    return opt


def _loop(model, opt, batches, steps):
    for i in range(steps):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def _measure(model, mode, args, dev, cycles, k_hint=None, profile_dir=None, chunk_mib=0) -> dict:
    batches = [random_batch(args.batch, args.seq, dev, seed=s) for s in range(4)]
    if mode == "standard":
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
        k = k_hint or 1
    else:
        opt = _hift(model, mode, args.store, chunk_mib)
        k = opt.num_groups
    row = {"mode": mode if not chunk_mib else f"{mode}-chunk{chunk_mib}", "groups": k, "batch": args.batch, "seq": args.seq}
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
        if profile_dir is not None and mode == "offload":
            row.update(_profile(model, opt, batches, k, profile_dir))
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


def _profile(model, opt, batches, k, out_dir) -> dict:
    from torch.profiler import ProfilerActivity, profile

    steps = min(k, 4)
    before = _store_bytes(opt)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _loop(model, opt, batches, steps)
        torch.cuda.synchronize()
    moved = _store_bytes(opt) - before
    copy_us = sum(e.device_time_total for e in prof.key_averages() if "Memcpy" in e.key and ("HtoD" in e.key or "DtoH" in e.key))
    trace = f"{out_dir}/step-offload-trace.json"
    prof.export_chrome_trace(trace)
    # Copies run on two streams at once, so bytes / summed copy time is a per-direction link rate.
    return {"trace": trace, "copy_GBps_per_stream": (moved / (copy_us * 1e-6) / 1e9) if copy_us else None}


def run(args) -> int:
    dev = require_cuda("step")
    modes = [m for m in args.modes.split(",") if m]
    rows = []
    runs = ((args.layers_small, modes, args.cycles), (args.layers_full, [m for m in modes if m != "standard"], args.cycles_full))
    for layers, allowed, cycles in runs:
        if not layers:
            continue
        model = build_llama(layers, dev)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {layers} layers, {n_params / 1e9:.3f} B params", flush=True)
        for mode in allowed:
            for chunk in ([int(c) for c in args.chunk_mib.split(",") if c] if mode == "offload" else [0]):
                row = _measure(model, mode, args, dev, cycles, k_hint=layers + 2,
                               profile_dir=args.out if args.profile else None, chunk_mib=chunk)
                row.update(layers=layers, params=n_params)
                rows.append(row)
                print(row, flush=True)
        del model
        _free()
    cols = ["layers", "mode", "groups", "step_ms", "tokens_per_s", "peak_allocated_gib", "peak_reserved_gib", "pcie_gib_per_step", "pcie_avg_GBps", "note"]
    print_table(rows, cols, title=f"hift bench step: batch {args.batch} x {args.seq} tokens, fp32 AdamW")

    def get(layers, mode, key="step_ms"):
        return next((r.get(key) for r in rows if r["layers"] == layers and r["mode"] == mode), None)

    summary = {}
    for layers in {r["layers"] for r in rows}:
        off, res, off_peak = get(layers, "offload"), get(layers, "resident"), get(layers, "offload", "peak_reserved_gib")
        official, std_peak = get(layers, "official"), get(layers, "standard", "peak_reserved_gib")
        summary[f"{layers}_layers"] = {
            "offload_over_resident": off / res if off and res else None,
            "official_over_offload": official / off if off and official else None,
            "hift_peak_over_standard_peak": off_peak / std_peak if off_peak and std_peak else None,
        }
    print(summary)
    write_result(args.out, "step", rows, summary)
    return 0
