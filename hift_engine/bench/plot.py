"""Plots for benchmark JSON (matplotlib, headless). ``python -m hift_engine.bench.plot results.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["plot_memory"]


def plot_memory(json_path: str | Path) -> Path:
    """Memory by group position, one line per run (batch size / sequence), with the cap; PNG beside the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    runs: dict[str, dict[int, tuple[float, float]]] = {}
    for r in data["rows"]:
        if r["run"].startswith("batch"):
            series = runs.setdefault(r["run"], {})
            alloc, reserved = series.get(r["group"], (0.0, 0.0))
            series[r["group"]] = (max(alloc, r["peak_allocated_gib"]), max(reserved, r["peak_reserved_gib"]))
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, series in runs.items():
        xs = sorted(series)
        line = ax.plot(xs, [series[x][0] for x in xs], marker=".", label=f"{name} allocated")[0]
        ax.plot(xs, [series[x][1] for x in xs], linestyle=":", color=line.get_color(), label=f"{name} reserved")
    cap = data["summary"].get("cap", {}).get("cap_gib")
    if cap:
        ax.axhline(cap, color="red", linestyle="--", label=f"cap {cap} GiB (48 GB card)")
    env = data["env"]
    ax.set_xlabel("group position (0 = embedding, 1..32 = blocks, last = head)")
    ax.set_ylabel("peak GiB per step (solid: allocated, dotted: reserved)")
    ax.text(0.99, 0.02, "runs with the same tokens per step (e.g. 4x512 and 1x2048) overlap", transform=ax.transAxes,
            ha="right", fontsize=7, color="gray")
    ax.set_title(f"HiFT AdamW fp32, {data['summary'].get('params', 0) / 1e9:.2f} B params — {env.get('device')}, torch {env.get('torch')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    out = json_path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(plot_memory(arg))
