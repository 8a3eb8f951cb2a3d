"""ZeRO-1 for HiFT (``shard_state=True`` under data parallelism): each rank owns 1/N of every group.

A group's parameters, read one after another as one flat sequence, are cut into N contiguous pieces, one per
rank (cuts aligned to 64 elements inside a parameter, as the kernels' state offsets are). A rank keeps the
optimizer state (and fp32 masters) of its piece only, so its pinned host memory and the state it streams per
step are about 1/N of the group's. At ``step()`` the active group's gradients are averaged over the ranks as
without sharding (so clipping sees the global norm and a non-finite gradient is seen by every rank), each rank
copies its piece of the averaged gradients into a small arena of its own and updates its piece of the weights
with the same fused kernels (every element gets exactly the arithmetic it gets unsharded), and then every
piece is broadcast from its owner so all ranks hold the same weights again.

The update path sees a rank's piece as a group of "parameters" that are flat views of the real ones
(``name[start:stop]``); ``refresh`` rebuilds those views if a parameter's storage was replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError
from .layout import ALIGN, GradArena, GroupLayout

__all__ = ["Piece", "ShardPlan", "split_group", "shard_file"]


def shard_file(gid: int, rank: int) -> str:
    """A rank's piece of group ``gid`` in a checkpoint's ``optim/`` directory."""
    return f"group-{gid:04d}.rank-{rank:03d}.safetensors"


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of parameter ``param`` (its index in the group) in flat order."""

    param: int
    start: int
    stop: int


def split_group(sizes: Sequence[int], world: int) -> list[list[Piece]]:
    """The pieces of each rank for parameters of these element counts: rank r owns the flat range from cut r to
    cut r+1, each cut at about r/world of the group, moved down to a multiple of ALIGN within its parameter."""
    total = sum(sizes)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def aligned_cut(r: int) -> int:
        if r == world:
            return total
        c = total * r // world
        i = max(j for j, s in enumerate(starts) if s <= c)
        return starts[i] + (c - starts[i]) // ALIGN * ALIGN

    cuts = [aligned_cut(r) for r in range(world + 1)]
    out: list[list[Piece]] = []
    for r in range(world):
        lo, hi, pieces = cuts[r], cuts[r + 1], []
        for i, (s, n) in enumerate(zip(starts, sizes)):
            a, b = max(lo, s), min(hi, s + n)
            if a < b:
                pieces.append(Piece(i, a - s, b - s))
        out.append(pieces)
    return out


class ShardPlan:
    """Which piece of every group this rank owns, its layouts for the update path, and the copies in and out."""

    def __init__(self, layouts: Sequence[GroupLayout], num_state: int, world: int, rank: int, device: torch.device) -> None:
        self.full = list(layouts)
        self.world, self.rank = world, rank
        self.pieces = [split_group([p.numel() for p in lay.params], world) for lay in self.full]
        for lay, per_rank in zip(self.full, self.pieces):
            empty = [r for r, pcs in enumerate(per_rank) if not pcs]
            if empty:
                raise ConfigError(
                    f"shard_state: group {lay.index} has {lay.numel} elements, too few to give each of {world} ranks "
                    f"a piece (ranks {empty} would own nothing); use larger groups (layers_per_group) or shard_state=False"
                )
        self.layouts = [
            GroupLayout(lay.index, [f"{lay.names[pc.param]}[{pc.start}:{pc.stop}]" for pc in mine],
                        self._views(lay, mine), [lay.param_group_of[pc.param] for pc in mine], num_state, device)
            for lay, mine in ((lay, per_rank[rank]) for lay, per_rank in zip(self.full, self.pieces))
        ]
        self._addresses = [self._bases(g) for g in range(len(self.full))]
        self.arena = GradArena(self.layouts, device)
        self.grad_views = [lay.grad_views(self.arena) for lay in self.layouts]
        self.bytes_broadcast = 0  # weight bytes this rank sent or received after updates, for benchmarks

    @staticmethod
    def _views(lay: GroupLayout, pieces: Sequence[Piece]) -> list[Tensor]:
        return [lay.params[pc.param].detach().view(-1)[pc.start:pc.stop] for pc in pieces]

    def _bases(self, gid: int) -> tuple[int, ...]:
        return tuple(self.full[gid].params[pc.param].data_ptr() for pc in self.pieces[gid][self.rank])

    def refresh(self, gid: int) -> None:
        """Re-point this rank's views if a parameter's storage was replaced since (``p.data = ...``): the update
        must land in the tensor the model uses."""
        if self._bases(gid) != self._addresses[gid]:
            self.layouts[gid].params[:] = self._views(self.full[gid], self.pieces[gid][self.rank])
            self._addresses[gid] = self._bases(gid)

    def piece_seeds(self, seeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """fp32 master seeds by parameter name -> this rank's pieces of them, named as its layouts name them."""
        out = {}
        for gid, lay in enumerate(self.full):
            for pc, piece_name in zip(self.pieces[gid][self.rank], self.layouts[gid].names):
                seed = seeds.get(lay.names[pc.param])
                if seed is not None:
                    out[piece_name] = seed.reshape(-1)[pc.start:pc.stop]
        return out

    def take_grads(self, gid: int, members: Sequence[int], full_views: Sequence[Tensor]) -> list[int]:
        """Copy this rank's piece of the (averaged) gradients of ``members`` into its arena; returns the indices
        of its pieces that have a gradient."""
        wanted, owned = set(members), []
        for j, pc in enumerate(self.pieces[gid][self.rank]):
            if pc.param in wanted:
                self.grad_views[gid][j].view(-1).copy_(full_views[pc.param].view(-1)[pc.start:pc.stop])
                owned.append(j)
        return owned

    def share_weights(self, gid: int, members: Sequence[int]) -> None:
        """Every rank's updated pieces of ``members`` to every rank (one broadcast per piece, from its owner)."""
        wanted = set(members)
        lay = self.full[gid]
        for owner, pieces in enumerate(self.pieces[gid]):
            for pc in pieces:
                if pc.param in wanted:
                    piece = lay.params[pc.param].detach().view(-1)[pc.start:pc.stop]
                    dist.broadcast(piece, src=owner)
                    self.bytes_broadcast += piece.numel() * piece.element_size()

    def assemble_masters(self, gid: int, per_rank: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Whole fp32 master weights of group ``gid`` from every rank's ``master_weights`` pieces (named
        ``name[start:stop]``); a parameter with a piece missing (its group never activated) is left out, so the
        model's own weight stands for it."""
        lay, out = self.full[gid], {}
        for i, name in enumerate(lay.names):
            mine = [(pc, per_rank[r].get(f"{name}[{pc.start}:{pc.stop}]"))
                    for r, pcs in enumerate(self.pieces[gid]) for pc in pcs if pc.param == i]
            if mine and all(t is not None for _, t in mine):
                flat = torch.empty(lay.params[i].numel(), dtype=torch.float32)
                for pc, t in mine:
                    flat[pc.start:pc.stop] = t.reshape(-1)
                out[name] = flat.view(lay.params[i].shape)
        return out

    def describe(self) -> str:
        mine = sum(lay.numel for lay in self.layouts)
        total = sum(lay.numel for lay in self.full)
        return f"shard_state: rank {self.rank} of {self.world} owns {mine:,} of {total:,} elements ({mine / total:.1%})"
