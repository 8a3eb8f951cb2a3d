"""A compact summary of a torch.profiler chrome trace: where the compute stream waited, and on what.

The full trace of a few 7B-width steps is tens of MB; what the step benchmark needs to explain an offload
overhead fits in a few kB: per stream, busy time and copies; on the compute stream, every idle gap longer
than ``min_gap_ms`` with the work on either side of it; on the host, every CUDA runtime call that blocked
longer than ``min_call_ms``. Works on any trace exported by ``prof.export_chrome_trace``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["summarize_trace"]

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def summarize_trace(path: str | Path, min_gap_ms: float = 0.5, min_call_ms: float = 1.0, top: int = 15) -> dict[str, Any]:
    events = json.loads(Path(path).read_text())["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES and "stream" in e.get("args", {})]
    if not gpu:
        return {"error": "no GPU events in the trace"}
    t0 = min(e["ts"] for e in gpu)
    by_stream: dict[int, list[dict]] = defaultdict(list)
    for e in gpu:
        by_stream[e["args"]["stream"]].append(e)
    busy = {s: sum(e["dur"] for e in evs) for s, evs in by_stream.items()}
    kernel_time = {s: sum(e["dur"] for e in evs if e["cat"] == "kernel") for s, evs in by_stream.items()}
    compute = max(kernel_time, key=kernel_time.get)

    streams = {}
    for s, evs in sorted(by_stream.items()):
        copies = [e for e in evs if e["cat"] == "gpu_memcpy"]
        streams[str(s)] = {
            "role": "compute" if s == compute else "side",
            "busy_ms": busy[s] / 1e3,
            "kernels": sum(e["cat"] == "kernel" for e in evs),
            "copies": len(copies),
            "copy_bytes": sum(int(e["args"].get("bytes", 0)) for e in copies),
            "copy_ms": sum(e["dur"] for e in copies) / 1e3,
        }

    timeline = sorted(by_stream[compute], key=lambda e: e["ts"])
    span_ms = (max(e["ts"] + e["dur"] for e in gpu) - t0) / 1e3
    gaps = []
    for prev, nxt in zip(timeline, timeline[1:]):
        gap = (nxt["ts"] - (prev["ts"] + prev["dur"])) / 1e3
        if gap >= min_gap_ms:
            gaps.append({
                "at_ms": round((prev["ts"] + prev["dur"] - t0) / 1e3, 3), "gap_ms": round(gap, 3),
                "before": _short(prev["name"]), "after": _short(nxt["name"]), "after_cat": nxt["cat"],
            })
    compute_copies = [
        {"at_ms": round((e["ts"] - t0) / 1e3, 3), "dur_ms": round(e["dur"] / 1e3, 3), "name": e["name"],
         "bytes": int(e["args"].get("bytes", 0))}
        for e in timeline if e["cat"] == "gpu_memcpy"
    ]
    side_copies = sorted(
        ({"stream": s, "at_ms": round((e["ts"] - t0) / 1e3, 3), "dur_ms": round(e["dur"] / 1e3, 3), "name": e["name"],
          "bytes": int(e["args"].get("bytes", 0))}
         for s, evs in by_stream.items() if s != compute for e in evs if e["cat"] == "gpu_memcpy"),
        key=lambda c: c["at_ms"],
    )
    calls = sorted(
        ({"name": e["name"], "dur_ms": round(e["dur"] / 1e3, 3), "at_ms": round((e["ts"] - t0) / 1e3, 3)}
         for e in events
         if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and e.get("dur", 0) >= min_call_ms * 1e3),
        key=lambda c: -c["dur_ms"],
    )
    return {
        "span_ms": span_ms,
        "compute_stream": compute,
        "compute_busy_fraction": busy[compute] / 1e3 / span_ms if span_ms else None,
        "compute_gap_total_ms": sum(g["gap_ms"] for g in gaps),
        "streams": streams,
        "largest_compute_gaps": sorted(gaps, key=lambda g: -g["gap_ms"])[:top],
        "compute_stream_copies": compute_copies[:top],
        "side_copies": side_copies[: 4 * top],
        "blocking_runtime_calls": calls[:top],
    }
