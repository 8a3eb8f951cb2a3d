"""The per-bucket tensor table that lets one kernel launch update many separate parameter tensors.

Why a table rather than flat parameter storage: parameters stay ordinary, separately allocated tensors, so
``save_pretrained``/safetensors (which refuse tensors that share storage) and user code keep working, while
gradients and optimizer state -- which the engine owns -- are flat per group. Each program of a launch
handles BLOCK elements of one tensor; it finds its tensor by binary search over the chunk-start column.

Layout: int64 [6, T], one column per tensor, rows:
    0 address      data_ptr() of the parameter
    1 numel        elements of the parameter
    2 state_off    element offset of this parameter inside each flat fp32 state vector of the group
    3 grad_off     element offset inside the group's flat gradient buffer (same dtype as the parameter)
    4 chunk_start  index of this tensor's first chunk (BLOCK elements) in the launch grid
    5 step_index   index into the group's per-parameter step-count tensor
Rows are contiguous so the binary search reads one cache-friendly row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["TensorTable", "build_tensor_table"]


@dataclass(frozen=True)
class TensorTable:
    table: Tensor  # int64 [6, T] on the parameters' device
    num_tensors: int
    num_chunks: int
    block: int
    numel: int
    addresses: tuple[int, ...]  # to detect parameters whose storage moved after the table was built
    dtype: torch.dtype


def build_tensor_table(
    params: Sequence[Tensor],
    state_offsets: Sequence[int],
    grad_offsets: Sequence[int],
    step_indices: Sequence[int],
    block: int,
) -> TensorTable:
    """Build the table for one launch. All params must share device and dtype, and be dense and contiguous."""
    if not params:
        raise ValueError("build_tensor_table: params is empty; a launch needs at least one tensor")
    if not (len(params) == len(state_offsets) == len(grad_offsets) == len(step_indices)):
        raise ValueError(
            "build_tensor_table: params, state_offsets, grad_offsets and step_indices must have the same length, got "
            f"{len(params)}, {len(state_offsets)}, {len(grad_offsets)}, {len(step_indices)}"
        )
    if block <= 0 or block & (block - 1):
        raise ValueError(f"build_tensor_table: block must be a positive power of two, got {block}")
    device, dtype = params[0].device, params[0].dtype
    cols, chunk = [], 0
    for i, p in enumerate(params):
        if p.device != device or p.dtype != dtype:
            raise ValueError(
                f"build_tensor_table: params[{i}] is {p.dtype} on {p.device}, expected {dtype} on {device}; "
                "split tensors of different devices/dtypes into separate launches"
            )
        if p.layout != torch.strided or not p.is_contiguous():
            raise ValueError(f"build_tensor_table: params[{i}] must be dense and contiguous")
        cols.append((p.data_ptr(), p.numel(), state_offsets[i], grad_offsets[i], chunk, step_indices[i]))
        chunk += -(-p.numel() // block)
    table = torch.tensor(cols, dtype=torch.int64).t().contiguous().to(device)
    return TensorTable(
        table=table,
        num_tensors=len(params),
        num_chunks=chunk,
        block=block,
        numel=sum(p.numel() for p in params),
        addresses=tuple(c[0] for c in cols),
        dtype=dtype,
    )
