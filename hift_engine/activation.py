"""HiFT-aware activation checkpointing: recompute only the blocks above the active group.

Below the active group nothing is stored anyway (no gradient flows there); the active group needs its
activations for its own gradients; the blocks *above* it need theirs only to pass the gradient down, so they
keep just their inputs and are recomputed in backward (``torch.utils.checkpoint``, non-reentrant, RNG state
preserved). "always" recomputes every block above the active group; "auto" (``MemoryBudget``) decides block by
block in forward whether the blocks still to come fit the budget if stored, and recomputes the lowest ones
only when they would not, so a short sequence recomputes nothing. With ``offload`` a recomputed block's input
is kept in pinned host memory instead of on the device (``_OffloadedBlock``), which is what remains of the
blocks above at long sequences (fp32 7B at 16k tokens: 256 MiB per block, 8 GiB for 32 blocks). With
``checkpoint_active`` the active group's own blocks are recomputed too (their weight gradients then come from
the recompute's backward), so in backward only one block's full activations exist at a time; the blocks
below the active group are never touched (no gradient flows there). Works on any
model whose blocks are modules (every Hugging Face decoder): each block gets an
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
        args, kwargs = _without_cache(args, kwargs)
        trainable = _trainable(self)
        if owner.offload and _offloadable(x, args, kwargs, trainable):
            return _run_offloaded(forward, self, args, kwargs, trainable)
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    if owner.budget is None or x is None:
        return forward(self, *args, **kwargs)
    before = owner.budget.allocated()
    out = forward(self, *args, **kwargs)
    first = out[0] if isinstance(out, (tuple, list)) else out
    if torch.is_tensor(first) and first.grad_fn is not None:  # autograd recorded it: it keeps activations
        owner.budget.observe(before, x, frozen=self._hift_position > owner.above)  # for the next decisions
    return out


_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def _is_cache(v) -> bool:
    """A Hugging Face KV cache object (transformers.Cache), wherever the model passes it."""
    return any(c.__name__ in ("Cache", "DynamicCache", "EncoderDecoderCache") for c in type(v).__mro__)


def _without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A recomputed block must not write a KV cache: it would append its keys twice (forward and recompute) and
    the recompute would attend over both. Training needs no cache, so cache objects become None wherever they
    are passed (GPT-2 passes its cache positionally); ``use_cache`` is left as given, so a block that returns a
    tuple with a cache slot keeps its output shape (older transformers read ``layer_outputs[1]``)."""
    if not any(_is_cache(v) for v in args) and not any(
        v is not None and (k in _CACHE_KWARGS or _is_cache(v)) for k, v in kwargs.items()
    ):
        return args, kwargs
    args = tuple(None if _is_cache(v) else v for v in args)
    kwargs = {k: (None if k in _CACHE_KWARGS or _is_cache(v) else v) for k, v in kwargs.items()}
    return args, kwargs


def _trainable(block: nn.Module) -> tuple[torch.Tensor, ...]:
    """The block's parameters that get gradients this step (an active block's, with checkpoint_active)."""
    return tuple(p for p in block.parameters() if p.requires_grad)


def _offloadable(x, args, kwargs, trainable: Sequence[torch.Tensor] = ()) -> bool:
    """The offloaded path passes the gradient to the block's first tensor argument and its own parameters only:
    every other tensor argument must not need one (Hugging Face passes masks and rotary tables, which do not).
    An input that needs no gradient is fine when the block's parameters do (the lowest active block above a
    frozen embedding); with neither there is nothing to backpropagate."""
    if x is None or not x.is_floating_point() or not (x.requires_grad or trainable):
        return False
    others = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v is not x]
    others += [t for v in (*args, *kwargs.values()) if isinstance(v, (tuple, list)) for t in v if torch.is_tensor(t)]
    return not any(t.requires_grad for t in others)


class _Slot:
    """Where the offloaded input goes in the block's arguments (the closure must not keep the tensor alive)."""


