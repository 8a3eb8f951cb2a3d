"""The fused update path: a FusedSpec's math over each group's flat fp32 state, one launch per bucket.

A group's state is one flat tensor (``layout.GroupLayout``) kept by a state store (resident or streamed from
pinned host memory); per-parameter step counts live on the device so the update never waits for the host.
Stateless optimizers (SGD without momentum) have no store: only step counts.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..layout import GradArena, GroupLayout
from ..state_io import GroupState, Signature
from ..store import StateStore
from .base import FusedSpec
from .path import UpdatePath

__all__ = ["FusedPath", "resolve_kernels"]


def resolve_kernels(choice: str, device: torch.device) -> str:
    """"triton" or "reference" for ``HiFTConfig.kernels`` on ``device`` (errors name what is missing)."""
    if choice == "reference":
        return "reference"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    usable = device.type == "cuda" or (device.type == "cpu" and interpret)
    if choice == "triton" and not usable:
        raise ConfigError(
            "kernels='triton' needs a CUDA device, or TRITON_INTERPRET=1 set before import for CPU tensors; "
            "use kernels='auto' to fall back to the reference math"
        )
    if choice != "triton" and device.type != "cuda":
        return "reference"
    try:
        import triton  # noqa: F401 - only whether it imports
    except ImportError as e:
        if choice == "triton":
            raise ConfigError(f"kernels='triton' but Triton cannot be imported: {e}") from e
        warnings.warn(f"hift_engine: Triton unavailable ({e}); using the slower reference update on CUDA", stacklevel=3)
        return "reference"
    return "triton"


class FusedPath(UpdatePath):
    def __init__(
        self,
        spec: FusedSpec,
        layouts: Sequence[GroupLayout],
        grad_views: Sequence[Sequence[Tensor]],
        arena: GradArena,
        param_groups: list[dict[str, Any]],
        store: StateStore | None,
        backend: str,
        clip: bool,
    ) -> None:
        self.spec, self.layouts, self.arena, self.param_groups = spec, list(layouts), arena, param_groups
        self.store, self.backend, self.clip = store, backend, clip
        self.name = spec.name
        self.state_names = spec.state_names(param_groups[0])
        self._structure = spec.structure(param_groups[0])
        self._grad_views = grad_views

    # ------------------------------------------------------------------ stepping
    def _check_structure(self) -> None:
        for pg in self.param_groups:
            if self.spec.structure(pg) != self._structure:
                raise ConfigError(
                    f"param_group {pg.get('name')!r} changed {self.spec.structural} (or momentum on/off) after "
                    "the optimizer was created; these fix the state layout. Create a new optimizer instead"
                )

    def _state(self, lay: GroupLayout) -> Tensor:
        if self.store is None:
            return lay.steps.new_empty(0)
        state, fresh = self.store.activate(lay.index)
        if fresh:
            for b in lay.buckets:
                views = [lay.state_views(state, k, b.members) for k in range(lay.num_state)]
                self.spec.init_fresh(views, self.param_groups[b.param_group])
        return state

    def update(self, gid: int, members: Sequence[int], flags: Tensor | None) -> None:
        self._check_structure()
        lay = self.layouts[gid]
        state = self._state(lay)
        full = len(members) == len(lay.params)
        ok = (1.0 - flags[1]) if flags is not None else 1.0  # a skipped step does not count
        if full:
            lay.steps.add_(ok)
        else:
            index = torch.tensor(members, device=lay.device)
            lay.steps.index_add_(0, index, torch.ones(len(members), device=lay.device) * ok)
        member_set = set(members)
        if self.backend == "triton":
            for b in lay.buckets:
                sub = b.members if full else [i for i in b.members if i in member_set]
                if sub:
                    table = lay.table(b, None if full else sub)
                    grads = self.arena.buffers[b.dtype]
                    self.spec.kernel(table, lay.steps, grads, state, lay.state_stride, flags, self.param_groups[b.param_group])
            return
        if flags is not None and flags[1].item() != 0:  # reference path: a host sync is acceptable here
            return
        coef = flags[0] if flags is not None and self.clip else None
        for b in lay.buckets:
            sub = [i for i in b.members if i in member_set]
            if not sub:
                continue
            grads = [self._grad_views[gid][i] for i in sub]
            if coef is not None:
                grads = [g * coef.to(g.dtype) for g in grads]
            states = [lay.state_views(state, k, sub) for k in range(lay.num_state)]
            steps = lay.steps[sub].tolist()
            self.spec.reference([lay.params[i] for i in sub], grads, states, steps, self.param_groups[b.param_group])

    def put_away(self, gid: int, keep: bool) -> None:
        if self.store is not None:
            self.store.release(gid, keep=keep)

    def prefetch(self, gid: int) -> None:
        if self.store is not None:
            self.store.prefetch(gid)

    # ------------------------------------------------------------------ state encoding
    def export_group(self, gid: int) -> GroupState:
        lay = self.layouts[gid]
        tensors = {"steps": lay.steps.detach().cpu()}
        flat = self.store.host_state(gid) if self.store is not None else None
        if flat is not None:
            tensors["state"] = flat
        return GroupState(tensors)

    def check_group(self, gid: int, signature: Signature, values: Mapping[str, Any]) -> None:
        lay = self.layouts[gid]
        expected = {"steps": ((len(lay.params),), torch.float32)}
        if self.store is not None:
            expected["state"] = ((lay.state_numel,), torch.float32)
        extra = sorted(set(signature) - set(expected))
        if extra or values:
            raise ConfigError(f"group {gid}: unexpected saved state {extra or sorted(values)} (saved by another optimizer?)")
        for key, want in expected.items():
            got = signature.get(key)
            if got is None and key == "state":
                continue  # never initialised
            if got != want:
                raise ConfigError(
                    f"group {gid}: saved {key!r} is {got[1] if got else 'missing'} of shape {got[0] if got else None}, "
                    f"expected {want[1]} of shape {want[0]} (saved for another model, grouping or optimizer option)"
                )

    def import_group(self, gid: int, state: GroupState) -> None:
        lay = self.layouts[gid]
        if self.store is not None:
            flat = state.tensors.get("state")
            if flat is None:
                self.store.reset(gid)
            else:
                self.store.load_state(gid, flat)
        lay.steps.copy_(state.tensors["steps"])

    def to_torch(self, gid: int, state: GroupState) -> list[dict[str, Any] | None]:
        lay = self.layouts[gid]
        steps, flat = state.tensors["steps"].tolist(), state.tensors.get("state")
        out: list[dict[str, Any] | None] = []
        for i in range(len(lay.params)):
            if steps[i] == 0:
                out.append(None)
                continue
            entry: dict[str, Any] = {"step": torch.tensor(steps[i], dtype=torch.float32)}
            for k, name in enumerate(self.state_names):
                entry[name] = lay.state_views(flat, k, [i])[0]
            out.append(entry)
        return out

    def from_torch(self, gid: int, entries: Sequence[Mapping[str, Any] | None], build: bool = True) -> GroupState | None:
        lay = self.layouts[gid]
        for i, e in enumerate(entries):
            if not e:
                continue
            for k, key in enumerate(self.state_names):
                src = e.get(key)
                if src is None:
                    raise ConfigError(f"load_state_dict: state of {lay.names[i]!r} lacks {key!r} (saved by another optimizer?)")
                if not torch.is_tensor(src) or tuple(src.shape) != tuple(lay.params[i].shape):
                    raise ConfigError(
                        f"load_state_dict: {key} of {lay.names[i]!r} has shape {tuple(getattr(src, 'shape', ())) or None}, "
                        f"the parameter has {tuple(lay.params[i].shape)}. HiFTOptimizer numbers parameters as its own "
                        "param_groups list them (weight-decay group first, each in unit order); load a torch.optim "
                        "state dict with load_torch_state_dict(state_dict, params) to map by parameter instead"
                    )
        if not build:
            return None
        # torch's SGD keeps no step count; a saved momentum buffer means at least one step was taken.
        steps = torch.tensor([float(e.get("step", 1)) if e else 0.0 for e in entries], dtype=torch.float32)
        tensors = {"steps": steps}
        if self.store is not None and any(entries):
            flat = torch.zeros(lay.state_numel, dtype=torch.float32)
            for b in lay.buckets:
                views = [lay.state_views(flat, k, b.members) for k in range(lay.num_state)]
                self.spec.init_fresh(views, self.param_groups[b.param_group])
            for i, e in enumerate(entries):
                for k, key in enumerate(self.state_names if e else ()):
                    lay.state_views(flat, k, [i])[0].copy_(e[key])
            tensors["state"] = flat
        return GroupState(tensors)

    # ------------------------------------------------------------------ misc
    def state_bytes_per_element(self) -> int:
        return 4 * len(self.state_names)

    def describe(self) -> str:
        return f"state_store={self.store.kind if self.store else 'none'}"

    def synchronize(self) -> None:
        if self.store is not None:
            self.store.synchronize()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
