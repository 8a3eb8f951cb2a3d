"""Baselines the step benchmark compares against (benchmark-only code, not used by the engine)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..store.base import StateStore

__all__ = ["OfficialStyleStore"]


class OfficialStyleStore(StateStore):
    """Moves state the way the official HiFT code does: after a group's update its state tensors go to the CPU
    with synchronous ``.to("cpu")`` copies into pageable memory, the device copy is dropped and
    ``torch.cuda.empty_cache()`` is called; before the next update they come back with ``.to(device)``.
    One tensor per parameter and state vector, as the official code keeps them."""

    kind = "official-sync-pageable"

    def __init__(self, numels: list[int], device: torch.device, tensors_per_group: list[int]) -> None:
        super().__init__(numels)
        self.device = torch.device(device)
        self.tensors_per_group = tensors_per_group
        self._host: dict[int, list[Tensor]] = {}
        self._dev: dict[int, Tensor] = {}

    def activate(self, gid: int) -> tuple[Tensor, bool]:
        if gid in self._dev:
            return self._dev[gid], False
        flat = torch.empty(self.numels[gid], dtype=torch.float32, device=self.device)
        host = self._host.get(gid)
        if host is None:
            flat.zero_()
            self.stats.zero_fills += 1
        else:
            for dst, src in zip(torch.tensor_split(flat, self.tensors_per_group[gid]), host):
                dst.copy_(src.to(self.device))  # pageable, synchronous
            self.stats.bytes_h2d += self.numels[gid] * 4
            self.stats.fetches += 1
        self._dev[gid] = flat
        return flat, host is None

    def release(self, gid: int, keep: bool) -> None:
        if keep:
            return
        flat = self._dev.pop(gid)
        self._host[gid] = [t.to("cpu") for t in torch.tensor_split(flat, self.tensors_per_group[gid])]
        self.stats.bytes_d2h += self.numels[gid] * 4
        self.stats.writebacks += 1
        del flat
        torch.cuda.empty_cache()

    def host_state(self, gid: int) -> Tensor | None:
        if gid in self._dev:
            return self._dev[gid].cpu()
        host = self._host.get(gid)
        return None if host is None else torch.cat(host)

    def load_state(self, gid: int, flat: Tensor) -> None:
        self._dev.pop(gid, None)
        self._host[gid] = [t.clone() for t in torch.tensor_split(flat.cpu(), self.tensors_per_group[gid])]

    def reset(self, gid: int) -> None:
        self._dev.pop(gid, None)
        self._host.pop(gid, None)
