"""``hift bench {kernels,offload,memory,step,ddp,groups,converge}``: benchmarks that print a table and write JSON to benchmarks/results/."""

from __future__ import annotations

import importlib

NAME = "bench"

# subcommand -> module in hift_engine.bench providing add_arguments(parser) and run(args)
BENCHES = {
    "kernels": "fused optimizer kernels vs torch fused/foreach AdamW vs a device copy (GB/s)",
    "offload": "state store copy bandwidth, pinned allocation speed and host bytes",
    "memory": "7B fp32 HiFT AdamW under a 48 GB cap: peak memory per group position, batch/sequence sweep",
    "step": "step time: offloaded vs resident vs official-style offload vs standard fine-tuning",
    "ddp": "data-parallel step under torchrun: tokens/s per process and in all, gradient bytes reduced, host memory per rank",
    "groups": "layers_per_group='auto' under capped cards: chosen groups, modelled vs measured peak, cycle time vs CPU-offloaded AdamW",
    "converge": "held-out loss vs steps and seconds on real text: full AdamW, CPU-offloaded AdamW, HiFT, BAdam-style (CPU or GPU)",
}


def register(sub) -> None:
    p = sub.add_parser(NAME, help="run a benchmark (GPU)", description=__doc__)
    bench_sub = p.add_subparsers(dest="bench", required=True, metavar="{" + ",".join(BENCHES) + "}")
    for name, help_text in BENCHES.items():
        module = importlib.import_module(f"hift_engine.bench.{name}")
        bp = bench_sub.add_parser(name, help=help_text, description=module.__doc__)
        bp.add_argument("--out", default="benchmarks/results", help="directory for the JSON (and plot) results")
        module.add_arguments(bp)
        bp.set_defaults(func=module.run)
