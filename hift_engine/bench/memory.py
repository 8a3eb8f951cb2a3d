"""7B (or 13B) HiFT AdamW (one block per group) under a hard cap that models a 24/48 GB card.

The cap: torch.cuda.set_per_process_memory_fraction, sized so the whole process (CUDA context included, as
pynvml reports device memory) stays under --cap-gib (default 47.5 GiB; an RTX A6000 has 49,140 MiB).
Reports, per group position: peak allocated, peak reserved, pynvml device memory, step time. Sweeps batch
1, 2, 4 at 512 tokens for a full cycle plus a few steps; checks that reserved memory stays flat over
several cycles; finds the longest sequence at batch 1 that fits (probing the deepest-backward groups, then
confirming with a full cycle), once per --activation-checkpointing mode (with and without), with the chunked
LM head loss when --head-chunk-tokens > 0; reports which SDPA backend attention runs on in the model's dtype.
Writes JSON and a PNG (memory by group position, one line per batch size).
"""

from __future__ import annotations

import gc
import time

import torch

from .common import gib, print_table, require_cuda, write_result
from ..precision import compute_dtype
from .model_factory import SHAPES, build_llama, random_batch

ALIGN_SEQ = 64  # cheap steps that only move the group order to a cycle position


def add_arguments(p) -> None:
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="LLaMA-2 width: 7b or 13b")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's own, 32 for 7b, 40 for 13b)")
    p.add_argument("--cap-gib", type=float, default=47.5, help="process memory cap, pynvml view (GiB)")
    p.add_argument("--batches", default="1,2,4", help="batch sizes at --seq tokens")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--extra-steps", type=int, default=3, help="steps after the first full cycle")
    p.add_argument("--flat-cycles", type=int, default=3, help="cycles at batch 1 to check reserved memory is flat")
    p.add_argument("--seq-probe", default="1024,2048,3072,4096,6144,8192", help="sequence lengths to try at batch 1 ('' skips)")
    p.add_argument("--activation-checkpointing", default="off",
                   help="comma-separated modes (off, auto, always): the batch sweep runs the first, the sequence probe each")
    p.add_argument("--memory-budget-gib", type=float, default=None, help="'auto' budget (default: the capped device's)")
    p.add_argument("--activation-offload", action="store_true",
                   help="with auto/always: recomputed blocks keep their inputs in pinned host memory")
    p.add_argument("--checkpoint-active", action="store_true",
                   help="with auto/always: the active group's blocks are recomputed too (one block's activations at a time)")
    p.add_argument("--mlp-chunk-tokens", type=int, default=0,
                   help="> 0: every block's MLP over the sequence in checkpointed chunks of this many tokens; 0: off")
    p.add_argument("--head-chunk-tokens", type=int, default=0,
                   help="> 0: the LM head and loss in chunks of this many tokens (no full logits); 0: the model's loss")
    p.add_argument("--full-cycle-modes", default=None,
                   help="comma-separated checkpointing modes whose longest probed sequence is confirmed with a full "
                   "cycle (default: every mode; '' none: the probe alone covers the deepest-backward groups)")
    p.add_argument("--store", default="native", choices=("native", "torch", "resident"))
    p.add_argument("--state-dtype", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: AdamW's moments in bf16 (stochastic rounding); halves their host memory and transfers")
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


_held_pin_contexts: list = []  # kept for the whole benchmark: stores made under the cap share it


def _set_cap(cap_gib: float, nvml: _Nvml, dev, pin_context: bool = False) -> dict:
    """Cap torch's allocator so that the whole process stays under cap_gib as pynvml counts it. With
    ``pin_context`` (runs whose native store pins from it, and nothing else under the same cap) the native store's
    pinning context is made first, so the overhead measured includes it; a baseline that never uses it would
    lose its 260 MiB from its own budget."""
    torch.empty(1, device=dev)  # create the context
    if pin_context:
        from ..store.native_transport import hold_pin_context

        held = hold_pin_context(dev)
        if held is not None:
            _held_pin_contexts.append(held)
    torch.cuda.synchronize()
    total = torch.cuda.get_device_properties(dev).total_memory
    used = nvml.used()
    overhead = (used - torch.cuda.memory_reserved(dev)) if used is not None else 600 * 2**20
    margin = 256 * 2**20  # cuBLAS/cuDNN handles and other non-caching-allocator memory created later
    budget = cap_gib * 2**30 - overhead - margin
    fraction = budget / total
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    return {"cap_gib": cap_gib, "context_overhead_gib": gib(overhead), "allocator_budget_gib": gib(budget), "fraction": fraction}


def _opt(model, store, precision="fp32", checkpointing="off", budget_gib=None, offload=False, checkpoint_active=False,
         mlp_chunk_tokens=0, state_dtype="fp32"):
    from ..optimizer import HiFTOptimizer

    extra = {"memory_budget_gib": budget_gib} if checkpointing == "auto" and budget_gib else {}
    if checkpointing != "off":  # both extend checkpointing: a mode "off" in the same sweep runs without them
        extra.update(activation_offload=offload, checkpoint_active=checkpoint_active)
    if mlp_chunk_tokens:
        extra["mlp_chunk_tokens"] = mlp_chunk_tokens
    return HiFTOptimizer(model, "adamw", lr=1e-5, weight_decay=0.0, layers_per_group=1, state_store=store, max_grad_norm=1.0,
                         precision=precision, activation_checkpointing=checkpointing, state_dtype=state_dtype, **extra)


def sdpa_backends(dtype: torch.dtype, dev, heads: int = 32, head_dim: int = 128, seq: int = 4096) -> dict:
    """Which SDPA backend PyTorch picks for causal attention of this shape and dtype, and which could run it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, heads, seq, head_dim, device=dev, dtype=dtype, requires_grad=True)
    out = {}
    try:
        out["selected"] = SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name
    except Exception as e:  # noqa: BLE001 - a private helper: report, do not fail the benchmark
        out["selected"] = f"unknown ({type(e).__name__})"
    eligible = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
            eligible.append(backend.name)
        except RuntimeError:
            pass
    out["eligible"] = eligible
    return out


def _loss(model, data, head_chunk_tokens):
    if head_chunk_tokens:
        from ..head_loss import causal_lm_loss

        return causal_lm_loss(model, data["input_ids"], data["labels"], None, head_chunk_tokens)
    return model(**data).loss


def _steps(model, opt, batch, seq, n, nvml, dev, label, head_chunk_tokens=0) -> list[dict]:
    rows = []
    for i in range(n):
        data = random_batch(batch, seq, dev, seed=i)
        torch.cuda.reset_peak_memory_stats(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        group = opt.active_group
        recomputed = opt.recomputed_blocks
        start.record()
        loss = _loss(model, data, head_chunk_tokens)
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
            "recomputed_blocks": opt.recomputed_blocks - recomputed,
        })
        del loss, data
    return rows


def _oom_cleanup(opt) -> None:
    opt.zero_grad()
    gc.collect()
    torch.cuda.empty_cache()


CHECKPOINTING = ("off", "auto", "always")


def _probe(model, opt, seqs, nvml, dev, mode, head_chunk_tokens, cap_gib=None) -> tuple[list[dict], int | None]:
    """The longest batch-1 sequence whose steps at the deepest-backward groups (embedding, block 0, block 1)
    fit: no out-of-memory error and, where pynvml reads the device, no more than ``cap_gib`` on it (the
    allocator's cap leaves out memory outside torch, such as libraries' kernels loaded on first use). Stops
    at the first that does not fit."""
    probes, longest = [], None
    for seq in seqs:
        try:
            while opt.order.position > 2:
                _steps(model, opt, 1, ALIGN_SEQ, 1, nvml, dev, "align")
            pr = _steps(model, opt, 1, seq, 3, nvml, dev, f"probe{seq}-{mode}", head_chunk_tokens)
            used = max((r["nvml_used_gib"] or 0) for r in pr) if nvml.handle is not None else None
            within = used is None or cap_gib is None or used <= cap_gib
            probes.append({"checkpointing": mode, "seq": seq, "fits": within,
                           "peak_reserved_gib": max(r["peak_reserved_gib"] for r in pr),
                           "nvml_used_gib": used,
                           "step_ms": sum(r["step_ms"] for r in pr) / len(pr),
                           "recomputed_blocks": sum(r["recomputed_blocks"] for r in pr)})
            if not within:
                probes[-1]["error"] = f"ran, but the device held {used:.3f} GiB (pynvml), over the {cap_gib} GiB cap"
                break
            longest = seq
        except torch.OutOfMemoryError as e:
            probes.append({"checkpointing": mode, "seq": seq, "fits": False, "error": str(e).splitlines()[0][:160]})
            _oom_cleanup(opt)
            break
        finally:
            print(f"probe {probes[-1] if probes else seq}", flush=True)
    return probes, longest


def _modes(args) -> list[str]:
    """The checkpointing modes to run, with the options that depend on them checked before any GPU work."""
    modes = [m.strip() for m in args.activation_checkpointing.split(",") if m.strip()]
    if not modes or any(m not in CHECKPOINTING for m in modes):
        raise SystemExit(f"hift bench memory: --activation-checkpointing {args.activation_checkpointing!r}: use a "
                         f"comma-separated list of {', '.join(CHECKPOINTING)}")
    if args.checkpoint_active and modes == ["off"] * len(modes):
        raise SystemExit("hift bench memory: --checkpoint-active recomputes the active group's blocks as well; it needs "
                         "--activation-checkpointing always or auto")
    if args.mlp_chunk_tokens < 0:
        raise SystemExit(f"hift bench memory: --mlp-chunk-tokens {args.mlp_chunk_tokens}: give tokens per chunk (> 0), "
                         "or 0 for the plain MLP")
    return modes


def run(args) -> int:
    modes = _modes(args)
    dev = require_cuda("memory")
    nvml = _Nvml()
    cap = _set_cap(args.cap_gib, nvml, dev, pin_context=args.store == "native")
    print(f"cap: {cap}", flush=True)
    layers = args.layers or SHAPES[args.shape][3]
    t0 = time.perf_counter()
    model = build_llama(layers, dev, dtype=compute_dtype(args.precision), shape=args.shape)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.shape} width, {layers} layers, {n_params:,} params, built in {build_s:.1f} s", flush=True)
    opt = _opt(model, args.store, args.precision, modes[0], args.memory_budget_gib, args.activation_offload,
               args.checkpoint_active, args.mlp_chunk_tokens, args.state_dtype)
    k = opt.num_groups
    chunk = args.head_chunk_tokens
    rows, outcomes = [], []
    for batch in [int(b) for b in args.batches.split(",") if b]:
        label = f"batch{batch}x{args.seq}"
        try:
            rows += _steps(model, opt, batch, args.seq, k + args.extra_steps, nvml, dev, label, chunk)
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
            cyc = _steps(model, opt, 1, args.seq, k, nvml, dev, f"flat{c}", chunk)
            flat.append({"cycle": c, "reserved_gib": gib(torch.cuda.memory_reserved(dev)),
                         "max_peak_reserved_gib": max(r["peak_reserved_gib"] for r in cyc),
                         "nvml_used_gib": gib(nvml.used()) if nvml.used() is not None else None})
        print(f"reserved per cycle: {flat}", flush=True)

    probes, longest = [], {}
    seqs = [int(s) for s in args.seq_probe.split(",") if s]
    host_state_gib = gib(opt.store.stats.host_bytes) if opt.store else None
    store_kind = opt.store.kind if opt.store else None
    for i, mode in enumerate(modes if seqs else []):
        if i:  # a fresh optimizer per mode (the option is fixed at construction)
            opt.close()
            gc.collect()
            torch.cuda.empty_cache()
            opt = _opt(model, args.store, args.precision, mode, args.memory_budget_gib, args.activation_offload,
                       args.checkpoint_active, args.mlp_chunk_tokens, args.state_dtype)
        found, longest[mode] = _probe(model, opt, seqs, nvml, dev, mode, chunk, args.cap_gib)
        probes += found
        confirm = modes if args.full_cycle_modes is None else [c.strip() for c in args.full_cycle_modes.split(",")]
        if longest[mode] is None or mode not in confirm:
            continue
        while opt.order.position != 0:
            _steps(model, opt, 1, ALIGN_SEQ, 1, nvml, dev, "align")
        label = f"batch1x{longest[mode]}-{mode}"
        try:
            rows += _steps(model, opt, 1, longest[mode], k, nvml, dev, label, chunk)
            outcomes.append({"run": label, "fits": True, "full_cycle": True})
        except torch.OutOfMemoryError as e:
            outcomes.append({"run": label, "fits": False, "error": str(e).splitlines()[0]})
            _oom_cleanup(opt)
        print(f"{label}: {outcomes[-1]}", flush=True)

    # After the measurements: trying every SDPA backend loads kernels that training never uses, and that memory
    # (outside torch's allocator) would count against the cap in the pynvml column.
    opt.close()
    gc.collect()
    torch.cuda.empty_cache()
    hidden, _, heads, _ = SHAPES[args.shape]
    sdpa = sdpa_backends(compute_dtype(args.precision), dev, heads, hidden // heads)
    print(f"SDPA ({args.precision}): {sdpa}", flush=True)
    per_run = {}
    for r in rows:
        agg = per_run.setdefault(r["run"], {"run": r["run"], "steps": 0, "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0,
                                            "nvml_used_gib": 0.0, "step_ms": [], "recomputed_blocks": 0})
        agg["steps"] += 1
        agg["recomputed_blocks"] += r["recomputed_blocks"]
        for key in ("peak_allocated_gib", "peak_reserved_gib", "nvml_used_gib"):
            agg[key] = max(agg[key], r[key] or 0.0)
        agg["step_ms"].append(r["step_ms"])
    table = [{**v, "mean_step_ms": sum(v["step_ms"]) / len(v["step_ms"]), "step_ms": None} for v in per_run.values()]
    print_table(table, ["run", "steps", "peak_allocated_gib", "peak_reserved_gib", "nvml_used_gib", "mean_step_ms", "recomputed_blocks"],
                title=f"hift bench memory: {n_params / 1e9:.3f} B params {args.precision} AdamW, cap {args.cap_gib} GiB "
                      f"({args.store} store, head chunk {chunk or 'off'}, MLP chunk {args.mlp_chunk_tokens or 'off'}, "
                      f"checkpoint_active {args.checkpoint_active}, state_dtype {args.state_dtype})")
    print_table(probes, ["checkpointing", "seq", "fits", "peak_reserved_gib", "nvml_used_gib", "step_ms", "recomputed_blocks"],
                title="longest batch-1 sequence (--seq-probe), per activation_checkpointing")
    summary = {
        "params": n_params, "shape": args.shape, "layers": layers, "num_groups": k, "cap": cap, "outcomes": outcomes,
        "flat_reserved": flat, "seq_probes": probes, "longest_seq_batch1": longest, "sdpa": sdpa,
        "activation_checkpointing": modes, "activation_offload": args.activation_offload, "head_chunk_tokens": chunk,
        "checkpoint_active": args.checkpoint_active, "mlp_chunk_tokens": args.mlp_chunk_tokens,
        "store": store_kind, "host_state_gib": host_state_gib, "state_dtype": args.state_dtype,
    }
    path = write_result(args.out, "memory", rows, summary, precision=args.precision)
    try:
        from .plot import plot_memory

        print(f"wrote {plot_memory(path)}")
    except ImportError as e:
        print(f"plot skipped ({e}); run `python -m hift_engine.bench.plot {path}` where matplotlib is installed")
    return 0
