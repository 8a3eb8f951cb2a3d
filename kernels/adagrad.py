"""Fused AdaGrad over every tensor of a bucket in one launch (torch.optim.Adagrad semantics).

20 bytes move per fp32 parameter (read p, g, sum; write p, sum).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._launch import DEFAULT_WARPS, check_update_args, is_aligned, launch_device
from ._locate import load_weight, locate_chunk, store_weight, to_pointer
from .reference import state_names
from .table import TensorTable

__all__ = ["adagrad_update"]


@triton.jit
def _adagrad_apply(p_ptrs, w_ptrs, g_ptrs, s_ptrs, mask, scale_ptr, step, lr, lr_decay, eps, weight_decay,
                   HAS_FLAGS: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER: tl.constexpr):
    """The update of one chunk; ``mask`` is None for chunks fully inside their tensor."""
    p = load_weight(p_ptrs, w_ptrs, mask, MASTER)  # the master under mixed precision
    g = tl.load(g_ptrs, mask=mask).to(tl.float32)
    s = tl.load(s_ptrs, mask=mask)
    if HAS_FLAGS:
        g = g * tl.load(scale_ptr)
    if MAXIMIZE:
        g = -g
    g = tl.where(weight_decay != 0.0, g + weight_decay * p, g)  # where(): 0 * inf must not make NaN
    clr = tl.div_rn(lr, 1.0 + (step - 1.0) * lr_decay)
    s = s + g * g
    p = p - clr * tl.div_rn(g, tl.sqrt_rn(s) + eps)
    store_weight(p_ptrs, w_ptrs, p, mask, MASTER)
    tl.store(s_ptrs, s, mask=mask)


@triton.jit(do_not_specialize=["num_tensors"])
def _adagrad_kernel(
    table_ptr, num_tensors, steps_ptr, grad_ptr, state_ptr, state_stride, flags_ptr,
    lr, lr_decay, eps, weight_decay,
    HAS_FLAGS: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    addr, soff, goff, sidx, offs, numel, full = locate_chunk(table_ptr, num_tensors, flags_ptr, HAS_FLAGS, ALIGNED, BLOCK)
    p_ptrs = to_pointer(addr, grad_ptr, ALIGNED) + offs
    g_ptrs = grad_ptr + goff + offs
    w_ptrs = state_ptr + soff + offs  # the fp32 master (vector 0) when MASTER
    s_ptrs = w_ptrs + MASTER * state_stride
    step = tl.load(steps_ptr + sidx)
    if full:
        _adagrad_apply(p_ptrs, w_ptrs, g_ptrs, s_ptrs, None, flags_ptr, step, lr, lr_decay, eps, weight_decay,
                       HAS_FLAGS, MAXIMIZE, MASTER)
    else:
        _adagrad_apply(p_ptrs, w_ptrs, g_ptrs, s_ptrs, offs < numel, flags_ptr, step, lr, lr_decay, eps, weight_decay,
                       HAS_FLAGS, MAXIMIZE, MASTER)


def adagrad_update(
    table: TensorTable,
    steps: Tensor,
    grads: Tensor,
    state: Tensor,
    state_stride: int,
    flags: Tensor | None,
    *,
    lr: float,
    lr_decay: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    master: bool = False,
    num_warps: int = DEFAULT_WARPS,
) -> None:
    """One AdaGrad step for every tensor in ``table``; state is the flat fp32 [master if master | sum]."""
    check_update_args("adagrad_update", table, steps, grads, state, state_stride, len(state_names("adagrad")) + master, flags)
    with launch_device(table):
        _adagrad_kernel[(table.num_chunks,)](
            table.table, table.num_tensors, steps, grads, state, state_stride, flags if flags is not None else steps,
            lr, lr_decay, eps, weight_decay,
            HAS_FLAGS=flags is not None, MAXIMIZE=maximize, MASTER=master,
            ALIGNED=is_aligned(table, state_stride), BLOCK=table.block, num_warps=num_warps,
        )
