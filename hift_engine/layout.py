"""Flat per-group layout of optimizer state and gradients.

Each group's optimizer state is one flat fp32 tensor: ``num_state`` vectors (e.g. exp_avg | exp_avg_sq) of
``state_stride`` elements each; parameter i of the group occupies [state_offset_i, + numel_i) in every vector.
With ``state_dtype="bf16"`` the optimizer's vectors (not the fp32 masters) are bf16: each takes half as many
fp32 elements of the flat tensor (``state_stride`` bf16 values) and is read through a bf16 view of it.
The active group's gradients live in a GradArena: one flat buffer per dtype, sized to the largest group, with
each parameter's ``.grad`` a view into it. Offsets are aligned to 64 elements so kernels can use 16-byte
accesses. Parameters themselves stay separate tensors; kernels reach them through a TensorTable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from .errors import LayoutError
from .kernels._launch import DEFAULT_BLOCK
from .kernels.table import TensorTable, build_tensor_table

__all__ = ["ALIGN", "Bucket", "GroupLayout", "GradArena", "check_params"]

ALIGN = 64  # elements


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def check_params(named: Sequence[tuple[str, nn.Parameter]]) -> torch.device:
    """All trainable parameters must be dense, contiguous, floating point and on one device."""
    devices: dict[torch.device, str] = {}
    for name, p in named:
        if p.layout != torch.strided or p.is_sparse:
            raise LayoutError(f"parameter {name!r} is sparse ({p.layout}); HiFT's fused updates need dense parameters")
        if not p.is_floating_point():
            raise LayoutError(f"parameter {name!r} has dtype {p.dtype}; only floating-point parameters can be trained")
        if not p.is_contiguous():
            raise LayoutError(
                f"parameter {name!r} is not contiguous (strides {p.stride()}); make it contiguous "
                "(p.data = p.data.contiguous()) before creating the optimizer"
            )
        devices.setdefault(p.device, name)
    if len(devices) > 1:
        desc = ", ".join(f"{d} (e.g. {n!r})" for d, n in devices.items())
        raise LayoutError(
            f"trainable parameters are on several devices: {desc}. HiFT trains a model on one device; "
            "move the whole model first (model.to(device)), then create the optimizer"
        )
    return next(iter(devices))


@dataclass
class Bucket:
    """Parameters of one group that share a torch param_group and a dtype: one kernel launch."""

    param_group: int
    dtype: torch.dtype
    members: list[int]  # indices into GroupLayout.params
    _tables: dict = field(default_factory=dict, repr=False)


class GroupLayout:
    def __init__(
        self,
        index: int,
        names: Sequence[str],
        params: Sequence[nn.Parameter],
        param_group_of: Sequence[int],
        num_state: int,
        device: torch.device,
        half_from: int | None = None,
    ) -> None:
        """``half_from``: state vectors from this index on are bf16 (None: every vector is fp32)."""
        self.index = index
        self.names = list(names)
        self.params = list(params)
        self.param_group_of = list(param_group_of)
        self.num_state = num_state
        self.device = device
        self.state_offsets: list[int] = []
        self.grad_offsets: list[int] = []
        self.grad_numel: dict[torch.dtype, int] = {}
        off = 0
        for p in self.params:
            self.state_offsets.append(off)
            off += _align(p.numel())
            g = self.grad_numel.get(p.dtype, 0)
            self.grad_offsets.append(g)
            self.grad_numel[p.dtype] = g + _align(p.numel())
        self.state_stride = off
        self.half_from = num_state if half_from is None else half_from
        # where each vector starts in the flat fp32 tensor, in fp32 elements (a bf16 vector takes stride / 2)
        self.vector_base = [k * off if k <= self.half_from else self.half_from * off + (k - self.half_from) * off // 2
                            for k in range(num_state + 1)]
        self.numel = sum(p.numel() for p in self.params)
        self._dtypes = [p.dtype for p in self.params]
        self._shapes = [p.shape for p in self.params]
        # Per-parameter step counts, on the device so the update never needs the host (non-finite skips are
        # decided on the device). float32 is exact for counts below 2**24.
        self.steps = torch.zeros(len(self.params), dtype=torch.float32, device=device)
        keyed: dict[tuple[int, torch.dtype], Bucket] = {}
        for i, p in enumerate(self.params):
            key = (self.param_group_of[i], p.dtype)
            keyed.setdefault(key, Bucket(key[0], key[1], [])).members.append(i)
        self.buckets = list(keyed.values())

    @property
    def state_numel(self) -> int:
        return self.vector_base[self.num_state]

    def vector_dtype(self, k: int) -> torch.dtype:
        return torch.bfloat16 if k >= self.half_from else torch.float32

    def vector(self, state: Tensor, k: int) -> Tensor:
        """State vector ``k`` of the flat tensor, in its own dtype (``state_stride`` elements)."""
        return state[self.vector_base[k] : self.vector_base[k + 1]].view(self.vector_dtype(k))

    def state_views(self, state: Tensor, k: int, members: Sequence[int] | None = None) -> list[Tensor]:
        """Views of state vector ``k`` shaped like the parameters (all, or ``members``), in the vector's dtype."""
        idx = range(len(self.params)) if members is None else members
        vec = self.vector(state, k)
        return [
            vec[self.state_offsets[i] : self.state_offsets[i] + self.params[i].numel()].view(self.params[i].shape)
            for i in idx
        ]

    def grad_views(self, arena: "GradArena") -> list[Tensor]:
        return [
            arena.buffers[p.dtype][self.grad_offsets[i] : self.grad_offsets[i] + p.numel()].view(p.shape)
            for i, p in enumerate(self.params)
        ]

    def check_unchanged(self) -> None:
        """Parameters must not change device/dtype/shape after setup (model.to() after building the optimizer)."""
        for name, p, dtype, shape in zip(self.names, self.params, self._dtypes, self._shapes):
            if p.device != self.device or p.dtype != dtype:
                raise LayoutError(
                    f"parameter {name!r} is now {p.dtype} on {p.device}, but was {dtype} on {self.device} when the "
                    "optimizer was created; create HiFTOptimizer after moving or casting the model"
                )
            if p.shape != shape or not p.is_contiguous():
                raise LayoutError(f"parameter {name!r} changed shape or became non-contiguous after the optimizer was created")

    def table(self, bucket: Bucket, members: Sequence[int] | None = None) -> TensorTable:
        """The cached kernel table for ``bucket`` (or a subset of it); rebuilt if a parameter's storage moved."""
        members = tuple(bucket.members if members is None else members)
        key = members
        table = bucket._tables.get(key)
        params = [self.params[i] for i in members]
        if table is None or table.addresses != tuple(p.data_ptr() for p in params):
            for i in members:
                if self.params[i].dtype != bucket.dtype:
                    raise LayoutError(
                        f"parameter {self.names[i]!r} changed dtype to {self.params[i].dtype} after the optimizer "
                        f"was created (was {bucket.dtype}); create HiFTOptimizer after casting the model"
                    )
            table = build_tensor_table(
                params,
                [self.state_offsets[i] for i in members],
                [self.grad_offsets[i] for i in members],
                list(members),
                DEFAULT_BLOCK,
            )
            bucket._tables[key] = table
        return table


class GradArena:
    """One flat gradient buffer per dtype, sized to the largest group; only the active group's grads exist."""

    def __init__(self, layouts: Sequence[GroupLayout], device: torch.device) -> None:
        sizes: dict[torch.dtype, int] = {}
        for lay in layouts:
            for dt, n in lay.grad_numel.items():
                sizes[dt] = max(sizes.get(dt, 0), n)
        self.buffers = {dt: torch.zeros(n, dtype=dt, device=device) for dt, n in sizes.items()}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
