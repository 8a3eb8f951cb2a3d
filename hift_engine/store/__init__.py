"""State stores: resident (all on the device) or offloaded (pinned host + device slots, torch or native transport)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import StateStore, StoreStats
from .offload import OffloadStore
from .resident import ResidentStore
from .torch_transport import TorchTransport

__all__ = ["StateStore", "StoreStats", "ResidentStore", "OffloadStore", "TorchTransport", "make_store"]


def make_store(kind: str, numels: list[int], device: torch.device, slots: int = 2, chunk_bytes: int = 0) -> StateStore:
    """``kind``: "auto" | "resident" | "torch" | "native" (see HiFTConfig.state_store); ``chunk_bytes`` > 0
    splits each transfer into pieces of that size (HiFTConfig.transfer_chunk_mib)."""
    device = torch.device(device)
    if kind == "auto":
        if device.type != "cuda":
            kind = "resident"  # on a CPU device, state is in host memory already
        else:
            from .. import _native

            kind = "native" if _native.available(warn=True) else "torch"
    if kind == "resident":
        return ResidentStore(numels, device)
    if kind == "torch":
        return OffloadStore(numels, device, TorchTransport(device, chunk_bytes), slots)
    if kind == "native":
        from .native_transport import NativeTransport

        return OffloadStore(numels, device, NativeTransport(device, chunk_bytes=chunk_bytes), slots)
    raise ConfigError(f"unknown state_store {kind!r}; use auto, resident, torch or native")
