"""HiFT-aware activation checkpointing: recompute only the blocks above the active group.

Below the active group nothing is stored anyway (no gradient flows there); the active group needs its
activations for its own gradients; the blocks *above* it need theirs only to pass the gradient down, so they
keep just their inputs and are recomputed in backward (``torch.utils.checkpoint``, non-reentrant, RNG state
preserved). Works on any model whose blocks are modules (every Hugging Face decoder): each block's ``forward``
is wrapped on the instance, and the wrapper asks which blocks are above the active group at call time.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Recompute"]


class Recompute:
    """``blocks[i]`` is the module of unit ``positions[i]`` (its index in forward order)."""

    def __init__(self, blocks: Sequence[nn.Module], positions: Sequence[int]) -> None:
        self._blocks = list(blocks)
        self._positions = list(positions)
        self.above = -1  # blocks at unit positions > above are recomputed; -1 before the first activation
        self.recomputed = 0  # blocks run through checkpoint() so far (for tests and diagnostics)
        for block, pos in zip(self._blocks, self._positions):
            inner = getattr(block, "_hift_inner_forward", None) or block.forward  # a previous optimizer's wrapper
            block._hift_inner_forward = inner
            block.forward = self._wrap(inner, pos)

    def _wrap(self, inner, position: int):
        def forward(*args, **kwargs):
            if position > self.above and torch.is_grad_enabled():
                self.recomputed += 1
                return checkpoint(inner, *args, use_reentrant=False, **kwargs)
            return inner(*args, **kwargs)

        return forward

    def set_active(self, last_unit: int) -> None:
        """The active group ends at unit ``last_unit``: the blocks after it are recomputed."""
        self.above = last_unit

    def remove(self) -> None:
        for block in self._blocks:
            inner = block.__dict__.pop("_hift_inner_forward", None)
            if inner is not None and "forward" in block.__dict__:
                del block.forward
        self._blocks.clear()