def _autocast_state(device_type: str):
    if device_type not in ("cuda", "cpu"):
        return None
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _OffloadedBlock(torch.autograd.Function):
    """Checkpoint a block keeping its input in (pinned) host memory: forward runs the block without recording
    and copies the input out; backward copies it back, reruns the block with the RNG and autocast state forward
    saw, and backpropagates through it. The copies are queued on the current stream, so stream order alone makes
    the device input free for reuse only after it has been read, and the block rerun only after it is back.
    Nothing here refers to the device input after forward: only the host copy stays.

    ``params`` are the block's trainable parameters (an active block under checkpoint_active): inputs of the
    Function, so that autograd calls backward even when ``x`` needs no gradient, and so that their gradients
    are returned to the outer backward, which accumulates them as it would without checkpointing (the
    engine's post-accumulate-grad hooks fire once per parameter and backward; a nested backward that
    accumulated them itself would fire them a second time when the outer one passes the parameters' empty
    gradients on)."""

    @staticmethod
    def forward(ctx, x, run, *params):
        ctx.run, ctx.device, ctx.params = run, x.device, params
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        ctx.autocast = _autocast_state(x.device.type)
        host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
        host.copy_(x, non_blocking=x.is_cuda)
        ctx.host = host
        with torch.no_grad():
            return run(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.host is None:
            raise RuntimeError("activation_offload: this block's saved input was used by an earlier backward; a "
                               "second backward through it (retain_graph=True) is not supported")
        x = ctx.host.to(ctx.device, non_blocking=ctx.device.type == "cuda").requires_grad_(ctx.needs_input_grad[0])
        cpu_rng, dev_rng = ctx.rng
        devices = [ctx.device] if dev_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(cpu_rng)
            if dev_rng is not None:
                torch.cuda.set_rng_state(dev_rng, ctx.device)
            if ctx.autocast is not None:
                enabled, dtype = ctx.autocast
                with torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                    out = ctx.run(x)
            else:
                out = ctx.run(x)
        wanted = ((x,) if x.requires_grad else ()) + ctx.params
        grads = list(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        ctx.host = ctx.run = ctx.params = None
        return (grads.pop(0) if x.requires_grad else None, None, *grads)


def _run_offloaded(forward, block, args, kwargs, trainable: Sequence[torch.Tensor] = ()):
    """``forward(block, *args, **kwargs)`` through _OffloadedBlock, its first tensor argument offloaded; a block
    that returns a tuple (older transformers) passes its other outputs through untouched."""
    x = _first_tensor(args, kwargs)
    args = tuple(_Slot if a is x else a for a in args)  # the closure below keeps no reference to x
    kwargs = {k: (_Slot if v is x else v) for k, v in kwargs.items()}
    extra: list = []

    def run(inp):
        out = forward(block, *(inp if a is _Slot else a for a in args),
                      **{k: (inp if v is _Slot else v) for k, v in kwargs.items()})
        if isinstance(out, tuple):
            extra[:] = out[1:]
            return out[0]
        return out

    main = _OffloadedBlock.apply(x, run, *trainable)
    return (main, *extra) if extra else main


class MemoryBudget:
    """activation_checkpointing="auto": recompute a block above the active group only when storing it and the
    blocks still to come would not fit ``budget_bytes``.

    What a stored block keeps is measured, not modelled: the allocator's growth across each block run without
    checkpointing, per element of the block's input, the largest seen, kept apart for blocks of the active
    group and frozen blocks above it. A frozen block keeps less (its linear layers save no inputs for weight
    gradients), so the decision for a frozen block uses the frozen estimate once one block was measured, and
    the active one (an upper bound) until then. With the active estimate alone, "auto" recomputed about two
    blocks a step at 7B fp32 x 2048 tokens where none were needed (measured before this split; the split is not
    yet measured on a GPU). Until any block has been measured every candidate is
    recomputed (the safe choice). Beyond the stored blocks, ``reserve_blocks`` blocks' worth (the recompute of
    one block and backward's working memory) plus ``margin_bytes`` is kept free. ``allocated`` reads the bytes
    allocated now (``torch.cuda.memory_allocated`` on a GPU). Memory the LM head needs after the last block
    (full-vocabulary logits) is covered only by that reserve and margin: at long sequences use the chunked head
    (``head_loss.causal_lm_loss``, ``hift train --head_chunk_tokens``)."""

    def __init__(self, budget_bytes: int, allocated: Callable[[], int], margin_bytes: int | None = None,
                 reserve_blocks: float = 2.0) -> None:
        self.budget_bytes = int(budget_bytes)
        self.allocated = allocated
        self.margin_bytes = int(margin_bytes if margin_bytes is not None else max(512 << 20, 0.03 * budget_bytes))
        self.reserve_blocks = reserve_blocks
        self.active_per_element = 0.0  # bytes a stored block of the active group keeps per element of its input
        self.frozen_per_element = 0.0  # the same for a stored frozen block (above the active group)

    @property
    def bytes_per_element(self) -> float:
        """The upper bound: what the larger kind of stored block keeps per input element."""
        return max(self.active_per_element, self.frozen_per_element)

    @bytes_per_element.setter
    def bytes_per_element(self, value: float) -> None:  # one estimate for both kinds (tests, a known model)
        self.active_per_element = self.frozen_per_element = float(value)

    def observe(self, before: int, x: torch.Tensor, frozen: bool = False) -> None:
        kept = self.allocated() - before
        if kept > 0 and x.numel():
            if frozen:
                self.frozen_per_element = max(self.frozen_per_element, kept / x.numel())
            else:
                self.active_per_element = max(self.active_per_element, kept / x.numel())

    def fits(self, x: torch.Tensor | None, remaining: int, frozen: bool = False) -> bool:
        """Whether ``remaining`` more blocks (this one included; frozen ones if ``frozen``) can be stored for an
        input like ``x``."""
        per_element = (self.frozen_per_element if frozen else 0.0) or self.bytes_per_element
        if x is None or not per_element:
            return False
        block = per_element * x.numel()
        need = self.allocated() + (remaining + self.reserve_blocks) * block + self.margin_bytes
        return need <= self.budget_bytes


class Recompute:
    """``blocks[i]`` is the module of unit ``positions[i]`` (its index in forward order); ``budget`` None
    recomputes every block above the active group ("always"), a MemoryBudget only those that must ("auto").
    ``checkpoint_active`` makes the active group's blocks candidates too ("always": recomputed; "auto": the
    lowest candidates first, as for the blocks above)."""

    def __init__(self, blocks: Sequence[nn.Module], positions: Sequence[int], budget: MemoryBudget | None = None,
                 offload: bool = False, checkpoint_active: bool = False) -> None:
        self._blocks = list(blocks)
        self.offload = offload
        self.checkpoint_active = checkpoint_active
        self._positions = sorted(positions)
        self.budget = budget
        self.above = -1  # the active group's last unit position; -1 before the first activation
        self.lowest = 0  # blocks at unit positions >= lowest may be recomputed
        self.recomputed = 0  # blocks run through checkpoint() so far (for tests and diagnostics)
        me = weakref.ref(self)
        for block, pos in zip(self._blocks, positions):
            block._hift_recompute, block._hift_position = me, pos
            block.forward = types.MethodType(_checkpointed_forward, block)

    def recomputes(self, position: int, x: torch.Tensor | None = None) -> bool:
        if position < self.lowest:
            return False
        if self.budget is None:
            return True
        remaining = len(self._positions) - bisect.bisect_left(self._positions, position)  # this block and above
        return not self.budget.fits(x, remaining, frozen=position > self.above)

    def set_active(self, first_unit: int, last_unit: int) -> None:
        """The active group spans units ``first_unit``..``last_unit``: the blocks after it are recomputed, and
        with checkpoint_active its own blocks too. Blocks below ``first_unit`` never are: no gradient reaches
        them, so they store nothing anyway."""
        self.above = last_unit
        self.lowest = first_unit if self.checkpoint_active else last_unit + 1

    def remove(self) -> None:
        for block in self._blocks:
            for name in ("forward", "_hift_recompute", "_hift_position"):
                block.__dict__.pop(name, None)
        self._blocks.clear()
