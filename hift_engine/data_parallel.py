"""Data parallelism on torch.distributed: only the active group's gradients cross the wire.

Each step of HiFT has gradients for one group only, so a step communicates one group's gradients: about 1/k of
what full fine-tuning's all-reduce moves. Every rank runs the same group order (checked at construction), keeps
the full optimizer state (replicated; each rank updates identically from the same averaged gradients), and at
``step()`` averages the active group's gradient arena with one all-reduce per dtype. With gradient accumulation
nothing is communicated until ``step()`` (``no_sync`` semantics come free: gradients accumulate locally in the
arena). Clipping then sees the global gradient and a non-finite gradient on any rank is non-finite on all, so
every rank skips or updates together. Works with any backend (NCCL on GPUs, gloo on CPUs).

At construction every rank checks it builds the same groups and options as rank 0 and takes rank 0's weights
and buffers. ``save_checkpoint`` is a collective under data parallelism: every rank calls it (rank 0 writes).

With ``shard_state=True`` each rank keeps and updates only its piece of every group (sharding.py) and writes
that piece into the one checkpoint. Not built (issue 15): overlapping the reduction with the active group's own
backward, reduce-scatter in place of the all-reduce under sharding, per-rank RNG state in checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError

__all__ = ["GradReducer", "make_reducer"]


def make_reducer(mode: str) -> "GradReducer | None":
    """The reducer for HiFTConfig.data_parallel: "auto" when torch.distributed is initialised with more than one
    process, "on" insists on it, "off" never communicates."""
    live = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if mode == "on" and not live:
        raise ConfigError("data_parallel='on' needs torch.distributed initialised with more than one process "
                          "(torchrun --nproc-per-node N, then dist.init_process_group)")
    return GradReducer() if live and mode != "off" else None


class GradReducer:
    def __init__(self) -> None:
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.bytes_reduced = 0  # gradient bytes all-reduced so far (per rank), for benchmarks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_same_setup(self, fingerprint: Any) -> None:
        """Every rank must train the same groups in the same order with the same options."""
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
        seen: list[str | None] = [None] * self.world
        dist.all_gather_object(seen, digest)
        differ = [r for r, d in enumerate(seen) if d != seen[0]]
        if differ:
            raise ConfigError(
                f"data parallel: ranks {differ} build different groups or options than rank 0 (model, "
                "layers_per_group, strategy, seed, freeze or optimizer options differ); every rank must construct "
                "HiFTOptimizer identically"
            )

    def reduce(self, buffers: dict[torch.dtype, Tensor], lengths: dict[torch.dtype, int], views: Sequence[Tensor],
               members: Sequence[int]) -> list[int]:
        """Average the active group's gradients over the ranks; returns the parameters that have a gradient on
        any rank (on ranks where one had none, it counts as zero, as DDP does)."""
        device = next(iter(buffers.values())).device
        mask = torch.zeros(len(views), dtype=torch.float32, device=device)
        if members:
            mask[list(members)] = 1.0
        dist.all_reduce(mask)
        union = [i for i, v in enumerate(mask.tolist()) if v > 0]
        for i in sorted(set(union) - set(members)):
            views[i].zero_()
        if not union:
            return union
        for dtype, buf in buffers.items():
            n = lengths.get(dtype, 0)
            if n:
                chunk = buf[:n]
                chunk.div_(self.world)  # before the sum: fp16 gradients (loss-scaled) must not overflow in it
                dist.all_reduce(chunk)
                self.bytes_reduced += n * chunk.element_size()
        return union

    def broadcast_weights(self, tensors) -> None:
        """Rank 0's values for every rank (as DDP does at wrap time): replicas start from the same weights."""
        for t in tensors:
            dist.broadcast(t.data, src=0)

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
