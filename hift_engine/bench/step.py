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
from .step_timer import StepTimer, copy_summary


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
    p.add_argument("--precision", default="fp32",
                   help="comma-separated, each measured in this run: fp32, tf32, bf16-mixed, fp16-mixed (the model in "
                   "bf16/fp16, fp32 masters), bf16-pure (a bf16 model trained without masters). The standard mode "
                   "trains the same model with torch.optim.AdamW")
    p.add_argument("--activation-checkpointing", default="off",
                   help="comma-separated (off, auto, always): the offload mode is measured with each, in this run")
    p.add_argument("--head-chunk-tokens", type=int, default=0,
                   help="> 0: every HiFT mode computes the LM head and loss in chunks of this many tokens")
    p.add_argument("--cap-gib", type=float, default=0.0,
                   help="> 0: cap the process's device memory (pynvml view, CUDA context included) as on a smaller card")
    p.add_argument("--no-pin-context", action="store_true",
                   help="offload mode: pin host buffers in the process's own CUDA context (pin_context=False), as "
                        "before the pinning context: no extra device memory, a slower first cycle")
    p.add_argument("--prepin", action="store_true",
                   help="offload mode: wait until every host buffer is pinned (HiFTOptimizer.wait_host_memory()) before "
                        "timing the first cycle (separates the cost of pinning during training from the rest of it)")
    p.add_argument("--profile", action="store_true", help="trace one cycle of each HiFT mode with torch.profiler")
    p.add_argument("--state-dtype", default="fp32",
                   help="comma-separated (fp32, bf16): the offload and resident modes are measured with each (bf16: "
                   "AdamW's moments in bf16 with stochastic rounding; rows labelled -bf16state)")
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


def _loop(model, opt, batches, steps, head_chunk_tokens=0, timer=None):
    from ..head_loss import causal_lm_loss

    for i in range(steps):
        if timer is not None:
            timer.begin()
        b = batches[i % len(batches)]
        if head_chunk_tokens and hasattr(opt, "num_groups"):
            loss = causal_lm_loss(model, b["input_ids"], b["labels"], None, head_chunk_tokens)
        else:
            loss = model(**b).loss
        getattr(opt, "scale_loss", lambda x: x)(loss).backward()  # standard mode: a torch optimizer
        opt.step()
        opt.zero_grad()
        if timer is not None:
            timer.end()


PRECISIONS = ("fp32", "tf32", "bf16-mixed", "fp16-mixed", "bf16-pure")
# The native store's diagnostic settings (docs/design.md, "Diagnostic settings"), read when a store is built.
STORE_DIAGNOSTICS = ("HIFT_ALLOC_MODE", "HIFT_ALLOC_NICE", "HIFT_ALLOC_STAGES", "HIFT_BACKGROUND_ALLOC", "HIFT_HUGE_PAGES",
                     "HIFT_PACE_DEPTH", "HIFT_PIN_FIRST", "HIFT_REGISTER_PIECE_MIB", "HIFT_TOUCH_CPUS",
                     "HIFT_TOUCH_QUEUE", "HIFT_TOUCH_THREADS")


def hift_precision(precision: str) -> str:
    """The engine's precision for a bench precision: bf16-pure is a bf16 model under precision='fp32'."""
    return "fp32" if precision == "bf16-pure" else precision


def model_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16-pure" else compute_dtype(precision)


def parse_precisions(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in PRECISIONS]
    if bad or not out:
        raise SystemExit(f"hift bench: --precision {text!r}: use a comma-separated list of {', '.join(PRECISIONS)}")
    return out


