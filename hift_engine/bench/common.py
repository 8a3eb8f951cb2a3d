"""What every benchmark shares: environment capture, median timing, a printed table, and a JSON record."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["environment", "median_ms", "print_table", "write_result", "gib", "require_cuda", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


def gib(n: float) -> float:
    return n / 2**30


def require_cuda(name: str) -> torch.device:
    if not torch.cuda.is_available():
        raise SystemExit(f"hift bench {name}: needs a CUDA GPU (none visible); run it on a GPU machine")
    return torch.device("cuda", torch.cuda.current_device())  # indexed: some torch.cuda APIs insist


def commit_id() -> str:
    """HIFT_COMMIT if set (the device's git metadata can be stale), else the checkout's short hash."""
    if os.environ.get("HIFT_COMMIT"):
        return os.environ["HIFT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """Device, versions and commit: every JSON record carries these."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit_id(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": "cpu",
        "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "hift_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("HIFT_") and k != "HIFT_COMMIT"},
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        env.update(device=prop.name, device_memory_gib=round(gib(prop.total_memory), 1), sms=prop.multi_processor_count)
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            env["pcie"] = f"gen{pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h)} x{pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)}"
        except Exception as e:  # noqa: BLE001 - informative only
            env["pynvml"] = f"unavailable: {e}"
    return env


def median_ms(fn: Callable[[], Any], warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median time of ``fn`` in ms, timed with CUDA events by triton.testing.do_bench."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_result(out_dir: str | os.PathLike, name: str, rows: list[dict], summary: dict | None = None, **extra) -> Path:
    """Write {benchmark, schema, env, rows, summary} to ``out_dir/<name>-<device>-<date>.json``."""
    env = environment()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = "".join(ch if ch.isalnum() else "_" for ch in env["device"]).strip("_").lower()
    stamp = env["date"][:19].replace(":", "").replace("-", "")
    path = out / f"{name}-{device}-{stamp}.json"
    record = {"benchmark": name, "schema": SCHEMA_VERSION, "env": env, "rows": rows, "summary": summary or {}, **extra}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)
    print(f"wrote {path}", flush=True)
    return path
