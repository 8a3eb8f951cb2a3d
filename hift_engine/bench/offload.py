"""State-store transfer bandwidth, pinned allocation speed and host bytes, for one LLaMA-2-7B block's AdamW
state (2 x 202,383,360 fp32 = 1.51 GiB), all in one run:

  native        our C++ store: fetch (host->device), write-back (device->host), both at once (two slots)
  torch-store   the same policy over the pure-torch transport
  raw-pinned    plain non-blocking copies between torch pinned memory and the device, one stream per direction
                (the ceiling a store can reach)
  pageable-sync per-parameter synchronous .to() copies from/to pageable memory (how the official HiFT code
                moves state)
Allocation: seconds per GiB to get pinned host memory (ours: mmap with huge pages + threaded first touch + cudaHostRegister;
ours with cudaHostAlloc; torch pin_memory=True) and host bytes reserved per byte asked for.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time

import torch

from .common import gib, print_table, require_cuda, write_result

BLOCK_PARAMS = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # 202,383,360
BLOCK_STATE = 2 * BLOCK_PARAMS  # exp_avg + exp_avg_sq
PARAM_SHAPES = [4096 * 4096] * 4 + [4096 * 11008] * 3 + [4096] * 2


def add_arguments(p) -> None:
    p.add_argument("--reps", type=int, default=8, help="timed repetitions per measurement (median reported)")
    p.add_argument("--alloc-gib", type=float, default=8.0, help="size of the pinned-allocation test")
    p.add_argument("--skip-pageable", action="store_true", help="skip the slow pageable synchronous baseline")
    p.add_argument("--chunk-mib", type=int, default=None,
                   help="pacing piece size of the 'native' row (default: the engine's transfer_chunk_mib); "
                        "a 'native-unpaced' row is always measured too")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _median_s(fn, reps: int) -> float:
    fn()  # warm-up (first-touch, lazy allocation)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _store_rows(kind: str, reps: int, dev, chunk_mib: int = 0, label: str | None = None) -> list[dict]:
    from ..store import OffloadStore

    # Two groups of one block's state each; the policy's slots are what the engine uses.
    store = OffloadStore([BLOCK_STATE, BLOCK_STATE], dev, kind, num_slots=2, chunk_bytes=chunk_mib << 20)
    t = store.transport
    for gid, s in ((0, 0), (1, 1)):  # allocate + fill host buffers, and place group gid in slot s
        t.host(gid).uniform_()
        store.slots[s].uniform_()

    def h2d():
        t.fetch(0, 0)
        t.synchronize()

    def d2h():
        t.mark_compute_done(1)
        t.writeback(1, 1)
        t.synchronize()

    def both():
        t.mark_compute_done(1)
        t.writeback(1, 1)
        t.fetch(0, 0)
        t.synchronize()

    nbytes = BLOCK_STATE * 4
    label = label or kind
    rows = [
        {"provider": label, "direction": "h2d", "seconds": _median_s(h2d, reps), "bytes": nbytes},
        {"provider": label, "direction": "d2h", "seconds": _median_s(d2h, reps), "bytes": nbytes},
        {"provider": label, "direction": "both", "seconds": _median_s(both, reps), "bytes": 2 * nbytes},
    ]
    if kind == "native":
        for r in rows:
            r["chunk_mib"] = chunk_mib
    # bit-exactness of a round trip through the store
    store.slots[1].copy_(t.host(0).to(dev, non_blocking=False))
    t.mark_compute_done(1)
    t.writeback(1, 1)
    t.synchronize()
    assert torch.equal(t.host(1), t.host(0)), f"{kind}: round trip not bit-exact"
    store.close()
    return rows


def _raw_rows(reps: int, dev) -> list[dict]:
    host_a = torch.empty(BLOCK_STATE, dtype=torch.float32, pin_memory=True).uniform_()
    host_b = torch.empty(BLOCK_STATE, dtype=torch.float32, pin_memory=True)
    dev_a = torch.empty(BLOCK_STATE, dtype=torch.float32, device=dev)
    dev_b = torch.empty(BLOCK_STATE, dtype=torch.float32, device=dev).uniform_()
    s_in, s_out = torch.cuda.Stream(dev), torch.cuda.Stream(dev)

    def h2d():
        with torch.cuda.stream(s_in):
            dev_a.copy_(host_a, non_blocking=True)
        s_in.synchronize()

    def d2h():
        with torch.cuda.stream(s_out):
            host_b.copy_(dev_b, non_blocking=True)
        s_out.synchronize()

    def both():
        with torch.cuda.stream(s_in):
            dev_a.copy_(host_a, non_blocking=True)
        with torch.cuda.stream(s_out):
            host_b.copy_(dev_b, non_blocking=True)
        s_in.synchronize()
        s_out.synchronize()

    nbytes = BLOCK_STATE * 4
    rows = [
        {"provider": "raw-pinned", "direction": "h2d", "seconds": _median_s(h2d, reps), "bytes": nbytes},
        {"provider": "raw-pinned", "direction": "d2h", "seconds": _median_s(d2h, reps), "bytes": nbytes},
        {"provider": "raw-pinned", "direction": "both", "seconds": _median_s(both, reps), "bytes": 2 * nbytes},
    ]
    return rows


def _pageable_rows(reps: int, dev) -> list[dict]:
    dev_state = [torch.empty(n, device=dev).uniform_() for n in PARAM_SHAPES for _ in range(2)]
    host_state = [t.cpu() for t in dev_state]  # pageable

    def d2h():
        for t in dev_state:
            t.to("cpu")

    def h2d():
        for t in host_state:
            t.to(dev)
        torch.cuda.synchronize()

    nbytes = BLOCK_STATE * 4
    rows = [
        {"provider": "pageable-sync", "direction": "h2d", "seconds": _median_s(h2d, max(2, reps // 2)), "bytes": nbytes},
        {"provider": "pageable-sync", "direction": "d2h", "seconds": _median_s(d2h, max(2, reps // 2)), "bytes": nbytes},
    ]
    return rows


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _alloc_rows(size_gib: float, dev) -> list[dict]:
    from .. import _native

    rows = []
    n = int(size_gib * 2**30) // 4
    mod = _native.load()
    for mode in ("register", "hostalloc"):
        slot = torch.empty(n, device=dev)  # the store wants a slot as large as its largest group
        # diagnostic settings, read when a store is built; no background thread, so host(0) below allocates on
        # this thread (with every core), and the time is the allocation's, not a race with that thread
        with _env("HIFT_ALLOC_MODE", mode), _env("HIFT_BACKGROUND_ALLOC", "0"):
            store = mod.PinnedStore([n], [slot])
        rss0 = _rss_bytes()
        t0 = time.perf_counter()
        view = store.host(0)
        seconds = time.perf_counter() - t0
        rows.append({
            "allocator": f"native-{mode}", "requested_gib": gib(n * 4), "seconds": seconds,
            "s_per_gib": seconds / gib(n * 4), "reserved_per_requested": store.host_bytes / (n * 4),
            "rss_growth_per_requested": (_rss_bytes() - rss0) / (n * 4), "pinned": view.is_pinned(),
        })
        del view
        store.close()
        del store, slot
        gc.collect()
        torch.cuda.empty_cache()
    for request_gib in (size_gib, size_gib + 1.0):  # torch's caching host allocator rounds to powers of two
        m = int(request_gib * 2**30) // 4
        rss0 = _rss_bytes()
        t0 = time.perf_counter()
        buf = torch.empty(m, dtype=torch.float32, pin_memory=True)
        seconds = time.perf_counter() - t0
        row = {
            "allocator": "torch-pin_memory", "requested_gib": gib(m * 4), "seconds": seconds,
            "s_per_gib": seconds / gib(m * 4), "rss_growth_per_requested": (_rss_bytes() - rss0) / (m * 4),
            "pinned": buf.is_pinned(),
        }
        stats = getattr(torch.cuda, "host_memory_stats", None)
        if stats is not None:
            try:
                s = stats()
                reserved = s.get("reserved_bytes.current", s.get("allocated_bytes.current"))
                if reserved:
                    row["reserved_per_requested"] = reserved / (m * 4)
            except Exception:  # noqa: BLE001 - informative only
                pass
        rows.append(row)
        del buf
        gc.collect()
        torch.cuda.synchronize()
        empty = getattr(torch._C, "_host_emptyCache", None)
        if empty is not None:
            empty()
    return rows


def run(args) -> int:
    dev = require_cuda("offload")
    from ..config import HiFTConfig

    chunk = HiFTConfig.transfer_chunk_mib if args.chunk_mib is None else args.chunk_mib
    rows = _raw_rows(args.reps, dev)
    rows += _store_rows("native", args.reps, dev, chunk)  # paced, as the engine runs it
    rows += _store_rows("native", args.reps, dev, 0, label="native-unpaced")
    rows += _store_rows("torch", args.reps, dev)
    if not args.skip_pageable:
        rows += _pageable_rows(args.reps, dev)
    for r in rows:
        if r.get("provider") == "torch":
            r["provider"] = "torch-store"
        r["GB/s"] = r["bytes"] / r["seconds"] / 1e9
    raw = {r["direction"]: r["GB/s"] for r in rows if r["provider"] == "raw-pinned"}
    for r in rows:
        if r["direction"] in raw:
            r["of_raw"] = r["GB/s"] / raw[r["direction"]]
    print_table(rows, ["provider", "direction", "bytes", "seconds", "GB/s", "of_raw"],
                title=f"hift bench offload: one LLaMA-2-7B block's AdamW state ({gib(BLOCK_STATE * 4):.2f} GiB)")
    alloc = _alloc_rows(args.alloc_gib, dev)
    print_table(alloc, ["allocator", "requested_gib", "seconds", "s_per_gib", "reserved_per_requested", "rss_growth_per_requested", "pinned"],
                title="pinned host allocation")
    native = {r["direction"]: r.get("of_raw") for r in rows if r["provider"] == "native"}
    summary = {
        "native_chunk_mib": chunk,
        "native_of_raw": native,
        "native_register_s_per_gib": next(r["s_per_gib"] for r in alloc if r["allocator"] == "native-register"),
        "native_host_bytes_per_state_byte": next(r["reserved_per_requested"] for r in alloc if r["allocator"] == "native-register"),
    }
    write_result(args.out, "offload", rows, summary, allocation=alloc, state_bytes=BLOCK_STATE * 4)
    return 0
