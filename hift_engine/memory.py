"""Memory in use (for logs and progress bars) and what a process may use of its device."""

from __future__ import annotations

import os

import torch

__all__ = ["memory_bytes", "device_budget_bytes", "other_device_bytes"]


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


def device_budget_bytes(device: torch.device) -> int:
    """What this process may use of its CUDA device now: its memory fraction of the card, or the free memory
    plus what torch has reserved, whichever is smaller (the default of memory_budget_gib)."""
    free, total = torch.cuda.mem_get_info(device)
    return min(int(total * torch.cuda.get_per_process_memory_fraction(device)), free + torch.cuda.memory_reserved(device))


def other_device_bytes(model: torch.nn.Module, device: torch.device, allocated: int) -> int:
    """Of ``allocated`` bytes on ``device``, those not held by ``model``'s own parameters and buffers: another
    model, a cached batch, a reference copy of the weights. A plan sized from the device's budget must leave
    them room, or it overflows the card it was sized for."""
    own = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if t.device == device)
    return max(0, allocated - own)
