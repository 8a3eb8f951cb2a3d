"""The built-in demo task trained with plain full AdamW (every parameter every step, torch.optim.AdamW), beside
the demo's HiFT run: the same model, batches, steps and cosine schedule, fp32 and with the initial weights nudged
by 1e-6 (as benchmarks/demo_precision.py does), seeds 0-2, CPU, two runs at a time (about 2 minutes).

    python benchmarks/demo_full_adamw.py     -> benchmarks/results/demo-full-adamw-cpu.json
"""

import json
import math
import random
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

from hift_engine.bench.common import commit_id

STEPS, LR, BATCH = 1500, 3e-3, 64


def one(job: tuple[int, float]) -> tuple[int, float, dict]:
    seed, noise = job
    torch.set_num_threads(1)
    from hift_engine.demo.run import nudge_weights, tiny_llama
    from hift_engine.demo.task import ArithmeticTask

    torch.manual_seed(seed)
    model = tiny_llama(seed=seed)
    if noise:  # as run_demo(init_noise=...) does it
        nudge_weights(model, noise)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / STEPS)))
    task, rng, losses = ArithmeticTask(), random.Random(seed), []
    for _ in range(STEPS):
        loss = model(**task.batch(rng, BATCH)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    accuracy = task.accuracy(model, random.Random(seed + 1), 200)
    curve = [sum(losses[i:i + 100]) / 100 for i in range(0, STEPS, 250)]
    return seed, noise, {"final_loss": sum(losses[-100:]) / 100, "accuracy": accuracy, "loss_every_250": curve}


def main() -> None:
    jobs = [(seed, noise) for seed in (0, 1, 2) for noise in (0.0, 1e-6)]
    results: dict = {}
    with ProcessPoolExecutor(max_workers=2) as pool:
        for seed, noise, row in pool.map(one, jobs):
            results.setdefault(f"seed{seed}", {})["fp32+1e-6" if noise else "fp32"] = row
            print(seed, noise, {k: v for k, v in row.items() if k != "loss_every_250"}, flush=True)
    out = {"benchmark": "demo-full-adamw", "device": "cpu", "torch": torch.__version__, "python": sys.version.split()[0],
           "commit": commit_id(), "steps": STEPS, "lr": LR, "final_loss": "mean of the last 100 step losses", "results": results}
    with open("benchmarks/results/demo-full-adamw-cpu.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
