"""Per-step timings of a training loop on the GPU and on the host, to tell where a slow cycle's time went.

Each step is bracketed by two CUDA events on the current stream and by host clocks. After a device sync,
``summary()`` says, per step of a window:
  gpu_ms        the compute stream from the step's first queued work to its last (waits on the store's
                copies inside the step count here)
  gpu_idle_ms   the compute stream idle between the previous step's end and this step's start (the host was late;
                0 for a window's first step)
  host_ms       wall time of the step on the training thread; host_cpu_ms: CPU time the thread got in it
  host_lead_ms  how far the GPU was behind the host when the host began the step (near 0: the host is the
                bottleneck; large: the GPU is; a window's first step, after a sync, starts near 0)
  nivcsw        involuntary context switches of the training thread (it was preempted)
and, for a store that times its copies (the native one), the host-to-device and device-to-host copies that
ran in the window: their mean time on the GPU and rate.
"""

from __future__ import annotations

import resource
import time

import torch

_RUSAGE = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


class StepTimer:
    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.steps: list[dict] = []
        self._origin: torch.cuda.Event | None = None
        self._origin_host = 0.0

    def start(self) -> None:
        """Call with the device idle (after a synchronize): host and GPU clocks are aligned here."""
        self._origin = torch.cuda.Event(enable_timing=True)
        self._origin.record(torch.cuda.current_stream(self.device))
        self._origin_host = time.perf_counter()

    def _mark(self, end: str) -> dict:
        """An event on the device's current stream and the host clocks now, keyed e0/t0/c0/sw0 (or ...1)."""
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        switches = resource.getrusage(_RUSAGE).ru_nivcsw
        return {f"e{end}": event, f"t{end}": time.perf_counter(), f"c{end}": time.thread_time(), f"sw{end}": switches}

    def begin(self) -> None:
        self.steps.append(self._mark("0"))

    def end(self) -> None:
        self.steps[-1].update(self._mark("1"))

    def summary(self, first: int, stop: int) -> dict:
        """Means over steps [first, stop) (synchronize the device first), and the per-step lists."""
        if self._origin is None:
            raise RuntimeError("StepTimer.summary: start() was not called")
        rows = []
        for i in range(first, stop):
            s = self.steps[i]
            gpu_start = self._origin.elapsed_time(s["e0"])
            rows.append({
                "gpu_ms": s["e0"].elapsed_time(s["e1"]),
                # from the window's first step on: the gap before it is the caller's (a sync between windows)
                "gpu_idle_ms": self.steps[i - 1]["e1"].elapsed_time(s["e0"]) if i > first else 0.0,
                "host_ms": 1e3 * (s["t1"] - s["t0"]),
                "host_cpu_ms": 1e3 * (s["c1"] - s["c0"]),
                "host_lead_ms": gpu_start - 1e3 * (s["t0"] - self._origin_host),
                "nivcsw": s["sw1"] - s["sw0"],
            })
        out = {f"mean_{key}": sum(r[key] for r in rows) / len(rows) for key in rows[0]} if rows else {}
        out["per_step"] = {key: [round(r[key], 3) for r in rows] for key in (rows[0] if rows else {})}
        return out


def copy_summary(times: list, first: int, stop: int) -> dict:
    """Mean GPU time and rate of copies [first, stop) of one direction, from the native store's copy_times()."""
    window = times[first:stop]
    if not window:
        return {"copies": 0}
    ms = [t for t, _ in window]
    nbytes = sum(b for _, b in window)
    return {"copies": len(window), "mean_ms": sum(ms) / len(ms), "max_ms": max(ms),
            "GBps": nbytes / (sum(ms) / 1e3) / 1e9 if sum(ms) > 0 else None, "per_copy_ms": [round(t, 3) for t in ms]}
