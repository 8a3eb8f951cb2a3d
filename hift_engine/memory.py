"""Memory in use, for logs and progress bars."""

from __future__ import annotations

import os

import torch

__all__ = ["memory_bytes"]


def memory_bytes(device: torch.device) -> int:
    """Allocated bytes on a CUDA device; resident set size of the process on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
