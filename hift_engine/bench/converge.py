"""Held-out loss against optimizer steps and wall-clock seconds, per fine-tuning method, on real text.

A LLaMA-style model (byte tokens) is first pretrained briefly by the benchmark itself on the Python standard
library's top-level modules, then fine-tuned from those same weights by each method on the ``email`` package
and evaluated on held-out ``email`` files (text_corpus.py says why this text). Methods (--methods):
  full              torch.optim.AdamW on every parameter every step (resident; where it fits)
  full-cpu-offload  torchao's CPUOffloadOptimizer around AdamW (GPU only; the optional ``bench`` extra)
  hift-N            HiFTOptimizer, N layers per group (hift-1: one block per group)
  hift-auto         HiFTOptimizer(layers_per_group="auto") under the memory budget (--memory-budget-gib)
  badam             BAdam-style block coordinate descent: one block (the hift-1 groups) trained for
                    --switch-every steps with a fresh AdamW, then the next (state reset at every switch)
Each method runs --updates updates of every parameter (k steps per update for a method with k groups), or until
--seconds of training time, whichever comes first; evaluation time is not counted, one-time costs of a method's
first steps (kernel compilation on a GPU) are. Reports the held-out loss
per method at equal updates per parameter and at equal seconds; JSON + PNG (two panels: steps, seconds).
"""

from __future__ import annotations

import gc
import tempfile
import time
from typing import Callable

import torch

from ..errors import HiFTError
from .common import print_table, write_result
from .text_corpus import load_corpus

DEFAULT_METHODS = "full,hift-1,hift-2,badam"


def add_arguments(p) -> None:
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS}); see above")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (AdamW, every method)")
    p.add_argument("--updates", type=int, default=60, help="updates of every parameter per method")
    p.add_argument("--seconds", type=float, default=0.0, help="> 0: also stop each method after this much training time")
    p.add_argument("--eval-points", type=int, default=12, help="evaluations per method")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--switch-every", type=int, default=10, help="badam: steps per block before switching")
    p.add_argument("--memory-budget-gib", type=float, default=None, help="hift-auto's budget (default: the device's)")
    p.add_argument("--activation-gib", type=float, default=None,
                   help="hift-auto's activation size (default: measured on the GPU; on the CPU give it with the budget)")
    p.add_argument("--cap-gib", type=float, default=0.0, help="> 0 (GPU): cap the process's device memory as on a smaller card, from after pretraining (full AdamW, which the cap is chosen to exclude)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolate", choices=("auto", "on", "off"), default="auto",
                   help="run each method in its own process (auto: on a GPU, so no method inherits another's device "
                   "memory; the cap applies per process)")


def build_model(hidden: int, layers: int, seq: int, device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=(8 * hidden // 3 + 63) // 64 * 64, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64), vocab_size=256,
                      max_position_embeddings=seq, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device)
    model.config.use_cache = False
    return model


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@torch.no_grad()
def heldout_loss(model, batches) -> float:
    model.eval()
    total = sum(_loss(model, b).item() for b in batches) / len(batches)
    model.train()
    return total


def pretrain(model, corpus, args, device) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.pretrain_steps):
        ids = corpus.batches("pretrain", args.batch, args.seq, gen).to(device)
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ methods
# make(model, args) -> (step, k, close): step(ids) trains one optimizer step; k steps update every parameter once.
def _full(model, args):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    def step(ids):
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, 1, lambda: None


def _full_cpu_offload(model, args):
    if not next(model.parameters()).is_cuda:
        raise RuntimeError("full-cpu-offload runs on a GPU only (torchao moves the optimizer to the CPU)")
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError as e:
        raise RuntimeError(f"full-cpu-offload needs torchao (pip install 'hift_engine[bench]'): {e}") from e
    # offload_gradients: each gradient leaves the GPU as backward produces it (the setting for a card too small
    # for full AdamW, which is where this method is the alternative)
    opt = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, offload_gradients=True, lr=args.lr,
                              weight_decay=0.0, fused=True)

    def step(ids):
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad()

    return step, 1, lambda: None


def _hift(layers_per_group):
    def make(model, args):
        from ..optimizer import HiFTOptimizer

        extra = {}
        if layers_per_group == "auto":
            extra["activation_gib"] = args.activation_gib
            if extra["activation_gib"] is None and next(model.parameters()).is_cuda:
                from ..auto_groups import measure_activation_gib

                ids = torch.zeros(args.batch, args.seq, dtype=torch.long, device=next(model.parameters()).device)
                extra["activation_gib"] = measure_activation_gib(model, {"input_ids": ids, "labels": ids})
            if args.memory_budget_gib:
                extra["memory_budget_gib"] = args.memory_budget_gib
        opt = HiFTOptimizer(model, "adamw", lr=args.lr, weight_decay=0.0, layers_per_group=layers_per_group,
                            strategy="bottom2up", **extra)

        def step(ids):
            _loss(model, ids).backward()
            opt.step()
            opt.zero_grad()

        step.plan = opt.group_plan.sizes if opt.group_plan is not None else None
        return step, opt.num_groups, opt.close

    return make


