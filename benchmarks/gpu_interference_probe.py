"""Does host-side allocation slow the GPU's own kernels? (The first cycle's remaining cost, docs in the README.)

The host queues several seconds of GPU work up front (bf16 matmuls and device-to-device copies, an event after
each iteration), then starts one kind of background work and waits. Since the GPU's queue is already full, the
training thread cannot be what slows it: any change in the iterations' GPU time while the background work runs
is the GPU's (or its driver's) own. Background kinds:
  none    nothing
  touch   first touch of fresh host memory from 6 threads (torch fill_ of a new tensor: the kernel zeroes pages)
  store   the native store's background allocator (touch, then pin from the pinning context) over the same bytes
  d2h     device-to-host copies into pinned memory on a side stream (the write-backs' traffic), for scale
Prints one line per kind: mean GPU ms per iteration while the background work ran and after it ended.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch


def queue_iterations(n: int, a, b, src, dst, after_first=None):
    """Events around n iterations, and the host time of the first (the GPU is idle before it, so GPU time offsets
    from that event and host time offsets from the returned origin match). ``after_first(origin)`` runs once 50
    iterations are queued: the GPU is busy from then on, since the host blocks on a full launch queue rather than
    letting it drain (at 5a10bd6 the background started only after all 700 were queued, 4.2 s in)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    events[0].record()
    origin = time.perf_counter()
    for i in range(n):
        if i == 50 and after_first is not None:
            after_first(origin)
        for _ in range(4):
            torch.mm(a, b)
        dst.copy_(src)
        events[i + 1].record()
    return events, origin


def background(kind: str, gib: float, done: threading.Event, info: dict, device, origin: float) -> None:
    t0 = time.perf_counter()
    info["start_s"] = t0 - origin
    if kind == "touch":
        torch.set_num_threads(6)
        x = torch.empty(int(gib * 2**30), dtype=torch.uint8)
        x.fill_(0)
        del x
    elif kind == "store":
        from hift_engine import _native

        per = 600 << 20  # 2.3 GiB of fp32 per group, as a 7B bf16-mixed group's state
        groups = max(1, int(gib * 2**30 // (per * 4)))
        slot = torch.empty(per, dtype=torch.float32, device=device)
        store = _native.load().PinnedStore([per] * groups, [slot], 16 << 20, list(range(groups)), True)
        store.wait_allocated()
        info["alloc"] = {k: v for k, v in store.alloc_stats().items() if k in ("touch_s", "register_s")}
        store.close()
    elif kind == "d2h":
        host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        side = torch.cuda.Stream(device)
        with torch.cuda.stream(side):
            for _ in range(int(gib)):
                host.copy_(dev, non_blocking=True)
        side.synchronize()
    info["seconds"] = time.perf_counter() - t0
    info["end_s"] = time.perf_counter() - origin
    done.set()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", default="none,touch,store,d2h,none")
    p.add_argument("--gib", type=float, default=40.0)
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--window", type=float, default=1.5, help="kind 'none': seconds from the start counted as 'during'")
    p.add_argument("--out", default="")
    args = p.parse_args()
    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    queue_iterations(20, a, b, src, dst)  # warm-up
    torch.cuda.synchronize()
    results = []
    for kind in args.kinds.split(","):
        done, info, started = threading.Event(), {}, []

        def start(origin):
            if kind != "none":
                started.append(threading.Thread(target=background, args=(kind, args.gib, done, info, dev, origin)))
                started[0].start()

        events, origin = queue_iterations(args.iters, a, b, src, dst, start)
        worker = started[0] if started else None
        torch.cuda.synchronize()
        if worker:
            worker.join()
        ms = [events[i].elapsed_time(events[i + 1]) for i in range(args.iters)]
        # 'during': iterations that ran entirely while the background work did (none: the first --window seconds)
        lo, hi = (info["start_s"], info["end_s"]) if worker else (0.0, args.window)
        t, during, after = 0.0, [], []
        for m in ms:
            if lo * 1e3 <= t and t + m <= hi * 1e3:
                during.append(m)
            elif t >= hi * 1e3:
                after.append(m)
            t += m
        row = {"kind": kind, "during_ms": sum(during) / len(during) if during else None,
               "after_ms": sum(after) / len(after) if after else None, "iters_during": len(during),
               "iters_after": len(after), "gpu_s": t / 1e3, **info}
        row["during_over_after"] = row["during_ms"] / row["after_ms"] if during and after else None
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu-interference.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
