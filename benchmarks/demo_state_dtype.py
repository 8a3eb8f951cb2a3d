"""The built-in demo task trained with fp32 and with bf16 AdamW moments (state_dtype), seeds 0-2: final loss,
mean of the last 100 losses and accuracy on fresh problems (CPU, about 6 minutes on 2 cores).

    python benchmarks/demo_state_dtype.py      -> benchmarks/results/demo-state-dtype-cpu.json
"""

import json

import torch

from hift_engine.bench.common import commit_id

from hift_engine.demo import run_demo


def main() -> None:
    results = {}
    for seed in (0, 1, 2):
        for state_dtype in ("fp32", "bf16"):
            r = run_demo(seed=seed, state_dtype=state_dtype, printer=None)
            results[f"seed{seed}/{state_dtype}"] = {
                "final": r.losses[-1], "mean_last_100": sum(r.losses[-100:]) / 100, "accuracy": r.accuracy,
            }
            print(seed, state_dtype, results[f"seed{seed}/{state_dtype}"], flush=True)
    out = {"benchmark": "demo-state-dtype", "device": "cpu", "torch": torch.__version__, "commit": commit_id(),
           "steps": 1500, "lr": 3e-3, "precision": "fp32", "results": results}
    with open("benchmarks/results/demo-state-dtype-cpu.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
