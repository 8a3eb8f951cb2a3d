"""HiFT-aware activation checkpointing: recompute only the blocks above the active group.

Below the active group nothing is stored anyway (no gradient flows there); the active group needs its
activations for its own gradients; the blocks *above* it need theirs only to pass the gradient down, so they
keep just their inputs and are recomputed in backward (``torch.utils.checkpoint``, non-reentrant, RNG state
preserved). "always" recomputes every block above the active group; "auto" (``MemoryBudget``) decides block by
block in forward whether the blocks still to come fit the budget if stored, and recomputes the lowest ones
only when they would not, so a short sequence recomputes nothing. Works on any model whose blocks are modules (every Hugging Face decoder): each block gets an
instance ``forward`` bound to itself that asks the optimizer's Recompute (through a weak reference) whether the
block is above the active group; a deep copy of the model gets methods bound to the copy, never the original.
"""

from __future__ import annotations

import bisect
import types
import weakref
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Recompute", "MemoryBudget"]


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    """The block's input activations (the first tensor argument; Hugging Face passes hidden_states first)."""
    for v in (*args, *kwargs.values()):
        if torch.is_tensor(v):
            return v
    return None


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The block's forward, bound to the block itself (so ``copy.deepcopy`` of the model rebinds it to the copy):
    through ``checkpoint()`` while the owning Recompute says so for this block."""
    forward = type(self).forward
    owner = self.__dict__.get("_hift_recompute")
    owner = owner() if owner is not None else None
    if owner is None or not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    x = _first_tensor(args, kwargs)
    if owner.recomputes(self._hift_position, x):
        owner.recomputed += 1
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    if owner.budget is None or x is None:
        return forward(self, *args, **kwargs)
    before = owner.budget.allocated()
    out = forward(self, *args, **kwargs)
    first = out[0] if isinstance(out, (tuple, list)) else out
    if torch.is_tensor(first) and first.grad_fn is not None:  # autograd recorded it: it keeps activations
        owner.budget.observe(before, x)  # what a stored block keeps, for the next decisions
    return out


class MemoryBudget:
    """activation_checkpointing="auto": recompute a block above the active group only when storing it and the
    blocks still to come would not fit ``budget_bytes``.

    What a stored block keeps is measured, not modelled: the allocator's growth across each block run without
    checkpointing, per element of the block's input (the largest seen; the active group's blocks keep more
    than frozen ones, so the estimate errs towards recomputing). Until a block has been measured every block
    above the active group is recomputed (the safe choice). Beyond the stored blocks, ``reserve_blocks``
    blocks' worth (the recompute of one block and backward's working memory) plus ``margin_bytes`` is kept
    free. ``allocated`` reads the bytes allocated now (``torch.cuda.memory_allocated`` on a GPU). Memory the
    LM head needs after the last block (full-vocabulary logits) is covered only by that reserve and margin: at
    long sequences use the chunked head (``head_loss.causal_lm_loss``, ``hift train --head_chunk_tokens``)."""

    def __init__(self, budget_bytes: int, allocated: Callable[[], int], margin_bytes: int | None = None,
                 reserve_blocks: float = 2.0) -> None:
        self.budget_bytes = int(budget_bytes)
        self.allocated = allocated
        self.margin_bytes = int(margin_bytes if margin_bytes is not None else max(512 << 20, 0.03 * budget_bytes))
        self.reserve_blocks = reserve_blocks
        self.bytes_per_element = 0.0  # bytes a stored block keeps per element of its input
        self._last_input = 0

    def observe(self, before: int, x: torch.Tensor) -> None:
        kept = self.allocated() - before
        if kept > 0 and x.numel():
            self.bytes_per_element = max(self.bytes_per_element, kept / x.numel())

    def fits(self, x: torch.Tensor | None, remaining: int) -> bool:
        """Whether ``remaining`` more blocks (this one included) can be stored for an input like ``x``."""
        if x is None or not self.bytes_per_element:
            return False
        block = self.bytes_per_element * x.numel()
        need = self.allocated() + (remaining + self.reserve_blocks) * block + self.margin_bytes
        return need <= self.budget_bytes


class Recompute:
    """``blocks[i]`` is the module of unit ``positions[i]`` (its index in forward order); ``budget`` None
    recomputes every block above the active group ("always"), a MemoryBudget only those that must ("auto")."""

    def __init__(self, blocks: Sequence[nn.Module], positions: Sequence[int], budget: MemoryBudget | None = None) -> None:
        self._blocks = list(blocks)
        self._positions = sorted(positions)
        self.budget = budget
        self.above = -1  # blocks at unit positions > above may be recomputed; -1 before the first activation
        self.recomputed = 0  # blocks run through checkpoint() so far (for tests and diagnostics)
        me = weakref.ref(self)
        for block, pos in zip(self._blocks, positions):
            block._hift_recompute, block._hift_position = me, pos
            block.forward = types.MethodType(_checkpointed_forward, block)

    def recomputes(self, position: int, x: torch.Tensor | None = None) -> bool:
        if position <= self.above:
            return False
        if self.budget is None:
            return True
        remaining = len(self._positions) - bisect.bisect_left(self._positions, position)  # this block and above
        return not self.budget.fits(x, remaining)

    def set_active(self, last_unit: int) -> None:
        """The active group ends at unit ``last_unit``: the blocks after it are recomputed."""
        self.above = last_unit

    def remove(self) -> None:
        for block in self._blocks:
            for name in ("forward", "_hift_recompute", "_hift_position"):
                block.__dict__.pop(name, None)
        self._blocks.clear()
