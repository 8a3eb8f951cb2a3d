"""Any torch.optim.Optimizer through HiFT: one inner optimizer per group, idle groups' state off the device.

Slower than the fused path (per-tensor copies, the inner optimizer's own kernels, a host sync for the
non-finite check) but works for every optimizer class whose step needs no closure. On CUDA, after a group's
step its state tensors are copied to pinned host memory on a side stream and the device copies are released;
the next group's state is brought back on another side stream while forward/backward run.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..state_io import GroupState, Signature
from .path import UpdatePath

__all__ = ["GenericPath", "generic_default_weight_decay", "generic_defaults", "check_generic_optimizer"]


def generic_default_weight_decay(cls: type) -> float:
    try:
        default = inspect.signature(cls.__init__).parameters["weight_decay"].default
        return float(default) if isinstance(default, (int, float)) else 0.0
    except (KeyError, ValueError, TypeError):
        return 0.0


def generic_defaults(cls: type) -> dict[str, Any]:
    """The class's keyword options with their defaults (lr and weight_decay aside), so param_groups and saved
    state carry every option as torch.optim's own param_groups do."""
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        p.name: p.default for p in params
        if p.kind in kinds and p.default is not inspect.Parameter.empty and p.name not in ("self", "params", "lr", "weight_decay")
    }


def check_generic_optimizer(cls: type) -> None:
    """Refuse optimizers whose step() requires a closure (LBFGS): HiFT calls step() without one."""
    try:
        closure = inspect.signature(cls.step).parameters.get("closure")
    except (TypeError, ValueError):
        return
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ConfigError(
            f"{cls.__name__}.step() requires a closure (it re-evaluates the loss several times per step); HiFT "
            "trains one group per step and cannot drive it. Use a first-order optimizer (adamw, sgd, adagrad, or "
            "a torch.optim class whose closure is optional)"
        )


def _state_key(i: int, key: str) -> str:
    return f"{i}.{key}"


