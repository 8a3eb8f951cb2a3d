"""Where do the host threads spend an offloaded first cycle? (7B tf32 batch 1 missed first cycle <= 1.05x.)

At 7B tf32 batch 1 x 512 the host leads the GPU by only 0.7-6.5 ms, so the step is about as long as the host's work,
and anything that slows the host while the store allocates and pins its host buffers in the background shows in
the step. `bench step` measured the first cycle at 0.973-1.125x later ones (mean 1.069x over 7 runs) and 0.974x with
every buffer pinned first (--prepin).

This probe runs the bench's sequence (a resident run first, which compiles every kernel; the allocator's cache
emptied before each variant; then an offloaded optimizer: one first cycle, two later cycles) for several variants
in turn, and a second *process* samples the kernel-side state of the training thread and of torch's autograd
thread (which runs a CUDA backward while the training thread waits for it on a futex) from /proc every half
millisecond (a Python thread in this process would compete for the GIL it is measuring): scheduler state (R running, S
sleeping, D uninterruptible), the system call it is in, the kernel function it sleeps in (wchan) and, where
readable, the top of its kernel stack. Per variant and cycle it prints the host ms a step and where the thread's
time went, so the first cycle's extra time can be placed: waiting (a futex, the driver's ioctl, the address-space
lock: mmap/munmap or page faults in D) or running. A futex does not say whose: a thread asleep while the other
runs is waiting for it, both asleep at once is waiting for something else. The sampler takes about one core
itself, beside the CPU contention it measures; R counts time runnable but not running too.

Variants (environment settings are the store's diagnostics, docs/design.md):
  default         as the bench runs it
  prepin          every host buffer pinned before the first step
  touched-first   every host buffer first-touched before the first step, pinned during the first cycle
                  (HIFT_TOUCH_QUEUE=4096: the kernel's zeroing out of the cycle, the pinning in it)
  touch2          HIFT_TOUCH_THREADS=2 (fewer threads faulting pages in at once; fell behind on the H200)
  touch3, touch4  HIFT_TOUCH_THREADS=3, 4 (the pacing runs 4-6 for most buffers, 16 for the first)
  stages1         HIFT_ALLOC_STAGES=1 (touch, then pin, one buffer at a time)
  piece64         HIFT_REGISTER_PIECE_MIB=64 (pinning in 64 MiB registrations: shorter driver-lock holds)
  piece16         HIFT_REGISTER_PIECE_MIB=16
  no-pin-context  pin_context=False (pinned from the process's own context)
  no-thp          HIFT_HUGE_PAGES=0 (4 KiB pages: no huge-page faults, hence no direct compaction for them, but 512x
                  more faults and pages to pin)
  writer-beside   touched-first, plus a second process writing already-faulted memory at --writer-gbs (default 20,
                  the allocator's measured zeroing rate) with 4 threads at nice 19 through the first cycle only:
                  memory traffic like the zeroing's without page faults. Slowed like default: the zeroing's memory
                  traffic is what costs; not slowed: the faulting itself (the kernel's work, its locks, its IPIs)
Per cycle it also reads kernel counters (/proc/vmstat, /proc/interrupts, each thread's faults and switches)
before and after, per step: compaction, migration and TLB-flush IPIs would show there.
Writes first-cycle-wait-probe-<device>-<time>.json to --out (hift_engine.bench.common.write_result).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import threading
import time

SYSCALLS_X86_64 = {0: "read", 1: "write", 3: "close", 7: "poll", 9: "mmap", 10: "mprotect", 11: "munmap", 12: "brk",
                   16: "ioctl", 23: "select", 24: "sched_yield", 25: "mremap", 28: "madvise", 35: "nanosleep",
                   202: "futex", 228: "clock_gettime", 230: "clock_nanosleep", 232: "epoll_wait", 271: "ppoll",
                   281: "epoll_pwait", 257: "openat", 4: "stat", 5: "fstat", 262: "newfstatat", 186: "gettid",
                   39: "getpid", 14: "rt_sigprocmask", 13: "rt_sigaction", 318: "getrandom", 56: "clone",
                   435: "clone3", 60: "exit", 72: "fcntl", 20: "writev", 17: "pread64", 18: "pwrite64"}

# name: (environment, optimizer overrides, what is done before the first cycle: "" nothing, "pinned" every buffer
# pinned, "touched" every buffer first-touched while pinning is held)
VARIANTS = {
    "default": ({}, {}, ""),
    "prepin": ({}, {}, "pinned"),
    "touched-first": ({"HIFT_TOUCH_QUEUE": "4096"}, {}, "touched"),
    "touch2": ({"HIFT_TOUCH_THREADS": "2"}, {}, ""),
    "touch3": ({"HIFT_TOUCH_THREADS": "3"}, {}, ""),
    "touch4": ({"HIFT_TOUCH_THREADS": "4"}, {}, ""),
    "stages1": ({"HIFT_ALLOC_STAGES": "1"}, {}, ""),
    "piece64": ({"HIFT_REGISTER_PIECE_MIB": "64"}, {}, ""),
    "piece16": ({"HIFT_REGISTER_PIECE_MIB": "16"}, {}, ""),
    "no-pin-context": ({}, {"pin_context": False}, ""),
    "no-thp": ({"HIFT_HUGE_PAGES": "0"}, {}, ""),
    "writer-beside": ({"HIFT_TOUCH_QUEUE": "4096"}, {}, "touched+writer"),
}


# ----------------------------------------------------------------------------------------------- the sampler process
def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _stat_fields(path: str) -> list:
    """The fields of a /proc stat file after the command name (proc(5) field 3 onward: state first), [] if gone."""
    stat = _read(path)
    return stat[stat.rindex(")") + 2:].split() if stat else []


def _stop_on_stdin_close() -> threading.Event:
    """An event set once the parent closes this child process's stdin (how the parent stops it)."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    return stop


