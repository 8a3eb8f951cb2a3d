"""What layers_per_group="auto" plans for LLaMA-2-7B on 24/48/80 GB cards, from the memory model alone.

No GPU needed: unit sizes come from the LLaMA-2-7B shapes, the activations from a measured step (the H200 step
benchmark's peak allocated memory at batch 1 x 512 minus the weights, the gradient arena and the two state
slots it models). The plan is a model's prediction, not a measurement: issue 16 asks for it to be checked
against measured peaks (within 5%).

    python benchmarks/plan_groups_7b.py
"""

from hift_engine.auto_groups import GIB, plan_groups

HIDDEN, INTER, LAYERS, VOCAB = 4096, 11008, 32, 32000
BLOCK = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN
UNITS = [VOCAB * HIDDEN] + [BLOCK] * LAYERS + [VOCAB * HIDDEN + HIDDEN]  # embedding, blocks, head (+ final norm)

# (precision, bytes per weight, fp32 state vectors incl. masters, activations at 1 x 512 in GiB: measured peak
# allocated minus weights, arena and slots, from benchmarks/results/step-nvidia_h200-20261129T083827.json)
CASES = [("fp32", 4, 2, 32.735 - 25.10 - 0.754 - 2 * 1.508), ("bf16-mixed", 2, 3, 19.734 - 12.55 - 0.377 - 2 * 2.262)]
CARDS = [("24 GB", 23.5), ("48 GB", 47.5), ("80 GB", 79.0)]
CONTEXT_GIB = 1.12  # the CUDA context pynvml counts (measured on the H200)

print(f"{'precision':<11} {'card':<6} {'k':>3}  groups (units each)")
for precision, esize, vectors, act in CASES:
    for card, cap in CARDS:
        budget = int((cap - CONTEXT_GIB) * GIB)
        try:
            plan = plan_groups(UNITS, [n * esize for n in UNITS], 0, vectors, 2, budget, int(act * GIB))
            print(f"{precision:<11} {card:<6} {len(plan.sizes):>3}  {plan.sizes}  modelled peak {plan.peak_bytes / GIB:.1f} GiB")
        except Exception as e:  # noqa: BLE001 - a card that cannot hold even one unit per group
            print(f"{precision:<11} {card:<6}   -  {str(e)[:110]}")
