"""Data-parallel HiFT step time under torchrun: tokens/s per process and in all, gradient bytes all-reduced per
step against the whole model's, weight bytes broadcast per step under --shard-state, and pinned host memory per
rank.

    torchrun --nproc-per-node N -m hift_engine.cli.main bench ddp [--layers 32] [--batch 1] [--seq 512]

Run it with N = 1 and N = 2 (same arguments) to get the scaling; each run writes its JSON from rank 0. Without
torchrun it measures one process. On CPUs (gloo) it runs too, with a small model (--hidden 256 --layers 4), which
is how the tests exercise it.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .common import gib, print_table, write_result
from .model_factory import random_batch


def add_arguments(p) -> None:
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=0, help="0: LLaMA-2-7B width (4096); smaller for CPU runs")
    p.add_argument("--batch", type=int, default=1, help="sequences per process and step")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--cycles", type=int, default=1, help="measured cycles after one warm-up cycle")
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16-mixed"))
    p.add_argument("--shard-state", action="store_true",
                   help="ZeRO-1: each rank keeps 1/N of the optimizer state (host memory per rank falls by N)")


def _model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..precision import compute_dtype
    from .model_factory import build_llama

    if not args.hidden:
        return build_llama(args.layers, device, dtype=compute_dtype(args.precision))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                      vocab_size=32000, max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=compute_dtype(args.precision))
    model.config.use_cache = False
    return model


def run(args) -> int:
    from ..optimizer import HiFTOptimizer
    from ..recipe.ranks import init_ranks

    ranks = init_ranks("auto")
    try:
        device = ranks.device("auto")
        model = _model(args, device)
        shard = args.shard_state and ranks.world > 1  # one process has nothing to shard over
        opt = HiFTOptimizer(model, "adamw", lr=1e-5, weight_decay=0.0, precision=args.precision, shard_state=shard)
        k = opt.num_groups
        batches = [random_batch(args.batch, args.seq, device, seed=1000 * s + ranks.rank) for s in range(4)]

        def steps(n):
            for i in range(n):
                model(**batches[i % 4]).loss.backward()
                opt.step()
                opt.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        steps(k)  # warm-up cycle
        reduced0 = opt.reducer.bytes_reduced if opt.reducer else 0
        shared0 = opt.shards.bytes_broadcast if opt.shards else 0
        t0 = time.perf_counter()
        steps(k * args.cycles)
        seconds = time.perf_counter() - t0
        n = k * args.cycles
        n_params = sum(p.numel() for p in model.parameters())
        row = {
            "processes": ranks.world, "device": str(device), "groups": k, "batch_per_process": args.batch, "seq": args.seq,
            "step_ms": 1e3 * seconds / n, "tokens_per_s_per_process": n * args.batch * args.seq / seconds,
            "tokens_per_s_total": ranks.world * n * args.batch * args.seq / seconds,
            "grad_gib_reduced_per_step": gib(((opt.reducer.bytes_reduced if opt.reducer else 0) - reduced0) / n),
            "full_ft_grad_gib_per_step": gib(n_params * next(model.parameters()).element_size()),
            "shard_state": shard,
            "weight_gib_broadcast_per_step": gib(((opt.shards.bytes_broadcast if opt.shards else 0) - shared0) / n),
            "host_state_gib_per_rank": gib(opt.store.stats.host_bytes) if getattr(opt, "store", None) else 0.0,
        }
        opt.close()
        rows = [row]
        if ranks.world > 1:
            gathered = [None] * ranks.world
            dist.all_gather_object(gathered, row)
            rows = gathered
        if ranks.is_main:
            print_table(rows, list(row), title=f"hift bench ddp: {n_params / 1e9:.3f} B params, {ranks.world} process(es)")
            write_result(args.out, "ddp", rows, {"processes": ranks.world, "params": n_params,
                                                 "tokens_per_s_total": row["tokens_per_s_total"]})
        if ranks.world > 1:  # every rank done before any tears the process group down (a rank aborted once in CI)
            dist.barrier()
    finally:
        ranks.close()
    return 0