def _state(base: str, names: dict):
    """(state, syscall, wchan, kernel stack top) of one thread, or None once it has exited."""
    fields = _stat_fields(f"{base}/stat")
    if not fields:
        return None
    state = fields[0]
    sc = _read(f"{base}/syscall").split()
    if not sc:
        call = "unknown"  # unreadable (ptrace restrictions): not evidence of running
    elif sc[0] == "running":
        call = "running"
    elif sc[0] == "-1":
        call = "no-syscall"  # in the kernel but not in a system call: a page fault or an interrupt
    else:
        call = names.get(int(sc[0]), f"sys{sc[0]}")
    wchan = _read(f"{base}/wchan").strip() or "-"
    top = ""
    if state != "R":
        frames = [line.split("] ", 1)[-1].split("+")[0] for line in _read(f"{base}/stack").splitlines()]
        top = " < ".join(frames[:4])
    return state, call, wchan, top


def sample(pid: int, tid: int, out_path: str, interval_s: float) -> None:
    """Runs in its own process until stdin closes: records (monotonic time, thread, state, syscall, wchan, stack
    top) for the training thread and torch's autograd threads (a CUDA backward runs on the device's autograd
    thread while the training thread waits for it on a futex)."""
    names = SYSCALLS_X86_64 if platform.machine() == "x86_64" else {}
    records, stop = [], _stop_on_stdin_close()
    threads, found_at = {"main": f"/proc/{pid}/task/{tid}"}, 0.0
    while not stop.is_set():
        t = time.monotonic()
        if t - found_at > 0.1:  # torch starts its autograd threads at the first backward
            found_at = t
            for task in os.listdir(f"/proc/{pid}/task"):
                comm = _read(f"/proc/{pid}/task/{task}/comm").strip()
                if "autograd" in comm:
                    threads.setdefault(f"{comm}", f"/proc/{pid}/task/{task}")
        for role, base in list(threads.items()):
            got = _state(base, names)
            if got is None:
                if role == "main":
                    stop.set()
                threads.pop(role)
                continue
            records.append((t, role) + got)
        time.sleep(interval_s)
    with open(out_path, "w") as fh:
        json.dump(records, fh)


