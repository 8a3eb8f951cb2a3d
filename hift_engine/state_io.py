"""One encoding of optimizer state: per-group export and import, shared by ``state_dict()`` and checkpoints.

A group's state travels as a :class:`GroupState`: CPU tensors plus JSON-friendly values. Its signature (the
names, shapes and dtypes of the tensors) can be checked without the data, so a checkpoint reader validates
everything from file headers before it changes anything. Which tensors a group holds is decided by its
update path (``optim.path``): the fused path stores ``steps`` and one flat ``state``, the generic path the
inner optimizer's per-parameter tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["STATE_FORMAT", "GroupState", "Signature", "StateExport", "signature_of"]

STATE_FORMAT = 1

# name -> (shape, dtype): what a group's tensors look like, known from a file header without reading data.
Signature = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class GroupState:
    """One group's optimizer state. Tensors are on the CPU and may alias the store's host memory (read or save
    them before the next optimizer step)."""

    tensors: dict[str, Tensor]
    values: dict[str, Any] = field(default_factory=dict)

    def signature(self) -> Signature:
        return signature_of(self.tensors)


def signature_of(tensors: Mapping[str, Tensor]) -> Signature:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


@dataclass
class StateExport:
    """``meta``: everything but tensors (JSON-friendly); ``groups``: each group's state, produced lazily so a
    writer holds one group at a time."""

    meta: dict[str, Any]
    groups: Iterator[GroupState]
