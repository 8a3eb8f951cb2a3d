"""Fused AdamW over every tensor of a bucket in one launch (torch.optim.AdamW semantics).

28 bytes move per fp32 parameter (read p, g, m, v; write p, m, v); the kernel is memory-bound, so the goal
is the device's copy bandwidth. Hot-path scalars are runtime arguments: changing lr never recompiles.

With bf16 moments (``moment_bf16``) m, v (and vmax) are read as bf16, updated in fp32 and stored with
stochastic rounding: round to nearest would lose every change below half a bf16 step, and v's per-step change
(1 - beta2 = 0.1% of v) is below that, so v would stop following the gradients. The random bits come from
Philox keyed by ``seed`` + the parameter's step count at each element's offset: the same step gives the same
bits (a resumed run is bit-exact; data-parallel replicas stay identical).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import DEFAULT_WARPS, check_update_args, is_aligned, launch_device
from ._locate import load_weight, locate_chunk, round_stochastic, store_weight, to_pointer
from .reference import state_names
from .table import TensorTable

__all__ = ["adamw_update"]


@triton.jit
def _store_moment(ptrs, x, mask, bits, MOM_BF16: tl.constexpr):
    if MOM_BF16:
        tl.store(ptrs, round_stochastic(x, bits), mask=mask)
    else:
        tl.store(ptrs, x, mask=mask)


@triton.jit
def _adamw_apply(
    p_ptrs, w_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, mask, scale_ptr, step, seed, rand_offs,
    lr, one_minus_beta1, beta2, one_minus_beta2, log2_beta1, log2_beta2, eps, decay_factor,
    HAS_FLAGS: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER: tl.constexpr,
    MOM_BF16: tl.constexpr,
):
    """The update of one chunk; ``mask`` is None for chunks fully inside their tensor (unmasked, wide accesses)."""
    p = load_weight(p_ptrs, w_ptrs, mask, MASTER)  # the master under mixed precision
    g = tl.load(g_ptrs, mask=mask).to(tl.float32)
    m = tl.load(m_ptrs, mask=mask).to(tl.float32)
    v = tl.load(v_ptrs, mask=mask).to(tl.float32)
    if MOM_BF16:
        bits_m, bits_v, _, _ = tl.randint4x(seed + step.to(tl.int64), rand_offs)
    else:
        bits_m = 0
        bits_v = 0
    if HAS_FLAGS:
        g = g * tl.load(scale_ptr)
    if MAXIMIZE:
        g = -g
    p = p * decay_factor
    m = m + one_minus_beta1 * (g - m)  # torch's lerp(m, g, w) for w < 0.5
    v = v * beta2 + one_minus_beta2 * (g * g)
    bias_correction1 = 1.0 - tl.exp2(step * log2_beta1)
    bias_correction2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(step * log2_beta2))
    step_size = tl.div_rn(lr, bias_correction1)
    if AMSGRAD:
        vmax = tl.maximum(tl.load(vmax_ptrs, mask=mask).to(tl.float32), v)
        # v's bits: rounding with the same bits is monotone, so the stored max never falls below the stored v
        _store_moment(vmax_ptrs, vmax, mask, bits_v, MOM_BF16)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bias_correction2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    store_weight(p_ptrs, w_ptrs, p, mask, MASTER)
    _store_moment(m_ptrs, m, mask, bits_m, MOM_BF16)
    _store_moment(v_ptrs, v, mask, bits_v, MOM_BF16)


@triton.jit(do_not_specialize=["num_tensors"])
def _adamw_kernel(
    table_ptr, num_tensors, steps_ptr, grad_ptr, state_ptr, state_stride, flags_ptr, mom_ptr, mom_base, seed,
    lr, one_minus_beta1, beta2, one_minus_beta2, log2_beta1, log2_beta2, eps, decay_factor,
    HAS_FLAGS: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER: tl.constexpr,
    MOM_BF16: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    addr, soff, goff, sidx, offs, numel, full = locate_chunk(table_ptr, num_tensors, flags_ptr, HAS_FLAGS, ALIGNED, BLOCK)
    p_ptrs = to_pointer(addr, grad_ptr, ALIGNED) + offs
    g_ptrs = grad_ptr + goff + offs
    w_ptrs = state_ptr + soff + offs  # the fp32 master (vector 0) when MASTER
    # the moments: in the flat state itself (fp32), or in its bf16 view; mom_base counts elements of that view
    m_ptrs = mom_ptr + mom_base + soff + offs
    v_ptrs = m_ptrs + state_stride
    vmax_ptrs = v_ptrs + state_stride
    step = tl.load(steps_ptr + sidx)
    rand_offs = (soff + offs).to(tl.uint32)  # 32-bit counters: older Triton returns 64-bit bits for 64-bit offsets
    if full:
        _adamw_apply(p_ptrs, w_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, None, flags_ptr, step, seed, rand_offs,
                     lr, one_minus_beta1, beta2, one_minus_beta2, log2_beta1, log2_beta2, eps, decay_factor,
                     HAS_FLAGS, AMSGRAD, MAXIMIZE, MASTER, MOM_BF16)
    else:
        _adamw_apply(p_ptrs, w_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, offs < numel, flags_ptr, step, seed, rand_offs,
                     lr, one_minus_beta1, beta2, one_minus_beta2, log2_beta1, log2_beta2, eps, decay_factor,
                     HAS_FLAGS, AMSGRAD, MAXIMIZE, MASTER, MOM_BF16)


def adamw_update(
    table: TensorTable,
    steps: Tensor,
    grads: Tensor,
    state: Tensor,
    state_stride: int,
    flags: Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    master: bool = False,
    moment_bf16: bool = False,
    seed: int = 0,
    num_warps: int = DEFAULT_WARPS,
) -> None:
    """One AdamW step for every tensor in ``table``.

    steps:  float32 per-parameter step counts, already incremented for this step (indexed by table row 5)
    grads:  flat gradient buffer of the parameters' dtype (offsets: table row 3)
    state:  flat fp32 [master if master | exp_avg | exp_avg_sq | max_exp_avg_sq if amsgrad], each
            ``state_stride`` long; with ``master`` the fp32 master weights are updated and the parameters
            (bf16/fp16) receive their rounded copy in the same pass
    flags:  None, or float32 [clip_coef, skip] computed on the device (no host sync)
    moment_bf16: the moment vectors are bf16, each taking ``state_stride / 2`` fp32 elements of ``state``
            after the master; stored with stochastic rounding from Philox keyed by ``seed`` + the step count
    """
    moments = len(state_names("adamw", amsgrad=amsgrad))
    check_update_args("adamw_update", table, steps, grads, state, state_stride, master + moments / (1 + moment_bf16), flags)
    if moment_bf16 and state_stride % 2:
        raise ValueError(f"adamw_update: bf16 moments need an even state_stride, got {state_stride}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"adamw_update: betas must be in [0, 1), got ({beta1}, {beta2})")
    # log2(0) is -inf; exp2(step * -inf) = 0 gives the right bias correction of 1 for beta = 0.
    log2_b1 = math.log2(beta1) if beta1 > 0 else float("-inf")
    log2_b2 = math.log2(beta2) if beta2 > 0 else float("-inf")
    with launch_device(table):
        _adamw_kernel[(table.num_chunks,)](
            table.table, table.num_tensors, steps, grads, state, state_stride, flags if flags is not None else steps,
            state.view(torch.bfloat16) if moment_bf16 else state, master * state_stride * (1 + moment_bf16), seed,
            lr, 1.0 - beta1, beta2, 1.0 - beta2, log2_b1, log2_b2, eps, 1.0 - lr * weight_decay,
            HAS_FLAGS=flags is not None, AMSGRAD=amsgrad, MAXIMIZE=maximize, MASTER=master, MOM_BF16=moment_bf16,
            ALIGNED=is_aligned(table, state_stride), BLOCK=table.block, num_warps=num_warps,
        )