def write_memory(gbs: float, threads: int) -> None:
    """Runs in its own process until stdin closes: writes a 4 GiB buffer, faulted in first, over and over at `gbs`
    GB/s (256 MiB at a time, sleeping to hold the rate) with `threads` threads at nice 19, as the allocator's
    touch threads run; prints the rate it reached."""
    import torch

    os.nice(19)
    torch.set_num_threads(threads)
    stop = _stop_on_stdin_close()
    buf = torch.empty(4 << 30, dtype=torch.uint8)
    buf.fill_(0)
    chunk, off, written, value = 256 << 20, 0, 0, 1
    print("writer ready", flush=True)
    t0, cpu0 = time.monotonic(), time.process_time()
    while not stop.is_set():
        buf[off:off + chunk].fill_(value)
        written += chunk
        off = (off + chunk) % buf.numel()
        value = value % 255 + 1
        ahead = written / (gbs * 1e9) - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    print(f"writer: {written / 1e9:.1f} GB in {time.monotonic() - t0:.2f} s, {time.process_time() - cpu0:.2f} CPU-s",
          flush=True)


class Writer:
    def __init__(self, gbs: float):
        self.proc = subprocess.Popen([sys.executable, __file__, "--write", str(gbs)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        timer = threading.Timer(120, self.proc.kill)  # a child stuck before "ready" must not hang the probe
        timer.start()
        ready = self.proc.stdout.readline()
        timer.cancel()
        if "ready" not in ready:
            raise RuntimeError(f"the writer process did not start: {ready!r}")

    def stop(self) -> str:
        self.proc.stdin.close()
        out = self.proc.stdout.read().strip()
        self.proc.wait(timeout=60)
        return out


class Sampler:
    def __init__(self, out_path: str, interval_s: float):
        self.out_path = out_path
        self.proc = subprocess.Popen([sys.executable, __file__, "--sample", str(os.getpid()), str(threading.get_native_id()),
                                      out_path, str(interval_s)], stdin=subprocess.PIPE)

    def stop(self) -> list:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        with open(self.out_path) as fh:
            return json.load(fh)


def where(records: list, t0: float, t1: float, interval_s: float) -> dict:
    """Milliseconds in [t0, t1) per thread by (state, syscall, wchan) and by kernel stack top; each sample weighs
    the time to the thread's next sample (at most four intervals: a gap is the sampler's, not the thread's)."""
    by_call, by_stack, last = collections.Counter(), collections.Counter(), {}
    for rec in records:
        t, role = rec[0], rec[1]
        prev = last.get(role)
        last[role] = rec
        if prev is None or prev[0] < t0 or prev[0] >= t1:
            continue
        _, _, state, call, wchan, top = prev
        ms = 1e3 * min(min(t, t1) - prev[0], 4 * interval_s)
        by_call[f"{role}: {state} {call} {wchan}"] += ms
        if top:
            by_stack[f"{role}: {top}"] += ms
    return {"by_state_call_wchan_ms": dict(by_call.most_common(16)), "by_kernel_stack_ms": dict(by_stack.most_common(10))}


# ------------------------------------------------------------------------------------------------- kernel counters
# Whole-machine counters that would show the kernel working against the training threads while the allocator
# faults pages in: huge pages taken or missed, direct compaction and page migration (which unmaps pages and flushes
# the TLBs of every CPU the process runs on), reclaim, and the IPIs that do such flushes (TLB, CAL) or wake threads.
VMSTAT_KEYS = ("pgfault", "thp_fault_alloc", "thp_fault_fallback", "compact_stall", "compact_migrate_scanned",
               "pgmigrate_success", "pgsteal_direct", "allocstall_normal", "numa_hint_faults", "nr_tlb_remote_flush",
               "nr_tlb_remote_flush_received")
IRQ_ROWS = ("TLB", "CAL", "RES", "LOC")


def kernel_counters(pid: int) -> dict:
    """The counters above, each thread's minor faults and involuntary switches, and its user/system CPU ticks."""
    out = {}
    for line in _read("/proc/vmstat").splitlines():
        name, _, value = line.partition(" ")
        if name in VMSTAT_KEYS:
            out[name] = int(value)
    for line in _read("/proc/interrupts").splitlines():
        name, _, rest = line.strip().partition(":")
        if name in IRQ_ROWS:
            out[f"irq_{name}"] = sum(int(x) for x in rest.split() if x.isdigit())
    fields = _stat_fields(f"/proc/{pid}/stat")  # the whole process: every thread's CPU, the allocator's among them
    if fields:
        out["process_utime"], out["process_stime"] = int(fields[11]), int(fields[12])
    for task in os.listdir(f"/proc/{pid}/task"):
        comm = _read(f"/proc/{pid}/task/{task}/comm").strip()
        role = "main" if int(task) == threading.get_native_id() else f"{comm}_{task}" if "autograd" in comm else None
        fields = _stat_fields(f"/proc/{pid}/task/{task}/stat") if role else []
        if not fields:
            continue
        out[f"{role}_minflt"], out[f"{role}_utime"], out[f"{role}_stime"] = int(fields[7]), int(fields[11]), int(fields[12])
        for line in _read(f"/proc/{pid}/task/{task}/status").splitlines():
            if line.startswith("nonvoluntary_ctxt_switches"):
                out[f"{role}_nvcsw"] = int(line.split()[1])
    return out


def per_step(before: dict, after: dict, steps: int) -> dict:
    """Each counter's change per step, and other_threads_ticks: the CPU ticks of every thread but the training and
    autograd threads (the allocator's, the copy pacers'), the process's total less theirs."""
    out = {k: (after[k] - before[k]) / steps for k in after if k in before}
    training = sum(v for k, v in out.items() if k.endswith(("_utime", "_stime")) and not k.startswith("process"))
    out["other_threads_ticks"] = out.get("process_utime", 0) + out.get("process_stime", 0) - training
    return out


# ----------------------------------------------------------------------------------------------- the training side
def run_cycle(model, opt, batches, steps) -> dict:
    import torch
    from hift_engine.bench.step import _loop

    torch.cuda.synchronize()
    counters0 = kernel_counters(os.getpid())
    t0 = time.monotonic()
    cpu0 = time.thread_time()
    _loop(model, opt, batches, steps)
    host_s = time.monotonic() - t0
    torch.cuda.synchronize()
    t1 = time.monotonic()
    counters = per_step(counters0, kernel_counters(os.getpid()), steps)
    return {"t0": t0, "t1": t1, "ms_per_step": 1e3 * (t1 - t0) / steps, "host_ms_per_step": 1e3 * host_s / steps,
            "cpu_ms_per_step": 1e3 * (time.thread_time() - cpu0) / steps, "kernel_counters_per_step": counters}


def variant(model, name, batches, precision, writer_gbs=20.0) -> dict:
    import torch
    from hift_engine.bench.step import _free, _hift

    env, overrides, before = VARIANTS[name]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _free()
        opt = _hift(model, "offload", "native", precision=precision, **overrides)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        k = opt.num_groups
        if before == "pinned":
            opt.wait_host_memory()
        elif before.startswith("touched"):  # the two-stage allocator records each buffer's touch threads once touched
            deadline = time.monotonic() + 120
            while len(opt.store.alloc_stats()["touch_threads"]) < k and time.monotonic() < deadline:
                time.sleep(0.01)
            touched = len(opt.store.alloc_stats()["touch_threads"])
            if touched < k:
                print(f"{name}: only {touched} of {k} buffers touched before the first cycle", flush=True)
        writer = Writer(writer_gbs) if before.endswith("+writer") else None
        try:
            first = run_cycle(model, opt, batches, k)
        finally:
            wrote = writer.stop() if writer else None
        if wrote:
            print(f"{name}: {wrote} (first cycle {first['t1'] - first['t0']:.2f} s)", flush=True)
        later = run_cycle(model, opt, batches, 2 * k)  # two later cycles: their steps vary by several percent
        return {"variant": name, "first": first, "later": later, "first_over_later": first["ms_per_step"] / later["ms_per_step"],
                "alloc": opt.store.alloc_stats(), "writer": wrote}
    finally:
        opt.close()
        del opt
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="tf32")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--interval-ms", type=float, default=0.5)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--writer-gbs", type=float, default=20.0)
    ap.add_argument("--sample", nargs=4, metavar=("PID", "TID", "OUT", "INTERVAL_S"), help=argparse.SUPPRESS)
    ap.add_argument("--write", type=float, metavar="GBS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        write_memory(args.write, 4)
        return
    if args.sample:
        pid, tid, out, interval = args.sample
        sample(int(pid), int(tid), out, float(interval))
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    import torch
    from hift_engine.bench.common import write_result
    from hift_engine.bench.model_factory import build_llama, random_batch
    from hift_engine.bench.step import _hift, _loop, model_dtype, set_matmul_precision

    dev = torch.device("cuda")
    set_matmul_precision(args.precision)
    model = build_llama(args.layers, dev, dtype=model_dtype(args.precision))
    batches = [random_batch(args.batch, args.seq, dev, seed=s) for s in range(4)]
    opt = _hift(model, "resident", "native", precision=args.precision)  # compiles every kernel, as the bench's first row
    _loop(model, opt, batches, 2 * opt.num_groups)
    torch.cuda.synchronize()
    opt.close()
    del opt

    stamp = time.strftime("%Y%m%dT%H%M%S")
    sampler = Sampler(os.path.join("/tmp", f"wait-samples-{stamp}.json"), args.interval_ms / 1e3)
    rows = []
    try:
        for r in range(args.rounds):
            for name in names:
                row = variant(model, name, batches, args.precision, args.writer_gbs)
                row["round"] = r
                rows.append(row)
                print(f"{name:>15} round {r}: first {row['first']['ms_per_step']:.1f} ms/step (host {row['first']['host_ms_per_step']:.1f}, "
                      f"cpu {row['first']['cpu_ms_per_step']:.1f}), later {row['later']['ms_per_step']:.1f} "
                      f"(cpu {row['later']['cpu_ms_per_step']:.1f}): {row['first_over_later']:.3f}x", flush=True)
    finally:
        records = sampler.stop()
    print(f"{len(records)} samples of the training thread")
    for row in rows:
        for cycle in ("first", "later"):
            row[cycle]["where"] = where(records, row[cycle]["t0"], row[cycle]["t1"], args.interval_ms / 1e3)
    for row in rows:
        print(f"\n=== {row['variant']} round {row['round']}: {row['first_over_later']:.3f}x")
        for cycle in ("first", "later"):
            w = row[cycle]["where"]
            print(f"  {cycle} cycle ({row[cycle]['ms_per_step']:.1f} ms/step), ms in the cycle by state/syscall/wchan:")
            for key, ms in w["by_state_call_wchan_ms"].items():
                print(f"    {ms:8.1f}  {key}")
            for key, ms in w["by_kernel_stack_ms"].items():
                print(f"    {ms:8.1f}  stack: {key}")
        first_c, later_c = row["first"]["kernel_counters_per_step"], row["later"]["kernel_counters_per_step"]
        print("  kernel counters a step, first / later cycle (ticks are 10 ms):")
        for key in first_c:
            if first_c[key] or later_c.get(key):
                print(f"    {key:>32}: {first_c[key]:12.1f} / {later_c.get(key, 0.0):12.1f}")
    write_result(args.out, "first-cycle-wait-probe", rows, args=vars(args))


if __name__ == "__main__":
    main()