class GenericPath(UpdatePath):
    def __init__(self, cls: type, kwargs: dict[str, Any], layouts, param_groups: list[dict], device) -> None:
        check_generic_optimizer(cls)
        self.cls, self.name = cls, cls.__name__
        self.layouts = list(layouts)
        self._param_groups = param_groups  # the optimizer's: hyper-parameters (LR schedules) are copied in per step
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.inners: list[torch.optim.Optimizer] = []
        self.pg_maps: list[list[int]] = []
        for lay in self.layouts:
            by_pg: dict[int, list] = {}
            for i, p in enumerate(lay.params):
                by_pg.setdefault(lay.param_group_of[i], []).append(p)
            inner_groups = [
                {"params": ps, **{k: v for k, v in param_groups[pg].items() if k not in ("params", "name")}}
                for pg, ps in by_pg.items()
            ]
            try:
                inner = cls(inner_groups, **kwargs)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"cannot build {cls.__name__} with options {sorted(kwargs)}: {e}") from e
            self.inners.append(inner)
            self.pg_maps.append(list(by_pg))
        if self.cuda:
            self.in_stream = torch.cuda.Stream(self.device)
            self.out_stream = torch.cuda.Stream(self.device)
        self._host: dict[tuple[int, str], Tensor] = {}  # (id(param), key) -> pinned host copy of device state
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

    def put_away(self, gid: int, keep: bool) -> None:
        if not self.cuda or keep:
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

    def prefetch(self, gid: int) -> None:
        if not self.cuda:
            return
        self.in_stream.wait_stream(torch.cuda.current_stream(self.device))  # allocations below are made there
        if gid in self._written:
            self.in_stream.wait_event(self._written[gid])
        # Everything put_away moved goes back, 0-dim tensors too: fused/capturable optimizers keep "step" on
        # the device and fail with it on the host.
        moves = []
        for p, st, key, value in list(self._tensors(gid)):
            if value.device.type == "cpu" and (id(p), key) in self._host:
                moves.append((st, key, value, torch.empty_like(value, device=self.device)))
        with torch.cuda.stream(self.in_stream):
            for st, key, value, dev in moves:
                dev.copy_(value, non_blocking=True)
                dev.record_stream(self.in_stream)
                st[key] = dev
            ev = self._arrived.setdefault(gid, torch.cuda.Event())
            ev.record(self.in_stream)

    def synchronize(self) -> None:
        if self.cuda:
            self.in_stream.synchronize()
            self.out_stream.synchronize()

    # ------------------------------------------------------------------ stepping
    def update(self, gid: int, members: Sequence[int], flags: Tensor | None) -> None:
        lay = self.layouts[gid]
        if flags is not None and flags[1].item() != 0:  # a host sync: the generic path decides on the host
            return
        grads = [lay.params[i].grad for i in members]
        if flags is not None and flags[0].item() != 1.0:
            for g in grads:
                g.mul_(flags[0].to(g.dtype))
        inner = self.inners[gid]
        for inner_group, pg in zip(inner.param_groups, self.pg_maps[gid]):
            for key, value in self._param_groups[pg].items():
                if key not in ("params", "name"):
                    inner_group[key] = value
        active = {id(lay.params[i]) for i in members}
        hidden = []
        for group in inner.param_groups:
            for p in group["params"]:
                if id(p) not in active and p.grad is not None:
                    hidden.append((p, p.grad))
                    p.grad = None  # torch.optim skips parameters without a gradient
        if self.cuda and gid in self._arrived:
            torch.cuda.current_stream(self.device).wait_event(self._arrived[gid])
        try:
            inner.step()
        finally:
            for p, g in hidden:
                p.grad = g

    # ------------------------------------------------------------------ state encoding
    def _entries(self, gid: int) -> list[dict[str, Any] | None]:
        self.synchronize()
        inner = self.inners[gid]
        return [dict(inner.state[p]) if inner.state.get(p) else None for p in self.layouts[gid].params]

    def export_group(self, gid: int) -> GroupState:
        tensors, values = {}, {}
        for i, entry in enumerate(self._entries(gid)):
            for key, v in (entry or {}).items():
                if torch.is_tensor(v):
                    tensors[_state_key(i, key)] = v.detach().cpu()
                else:
                    values[_state_key(i, key)] = v
        return GroupState(tensors, values)

    def _check_entry(self, gid: int, i: int, key: str, shape: tuple[int, ...] | None) -> None:
        """A tensor of torch.optim's own optimizers is a 0-dim count or shaped like its parameter (factored
        optimizers such as Adafactor, and classes from elsewhere, are not checked)."""
        lay = self.layouts[gid]
        checked = self.cls.__module__.startswith("torch.optim") and self.cls.__name__ != "Adafactor"
        if checked and shape is not None and shape not in ((), tuple(lay.params[i].shape)):
            raise ConfigError(
                f"load_state_dict: {key} of {lay.names[i]!r} has shape {shape}, the parameter has "
                f"{tuple(lay.params[i].shape)} (saved for another model, or by another optimizer?)"
            )

    def check_group(self, gid: int, signature: Signature, values: Mapping[str, Any]) -> None:
        n = len(self.layouts[gid].params)
        for key in list(signature) + list(values):
            i, _, name = key.partition(".")
            if not (i.isdigit() and int(i) < n and name):
                raise ConfigError(f"group {gid}: unexpected saved state key {key!r} (saved for another model or grouping?)")
            self._check_entry(gid, int(i), name, signature[key][0] if key in signature else None)

    def import_group(self, gid: int, state: GroupState) -> None:
        self._load_entries(gid, self.to_torch(gid, state))

    def to_torch(self, gid: int, state: GroupState) -> list[dict[str, Any] | None]:
        entries: list[dict[str, Any] | None] = [None] * len(self.layouts[gid].params)
        for key, v in list(state.tensors.items()) + list(state.values.items()):
            i, _, name = key.partition(".")
            entries[int(i)] = {**(entries[int(i)] or {}), name: v}
        return entries

    def from_torch(self, gid: int, entries: Sequence[Mapping[str, Any] | None], build: bool = True) -> GroupState | None:
        if len(entries) != len(self.layouts[gid].params):
            raise ConfigError(f"group {gid}: {len(entries)} state entries for {len(self.layouts[gid].params)} parameters")
        for i, e in enumerate(entries):
            if e is not None and not isinstance(e, Mapping):
                raise ConfigError(f"load_state_dict: the state of {self.layouts[gid].names[i]!r} is not a mapping")
            for key, v in (e or {}).items():
                self._check_entry(gid, i, key, tuple(v.shape) if torch.is_tensor(v) else None)
        if not build:
            return None
        tensors, values = {}, {}
        for i, e in enumerate(entries):
            for key, v in (e or {}).items():
                (tensors if torch.is_tensor(v) else values)[_state_key(i, key)] = v
        return GroupState(tensors, values)

    def _load_entries(self, gid: int, entries: Sequence[Mapping[str, Any] | None]) -> None:
        self.synchronize()
        inner = self.inners[gid]
        inner.state.clear()
        position = {id(p): i for i, p in enumerate(self.layouts[gid].params)}
        for group in inner.param_groups:
            # torch.optim's own load policy: "step" goes to the device only for fused/capturable optimizers,
            # other floating-point state follows the parameter's device and dtype.
            step_on_device = bool(group.get("fused") or group.get("capturable"))
            for p in group["params"]:
                e = entries[position[id(p)]]
                if not e:
                    continue
                st = {}
                for k, v in e.items():
                    if not torch.is_tensor(v):
                        st[k] = v
                    elif k == "step":
                        st[k] = v.to(device=p.device, dtype=torch.float32) if step_on_device else v.clone()
                    else:
                        st[k] = v.to(device=p.device, dtype=p.dtype if v.is_floating_point() else v.dtype, copy=True)
                inner.state[p] = st
        self.put_away(gid, keep=False)
