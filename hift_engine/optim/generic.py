"""Any torch.optim.Optimizer through HiFT: one inner optimizer per group, idle groups' state off the device.

Slower than the fused path (per-tensor copies, the inner optimizer's own kernels, a host sync for the
non-finite check) but works for every optimizer class. On CUDA, after a group's step its state tensors are
copied to pinned host memory on a side stream and the device copies are released; the next group's state is
brought back on another side stream while forward/backward run.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["GenericPath", "generic_default_weight_decay"]


def generic_default_weight_decay(cls: type) -> float:
    try:
        default = inspect.signature(cls.__init__).parameters["weight_decay"].default
        return float(default) if isinstance(default, (int, float)) else 0.0
    except (KeyError, ValueError, TypeError):
        return 0.0


class GenericPath:
    def __init__(self, cls: type, kwargs: dict[str, Any], layouts, param_groups: list[dict], device) -> None:
        self.cls = cls
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.inners: list[torch.optim.Optimizer] = []
        self.pg_maps: list[list[int]] = []
        for lay in layouts:
            by_pg: dict[int, list] = {}
            for i, p in enumerate(lay.params):
                by_pg.setdefault(lay.param_group_of[i], []).append(p)
            inner_groups = [
                {"params": ps, **{k: v for k, v in param_groups[pg].items() if k not in ("params", "name")}}
                for pg, ps in by_pg.items()
            ]
            try:
                inner = cls(inner_groups, **kwargs)
            except TypeError as e:
                raise ConfigError(f"cannot build {cls.__name__} with options {sorted(kwargs)}: {e}") from e
            self.inners.append(inner)
            self.pg_maps.append(list(by_pg))
        if self.cuda:
            self.in_stream = torch.cuda.Stream(self.device)
            self.out_stream = torch.cuda.Stream(self.device)
        self._host: dict[tuple[int, str], Tensor] = {}  # (id(param), key) -> pinned host copy
        self._written: dict[int, torch.cuda.Event] = {}
        self._arrived: dict[int, torch.cuda.Event] = {}

    # ------------------------------------------------------------------ moving state
    def _tensors(self, gid: int):
        inner = self.inners[gid]
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p)
                if st:
                    for key, value in st.items():
                        if torch.is_tensor(value):
                            yield p, st, key, value

    def put_away(self, gid: int) -> None:
        if not self.cuda:
            return
        compute = torch.cuda.current_stream(self.device)
        self.out_stream.wait_stream(compute)
        with torch.cuda.stream(self.out_stream):
            for p, st, key, value in list(self._tensors(gid)):
                if value.device.type != "cuda":
                    continue
                host = self._host.get((id(p), key))
                if host is None or host.shape != value.shape or host.dtype != value.dtype:
                    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                    self._host[(id(p), key)] = host
                host.copy_(value, non_blocking=True)
                value.record_stream(self.out_stream)  # keep the device memory until the copy is done
                st[key] = host
            ev = self._written.setdefault(gid, torch.cuda.Event())
            ev.record(self.out_stream)

    def bring(self, gid: int) -> None:
        if not self.cuda:
            return
        self.in_stream.wait_stream(torch.cuda.current_stream(self.device))  # allocations below are made there
        if gid in self._written:
            self.in_stream.wait_event(self._written[gid])
        moves = []
        for p, st, key, value in list(self._tensors(gid)):
            if value.device.type == "cpu" and (id(p), key) in self._host and value.dim() > 0:
                dev = torch.empty_like(value, device=self.device)
                moves.append((st, key, value, dev))
        with torch.cuda.stream(self.in_stream):
            for st, key, value, dev in moves:
                dev.copy_(value, non_blocking=True)
                dev.record_stream(self.in_stream)
                st[key] = dev
            ev = self._arrived.setdefault(gid, torch.cuda.Event())
            ev.record(self.in_stream)

    def wait(self, gid: int) -> None:
        if self.cuda and gid in self._arrived:
            torch.cuda.current_stream(self.device).wait_event(self._arrived[gid])

    def synchronize(self) -> None:
        if self.cuda:
            self.in_stream.synchronize()
            self.out_stream.synchronize()

    # ------------------------------------------------------------------ stepping
    def step(self, gid: int, param_groups: list[dict], active: Sequence[Tensor]) -> None:
        """Step group ``gid``; ``active`` are its parameters that received a gradient (others are skipped)."""
        inner = self.inners[gid]
        for inner_group, pg in zip(inner.param_groups, self.pg_maps[gid]):
            for key, value in param_groups[pg].items():
                if key not in ("params", "name"):
                    inner_group[key] = value
        active_ids = {id(p) for p in active}
        hidden = []
        for group in inner.param_groups:
            for p in group["params"]:
                if id(p) not in active_ids and p.grad is not None:
                    hidden.append((p, p.grad))
                    p.grad = None  # torch.optim skips parameters without a gradient
        self.wait(gid)
        try:
            inner.step()
        finally:
            for p, g in hidden:
                p.grad = g

    def state_entries(self, gid: int) -> dict[Any, dict[str, Any]]:
        """Per-parameter state of group gid (CPU tensors once the write-back finished)."""
        self.synchronize()
        inner = self.inners[gid]
        return {p: dict(inner.state[p]) for group in inner.param_groups for p in group["params"] if inner.state.get(p)}

    def load_entries(self, gid: int, entries: dict[Any, dict[str, Any]]) -> None:
        self.synchronize()
        inner = self.inners[gid]
        inner.state.clear()
        for p, st in entries.items():
            # As torch.optim's load_state_dict: "step" stays where it is (CPU unless capturable/fused), other
            # floating-point state follows the parameter's device and dtype.
            inner.state[p] = {
                k: (
                    v.to(device=p.device, dtype=p.dtype if v.is_floating_point() else v.dtype)
                    if torch.is_tensor(v) and k != "step"
                    else v
                )
                for k, v in st.items()
            }
        self.put_away(gid)
