"""The fused update path: a FusedSpec's math over each group's flat fp32 state, one launch per bucket.

A group's state is one flat tensor (``layout.GroupLayout``) kept by a state store (resident or streamed from
pinned host memory); per-parameter step counts live on the device so the update never waits for the host.
With ``masters`` (bf16-mixed) vector 0 of that state holds the fp32 master weights: they travel with the
optimizer state, the update reads and writes them and writes the rounded weights into the model. Stateless
optimizers (SGD without momentum) without masters have no store: only step counts.
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


def _valid_step(step: Any) -> bool:
    """A saved step count: a finite number >= 0 (a 0-dim tensor in torch's state dicts)."""
    if torch.is_tensor(step):
        if step.numel() != 1 or not step.dtype.is_floating_point and step.dtype not in (torch.int32, torch.int64):
            return False
        step = step.item()
    return isinstance(step, (int, float)) and not isinstance(step, bool) and step == step and 0 <= step < float("inf")


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


def _rounding_seed(gid: int) -> int:
    """Key of the random bits that round group ``gid``'s bf16 moments (plus the step count): fixed, so a
    resumed run and every data-parallel replica round alike."""
    return (gid + 1) << 32


def rounding_noise(like: Tensor, generator: torch.Generator) -> Tensor:
    """16 random bits per element of ``like``, for round_stochastic_."""
    return torch.randint(0, 1 << 16, like.shape, dtype=torch.int32, device=like.device, generator=generator)


def round_stochastic_(dst: Tensor, src: Tensor, noise: Tensor) -> None:
    """dst (bf16) <- src (fp32) rounded up or down at random in proportion to the distance (as the kernels do):
    the 16 bits of ``noise`` added below the bf16 mantissa, then cut off. For a fixed noise it is monotone, so
    two vectors rounded with the same noise keep their order (AMSGrad's max stays >= v)."""
    bits = (src.contiguous().view(torch.int32) + noise) & -65536
    dst.copy_(bits.view(torch.float32))


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
        apply_coef: bool,
        masters: bool = False,
    ) -> None:
        self.spec, self.layouts, self.arena, self.param_groups = spec, list(layouts), arena, param_groups
        # apply_coef: the gradients are multiplied by flags[0] (clipping, loss-scale unscaling) before the math
        self.store, self.backend, self.apply_coef, self.masters = store, backend, apply_coef, masters
        self.name = spec.name
        # state_dtype="bf16": the optimizer's vectors are bf16 (the layouts say so), stored with stochastic rounding
        self.moment_bf16 = any(lay.half_from < lay.num_state for lay in self.layouts)
        self.state_names = spec.state_names(param_groups[0])
        self._structure = spec.structure(param_groups[0])
        self._grad_views = grad_views
        if backend == "triton":
            # Every bucket's kernel table now, not at its group's first update: building one copies it from pageable
            # memory, which makes the host wait for the GPU. Left to the first cycle, that wait came once per step
            # and took away the host's lead over the GPU, so any slowdown of the training thread (the store's
            # allocator pinning beside it) showed in full in the step time.
            for lay in self.layouts:
                for b in lay.buckets:
                    lay.table(b)

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
            self._init_fresh(lay, state, lay.buckets)
        return state

    def _init_fresh(self, lay: GroupLayout, flat: Tensor, buckets) -> None:
        """First activation: masters from the model's weights (exact: bf16 -> fp32), optimizer vectors as the
        spec starts them (zeros unless e.g. AdaGrad's initial_accumulator_value)."""
        for b in buckets:
            if self.masters:
                for view, i in zip(lay.state_views(flat, 0, b.members), b.members):
                    view.copy_(lay.params[i].detach())
            views = [lay.state_views(flat, k, b.members) for k in range(self.masters, lay.num_state)]
            self.spec.init_fresh(views, self.param_groups[b.param_group])

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
                    extra = {"moment_bf16": True, "seed": _rounding_seed(gid)} if self.moment_bf16 else {}
                    self.spec.kernel(table, lay.steps, grads, state, lay.state_stride, flags, self.param_groups[b.param_group],
                                     master=self.masters, **extra)
            return
        if flags is not None and flags[1].item() != 0:  # reference path: a host sync is acceptable here
            return
        coef = flags[0] if flags is not None and self.apply_coef else None
        gen = None  # one random stream per update (bf16 moments), so buckets do not repeat each other's bits
        for b in lay.buckets:
            sub = [i for i in b.members if i in member_set]
            if not sub:
                continue
            grads = [self._grad_views[gid][i] for i in sub]
            if self.masters:  # the math on the fp32 masters, with the gradients (and their clipping) in fp32
                grads = [g.float() for g in grads]
            if coef is not None:
                grads = [g * coef.to(g.dtype) for g in grads]
            states = [lay.state_views(state, k, sub) for k in range(self.masters, lay.num_state)]
            stored = states
            if self.moment_bf16:  # the math in fp32 on copies, stored back with stochastic rounding below
                states = [[t.float() for t in vec] for vec in stored]
            steps = lay.steps[sub].tolist()
            params = lay.state_views(state, 0, sub) if self.masters else [lay.params[i] for i in sub]
            if self.masters:  # a weight the user changed since the last update wins over its master (as in the kernels)
                for i, master in zip(sub, params):
                    weight = lay.params[i].detach()
                    torch.where(weight != master.to(weight.dtype), weight.float(), master, out=master)
            self.spec.reference(params, grads, states, steps, self.param_groups[b.param_group])
            if self.moment_bf16:
                if gen is None:
                    gen = torch.Generator(device=lay.device).manual_seed(_rounding_seed(gid) + int(steps[0]))
                noise = [[rounding_noise(t, gen) for t in vec] for vec in states[:2]]  # m's and v's
                noise += noise[1:] * (len(states) - 2)  # AMSGrad's max takes v's bits (order kept)
                for vec_out, vec_in, vec_noise in zip(stored, states, noise):
                    for dst, src, bits in zip(vec_out, vec_in, vec_noise):
                        round_stochastic_(dst, src, bits)
            if self.masters:
                for i, master in zip(sub, params):
                    lay.params[i].copy_(master)  # round to the model's dtype

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
            for k, name in enumerate(self._keys()):
                # views of the host state in its own dtype (bf16 moments stay bf16: no copy, nothing rounded)
                entry[name] = lay.state_views(flat, k, [i])[0]
            out.append(entry)
        return out

    def from_torch(self, gid: int, entries: Sequence[Mapping[str, Any] | None], build: bool = True) -> GroupState | None:
        lay = self.layouts[gid]
        for i, e in enumerate(entries):
            if not e:
                continue
            step = e.get("step", 1)
            if not _valid_step(step):
                raise ConfigError(f"load_state_dict: step of {lay.names[i]!r} is {step!r}, not a finite count >= 0")
            if not self.masters and "master" in e:
                raise ConfigError(
                    f"load_state_dict: {lay.names[i]!r} has fp32 master weights (saved by a bf16-/fp16-mixed run); "
                    "create the optimizer with that precision, or load the checkpoint's model weights instead"
                )
            for key in self._keys():
                src = e.get(key)
                if src is None and key == "master":
                    continue  # a torch.optim state dict: the master starts from the model's weight
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
            self._init_fresh(lay, flat, lay.buckets)  # parameters without saved state start fresh
            for i, e in enumerate(entries):
                for k, key in enumerate(self._keys() if e else ()):
                    if key in e:
                        lay.state_views(flat, k, [i])[0].copy_(e[key])
            tensors["state"] = flat
        return GroupState(tensors)

    def seed_masters(self, seeds: dict[str, Tensor]) -> None:
        """Start the masters of the named parameters from these fp32 tensors (any device), group by group; each
        group's entries leave ``seeds`` once stored, so fp32 copies are freed as the store takes them."""
        for lay in self.layouts:
            if not any(n in seeds for n in lay.names):
                continue
            flat = torch.zeros(lay.state_numel, dtype=torch.float32, device=lay.device)
            self._init_fresh(lay, flat, lay.buckets)
            for n, view in zip(lay.names, lay.state_views(flat, 0)):
                if n in seeds:
                    view.copy_(seeds.pop(n))
            self.store.load_state(lay.index, flat)

    def master_weights(self, gid: int, state: GroupState) -> dict[str, Tensor]:
        flat = state.tensors.get("state")
        if not self.masters or flat is None:  # never activated: the model's weights are the masters
            return {}
        lay = self.layouts[gid]
        out = {}
        for name, p, master in zip(lay.names, lay.params, lay.state_views(flat, 0)):
            weight = p.detach().to(master.device)  # where the user changed the weight, the weight is what counts
            out[name] = torch.where(weight == master.to(weight.dtype), master, weight.float())
        return out

    def _keys(self) -> tuple[str, ...]:
        """The flat state's vectors as torch.optim-style keys: "master" first when masters are kept."""
        return ("master",) * self.masters + tuple(self.state_names)

    # ------------------------------------------------------------------ misc
    def state_bytes_per_element(self) -> int:
        return 4 * self.masters + (2 if self.moment_bf16 else 4) * len(self.state_names)

    def describe(self) -> str:
        out = f"state_store={self.store.kind if self.store else 'none'}" + (" masters=fp32" if self.masters else "")
        out += " moments=bf16 (stochastic rounding)" if self.moment_bf16 else ""
        if self.store is not None and self.store.kind.startswith("offload"):  # said before it is taken
            out += f" pinned host state={sum(self.store.numels) * 4 / 2**30:.2f} GiB"
            alloc = self.store.alloc_stats()
            if alloc is not None and alloc["pin_context"]:
                out += f" (pinned from a second CUDA context: {alloc['pin_context_bytes'] / 2**20:.0f} MiB of device memory)"
            elif alloc is not None and alloc["pin_context_error"]:
                out += f" (no pinning context: {alloc['pin_context_error']})"
        return out

    def synchronize(self) -> None:
        if self.store is not None:
            self.store.synchronize()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