def set_matmul_precision(precision: str) -> None:
    """Every precision starts from torch's defaults: a tf32 run switches TF32 on process-wide."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"


def _measure(model, mode, args, dev, cycles, k_hint=None, profile_dir=None, chunk_mib=None, label=None,
             precision="fp32", **overrides) -> dict:
    batches = [random_batch(args.batch, args.seq, dev, seed=s) for s in range(4)]
    if mode == "standard":
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
        k = k_hint or 1
    else:
        built = time.perf_counter()
        opt = _hift(model, mode, args.store, chunk_mib, precision=hift_precision(precision), **overrides)
        built = time.perf_counter() - built
        k = opt.num_groups
    label = label or mode
    row = {"precision": precision, "mode": label, "groups": k, "batch": args.batch, "seq": args.seq}
    tuning = {name: os.environ[name] for name in STORE_DIAGNOSTICS if os.environ.get(name)}
    if tuning and mode == "offload":  # the native store's diagnostic settings change what its row measures
        row["hift_env"] = " ".join(f"{name}={v}" for name, v in tuning.items())
    if mode == "offload":
        row.update(store=opt.store.kind, transfer_chunk_mib=opt.config.transfer_chunk_mib, construct_s=built)
    if getattr(args, "prepin", False) and mode == "offload":
        if opt.store.alloc_stats() is None or os.environ.get("HIFT_BACKGROUND_ALLOC", "1") != "1":
            raise SystemExit("hift bench step --prepin: needs the native store allocating in the background "
                             "(--store native, HIFT_BACKGROUND_ALLOC unset or 1); nothing would be pinned beforehand")
        t0 = time.perf_counter()
        opt.wait_host_memory()
        row["prepin_s"] = time.perf_counter() - t0
        label = row["mode"] = f"{label}-prepinned"
    # HiFT modes: per-step GPU/host timings and (native store) GPU-timed copies, first cycle against later ones
    timer = StepTimer(dev) if mode != "standard" else None
    copies = getattr(getattr(opt, "store", None), "transport", None)
    copies = copies if hasattr(copies, "time_copies") else None
    try:
        if copies is not None:  # copies are split between the cycles by how many each submitted (store stats)
            copies.time_copies(k * (1 + cycles) + 2)
            waits0, jobs0 = copies.copy_waits(), _copy_jobs(opt)
        torch.cuda.synchronize()
        if timer is not None:
            timer.start()
        t0 = time.perf_counter()
        _loop(model, opt, batches, k, args.head_chunk_tokens, timer)  # the first cycle: zero fills, compilation, host buffers
        torch.cuda.synchronize()
        first_ms = 1e3 * (time.perf_counter() - t0) / k
        if copies is not None:  # no drain here: the later cycles start with the last write-back in flight, as in training
            waits1, jobs1 = copies.copy_waits(), _copy_jobs(opt)
        alloc = getattr(getattr(opt, "store", None), "alloc_stats", lambda: None)()
        if alloc is not None:  # the native store: what pinning host memory cost the first cycle
            row.update(first_cycle_alloc_wait_s=alloc["wait_s"], alloc_pin_held_s=alloc["held_s"],
                       alloc_map_s=alloc["map_s"], alloc_touch_s=alloc["touch_s"],
                       alloc_register_s=alloc["register_s"], pin_context=alloc["pin_context"],
                       pin_context_mib=alloc["pin_context_bytes"] / 2**20,
                       alloc_touch_threads=alloc["touch_threads"], alloc_touch_leads=alloc["touch_leads"])
        torch.cuda.reset_peak_memory_stats(dev)
        stats0 = _store_bytes(opt)
        n = k * cycles
        t0 = time.perf_counter()
        recomputed = getattr(opt, "recomputed_blocks", 0)
        _loop(model, opt, batches, n, args.head_chunk_tokens, timer)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if timer is not None:
            row["first_cycle_timing"], row["later_timing"] = timer.summary(0, k), timer.summary(k, k + n)
        if copies is not None:
            waits2 = copies.copy_waits()
            opt.store.synchronize()  # every timed copy finished (after the window's clock stopped)
            done = copies.copy_times()
            for d in ("h2d", "d2h"):
                split, stop = jobs1[d] - jobs0[d], _copy_jobs(opt)[d] - jobs0[d]
                row["first_cycle_timing"][d] = copy_summary(done[d], 0, split)
                row["later_timing"][d] = copy_summary(done[d], split, stop)
            # how long a step's host thread was blocked on the copiers, and where (PinnedStore.copy_waits)
            row["first_cycle_timing"]["host_blocked_on_copies_ms"] = {w: 1e3 * (waits1[w] - waits0[w]) / k for w in waits0}
            row["later_timing"]["host_blocked_on_copies_ms"] = {w: 1e3 * (waits2[w] - waits1[w]) / n for w in waits0}
        row["recomputed_blocks_per_cycle"] = (getattr(opt, "recomputed_blocks", 0) - recomputed) / cycles
        moved = _store_bytes(opt) - stats0
        row.update(
            step_ms=1e3 * seconds / n, first_cycle_step_ms=first_ms, first_over_later=first_ms / (1e3 * seconds / n),
            tokens_per_s=n * args.batch * args.seq / seconds,
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


def _printable(row: dict) -> dict:
    """The row without its trace summary and per-step lists (those stay in the JSON)."""
    def short(v):
        return {k: short(x) for k, x in v.items() if k not in ("per_step", "per_copy_ms")} if isinstance(v, dict) else v
    return {k: short(v) for k, v in row.items() if k != "trace_summary"}


def _copy_jobs(opt) -> dict:
    """Copier jobs the store has submitted so far, per direction (a fetch or a write-back is one job each)."""
    return {"h2d": opt.store.stats.fetches, "d2h": opt.store.stats.writebacks}


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
    state_dtypes = [d.strip() for d in args.state_dtype.split(",") if d.strip()]
    if not state_dtypes or any(d not in ("fp32", "bf16") for d in state_dtypes):
        raise SystemExit(f"hift bench step: --state-dtype {args.state_dtype!r}: use fp32, bf16 or both")
    dev = require_cuda("step")
    modes = [m for m in args.modes.split(",") if m]
    if args.cap_gib:
        from .memory import _Nvml, _set_cap

        # the pinning context counts against the cap only where every mode under it is an offloaded native run
        holds = args.store == "native" and not args.no_pin_context and set(modes) == {"offload"}
        print(f"cap: {_set_cap(args.cap_gib, _Nvml(), dev, pin_context=holds)}", flush=True)
    precisions = parse_precisions(args.precision)
    ckpts = [c.strip() for c in args.activation_checkpointing.split(",") if c.strip()]
    if not ckpts or any(c not in ("off", "auto", "always") for c in ckpts):
        raise SystemExit(f"hift bench step: --activation-checkpointing {args.activation_checkpointing!r}: use off, auto, always")
    rows = []
    runs = ((args.layers_small, modes, args.cycles), (args.layers_full, [m for m in modes if m != "standard"], args.cycles_full))
    chunks = [int(c) for c in args.chunk_mib.split(",") if c] if args.chunk_mib else [None]
    for layers, allowed, cycles in runs:
        if not layers:
            continue
        for precision in precisions:
            set_matmul_precision(precision)
            model = build_llama(layers, dev, dtype=model_dtype(precision))
            n_params = sum(p.numel() for p in model.parameters())
            print(f"model: {layers} layers, {n_params / 1e9:.3f} B params, {precision}", flush=True)
            for mode in allowed:
                if mode == "standard" and precision != precisions[0]:
                    continue  # one full fine-tuning reference per model size
                variants = [(c, None) for c in chunks] + [(chunks[0], a) for a in ckpts[1:]] if mode == "offload" else [(None, None)]
                dtypes = state_dtypes if mode in ("offload", "resident") else ["fp32"]
                for chunk, ckpt, sd in ((c, a, d) for d in dtypes for c, a in variants):
                    label = f"{mode}-ckpt-{ckpt}" if ckpt else f"{mode}-chunk{chunk}" if chunk != variants[0][0] else mode
                    label += "-bf16state" if sd == "bf16" else ""
                    extra = {"activation_checkpointing": ckpt or ckpts[0]} if mode != "standard" else {}
                    if sd == "bf16":
                        extra["state_dtype"] = "bf16"
                    if args.no_pin_context and mode == "offload":
                        extra["pin_context"] = False
                        label += "-primary-context"
                    row = _measure(model, mode, args, dev, args.cycles_official if mode == "official" else cycles,
                                   k_hint=layers + 2, profile_dir=args.out if args.profile else None,
                                   chunk_mib=chunk, label=label, precision=precision, **extra)
                    row.update(layers=layers, params=n_params, activation_checkpointing=extra.get("activation_checkpointing"))
                    rows.append(row)
                    print(_printable(row), flush=True)
            del model
            _free()
    set_matmul_precision("fp32")
    cols = ["layers", "precision", "mode", "groups", "step_ms", "tokens_per_s", "first_over_later", "recomputed_blocks_per_cycle", "peak_allocated_gib",
            "peak_reserved_gib", "pcie_gib_per_step", "pcie_avg_GBps", "note"]
    print_table(rows, cols, title=f"hift bench step: batch {args.batch} x {args.seq} tokens, AdamW")
    summary = summarize(rows, precisions)
    print(summary)
    write_result(args.out, "step", rows, summary, precision=args.precision)
    return 0


def summarize(rows: list[dict], precisions: list[str]) -> dict:
    """Ratios within one precision (offload/resident, ...) and across precisions (tokens/s against fp32)."""

    def get(layers, precision, mode, key="step_ms"):
        return next((r.get(key) for r in rows if r["layers"] == layers and r["precision"] == precision and r["mode"] == mode), None)

    def ratio(a, b):
        return a / b if a and b else None

    summary = {}
    for layers in sorted({r["layers"] for r in rows}):
        for precision in precisions:
            off, res = get(layers, precision, "offload"), get(layers, precision, "resident")
            entry = {
                "offload_over_resident": ratio(off, res),
                "official_over_offload": ratio(get(layers, precision, "official"), off),
                "hift_peak_over_standard_peak": ratio(get(layers, precision, "offload", "peak_reserved_gib"),
                                                      get(layers, precision, "standard", "peak_reserved_gib")),
                "offload_first_cycle_over_later": get(layers, precision, "offload", "first_over_later"),
            }
            for other in precisions:  # offloaded tokens/s of this precision over the others'
                if other != precision:
                    entry[f"tokens_per_s_over_{other}"] = ratio(get(layers, precision, "offload", "tokens_per_s"),
                                                                 get(layers, other, "offload", "tokens_per_s"))
            for r in rows:  # every other offload variant measured (--chunk-mib, checkpointing) against resident and offload
                if r["layers"] == layers and r["precision"] == precision and r["mode"].startswith("offload-") and r.get("step_ms"):
                    entry[f"{r['mode']}_over_resident"] = ratio(r["step_ms"], res)
                    entry[f"{r['mode']}_over_offload"] = ratio(r["step_ms"], off)
                    if r["mode"].endswith("-bf16state"):  # against the resident run with the same state
                        entry[f"{r['mode']}_over_resident-bf16state"] = ratio(r["step_ms"], get(layers, precision, "resident-bf16state"))
            summary[f"{layers}_layers/{precision}"] = entry
    return summary
