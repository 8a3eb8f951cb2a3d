"""Why is the offloaded step slower than the resident one? One run, one model, several variants.

    python benchmarks/diagnose_offload.py --layers 8 --out DIR

Each variant is timed over whole cycles like `hift bench step` (same code) and, with --profile, traced for one
cycle; the trace summary (compute-stream gaps and what followed them, copies per stream, blocking runtime
calls) lands in DIR/diagnose-*.json. Variants separate the suspects: the transport (native vs torch), and
whether transfers are paced, in which piece size and with how many pieces in flight (HIFT_PACE_DEPTH, a
diagnostic setting the native store reads when it is built). What past runs found: docs/design.md, "Paced
transfers".
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

import torch

from hift_engine.bench.common import print_table, write_result
from hift_engine.bench.model_factory import build_llama
from hift_engine.bench.step import _measure

VARIANTS = {  # name: (mode, store, transfer_chunk_mib, pieces in flight (HIFT_PACE_DEPTH), optimizer overrides)
    "resident": ("resident", "native", None, 1, {}),
    "paced8": ("offload", "native", 8, 1, {}),
    "paced16": ("offload", "native", 16, 1, {}),
    "paced32": ("offload", "native", 32, 1, {}),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--trace-dir", default=None, help="where the gzipped traces go (default: --out)")
    args = p.parse_args()
    dev = torch.device("cuda")
    model = build_llama(args.layers, dev)
    rows = []
    for name in args.variants.split(","):
        mode, store, chunk, depth, overrides = VARIANTS[name]
        os.environ["HIFT_PACE_DEPTH"] = str(depth)
        ns = SimpleNamespace(batch=args.batch, seq=args.seq, store=store)
        row = _measure(model, mode, ns, dev, args.cycles, profile_dir=(args.trace_dir or args.out) if args.profile else None,
                       chunk_mib=chunk, label=name, **overrides)
        row["layers"] = args.layers
        rows.append(row)
        brief = {k: v for k, v in row.items() if k != "trace_summary"}
        gaps = row.get("trace_summary", {}).get("compute_gap_total_ms")
        print(brief, "compute gaps (ms):", gaps, flush=True)
    print_table(rows, ["mode", "step_ms", "peak_reserved_gib", "pcie_gib_per_step", "pcie_avg_GBps"],
                title=f"offload diagnosis, {args.layers} layers, batch {args.batch} x {args.seq}")
    write_result(args.out, "diagnose", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
