"""HiFT-aware activation checkpointing: recompute only the blocks above the active group.

Below the active group nothing is stored anyway (no gradient flows there); the active group needs its
activations for its own gradients; the blocks *above* it need theirs only to pass the gradient down, so they
keep just their inputs and are recomputed in backward (``torch.utils.checkpoint``, non-reentrant, RNG state
preserved). Works on any model whose blocks are modules (every Hugging Face decoder): each block gets an
instance ``forward`` bound to itself that asks the optimizer's Recompute (through a weak reference) whether the
block is above the active group; a deep copy of the model gets methods bound to the copy, never the original.
"""

from __future__ import annotations

import types
import weakref
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Recompute"]


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The block's forward, bound to the block itself (so ``copy.deepcopy`` of the model rebinds it to the copy):
    through ``checkpoint()`` while the owning Recompute says the block is above the active group."""
    forward = type(self).forward
    owner = self.__dict__.get("_hift_recompute")
    owner = owner() if owner is not None else None
    if owner is not None and owner.recomputes(self._hift_position) and torch.is_grad_enabled():
        owner.recomputed += 1
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


class Recompute:
    """``blocks[i]`` is the module of unit ``positions[i]`` (its index in forward order)."""

    def __init__(self, blocks: Sequence[nn.Module], positions: Sequence[int]) -> None:
        self._blocks = list(blocks)
        self.above = -1  # blocks at unit positions > above are recomputed; -1 before the first activation
        self.recomputed = 0  # blocks run through checkpoint() so far (for tests and diagnostics)
        me = weakref.ref(self)
        for block, pos in zip(self._blocks, positions):
            block._hift_recompute, block._hift_position = me, pos
            block.forward = types.MethodType(_checkpointed_forward, block)

    def recomputes(self, position: int) -> bool:
        return position > self.above

    def set_active(self, last_unit: int) -> None:
        """The active group ends at unit ``last_unit``: the blocks after it are recomputed."""
        self.above = last_unit

    def remove(self) -> None:
        for block in self._blocks:
            for name in ("forward", "_hift_recompute", "_hift_position"):
                block.__dict__.pop(name, None)
        self._blocks.clear()
