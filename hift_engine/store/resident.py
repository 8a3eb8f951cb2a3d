"""All optimizer state on the device: no transfers (the baseline the offloaded stores are measured against)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import StateStore

__all__ = ["ResidentStore"]


class ResidentStore(StateStore):
    kind = "resident"

    def __init__(self, numels: list[int], device: torch.device) -> None:
        super().__init__(numels)
        self.device = torch.device(device)
        self._state: dict[int, Tensor] = {}

    def activate(self, gid: int) -> tuple[Tensor, bool]:
        state = self._state.get(gid)
        if state is not None:
            return state, False
        state = torch.zeros(self.numels[gid], dtype=torch.float32, device=self.device)
        self._state[gid] = state
        self.stats.zero_fills += 1
        self.stats.device_bytes += state.numel() * 4
        if self.device.type == "cpu":
            self.stats.host_bytes += state.numel() * 4
        return state, True

    def release(self, gid: int, keep: bool) -> None:
        pass

    def host_state(self, gid: int) -> Tensor | None:
        state = self._state.get(gid)
        return None if state is None else state.to("cpu")

    def load_state(self, gid: int, flat: Tensor) -> None:
        if flat.numel() != self.numels[gid]:
            raise ValueError(f"load_state: group {gid} holds {self.numels[gid]} state elements, got {flat.numel()}")
        if gid in self._state:
            self._state[gid].copy_(flat.reshape(-1))
        else:
            self._state[gid] = flat.reshape(-1).to(device=self.device, dtype=torch.float32).clone()
            self.stats.device_bytes += self.numels[gid] * 4

    def reset(self, gid: int) -> None:
        state = self._state.pop(gid, None)
        if state is not None:
            self.stats.device_bytes -= state.numel() * 4

    def close(self) -> None:
        self._state.clear()
