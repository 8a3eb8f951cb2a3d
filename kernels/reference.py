"""Pure-PyTorch reference updates, op for op the single-tensor paths of torch.optim (torch 2.13).

Used by the CPU path of the engine, as the CUDA fallback when Triton is unavailable, and by every kernel
test and benchmark; nothing else re-implements this math. All functions update in place and take lists of
per-parameter tensors:

    params:  the parameters (any float dtype; low-precision params are updated in fp32 and rounded back)
    grads:   gradients, same dtype/shape as params (already multiplied by the clip coefficient if any)
    state:   fp32 tensors, same shape as params (for float64 checks, pass float64 everything)
    steps:   per-parameter step counts *after* this step's increment (python floats)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["adamw_reference", "adagrad_reference", "sgd_reference", "state_names"]


def state_names(optimizer: str, *, amsgrad: bool = False, momentum: float = 0.0) -> tuple[str, ...]:
    """The fp32 state vectors each update keeps, in the order of the flat layout (torch.optim's state keys).
    The one owner of that fact: the optimizer specs and the kernel launchers' checks both read it."""
    if optimizer == "adamw":
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
    if optimizer == "adagrad":
        return ("sum",)
    if optimizer == "sgd":
        return ("momentum_buffer",) if momentum != 0 else ()
    raise ValueError(f"state_names: unknown fused optimizer {optimizer!r}")


def _working(param: Tensor, state: Tensor) -> Tensor:
    """The tensor to do the math on: the param itself when its dtype matches the state, else an upcast copy."""
    return param if param.dtype == state.dtype else param.to(state.dtype)


def _write_back(param: Tensor, work: Tensor) -> None:
    if work is not param:
        param.copy_(work)


@torch.no_grad()
def adamw_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    steps: Sequence[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
) -> None:
    """torch.optim.AdamW (decoupled weight decay, bias correction from each parameter's own step)."""
    for i, param in enumerate(params):
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        p = _working(param, exp_avg)
        grad = grads[i].to(exp_avg.dtype)
        if maximize:
            grad = -grad
        step = steps[i]
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
        _write_back(param, p)


@torch.no_grad()
def adagrad_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state_sums: Sequence[Tensor],
    steps: Sequence[float],
    *,
    lr: float,
    lr_decay: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """torch.optim.Adagrad (L2 weight decay added to the gradient, lr decayed by the step count)."""
    for i, param in enumerate(params):
        state_sum = state_sums[i]
        p = _working(param, state_sum)
        grad = grads[i].to(state_sum.dtype)
        if maximize:
            grad = -grad
        if weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)
        clr = lr / (1 + (steps[i] - 1) * lr_decay)
        state_sum.addcmul_(grad, grad, value=1)
        std = state_sum.sqrt().add_(eps)
        p.addcdiv_(grad, std, value=-clr)
        _write_back(param, p)


@torch.no_grad()
def sgd_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor] | None,
    steps: Sequence[float],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool = False,
    maximize: bool = False,
) -> None:
    """torch.optim.SGD; the momentum buffer is initialised to the gradient on a parameter's first step."""
    for i, param in enumerate(params):
        work_dtype = momentum_buffers[i].dtype if momentum_buffers is not None else torch.float32
        p = param if param.dtype in (work_dtype, torch.float64) else param.to(work_dtype)
        grad = grads[i].to(p.dtype)
        if maximize:
            grad = -grad
        if weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if steps[i] == 1:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        p.add_(grad, alpha=-lr)
        _write_back(param, p)
