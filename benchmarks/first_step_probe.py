"""Where does the first step of an offloaded run wait? (The first cycle's remaining cost, README "Timing every step".)

`hift bench step` at a7686ca showed 7B bf16-mixed batch 4's whole first-cycle excess in its first step: 375-449 ms
against 137 ms for the same step of a later cycle, most of it with the host thread blocked (84-98 ms of CPU time),
and no excess in the other 33 steps. This probe runs the bench's sequence (a resident run first, which compiles
every kernel; the allocator's cache emptied; then the offloaded optimizer) and times the first step's phases on the
host (forward, backward, step: no synchronisation between them, so a phase's host time is what its calls blocked),
with how many device segments the caching allocator mapped (cudaMalloc calls) in each. Variants, in turn:
  default       as the bench runs it
  warm-cache    the caching allocator's cache kept from a first offloaded run (no cudaMalloc in the first step)
  prepin        every host buffer pinned before the first step
  piece64       HIFT_REGISTER_PIECE_MIB=64 (pinning in 64 MiB registrations)
  no-hold       HIFT_PIN_FIRST=-1: every buffer pinned from construction (the behaviour before 'default' held all but
                the first until the first update; at 88111c5 'default' was this)
A thread samples the training thread's Python stack every millisecond during the default variant's first step,
and prints where the time went. Writes first-step-probe-<device>-<time>.json to --out
(hift_engine.bench.common.write_result).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time

import torch

from hift_engine.bench.common import write_result
from hift_engine.bench.model_factory import build_llama, random_batch
from hift_engine.bench.step import _free, _hift, _loop, set_matmul_precision


def segments(dev) -> int:
    return torch.cuda.memory_stats(dev).get("segment.all.allocated", 0)


class StackSampler:
    """Samples one thread's Python stack; a gap between samples (the GIL held by a C call) is charged to the stack
    seen after it, which is still inside the Python line that made the call."""

    def __init__(self, thread_id: int, interval_s: float = 1e-3):
        self.tid, self.interval = thread_id, interval_s
        self.ms = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(self.interval)
            frame = sys._current_frames().get(self.tid)
            now = time.perf_counter()
            key = []
            while frame is not None and len(key) < 4:
                code = frame.f_code
                key.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
                frame = frame.f_back
            self.ms[" < ".join(key)] += 1e3 * (now - last)
            last = now

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed_step(model, opt, batch, dev) -> dict:
    """Host milliseconds of one step's phases and the segments the allocator mapped in each."""
    out, s0, t0 = {}, segments(dev), time.perf_counter()
    loss = model(**batch).loss
    t1, s1 = time.perf_counter(), segments(dev)
    opt.scale_loss(loss).backward()
    t2, s2 = time.perf_counter(), segments(dev)
    opt.step()
    opt.zero_grad()
    t3, s3 = time.perf_counter(), segments(dev)
    out.update(forward_ms=1e3 * (t1 - t0), backward_ms=1e3 * (t2 - t1), step_ms=1e3 * (t3 - t2),
               forward_segments=s1 - s0, backward_segments=s2 - s1, step_segments=s3 - s2)
    return out


def variant(model, name, batches, dev, sample=False, prepin=False, keep_cache=False) -> dict:
    if not keep_cache:
        _free()
    opt = _hift(model, "offload", "native", precision="bf16-mixed")
    try:
        k = opt.num_groups
        if prepin:
            opt.store.wait_allocated()
        torch.cuda.synchronize()
        if sample:
            with StackSampler(threading.get_ident()) as sampler:
                first = timed_step(model, opt, batches[0], dev)
                torch.cuda.synchronize()
        else:
            first = timed_step(model, opt, batches[0], dev)
        t0 = time.perf_counter()
        _loop(model, opt, batches[1:] + batches[:1], k - 1)
        torch.cuda.synchronize()
        rest_first = 1e3 * (time.perf_counter() - t0) / (k - 1)
        later = timed_step(model, opt, batches[0], dev)  # the same group's step one cycle later
        t0 = time.perf_counter()
        _loop(model, opt, batches[1:] + batches[:1], k - 1)
        torch.cuda.synchronize()
        rest_later = 1e3 * (time.perf_counter() - t0) / (k - 1)
        row = {"variant": name, "first_step": first, "later_step": later, "rest_of_first_cycle_ms": rest_first,
               "rest_of_later_cycle_ms": rest_later, "alloc": opt.store.alloc_stats()}
        if sample:
            row["first_step_stacks_ms"] = dict(sampler.ms.most_common(25))
        return row
    finally:
        opt.close()
        del opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dev = torch.device("cuda")
    set_matmul_precision("bf16-mixed")
    model = build_llama(args.layers, dev, dtype=torch.bfloat16)
    batches = [random_batch(args.batch, args.seq, dev, seed=s) for s in range(4)]
    opt = _hift(model, "resident", "native", precision="bf16-mixed")  # compiles every kernel, as the bench's first row
    _loop(model, opt, batches, 2 * opt.num_groups)
    torch.cuda.synchronize()
    opt.close()
    del opt
    rows = [variant(model, "default", batches, dev, sample=True)]
    rows.append(variant(model, "warm-cache", batches, dev, keep_cache=True))
    rows.append(variant(model, "prepin", batches, dev, prepin=True))
    os.environ["HIFT_REGISTER_PIECE_MIB"] = "64"
    rows.append(variant(model, "piece64", batches, dev))
    del os.environ["HIFT_REGISTER_PIECE_MIB"]
    os.environ["HIFT_PIN_FIRST"] = "-1"
    rows.append(variant(model, "no-hold", batches, dev))
    del os.environ["HIFT_PIN_FIRST"]
    rows.append(variant(model, "default-again", batches, dev))
    for r in rows:
        f, l = r["first_step"], r["later_step"]
        print(f"{r['variant']:>14}  first step fwd/bwd/step {f['forward_ms']:.0f}/{f['backward_ms']:.0f}/{f['step_ms']:.0f} ms "
              f"(segments {f['forward_segments']}/{f['backward_segments']}/{f['step_segments']})  later "
              f"{l['forward_ms']:.0f}/{l['backward_ms']:.0f}/{l['step_ms']:.0f} ms  rest of cycle "
              f"{r['rest_of_first_cycle_ms']:.1f} vs {r['rest_of_later_cycle_ms']:.1f} ms/step", flush=True)
    for key, ms in rows[0]["first_step_stacks_ms"].items():
        print(f"{ms:8.1f} ms  {key}")
    write_result(args.out, "first-step-probe", rows, args=vars(args))


if __name__ == "__main__":
    main()
