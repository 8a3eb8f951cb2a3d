"""Sequence-tiled MLP: each decoder block's ``mlp`` runs over the sequence in chunks, each chunk checkpointed.

Why: at long sequences a block's MLP intermediates dominate its memory. In LLaMA-2 7B the MLP keeps gate, up,
act(gate) and their product, 4 x seq x 11008 elements, against seq x 4096 for its input: in the active block's
stored activations and again in the working memory of a recomputed block's backward (activation.py). The MLP
is token-wise (each token's output depends on that token alone), so it can run on pieces of the sequence: each
chunk runs through non-reentrant ``torch.utils.checkpoint``, which keeps only the chunk's input (a view of the
MLP's input, which the block keeps anyway) and recomputes the chunk's intermediates in its backward, so they
exist for one chunk at a time, in forward and in backward. Outputs are those of the whole MLP; the weight
gradients are the sum of the chunks' (equal up to floating-point summation order). Checkpoint restores each
chunk's RNG state in its recompute, so dropout inside the MLP (GPT-2) applies the same mask twice. Under
``torch.no_grad`` (a block offloaded by activation.py runs its forward so) the chunks run plainly: forward's
peak still holds one chunk's intermediates.

Cost: one more MLP forward per block that autograd backpropagates through (the chunk's recompute), plus a
kernel launch per chunk and layer (small chunks cost launch overhead).

Installed as activation.py installs block forwards: each ``mlp`` module gets an instance ``forward`` bound to
itself that asks the owning TiledMLP (through a weak reference) for the chunk size, so ``copy.deepcopy`` of
the model rebinds the method to the copy (never running the original's weights), a collected owner leaves
plain MLPs behind, and ``remove()`` gives the modules back unwrapped.
"""

from __future__ import annotations

import types
import weakref
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError

__all__ = ["TiledMLP", "find_mlps"]

_ATTRS = ("forward", "_hift_tiled")


def find_mlps(blocks: Sequence[tuple[str, nn.Module]]) -> list[nn.Module]:
    """The child module named ``mlp`` of each ``(name, block)``; a ConfigError naming the first block without."""
    mlps = []
    for name, block in blocks:
        mlp = block._modules.get("mlp")
        if mlp is None:
            raise ConfigError(
                f"mlp_chunk_tokens: block {name!r} ({type(block).__name__}) has no `mlp` submodule; mlp_chunk_tokens "
                "supports models whose blocks have an `mlp` submodule (LLaMA, Mistral, Qwen2, GPT-2, GPT-NeoX). OPT "
                "and BERT keep their MLP as separate layers (fc1/fc2, intermediate/output): set mlp_chunk_tokens=0"
            )
        mlps.append(mlp)
    return mlps


def _tiled_forward(self: nn.Module, *args, **kwargs):
    """The MLP's forward, bound to the MLP itself: chunked over the sequence while its TiledMLP lives."""
    forward = type(self).forward
    owner = self.__dict__.get("_hift_tiled")
    owner = owner() if owner is not None else None
    if owner is None:
        return forward(self, *args, **kwargs)
    return owner.run(forward, self, _hidden_states(self, args, kwargs))


def _hidden_states(mlp: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The MLP's only argument. Anything else passed along might be per token as well, and would need chunking
    too: such an MLP is not supported."""
    values = (*args, *kwargs.values())
    if len(values) != 1 or not torch.is_tensor(values[0]) or values[0].dim() < 2:
        raise ConfigError(
            f"mlp_chunk_tokens: {type(mlp).__name__} was called with {len(values)} argument(s) "
            f"({', '.join(type(v).__name__ for v in values)}); only an MLP called on the hidden states alone "
            "([..., seq, hidden]) can be tiled over the sequence: set mlp_chunk_tokens=0 for this model"
        )
    return values[0]


def _check_tokenwise(mlp: nn.Module, chunk: torch.Tensor, out) -> None:
    """Concatenating chunk outputs along the sequence is right only for a token-wise map [..., seq, hidden] ->
    the same shape (a mixture-of-experts block returning router logits too is not one)."""
    if not torch.is_tensor(out) or out.shape != chunk.shape:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(
            f"mlp_chunk_tokens: {type(mlp).__name__} maps {tuple(chunk.shape)} to {got}; tiling needs a token-wise "
            "MLP whose output has its input's shape: set mlp_chunk_tokens=0 for this model"
        )


def _contiguous_forward(forward, mlp: nn.Module, chunk: torch.Tensor):
    """A chunk of a batch > 1 is strided (its rows skip the other chunks' tokens) and some MLPs ``view`` their
    input (GPT-2's Conv1D): the contiguous copy is made here, inside the checkpointed function, so that it is
    transient and checkpoint keeps the strided view of the MLP's input, not a copy of it."""
    return forward(mlp, chunk.contiguous())


class TiledMLP:
    """Run every module in ``mlps`` over dim -2 (the sequence of [batch, seq, hidden]) in chunks of
    ``chunk_tokens``; ``chunk_runs`` counts chunk forwards (not their recomputes), for tests and diagnostics."""

    def __init__(self, mlps: Sequence[nn.Module], chunk_tokens: int) -> None:
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ConfigError(f"mlp_chunk_tokens must be an integer >= 1 to tile, got {chunk_tokens!r}")
        self.chunk_tokens = chunk_tokens
        self.chunk_runs = 0
        self._mlps = list(mlps)
        me = weakref.ref(self)
        for mlp in self._mlps:
            mlp._hift_tiled = me
            mlp.forward = types.MethodType(_tiled_forward, mlp)

    def run(self, forward, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``forward(mlp, x)`` chunk by chunk along dim -2, each chunk checkpointed while autograd records."""
        record = torch.is_grad_enabled()
        outs = []
        for chunk in x.split(self.chunk_tokens, dim=-2):  # one SplitBackward gathers the chunks' input gradients
            self.chunk_runs += 1
            if record:  # preserve_rng_state: the recompute draws the same dropout mask as this forward
                out = checkpoint(_contiguous_forward, forward, mlp, chunk, use_reentrant=False, preserve_rng_state=True)
            else:
                out = _contiguous_forward(forward, mlp, chunk)
            _check_tokenwise(mlp, chunk, out)
            outs.append(out)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)

    def remove(self) -> None:
        for mlp in self._mlps:
            for name in _ATTRS:
                mlp.__dict__.pop(name, None)
        self._mlps.clear()
