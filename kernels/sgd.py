"""Fused SGD (momentum, dampening, nesterov, L2 weight decay) in one launch (torch.optim.SGD semantics).

With momentum, 20 bytes move per fp32 parameter (read p, g, buf; write p, buf); without, 12.
The momentum buffer is set to the gradient on a parameter's first step (step count 1), as torch does.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._launch import DEFAULT_WARPS, check_update_args, is_aligned, launch_device
from ._locate import load_weight, locate_chunk, store_weight, to_pointer
from .reference import state_names
from .table import TensorTable

__all__ = ["sgd_update"]


@triton.jit
def _sgd_apply(p_ptrs, w_ptrs, g_ptrs, buf_ptrs, mask, scale_ptr, first, lr, momentum, one_minus_dampening, weight_decay,
               HAS_FLAGS: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               MASTER: tl.constexpr):
    """The update of one chunk; ``mask`` is None for chunks fully inside their tensor."""
    p = load_weight(p_ptrs, w_ptrs, mask, MASTER)  # the master under mixed precision
    g = tl.load(g_ptrs, mask=mask).to(tl.float32)
    if HAS_FLAGS:
        g = g * tl.load(scale_ptr)
    if MAXIMIZE:
        g = -g
    g = tl.where(weight_decay != 0.0, g + weight_decay * p, g)
    if MOMENTUM:
        buf = tl.load(buf_ptrs, mask=mask)
        buf = tl.where(first, g, buf * momentum + one_minus_dampening * g)
        tl.store(buf_ptrs, buf, mask=mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    store_weight(p_ptrs, w_ptrs, p, mask, MASTER)


@triton.jit(do_not_specialize=["num_tensors"])
def _sgd_kernel(
    table_ptr, num_tensors, steps_ptr, grad_ptr, state_ptr, state_stride, flags_ptr,
    lr, momentum, one_minus_dampening, weight_decay,
    HAS_FLAGS: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    MASTER: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    addr, soff, goff, sidx, offs, numel, full = locate_chunk(table_ptr, num_tensors, flags_ptr, HAS_FLAGS, ALIGNED, BLOCK)
    p_ptrs = to_pointer(addr, grad_ptr, ALIGNED) + offs
    g_ptrs = grad_ptr + goff + offs
    w_ptrs = state_ptr + soff + offs  # the fp32 master (vector 0) when MASTER
    buf_ptrs = w_ptrs + MASTER * state_stride
    first = tl.load(steps_ptr + sidx) == 1.0  # a parameter's first step: the buffer starts as the gradient
    if full:
        _sgd_apply(p_ptrs, w_ptrs, g_ptrs, buf_ptrs, None, flags_ptr, first, lr, momentum, one_minus_dampening,
                   weight_decay, HAS_FLAGS, MOMENTUM, NESTEROV, MAXIMIZE, MASTER)
    else:
        _sgd_apply(p_ptrs, w_ptrs, g_ptrs, buf_ptrs, offs < numel, flags_ptr, first, lr, momentum,
                   one_minus_dampening, weight_decay, HAS_FLAGS, MOMENTUM, NESTEROV, MAXIMIZE, MASTER)


def sgd_update(
    table: TensorTable,
    steps: Tensor,
    grads: Tensor,
    state: Tensor,
    state_stride: int,
    flags: Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool = False,
    maximize: bool = False,
    master: bool = False,
    num_warps: int = DEFAULT_WARPS,
) -> None:
    """One SGD step for every tensor in ``table``; state is the flat fp32 [master if master | momentum buffer if
    momentum != 0]; with ``master`` the parameters receive the rounded master.

    ``momentum`` switches between two compiled variants (with/without a buffer); its value is a runtime argument.
    """
    has_momentum = momentum != 0
    num_state = len(state_names("sgd", momentum=momentum)) + master
    check_update_args("sgd_update", table, steps, grads, state, state_stride, num_state, flags)
    with launch_device(table):
        _sgd_kernel[(table.num_chunks,)](
            table.table, table.num_tensors, steps, grads, state, state_stride, flags if flags is not None else steps,
            lr, momentum, 1.0 - dampening, weight_decay,
            HAS_FLAGS=flags is not None, MOMENTUM=has_momentum, NESTEROV=nesterov, MAXIMIZE=maximize, MASTER=master,
            ALIGNED=is_aligned(table, state_stride), BLOCK=table.block, num_warps=num_warps,
        )
