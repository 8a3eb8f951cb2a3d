"""HiFTOptimizer: a torch.optim.Optimizer that trains one group of layers per step.

Per ``step()`` (group g active, g' next):
  1. bring g's optimizer state onto the device (prefetched during forward/backward; usually already there)
  2. one device reduction over g's flat gradients: norm for clipping and the non-finite check (no host sync)
  3. one fused update launch per (param_group, dtype) bucket of g (Triton on CUDA, reference math elsewhere)
  4. put g's state away (write-back on a side stream), unless g' == g
  5. switch: requires_grad off for g, on for g' (so backward stops below g'), g' grads -> zeroed arena views
  6. prefetch g' state on a side stream, hidden behind the next forward/backward

``param_groups`` are torch-style hyper-parameter groups ("decay" and "no_decay"), so LR schedulers and
transformers.Trainer work unchanged; the HiFT layer groups are a separate partition (``grouping``).
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .config import HiFTConfig
from .errors import ConfigError
from .grouping import Grouping, build_grouping, name_matches
from .hooks import GradRouter
from .kernels._launch import DEFAULT_BLOCK
from .layout import GradArena, GroupLayout, check_params
from .nonfinite import SkipMonitor
from .optim import FUSED_SPECS, FusedSpec
from .optim.generic import GenericPath, generic_default_weight_decay
from .schedule import CycleLR, DelayedScheduler, GroupOrder
from .store import StateStore, make_store

__all__ = ["HiFTOptimizer", "default_no_decay"]

STATE_DICT_FORMAT = 1
_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def default_no_decay(model: nn.Module) -> set[str]:
    """Names excluded from weight decay, as transformers does: biases and the weights of norm layers."""
    out = set()
    norm_modules = {
        name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()
    }
    for name, _ in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owner in norm_modules or any(re.search(p, name.lower()) for p in _NO_DECAY_PATTERNS):
            out.add(name)
    return out


def _resolve_kernels(choice: str, device: torch.device) -> str:
    if choice == "reference":
        return "reference"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    usable = device.type == "cuda" or (device.type == "cpu" and interpret)
    if choice == "triton":
        if not usable:
            raise ConfigError(
                "kernels='triton' needs a CUDA device, or TRITON_INTERPRET=1 set before import for CPU tensors; "
                "use kernels='auto' to fall back to the reference math"
            )
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"kernels='triton' but Triton cannot be imported: {e}") from e
        return "triton"
    if device.type != "cuda":
        return "reference"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        warnings.warn(f"hift_engine: Triton unavailable ({e}); using the slower reference update on CUDA", stacklevel=3)
        return "reference"
    return "triton"


class HiFTOptimizer(torch.optim.Optimizer):
    """Hierarchical full-parameter fine-tuning optimizer.

    Args:
        model: the model to train, already on its training device (parameters may not move afterwards).
        optimizer: "adamw" (default), "adagrad", "sgd", or any torch.optim.Optimizer subclass.
        All other keyword arguments are HiFTConfig fields (lr, weight_decay, layers_per_group, strategy, seed,
        groups, freeze, no_decay, max_grad_norm, skip_nonfinite, max_consecutive_skips, state_store, slots,
        kernels); anything else is an optimizer option (betas, eps, amsgrad, momentum, nesterov, lr_decay, ...).

    Example:
        opt = HiFTOptimizer(model, "adamw", lr=1e-5, layers_per_group=1, strategy="bottom2up")
        sched = opt.cycle_scheduler("cosine", total_steps=10_000, warmup_steps=100)
        for batch in loader:
            model(**batch).loss.backward()
            opt.step(); sched.step(); opt.zero_grad()
    """

    def __init__(self, model: nn.Module, optimizer: Any = "adamw", **kwargs: Any) -> None:
        names = set(HiFTConfig.field_names())
        cfg_kwargs = {k: v for k, v in kwargs.items() if k in names}
        opt_kwargs = {k: v for k, v in kwargs.items() if k not in names}
        if "optimizer_kwargs" in cfg_kwargs:
            opt_kwargs = {**cfg_kwargs.pop("optimizer_kwargs"), **opt_kwargs}
        cfg = HiFTConfig(optimizer=optimizer, optimizer_kwargs=opt_kwargs, **cfg_kwargs)
        self._setup(model, cfg)

    @classmethod
    def from_config(cls, model: nn.Module, config: HiFTConfig | Mapping[str, Any]) -> "HiFTOptimizer":
        cfg = config if isinstance(config, HiFTConfig) else HiFTConfig.from_dict(config)
        fields = {k: getattr(cfg, k) for k in HiFTConfig.field_names() if k != "optimizer"}
        return cls(model, cfg.optimizer, **fields)

    # ------------------------------------------------------------------------------------------ setup
    def _setup(self, model: nn.Module, cfg: HiFTConfig) -> None:
        self.config = cfg
        self.grouping: Grouping = build_grouping(model, cfg.layers_per_group, cfg.groups, cfg.freeze)
        named = [(n, p) for g in self.grouping.groups for n, p in zip(g.param_names, g.params)]
        self.device = check_params(named)
        self.param_names = [n for n, _ in named]

        # Hyper-parameters: fused spec (validated, torch defaults) or the generic optimizer's own defaults.
        self.spec: FusedSpec | None = FUSED_SPECS[cfg.optimizer]() if isinstance(cfg.optimizer, str) else None
        if self.spec is not None:
            hyper = self.spec.normalize(cfg.optimizer_kwargs)
            wd = self.spec.default_weight_decay if cfg.weight_decay is None else cfg.weight_decay
        else:
            hyper = dict(cfg.optimizer_kwargs)
            wd = generic_default_weight_decay(cfg.optimizer) if cfg.weight_decay is None else cfg.weight_decay

        if cfg.no_decay == "auto":
            no_decay = default_no_decay(model)
        else:
            no_decay = {n for n, _ in named if any(name_matches(p, n) for p in cfg.no_decay)}
        decay_params = [p for n, p in named if n not in no_decay]
        nodecay_params = [p for n, p in named if n in no_decay]
        groups = []
        if decay_params:
            groups.append({"params": decay_params, "lr": cfg.lr, "weight_decay": wd, **hyper, "name": "decay"})
        if nodecay_params:
            groups.append({"params": nodecay_params, "lr": cfg.lr, "weight_decay": 0.0, **hyper, "name": "no_decay"})
        self._constructing = True
        super().__init__(groups, {"lr": cfg.lr, "weight_decay": wd, **hyper})
        self._constructing = False
        pg_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._structure = self.spec.structure(self.param_groups[0]) if self.spec else None

        # Freeze what the config freezes; every group starts inactive. Hooks first: torch only registers
        # them on tensors that require grad.
        by_name = dict(model.named_parameters())
        self._config_frozen = [by_name[n] for n in self.grouping.frozen if by_name[n].requires_grad]
        self.router = GradRouter([p for _, p in named] + self._config_frozen)
        for p in self._config_frozen:
            p.requires_grad_(False)
        for _, p in named:
            p.requires_grad_(False)
            p.grad = None

        self.state_names = self.spec.state_names(self.param_groups[0]) if self.spec else ()
        self.layouts = [
            GroupLayout(g.index, g.param_names, g.params, [pg_of[id(p)] for p in g.params], len(self.state_names), self.device)
            for g in self.grouping.groups
        ]
        self.arena = GradArena(self.layouts, self.device)
        self._grad_views = [lay.grad_views(self.arena) for lay in self.layouts]
        self.kernel_backend = _resolve_kernels(cfg.kernels, self.device) if self.spec else "generic"
        self.store: StateStore | None = None
        self.generic: GenericPath | None = None
        if self.spec is not None and self.state_names:
            self.store = make_store(
                cfg.state_store, [lay.state_numel for lay in self.layouts], self.device, cfg.slots,
                chunk_bytes=cfg.transfer_chunk_mib << 20,
            )
        elif self.spec is None:
            self.generic = GenericPath(cfg.optimizer, hyper, self.layouts, self.param_groups, self.device)

        self.order = GroupOrder(len(self.layouts), cfg.strategy, cfg.seed)
        self.monitor = SkipMonitor(self.device, cfg.max_consecutive_skips)
        self.global_step = 0
        self.last_grad_norm: Tensor | None = None
        self._block = DEFAULT_BLOCK  # elements per kernel program (kernels/_launch.py)
        self._activate(self.order.current)
        self._prefetch(self.order.current)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_constructing", False):
            raise NotImplementedError(
                "HiFTOptimizer builds its param_groups from the model; create a new optimizer to change them"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def num_groups(self) -> int:
        return len(self.layouts)

    @property
    def active_group(self) -> int:
        return self.order.current

    @property
    def nonfinite_skips(self) -> int:
        """Steps skipped for non-finite gradients so far (waits for the last steps' flags)."""
        self.monitor.poll(block=True)
        return self.monitor.total

    def describe(self) -> str:
        state_bytes = 4 * len(self.state_names)
        store = self.store.kind if self.store else ("generic" if self.generic else "none")
        return (
            self.grouping.describe(state_bytes_per_element=state_bytes)
            + f"\noptimizer={self.spec.name if self.spec else self.config.optimizer.__name__} "
            f"kernels={self.kernel_backend} state_store={store} device={self.device} "
            f"grad arena={self.arena.nbytes / 2**30:.3f} GiB"
        )

    # ------------------------------------------------------------------------------------------ switching
    def _activate(self, gid: int) -> None:
        lay = self.layouts[gid]
        self.arena.zero(lay)
        for p in lay.params:
            p.requires_grad_(True)
        self.router.set_active(lay.params, self._grad_views[gid])

    def _deactivate(self, gid: int) -> None:
        for p in self.layouts[gid].params:
            p.requires_grad_(False)
            p.grad = None

    def _prefetch(self, gid: int) -> None:
        if self.store is not None:
            self.store.prefetch(gid)
        elif self.generic is not None:
            self.generic.bring(gid)

    # ------------------------------------------------------------------------------------------ step
    def _grad_flags(self, lay: GroupLayout) -> Tensor | None:
        """[clip coefficient, skip] for the active group, computed on the device in one pass over its grads."""
        clip, check = self.config.max_grad_norm, self.config.skip_nonfinite
        if clip is None and not check:
            return None
        # Same reduction order as torch.nn.utils.clip_grad_norm_ (per-tensor norms, then the norm of those),
        # so k = 1 with clipping equals torch exactly. One multi-tensor launch per dtype, no host sync.
        views = self._grad_views[lay.index]
        norms = []
        for dtype in lay.grad_numel:
            same = [v for v, p in zip(views, lay.params) if p.dtype == dtype]
            if dtype == torch.float32:
                norms.extend(torch._foreach_norm(same))
            else:
                norms.extend(torch.linalg.vector_norm(v, dtype=torch.float32) for v in same)
        norm = torch.linalg.vector_norm(torch.stack(norms))
        self.last_grad_norm = norm
        coef = (clip / (norm + 1e-6)).clamp(max=1.0) if clip is not None else torch.ones_like(norm)
        skip = (~torch.isfinite(norm)).float() if check else torch.zeros_like(norm)
        return torch.stack([coef, skip])

    def _check_structure(self) -> None:
        for pg in self.param_groups:
            if self.spec.structure(pg) != self._structure:
                raise ConfigError(
                    f"param_group {pg.get('name')!r} changed {self.spec.structural} (or momentum on/off) after "
                    "the optimizer was created; these fix the state layout. Create a new optimizer instead"
                )

    def _fused_update(self, gid: int, members: list[int]) -> None:
        lay = self.layouts[gid]
        full = len(members) == len(lay.params)
        if self.store is not None:
            state, fresh = self.store.activate(gid)
            if fresh:
                for b in lay.buckets:
                    views = [lay.state_views(state, k, b.members) for k in range(lay.num_state)]
                    self.spec.init_fresh(views, self.param_groups[b.param_group])
        else:
            state = lay.steps.new_empty(0)
        flags = self._grad_flags(lay)
        ok = (1.0 - flags[1]) if flags is not None else 1.0
        if full:
            lay.steps.add_(ok)
        else:
            index = torch.tensor(members, device=self.device)
            lay.steps.index_add_(0, index, torch.ones(len(members), device=self.device) * ok)
        if flags is not None:
            self.monitor.record(flags[1], self.global_step, gid)
        if self.kernel_backend == "triton":
            for b in lay.buckets:
                sub = b.members if full else [i for i in b.members if i in set(members)]
                if sub:
                    table = lay.table(b, self._block, None if full else sub)
                    hyper = self.param_groups[b.param_group]
                    self.spec.kernel(table, lay.steps, self.arena.buffers[b.dtype], state, lay.state_stride, flags, hyper)
            return
        if flags is not None and flags[1].item() != 0:  # reference path: a host sync is acceptable here
            return
        coef = flags[0] if flags is not None and self.config.max_grad_norm is not None else None
        grads_all = self._grad_views[gid]
        member_set = set(members)
        for b in lay.buckets:
            sub = [i for i in b.members if i in member_set]
            if not sub:
                continue
            grads = [grads_all[i] for i in sub]
            if coef is not None:
                grads = [g * coef.to(g.dtype) for g in grads]
            states = [lay.state_views(state, k, sub) for k in range(lay.num_state)]
            steps = lay.steps[sub].tolist()
            self.spec.reference([lay.params[i] for i in sub], grads, states, steps, self.param_groups[b.param_group])

    def _generic_update(self, gid: int, members: list[int], keep: bool) -> None:
        lay = self.layouts[gid]
        flags = self._grad_flags(lay)
        if flags is not None:
            self.monitor.record(flags[1], self.global_step, gid)
            if flags[1].item() != 0:
                return
            if self.config.max_grad_norm is not None:
                torch._foreach_mul_([self._grad_views[gid][i] for i in members], flags[0])
        self.generic.step(gid, self.param_groups, [lay.params[i] for i in members])
        if not keep:
            self.generic.put_away(gid)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update the active group, put its state away, and switch to the next group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gid = self.order.current
        lay = self.layouts[gid]
        lay.check_unchanged()
        self.router.reinstall()
        members = sorted(self.router.received)
        nxt = self.order.peek()
        if members:
            if self.spec is not None:
                self._check_structure()
                self._fused_update(gid, members)
                if self.store is not None:
                    self.store.release(gid, keep=nxt == gid)
            else:
                self._generic_update(gid, members, keep=nxt == gid)
        self.global_step += 1
        self.order.advance()
        if nxt != gid:
            self._deactivate(gid)
            self._activate(nxt)
            self._prefetch(nxt)
        self.monitor.poll()  # after the step is complete: a NonFiniteError never leaves it half done
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the active group's gradients. They are views into a persistent buffer, so they are zeroed in
        place whatever ``set_to_none`` says (dropping them would free nothing)."""
        if self.router.dirty:
            self.arena.zero(self.layouts[self.order.current])
            self.router.cleared()
        self.router.reinstall()

    # ------------------------------------------------------------------------------------------ schedulers
    def cycle_scheduler(
        self, name: str = "cosine", total_steps: int = 1, warmup_steps: int = 0, per_step: bool = False, **kwargs: Any
    ) -> CycleLR:
        """An LR schedule for ``total_steps`` optimizer steps that advances once per cycle of k steps (HiFT's
        delayed LR; it spans ceil(total_steps / k) cycles). ``per_step=True`` advances every step instead."""
        return CycleLR(self, name, total_steps, warmup_steps, 1 if per_step else self.num_groups, **kwargs)

    def transformers_scheduler(
        self, name: str, total_steps: int, warmup_steps: int = 0, **scheduler_kwargs: Any
    ) -> DelayedScheduler:
        """Any ``transformers.get_scheduler`` schedule, built for ceil(total/k) cycles and stepped once per cycle."""
        from transformers import get_scheduler

        k = self.num_groups
        inner = get_scheduler(
            name,
            self,
            num_warmup_steps=-(-warmup_steps // k),
            num_training_steps=-(-total_steps // k),
            scheduler_specific_kwargs=scheduler_kwargs or None,
        )
        return DelayedScheduler(inner, k)

    # ------------------------------------------------------------------------------------------ state dict
    def _param_index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def state_dict(self) -> dict[str, Any]:
        """torch.optim-compatible: ``state`` maps parameter indices to torch's state keys ("step", "exp_avg",
        ...); ``hift`` holds the group order, step counter and skip counts. State tensors are CPU tensors that
        may alias the store's host memory (as torch's state_dict aliases live state): save or clone them
        before the next step."""
        index = self._param_index()
        state: dict[int, dict[str, Any]] = {}
        for gid, lay in enumerate(self.layouts):
            if self.generic is not None:
                for p, entry in self.generic.state_entries(gid).items():
                    state[index[id(p)]] = entry
                continue
            steps = lay.steps.tolist()
            flat = self.store.host_state(gid) if self.store is not None else None
            for i, p in enumerate(lay.params):
                if steps[i] == 0:
                    continue
                entry: dict[str, Any] = {"step": torch.tensor(steps[i], dtype=torch.float32)}
                for k, name in enumerate(self.state_names):
                    entry[name] = lay.state_views(flat, k, [i])[0]
                state[index[id(p)]] = entry
        groups = []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = [index[id(p)] for p in g["params"]]
            groups.append(packed)
        return {"state": state, "param_groups": groups, "hift": self.hift_meta()}

    def _names_in_index_order(self) -> list[str]:
        name_of = {id(p): n for lay in self.layouts for n, p in zip(lay.names, lay.params)}
        return [name_of[id(p)] for g in self.param_groups for p in g["params"]]

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()`` output (or a torch.optim state dict of the same optimizer type)."""
        if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ConfigError("load_state_dict: expected a dict with 'state' and 'param_groups' (from state_dict())")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            raise ConfigError(
                "load_state_dict: the saved optimizer has param_groups of sizes "
                f"{[len(s['params']) for s in saved_groups]}, this one {[len(g['params']) for g in self.param_groups]}; "
                "it was saved for a different model, freeze list or weight-decay split"
            )
        hift = state_dict.get("hift")
        if hift is not None:
            self.check_compatible(hift, "load_state_dict")
        self._load_hyperparameters(saved_groups)
        self._load_group_states(state_dict["state"], self._param_index())
        self._restore_position(hift)

    # ------------------------------------------------------------------------------------------ shared by
    # load_state_dict and checkpoint.py
    def hift_meta(self) -> dict[str, Any]:
        """Everything but tensors: format, optimizer, names, groups, order position, step counter, skips."""
        return {
            "format": STATE_DICT_FORMAT,
            "optimizer": self.spec.name if self.spec else self.config.optimizer.__name__,
            "state_names": list(self.state_names),
            "param_names": list(self._names_in_index_order()),
            "groups": [list(lay.names) for lay in self.layouts],
            "order": self.order.state_dict(),
            "global_step": self.global_step,
            "skips": self.monitor.state_dict(),
        }

    def check_compatible(self, hift: Mapping[str, Any], where: str) -> None:
        """Raise ConfigError when saved state belongs to another model, optimizer or grouping."""
        fmt = hift.get("format") if isinstance(hift, Mapping) else None
        if fmt != STATE_DICT_FORMAT:
            raise ConfigError(f"{where}: unsupported or missing hift state format {fmt!r}")
        mine = self.spec.name if self.spec else self.config.optimizer.__name__
        if hift.get("optimizer") != mine:
            raise ConfigError(f"{where}: saved for optimizer {hift.get('optimizer')!r}, this one is {mine!r}")
        if list(hift.get("param_names", [])) != self._names_in_index_order():
            raise ConfigError(f"{where}: the saved parameter names differ from this model's; it belongs to another model")
        if [list(g) for g in hift.get("groups", [])] != [list(lay.names) for lay in self.layouts]:
            raise ConfigError(
                f"{where}: the saved group layout differs (layers_per_group, groups or freeze changed); "
                "resume with the same grouping options"
            )

    def _load_hyperparameters(self, saved_groups: list[Mapping[str, Any]]) -> None:
        # The saved hyper-parameters win (as in torch.optim); structural ones must agree.
        for g, s in zip(self.param_groups, saved_groups):
            for k, v in s.items():
                if k != "params":
                    g[k] = tuple(v) if isinstance(g.get(k), tuple) and isinstance(v, list) else v
        if self.spec is not None:
            self._check_structure()

    def _restore_position(self, hift: Mapping[str, Any] | None) -> None:
        old = self.order.current
        if hift is not None:
            self.order.load_state_dict(hift["order"])
            self.global_step = int(hift.get("global_step", 0))
            self.monitor.load_state_dict(hift.get("skips", {}))
        if self.order.current != old:
            self._deactivate(old)
            self._activate(self.order.current)
        else:
            self.zero_grad()
        self._prefetch(self.order.current)

    def hyperparameters(self) -> list[dict[str, Any]]:
        """param_groups without the parameters (JSON-friendly: tuples become lists)."""
        return [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"} for g in self.param_groups
        ]

    def group_tensors(self, gid: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Group gid's optimizer state as CPU tensors (+ non-tensor values for generic optimizers).

        Fused optimizers: {"steps": float32 [T], "state": flat fp32 (absent if never initialised)}; the state
        tensor is the store's host memory itself (read it before the next step). Generic optimizers:
        "<i>.<key>" for tensor state of the group's i-th parameter, other values in the second dict."""
        lay = self.layouts[gid]
        if self.generic is not None:
            tensors, values = {}, {}
            index = {id(p): i for i, p in enumerate(lay.params)}
            for p, entry in self.generic.state_entries(gid).items():
                for key, v in entry.items():
                    if torch.is_tensor(v):
                        tensors[f"{index[id(p)]}.{key}"] = v.detach().cpu()
                    else:
                        values[f"{index[id(p)]}.{key}"] = v
            return tensors, values
        out = {"steps": lay.steps.detach().cpu()}
        if self.store is not None:
            flat = self.store.host_state(gid)
            if flat is not None:
                out["state"] = flat
        return out, {}

    def load_group_tensors(self, gid: int, tensors: Mapping[str, Tensor], values: Mapping[str, Any]) -> None:
        """Inverse of group_tensors (shapes checked; ConfigError on mismatch)."""
        lay = self.layouts[gid]
        if self.generic is not None:
            entries: dict[Any, dict[str, Any]] = {}
            for key, v in list(tensors.items()) + list(values.items()):
                i, _, name = key.partition(".")
                if not i.isdigit() or int(i) >= len(lay.params):
                    raise ConfigError(f"group {gid}: unexpected saved state key {key!r}")
                entries.setdefault(lay.params[int(i)], {})[name] = v
            self.generic.load_entries(gid, entries)
            return
        steps = tensors.get("steps")
        if steps is None or tuple(steps.shape) != (len(lay.params),):
            raise ConfigError(f"group {gid}: saved step counts have shape {getattr(steps, 'shape', None)}, expected ({len(lay.params)},)")
        if self.store is not None:
            flat = tensors.get("state")
            if flat is None:
                self.store.reset(gid)
            elif flat.numel() != lay.state_numel or flat.dtype != torch.float32:
                raise ConfigError(
                    f"group {gid}: saved state has {flat.numel()} {flat.dtype} elements, expected {lay.state_numel} float32"
                )
            else:
                self.store.load_state(gid, flat)
        lay.steps.copy_(steps)

    def load_meta(self, hyper: list[Mapping[str, Any]], hift: Mapping[str, Any]) -> None:
        """Restore hyper-parameters and position (after load_group_tensors for every group)."""
        if len(hyper) != len(self.param_groups):
            raise ConfigError(f"saved {len(hyper)} param_groups, this optimizer has {len(self.param_groups)}")
        self.check_compatible(hift, "load_meta")
        self._load_hyperparameters(list(hyper))
        self._restore_position(hift)

    def _load_group_states(self, saved_state: Mapping[Any, Any], index: dict[int, int]) -> None:
        def entry_for(p):
            i = index[id(p)]
            return saved_state.get(i, saved_state.get(str(i)))

        for gid, lay in enumerate(self.layouts):
            if self.generic is not None:
                self.generic.load_entries(gid, {p: dict(e) for p in lay.params if (e := entry_for(p))})
                continue
            entries = [entry_for(p) for p in lay.params]
            steps = torch.zeros(len(lay.params), dtype=torch.float32)
            if self.store is None:  # stateless (SGD without momentum): only step counts
                for i, e in enumerate(entries):
                    if e:
                        steps[i] = float(e.get("step", 1))
                lay.steps.copy_(steps)
                continue
            if not any(entries):
                self.store.reset(gid)
                lay.steps.zero_()
                continue
            flat = torch.zeros(lay.state_numel, dtype=torch.float32)
            for b in lay.buckets:
                views = [lay.state_views(flat, k, b.members) for k in range(lay.num_state)]
                self.spec.init_fresh(views, self.param_groups[b.param_group])
            for i, e in enumerate(entries):
                if not e:
                    continue
                name = lay.names[i]
                for k, key in enumerate(self.state_names):
                    if key not in e:
                        raise ConfigError(f"load_state_dict: state of {name!r} lacks {key!r} (saved by another optimizer?)")
                    src = e[key]
                    view = lay.state_views(flat, k, [i])[0]
                    if not torch.is_tensor(src) or src.shape != view.shape:
                        raise ConfigError(
                            f"load_state_dict: {key} of {name!r} has shape {getattr(src, 'shape', None)}, "
                            f"the parameter has {tuple(view.shape)}"
                        )
                    view.copy_(src)
                # torch's SGD keeps no step count; a saved momentum buffer means at least one step was taken.
                steps[i] = float(e["step"]) if "step" in e else 1.0
            self.store.load_state(gid, flat)
            lay.steps.copy_(steps)

    # ------------------------------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Remove hooks, free the state store, and make every trained parameter trainable again."""
        self.monitor.poll(block=True)
        self.router.remove()
        if self.store is not None:
            self.store.close()
        for lay in self.layouts:
            for p in lay.params:
                p.requires_grad_(True)
                p.grad = None
        for p in self._config_frozen:
            p.requires_grad_(False)
