"""Train a tiny model with periodic checkpoints, resuming from the latest good one if present.

Run as ``python -m tests.crash_worker --root DIR ...`` by tests/test_checkpoint.py, which kills it with SIGKILL
at random moments and checks that resuming ends with exactly the weights of an uninterrupted run.
"""

import argparse
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--strategy", default="random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--slow-fsync", type=float, default=0.0, help="seconds of sleep per fsync: widens write windows")
    args = p.parse_args()

    from hift_engine import HiFTOptimizer, checkpoint
    from tests.helpers import lm_batch, tiny_llama

    if args.slow_fsync:
        real = checkpoint._fsync
        checkpoint._fsync = lambda fd: (time.sleep(args.slow_fsync), real(fd))
    torch.manual_seed(0)
    model = tiny_llama(layers=3, device=args.device)
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, strategy=args.strategy, seed=3, max_grad_norm=1.0)
    sched = opt.cycle_scheduler("cosine", total_steps=args.steps, warmup_steps=4)
    print(f"store={opt.store.kind} kernels={opt.kernel_backend}", flush=True)
    start = 0
    latest = checkpoint.latest_checkpoint(args.root, verify=True)
    if latest is not None:
        start = checkpoint.load_checkpoint(latest, model, opt, sched)["step"]
        print(f"resumed from {latest.name}", flush=True)
    for step in range(start, args.steps):
        for micro in range(args.accum):
            batch = lm_batch(seed=1000 * step + micro, device=args.device)
            (model(**batch).loss / args.accum).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if (step + 1) % args.every == 0:
            checkpoint.save_checkpoint(args.root, model, opt, sched, step=step + 1, keep_last=2)
            print(f"saved {step + 1}", flush=True)
    from safetensors.torch import save_model

    save_model(model, os.path.join(args.root, "final.safetensors"))
    print("done", flush=True)


if __name__ == "__main__":
    main()
