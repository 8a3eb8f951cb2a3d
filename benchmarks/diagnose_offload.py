"""Why is the offloaded step slower than the resident one? One run, one model, several variants.

    python benchmarks/diagnose_offload.py --layers 8 --out DIR

Each variant is timed over whole cycles like `hift bench step` (same code) and, with --profile, traced for one
cycle; the trace summary (compute-stream gaps and what followed them, copies per stream, blocking runtime
calls) lands in DIR/diagnose-*.json. Variants separate the suspects: the transport (native vs torch), and
whether transfers are paced and in which piece size (a small copy on the compute stream queues behind a whole
group's copy on the same copy engine). The first run (5f37288, H100) showed 29 ms compute-stream gaps before
a 1-byte device-to-host copy each step while a write-back ran, with or without the non-finite flag copy, and
with transfers split into pieces that were all submitted at once. The second (4da4456): pieces fed by a
worker with two in flight fixed it at 4 MiB (1.02x) but not at 16 or 64 MiB (1.31x, 1.38x). The third
(571b0e6): one piece in flight, waited for by sleeping then polling: 16 and 32 MiB hid the transfers (1.03x,
1.02x); 8 MiB, and 4 MiB with two in flight, did not (1.45x): the sleep estimate grew with every late
wake-up and slowed the link (the offload benchmark showed 61-65% of raw at 16 MiB). Estimator fixed next.
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
