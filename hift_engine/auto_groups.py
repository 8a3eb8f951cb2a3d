"""layers_per_group="auto": the fewest groups whose training step fits a device memory budget.

Fewer, larger groups touch every parameter in fewer steps (k steps per update of every parameter), so on a
card with room to spare they converge faster per hour; the price is device memory for the active group. The
model of one step's peak device memory (bytes), for groups of consecutive units:

    weights                   every parameter on the device (trained and frozen), as stored
  + gradient arena            the largest group's parameters, in their dtype (only the active group has any)
  + optimizer state on device offloaded: ``slots`` x the largest group's state (fp32, vectors per parameter:
                              the optimizer's, plus 1 for mixed-precision masters); resident: every group's
  + activations               one step's activations at the training batch x sequence with the bottom unit
                              active (the worst case: every block above stores its activations), plus, per unit
                              of the group, what an active unit keeps beyond a frozen one (its layers' inputs
                              for the weight gradients); measured by ``measure_activation_gib`` or given as
                              ``activation_gib`` (a number, or [bottom, per active unit])
  + gradient transient        the largest single parameter's gradient as autograd produces it, before it
                              lands in the arena (the embedding's or the head's, for a language model)
  + margin                    3% of the budget, at least 512 MiB (allocator fragmentation, workspaces)

With offloaded state that bounds the largest group's parameter count; units are then packed bottom-up into the
fewest consecutive groups under that bound (greedy packing is optimal for consecutive pieces), so groups may
differ in unit count (embedding and head are large).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["GroupPlan", "plan_groups", "measure_activation_gib", "margin_bytes"]

GIB = 2**30


def margin_bytes(budget: int) -> int:
    return int(max(512 << 20, 0.03 * budget))


@dataclass
class GroupPlan:
    sizes: list[int]  # units per group, bottom-up
    peak_bytes: int  # the modelled peak of the largest group's step
    budget_bytes: int
    parts: dict  # the model's terms, bytes

    def describe(self) -> str:
        p = {k: f"{v / GIB:.3f}" for k, v in self.parts.items()}
        return (f"layers_per_group=auto: {len(self.sizes)} groups of {self.sizes} units; modelled peak "
                f"{self.peak_bytes / GIB:.2f} GiB of a {self.budget_bytes / GIB:.2f} GiB budget (GiB: {p})")


def plan_groups(
    numel: Sequence[int],
    grad: Sequence[int],
    frozen_bytes: int,
    num_state: float,
    slots: int | None,
    budget_bytes: int,
    activation_bytes: int,
    per_unit_activation_bytes: int = 0,
    grad_transient_bytes: int = 0,
) -> GroupPlan:
    """``numel`` / ``grad``: each unit's trained parameter count and their bytes on the device (= its gradients'
    bytes), bottom-up; ``num_state``: fp32 state vectors per parameter (masters included; a bf16 vector counts
    half); ``slots``: device
    state slots of an offloaded store, None when all state is resident on the device."""
    state = [int(n * 4 * num_state) for n in numel]
    weights = sum(grad) + frozen_bytes
    fixed = weights + activation_bytes + grad_transient_bytes + margin_bytes(budget_bytes) + (sum(state) if slots is None else 0)
    per_slot = 0 if slots is None else slots

    def group_cost(lo: int, hi: int) -> int:  # device bytes that grow with the group [lo, hi)
        return sum(grad[lo:hi]) + per_slot * sum(state[lo:hi]) + (hi - lo - 1) * per_unit_activation_bytes

    room = budget_bytes - fixed
    sizes, lo = [], 0
    while lo < len(numel):
        hi = lo + 1
        if group_cost(lo, hi) > room:
            need = fixed + group_cost(lo, hi)
            raise ConfigError(
                f"layers_per_group='auto': even one unit per group does not fit the memory budget: unit {lo} needs "
                f"{need / GIB:.2f} GiB (weights {weights / GIB:.2f}, activations {activation_bytes / GIB:.2f}, its "
                f"gradients and state {group_cost(lo, hi) / GIB:.2f}, margin {margin_bytes(budget_bytes) / GIB:.2f}) "
                f"of a {budget_bytes / GIB:.2f} GiB budget; give more memory_budget_gib, or a shorter sequence or smaller "
                "batch"
            )
        while hi < len(numel) and group_cost(lo, hi + 1) <= room:
            hi += 1
        sizes.append(hi - lo)
        lo = hi
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    largest = max(group_cost(a, b) for a, b in zip(bounds, bounds[1:]))
    parts = {"weights": weights, "largest_group_grads_state_activations": largest, "activations": activation_bytes,
             "grad_transient": grad_transient_bytes, "margin": margin_bytes(budget_bytes)}
    if slots is None:
        parts["resident_state"] = sum(state)
    return GroupPlan(sizes, fixed + largest, budget_bytes, parts)


def measure_activation_gib(model: nn.Module, batch: dict, loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None) -> list[float]:
    """[bottom, per_unit]: device memory (GiB) one forward + backward on ``batch`` keeps beyond the weights with
    only the bottom unit (the embedding) trainable, HiFT's worst case (every block above storing its
    activations); and what one more active unit (block 0) keeps beyond that. Pass it as ``activation_gib``.
    Runs two steps' worth of compute; leaves requires_grad and gradients as they were. CUDA only."""
    from .grouping import build_grouping

    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ConfigError("measure_activation_gib needs the model on a CUDA device (it reads the allocator's peak); "
                          "elsewhere pass activation_gib= yourself")
    units = build_grouping(model, 1, None, (), lambda p: p.requires_grad).groups
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}

    def peak_with(trained: set) -> int:
        for p in model.parameters():
            p.requires_grad_(p in trained)
            p.grad = None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        loss.backward()
        del loss
        torch.cuda.synchronize(device)
        grad_bytes = sum(p.numel() * p.element_size() for p in trained)  # the model counts them as the arena
        out = torch.cuda.max_memory_allocated(device) - base - grad_bytes
        for p in trained:
            p.grad = None
        return max(0, out)

    try:
        bottom = peak_with(set(units[0].params))
        two = peak_with(set(units[0].params) | set(units[1].params)) if len(units) > 1 else bottom
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = grads[p]
    return [bottom / GIB, max(0, two - bottom) / GIB]
