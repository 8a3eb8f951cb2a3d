"""State stores: resident (all on the device) or offloaded (pinned host + device slots, torch or native transport)."""

from __future__ import annotations

import os

import torch

from ..errors import ConfigError, HostMemoryError
from .base import StateStore, StoreStats
from .offload import TRANSPORTS, OffloadStore
from .resident import ResidentStore
from .torch_transport import TorchTransport

__all__ = ["StateStore", "StoreStats", "ResidentStore", "OffloadStore", "TorchTransport", "make_store", "available_host_bytes"]


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(numels: list[int]) -> None:
    """Refuse, before anything is allocated, an offloaded store whose state cannot fit in host memory.
    HIFT_HOST_MEMORY_CHECK=0 skips it: on virtual machines whose memory grows as it is used (memory hot-plug,
    balloons) MemAvailable at start is far below what the process can get."""
    if os.environ.get("HIFT_HOST_MEMORY_CHECK", "1") == "0":
        return
    need = 4 * sum(numels)
    have = available_host_bytes()
    if have is not None and need > have:
        raise HostMemoryError(
            f"the offloaded optimizer state needs {need / 2**30:.1f} GiB of pinned host memory for {len(numels)} "
            f"groups, but only {have / 2**30:.1f} GiB is available. Use a machine with more host memory, freeze "
            "some units (freeze=[...]), use state_dtype='bf16' (AdamW: half the moments' bytes), or keep the state on "
            "the GPU (state_store='resident') if it fits there. On a virtual machine whose memory grows on demand, "
            "HIFT_HOST_MEMORY_CHECK=0 skips this check"
        )


def make_store(kind: str, numels: list[int], device: torch.device, slots: int = 2, chunk_bytes: int = 0,
               alloc_order: list[int] | None = None, pin_context: bool = True) -> StateStore:
    """``kind``: "auto" | "resident" | "torch" | "native" (see HiFTConfig.state_store); ``chunk_bytes`` > 0
    makes the native store pace each transfer in pieces of that size (HiFTConfig.transfer_chunk_mib);
    ``pin_context``: the native store pins from a second context of the device (HiFTConfig.pin_context)."""
    device = torch.device(device)
    if kind == "auto":
        if device.type != "cuda":
            kind = "resident"  # on a CPU device, state is in host memory already
        else:
            from .. import _native

            kind = "native" if _native.available(warn=True) else "torch"
    if kind == "resident":
        return ResidentStore(numels, device)
    if kind in TRANSPORTS:
        check_host_memory(numels)
        return OffloadStore(numels, device, kind, slots, chunk_bytes, alloc_order, pin_context)
    raise ConfigError(f"unknown state_store {kind!r}; use auto, resident, torch or native")