def _badam(model, args):
    """Block coordinate descent as BAdam does it: the active block trains --switch-every steps with a fresh
    AdamW (its state dropped at the switch), the other blocks frozen; blocks in HiFT's one-block-per-group order."""
    from ..grouping import build_grouping

    blocks = [g.params for g in build_grouping(model, 1, None, (), lambda p: True).groups]
    state = {"i": -1, "left": 0, "opt": None}
    for p in model.parameters():
        p.requires_grad_(False)

    def step(ids):
        if state["left"] == 0:
            if state["opt"] is not None:
                for p in blocks[state["i"]]:
                    p.requires_grad_(False)
                    p.grad = None
            state["i"] = (state["i"] + 1) % len(blocks)
            for p in blocks[state["i"]]:
                p.requires_grad_(True)
            state["opt"] = torch.optim.AdamW(blocks[state["i"]], lr=args.lr, weight_decay=0.0)
            state["left"] = args.switch_every
        _loss(model, ids).backward()
        state["opt"].step()
        state["opt"].zero_grad(set_to_none=True)
        state["left"] -= 1

    def close():
        for p in model.parameters():
            p.requires_grad_(True)

    return step, len(blocks), close


def method_factory(name: str) -> Callable:
    if name == "full":
        return _full
    if name == "full-cpu-offload":
        return _full_cpu_offload
    if name == "badam":
        return _badam
    if name == "hift-auto":
        return _hift("auto")
    if name.startswith("hift-") and name[5:].isdigit() and int(name[5:]) > 0:
        return _hift(int(name[5:]))
    raise SystemExit(f"hift bench converge: unknown method {name!r}; use full, full-cpu-offload, hift-N, hift-auto, badam")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def run_method(name, base_state, corpus, eval_batches, args, device) -> tuple[list[dict], dict]:
    before = _allocated(device)
    model = build_model(args.hidden, args.layers, args.seq, device)
    model.load_state_dict(base_state)
    rows = []
    try:
        step, k, close = method_factory(name)(model, args)
    except (RuntimeError, torch.OutOfMemoryError, HiFTError) as e:  # a method that cannot run here is a row, not a crash
        return rows, {"method": name, "note": str(e).splitlines()[0][:160]}
    total = args.updates * k
    every = max(1, total // args.eval_points)
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same fine-tuning batches for every method
    rows.append({"method": name, "step": 0, "updates_per_param": 0.0, "seconds": 0.0,
                 "heldout_loss": heldout_loss(model, eval_batches)})
    trained, done, note = 0.0, 0, None
    try:
        while done < total:
            ids = corpus.batches("finetune", args.batch, args.seq, gen).to(device)
            _sync(device)
            t0 = time.perf_counter()
            step(ids)
            _sync(device)
            trained += time.perf_counter() - t0
            done += 1
            out_of_time = args.seconds and trained >= args.seconds
            if done % every == 0 or done == total or out_of_time:
                rows.append({"method": name, "step": done, "updates_per_param": done / k, "seconds": trained,
                             "heldout_loss": heldout_loss(model, eval_batches)})
            if out_of_time:
                break
    except torch.OutOfMemoryError as e:
        note = f"out of memory after {done} steps: {str(e).splitlines()[0][:100]}"
    finally:
        close()
    summary = {"method": name, "groups_k": k, "plan": getattr(step, "plan", None), "steps": done, "updates_per_param": done / k, "train_seconds": trained,
               "s_per_step": trained / done if done else None, "final_heldout_loss": rows[-1]["heldout_loss"], "note": note}
    # the method's closures can sit in reference cycles with the model (torchao's gradient hooks hold its
    # optimizer, which holds the parameters): drop them all before collecting, or the next method finds the
    # capped device still full
    del model, step, close
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    left = _allocated(device) - before
    if left > 64 << 20:  # the next methods run with less memory than the cap: say so in this row
        summary["note"] = ((summary["note"] + "; ") if summary["note"] else "") + f"left {left / 2**30:.2f} GiB on the device"
    return rows, summary


def _cap(args, device, method: str) -> dict:
    from .memory import _Nvml, _set_cap

    cap = _set_cap(args.cap_gib, _Nvml(), device, pin_context=method.startswith("hift"))  # only HiFT's store pins from it
    print(f"cap: {cap}", flush=True)
    return cap


def _method_process(name: str, base_path: str, args, results) -> None:
    """One method in its own process (spawned): the same corpus, evaluation batches and starting weights."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cap = _cap(args, device, name) if args.cap_gib and device.type == "cuda" else None
    corpus = load_corpus()
    eval_batches = [b.to(device) for b in corpus.eval_batches(args.batch, args.seq, args.eval_batches)]
    base = torch.load(base_path, weights_only=True)
    rows, summary = run_method(name, base, corpus, eval_batches, args, device)
    results.put((rows, summary, cap))


def _run_isolated(name: str, base_path: str, args) -> tuple[list[dict], dict, dict | None]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_method_process, args=(name, base_path, args, results))
    proc.start()
    try:
        while True:
            try:
                out = results.get(timeout=5)  # read before join: a large result must not block the child's exit
                break
            except Exception:  # noqa: BLE001 - queue.Empty: still running, or dead without a result
                if not proc.is_alive():
                    out = ([], {"method": name, "note": f"its process exited with code {proc.exitcode} before reporting"}, None)
                    break
    finally:
        proc.join(timeout=60)
    return out


def loss_at(rows: list[dict], key: str, x: float) -> float | None:
    """The held-out loss of the last evaluation at or before ``x`` (in updates per parameter or seconds)."""
    best = [r for r in rows if r[key] <= x + 1e-9]
    return best[-1]["heldout_loss"] if best else None


def run(args) -> int:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.eval_points < 1 or args.updates < 1 or args.eval_batches < 1:
        raise SystemExit("hift bench converge: --eval-points, --updates and --eval-batches must be >= 1")
    for m in methods:
        method_factory(m)  # unknown names fail before any training
    corpus = load_corpus()
    eval_batches = [b.to(device) for b in corpus.eval_batches(args.batch, args.seq, args.eval_batches)]
    model = build_model(args.hidden, args.layers, args.seq, device, args.seed)
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    pretrain(model, corpus, args, device)
    pretrain_s = time.perf_counter() - t0
    base = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    start_loss = heldout_loss(model, eval_batches)
    print(f"model: {params / 1e6:.2f} M params on {device}; pretrained {args.pretrain_steps} steps in {pretrain_s:.1f} s; "
          f"held-out loss {start_loss:.4f}", flush=True)
    del model
    isolate = args.isolate == "on" or (args.isolate == "auto" and device.type == "cuda")
    cap = None
    if args.cap_gib and device.type == "cuda" and not isolate:
        # capped only now: pretraining is full AdamW, which the cap is chosen to exclude; its cached blocks go first
        gc.collect()
        torch.cuda.empty_cache()
        cap = _cap(args, device)
    rows, summaries = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if isolate:  # each method in a fresh process: nothing one leaves on the device (or in the allocator) stays
            base_path = f"{tmp}/base.pt"
            torch.save(base, base_path)
            del base
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for m in methods:
            if isolate:
                r, s, cap = _run_isolated(m, base_path, args)
            else:
                r, s = run_method(m, base, corpus, eval_batches, args, device)
            rows += r
            summaries.append(s)
            print(s, flush=True)
    # Comparisons: each method at the full-AdamW run's updates per parameter, and at the shortest training time.
    ref = next((s for s in summaries if s["method"] == "full" and s.get("steps")), None)
    min_seconds = min((s["train_seconds"] for s in summaries if s.get("steps")), default=None)
    for s in summaries:
        mine = [r for r in rows if r["method"] == s["method"]]
        if not mine:
            continue
        if ref is not None:
            at = loss_at(mine, "updates_per_param", ref["updates_per_param"])
            s["heldout_at_full_updates"] = at
            s["gap_vs_full_at_equal_updates"] = (at - ref["final_heldout_loss"]) / ref["final_heldout_loss"] if at else None
        if min_seconds:
            s["heldout_at_equal_seconds"] = loss_at(mine, "seconds", min_seconds)
    print_table(summaries, ["method", "groups_k", "steps", "updates_per_param", "train_seconds", "s_per_step",
                            "final_heldout_loss", "heldout_at_full_updates", "gap_vs_full_at_equal_updates",
                            "heldout_at_equal_seconds", "note"],
                title=f"hift bench converge: {params / 1e6:.2f} M params, held-out loss from {start_loss:.4f} "
                      f"(pretrained), {args.updates} updates per parameter, {device}")
    summary = {"params": params, "device": str(device), "corpus": corpus.source, "pretrain_seconds": pretrain_s,
               "start_heldout_loss": start_loss, "equal_seconds": min_seconds, "methods": summaries, "cap": cap,
               "settings": {k: v for k, v in vars(args).items() if k not in ("func",)}}
    path = write_result(args.out, "converge", rows, summary)
    try:
        print(f"wrote {plot_converge(path)}")
    except ImportError as e:
        print(f"plot skipped ({e})")
    return 0


def plot_converge(path) -> str:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(open(path).read())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in data["rows"]):
        pts = [r for r in data["rows"] if r["method"] == method]
        axes[0].plot([r["updates_per_param"] for r in pts], [r["heldout_loss"] for r in pts], marker=".", label=method)
        axes[1].plot([r["seconds"] for r in pts], [r["heldout_loss"] for r in pts], marker=".", label=method)
    axes[0].set_xlabel("updates of every parameter (k steps each for k groups)")
    axes[1].set_xlabel("training seconds")
    for ax in axes:
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"hift bench converge: {data['summary']['params'] / 1e6:.1f} M params, {data['summary']['device']}")
    out = str(path).replace(".json", ".png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
