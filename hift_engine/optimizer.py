"""HiFTOptimizer: a torch.optim.Optimizer that trains one group of layers per step.

Per ``step()`` (group g active, g' next), read top to bottom in ``step``:
  1. collect: which of g's parameters hold a gradient (torch.optim's rule: ``.grad`` None is skipped)
  2. norm + non-finite flag over those gradients, on the device (no host sync)
  3. update: the path brings g's state (prefetched during forward/backward) and applies the optimizer
  4. put away: g's state goes back to pinned host memory on a side stream, unless g' == g
  5. switch: requires_grad off for g, on for g' (so backward stops below g'), g' grads -> zeroed arena views
  6. prefetch g' state on a side stream, hidden behind the next forward/backward

How an update is done lives in ``optim.path`` (fused kernels over a state store, or any torch.optim class);
``param_groups`` are torch-style hyper-parameter groups, the HiFT layer groups a separate partition.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import state_io
from .activation import MemoryBudget, Recompute
from .auto_groups import GroupPlan, plan_groups
from .config import HiFTConfig
from .data_parallel import make_reducer
from .errors import ConfigError
from .grouping import Grouping, build_grouping
from .hooks import ParamClaim, user_requires_grad
from .layout import GradArena, GroupLayout, check_params
from .nonfinite import SkipMonitor, grad_flags
from .optim.build import make_path, optimizer_options
from .optim.path import UpdatePath
from .param_groups import build_param_groups, no_decay_names
from .loss_scale import LossScaler
from .memory import device_budget_bytes, other_device_bytes
from .sharding import ShardPlan
from .precision import compute_dtype, enable_tf32, prepare_precision, take_fp32_masters
from .schedule import GroupOrder, cycle_scheduler, transformers_scheduler
from .state_io import Signature, StateExport
from .store import StateStore
from .tiled_mlp import TiledMLP, find_mlps

__all__ = ["HiFTOptimizer"]

StoreFactory = Callable[[Sequence[GroupLayout], torch.device], StateStore]


class HiFTOptimizer(torch.optim.Optimizer):
    """Hierarchical full-parameter fine-tuning optimizer.

    Args:
        model: the model to train, already on its training device (parameters may not move afterwards).
        optimizer: "adamw" (default), "adagrad", "sgd", or any torch.optim.Optimizer subclass.
        config: a HiFTConfig (or mapping) instead of keyword options.
        store: where fused optimizer state lives, instead of ``config.state_store``: a StateStore, or a callable
            ``(layouts, device) -> StateStore`` (benchmarks use it for their baselines).
        initial_masters: under bf16-/fp16-mixed, fp32 weights by parameter name to start the masters from
            (``precision.to_device_bf16`` returns them for a model moved to the GPU from fp32 on the host).
        All other keyword arguments are HiFTConfig fields (lr, weight_decay, layers_per_group, strategy, ...);
        anything else is an optimizer option (betas, eps, amsgrad, momentum, nesterov, lr_decay, ...).

    Example:
        opt = HiFTOptimizer(model, "adamw", lr=1e-5, layers_per_group=1, strategy="bottom2up")
        sched = opt.cycle_scheduler("cosine", total_steps=10_000, warmup_steps=100)
        for batch in loader:
            model(**batch).loss.backward()
            opt.step(); sched.step(); opt.zero_grad()
    """

    def __init__(
        self, model: nn.Module, optimizer: Any = None, *, config: HiFTConfig | Mapping[str, Any] | None = None,
        store: StateStore | StoreFactory | None = None, initial_masters: Mapping[str, Tensor] | None = None, **kwargs: Any,
    ) -> None:
        if config is not None:
            if optimizer is not None or kwargs:
                raise ConfigError("HiFTOptimizer: pass either config= or optimizer options, not both")
            cfg = config if isinstance(config, HiFTConfig) else HiFTConfig.from_dict(config)
        else:
            names = set(HiFTConfig.field_names())
            opt_kwargs = {**kwargs.pop("optimizer_kwargs", {}), **{k: v for k, v in kwargs.items() if k not in names}}
            cfg = HiFTConfig(optimizer=optimizer or "adamw", optimizer_kwargs=opt_kwargs, **{k: v for k, v in kwargs.items() if k in names})
        self._setup(model, cfg, store, initial_masters)

    @classmethod
    def from_config(cls, model: nn.Module, config: HiFTConfig | Mapping[str, Any]) -> "HiFTOptimizer":
        return cls(model, config=config)

    # ------------------------------------------------------------------------------------------ setup
    def _setup(self, model: nn.Module, cfg: HiFTConfig, store, initial_masters) -> None:
        # Everything is validated and built before the model is touched: a failed construction changes nothing.
        self.config = cfg
        auto = cfg.layers_per_group == "auto"
        self.grouping: Grouping = build_grouping(model, 1 if auto else cfg.layers_per_group, cfg.groups, cfg.freeze, user_requires_grad)
        named = [(n, p) for g in self.grouping.groups for n, p in zip(g.param_names, g.params)]
        self.device = check_params(named)
        spec, hyper, wd = optimizer_options(cfg, named)
        masters = prepare_precision(cfg.precision, named, self.device, initial_masters)
        self.group_plan: GroupPlan | None = None
        # The "auto" plans may read the device's free memory: the store's pinning context is made first so that they
        # see its device memory; the store takes it over. Let go on an error too: a traceback kept alive (IPython,
        # a stored exception) must not keep the context's device memory.
        pin_hold = _hold_pin_context(cfg, self.device, store, spec, hyper, masters)
        try:
            self._plan_and_build(model, cfg, store, initial_masters, auto, named, spec, hyper, wd, masters)
        finally:
            del pin_hold

    def _plan_and_build(self, model, cfg, store, initial_masters, auto, named, spec, hyper, wd, masters) -> None:
        if auto:  # the same units, packed into the fewest groups that fit (the parameter order is unchanged)
            self.group_plan = _plan_groups(cfg, model, self.grouping, spec, hyper, masters, self.device, store)
            self.grouping = build_grouping(model, 1, None, cfg.freeze, user_requires_grad, sizes=self.group_plan.sizes)
        no_decay = no_decay_names(model, cfg.no_decay, [n for n, _ in named])
        budget = _memory_budget(cfg, self.device, named) if cfg.activation_checkpointing == "auto" else None
        mlps = _mlps(model, self.grouping) if cfg.mlp_chunk_tokens else None  # refused here: the model is untouched
        self.reducer = make_reducer(cfg.data_parallel)
        if self.reducer is not None:  # before anything is built or cast: a mismatch changes nothing
            self.reducer.check_same_setup([cfg.to_dict(), [list(g.param_names) for g in self.grouping.groups],
                                           [list(p.shape) for _, p in named]])
            self.reducer.broadcast_weights([*model.parameters(), *model.buffers()])
        seeds, undo = take_fp32_masters(cfg.precision, named, masters, initial_masters)
        try:
            self._build(model, cfg, store, named, spec, hyper, wd, no_decay, masters, seeds, budget, mlps)
        except BaseException:
            undo()  # the model as it was
            raise

    def _build(self, model, cfg, store, named, spec, hyper, wd, no_decay, masters, seeds, budget, mlps) -> None:
        self._constructing = True
        super().__init__(build_param_groups(named, no_decay, cfg.lr, wd, hyper), {"lr": cfg.lr, "weight_decay": wd, **hyper})
        self._constructing = False

        pg_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        num_state = len(spec.state_names(self.param_groups[0])) + masters if spec else 0
        half_from = masters if cfg.state_dtype == "bf16" else None  # the optimizer's vectors in bf16, masters fp32
        self.layouts = [
            GroupLayout(g.index, g.param_names, g.params, [pg_of[id(p)] for p in g.params], num_state, self.device,
                        half_from)
            for g in self.grouping.groups
        ]
        self.arena = GradArena(self.layouts, self.device)
        self._grad_views = [lay.grad_views(self.arena) for lay in self.layouts]
        # Under shard_state the update path sees only this rank's piece of each group (its own layouts and arena)
        self.shards = _shard_plan(cfg, spec, self.layouts, num_state, self.reducer, self.device)
        path_layouts, path_views, path_arena = ((self.shards.layouts, self.shards.grad_views, self.shards.arena)
                                                if self.shards else (self.layouts, self._grad_views, self.arena))
        self.path: UpdatePath
        self.path, self.kernel_backend = make_path(
            cfg, spec, hyper, path_layouts, path_views, path_arena, self.param_groups, self.device, store, masters
        )
        if seeds:  # under shard_state each rank seeds its own pieces (the layouts name pieces, not parameters)
            self.path.seed_masters(self.shards.piece_seeds(seeds) if self.shards is not None else seeds)
            seeds.clear()
        self.order = GroupOrder(len(self.layouts), cfg.strategy, cfg.seed)
        self.monitor = SkipMonitor(self.device, cfg.max_consecutive_skips)
        self.scaler = LossScaler(self.device) if cfg.precision == "fp16-mixed" else None
        self.global_step = 0
        self.last_grad_norm: Tensor | None = None

        # Now take the parameters over (a previous optimizer on them is detached first).
        by_name = dict(model.named_parameters())
        frozen = [by_name[n] for n in self.grouping.frozen if user_requires_grad(by_name[n])]
        self._claim = ParamClaim([p for _, p in named], frozen)
        self.router = self._claim.router
        self._recompute = (_recompute(model, self.grouping, budget, cfg.activation_offload, cfg.checkpoint_active)
                           if cfg.activation_checkpointing != "off" else None)
        position = {u.name: i for i, u in enumerate(self.grouping.units)}
        self._unit_span = [(min(position[u] for u in g.units), max(position[u] for u in g.units))
                           for g in self.grouping.groups]
        if self._recompute is not None:
            self._claim.on_release.append(self._recompute.remove)
        self._tiled = TiledMLP(mlps, cfg.mlp_chunk_tokens) if mlps else None
        if self._tiled is not None:
            self._claim.on_release.append(self._tiled.remove)
        weakref.finalize(self, self._claim.release)  # a collected optimizer gives the model back as it was
        if cfg.precision == "tf32":
            enable_tf32()
        self._activate(self.order.current)
        self.path.prefetch(self.order.current)

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
    def store(self) -> StateStore | None:
        """The fused path's state store (None for stateless or generic optimizers)."""
        return getattr(self.path, "store", None)

    def wait_host_memory(self) -> None:
        """Block until the host memory for every group's idle state is allocated and pinned.

        The native store allocates it in the background from construction, beside the first cycle. Where the step
        is bound by the host's CPU (small batches), that work slows the first cycle: 7B tf32 batch 1 ran it at
        1.069x later ones on average on an H200 (7 runs), and at 0.974x and 1.053x after this call, which took
        2.1 s on a warmed machine and 5.5 s on a fresh one. Call it after construction when keeping that work out
        of training is worth those seconds (measuring a run's speed). Buffers not allocated in the background
        (the torch transport, a failed background allocation) are allocated here, so a lack of host memory raises
        now. Returns at once for stores that keep no state off the device.
        """
        self._check_live()
        wait = getattr(self.store, "wait_allocated", None)  # a custom store= factory's store may not have one
        if wait is not None:
            wait()

    @property
    def nonfinite_skips(self) -> int:
        """Steps skipped for non-finite gradients so far (waits for the last steps' flags)."""
        self.monitor.poll(block=True)
        return self.monitor.total

    def describe(self) -> str:
        return (
            (self.group_plan.describe() + "\n" if self.group_plan is not None else "")
            + self.grouping.describe(state_bytes_per_element=self.path.state_bytes_per_element())
            + f"\noptimizer={self.path.name} kernels={self.kernel_backend} {self.path.describe()} "
            f"device={self.device} grad arena={self.arena.nbytes / 2**30:.3f} GiB"
            + (f"\n{self.shards.describe()}" if self.shards is not None else "")
        )

    # ------------------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update the active group, put its state away, and switch to the next group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_live()
        gid, nxt = self.order.current, self.order.peek()
        lay = self.layouts[gid]
        lay.check_unchanged()
        members = self.router.collect(lay.names)
        if self.reducer is not None:  # the same averaged gradients on every rank: identical updates
            had = set(members)
            members = self.reducer.reduce(self.arena.buffers, lay.grad_numel, self._grad_views[gid], members)
            for i in members:
                if i not in had:  # a gradient only other ranks had: zero here, and visible as .grad (generic path)
                    lay.params[i].grad = self._grad_views[gid][i]
        if self.scaler is not None and members and not self.scaler.scaled:
            raise ConfigError("precision='fp16-mixed': call loss = opt.scale_loss(loss) before backward (unscaled fp16 "
                              "gradients underflow); hift train does this")
        if members:
            flags, self.last_grad_norm = grad_flags(
                [self._grad_views[gid][i] for i in members], self.config.max_grad_norm,
                self.config.skip_nonfinite or self.scaler is not None, self.scaler.inv_scale() if self.scaler else None,
            )
            if self.scaler is not None:  # overflows above a scale of 1 are routine: they back the scale off
                self.monitor.record(flags[1], self.global_step, gid, abortable=flags[1] * (self.scaler.scale <= 1.0))
                self.scaler.update(flags[1])
            elif flags is not None:
                self.monitor.record(flags[1], self.global_step, gid)
            if self.shards is None:
                self.path.update(gid, members, flags)
            else:  # this rank's piece of the averaged gradients, its update, then every piece to every rank
                self.shards.refresh(gid)
                self.path.update(gid, self.shards.take_grads(gid, members, self._grad_views[gid]), flags)
                self.shards.share_weights(gid, members)
            self.path.put_away(gid, keep=nxt == gid)
        self.global_step += 1
        self.order.advance()
        if nxt != gid:
            self._switch(nxt)
            self.path.prefetch(nxt)
        # After the step is complete: a NonFiniteError never leaves it half done. Under data parallelism every
        # rank must raise at the same step (a rank that raises skips the next collectives): wait for the flag.
        self.monitor.poll(block=self.reducer is not None)
        return loss

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss`` times the dynamic loss scale under fp16-mixed (call it before backward); ``loss`` otherwise."""
        return self.scaler.scale_loss(loss) if self.scaler is not None else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim: the active group's gradients become None (or zeros, kept as gradients, with
        ``set_to_none=False``). Idle groups hold none."""
        self._check_live()
        self.router.zero(set_to_none)

    def _activate(self, gid: int) -> None:
        lay = self.layouts[gid]
        for p in lay.params:
            p.requires_grad_(True)
        self.router.set_active(lay.params, self._grad_views[gid])
        if self._recompute is not None:
            self._recompute.set_active(*self._unit_span[gid])
        self._wired = gid  # the group whose parameters require grad (the order may be ahead during a load)

    def _switch(self, new: int) -> None:
        for p in self.layouts[self._wired].params:
            p.requires_grad_(False)
            p.grad = None
        self._activate(new)

    def _refuse_sharded_state(self) -> None:
        if self.shards is not None:
            raise ConfigError(
                "shard_state=True: this rank holds only its piece of the optimizer state, so there is no "
                "torch.optim-style state_dict of the whole; save and resume with save_checkpoint/load_checkpoint "
                "(every rank writes its piece into one checkpoint)"
            )

    def _check_live(self) -> None:
        if self._claim.released:
            raise ConfigError("this HiFTOptimizer was closed or replaced by a newer one on the same model; create a new one")

    # ------------------------------------------------------------------------------------------ schedulers
    def cycle_scheduler(self, name: str = "cosine", total_steps: int = 1, warmup_steps: int = 0, per_step: bool = False, **kw):
        """``schedule.cycle_scheduler(self, ...)``: HiFT's delayed LR, advancing once per cycle of k steps."""
        return cycle_scheduler(self, name, total_steps, warmup_steps, per_step, **kw)

    def transformers_scheduler(self, name: str, total_steps: int, warmup_steps: int = 0, **scheduler_kwargs: Any):
        """``schedule.transformers_scheduler(self, ...)``: any transformers schedule, stepped once per cycle."""
        return transformers_scheduler(self, name, total_steps, warmup_steps, **scheduler_kwargs)

    # ------------------------------------------------------------------------------------------ state
    # One encoding (state_io): state_dict() and checkpoints are both built on export/check/import_state.
    def export_state(self) -> StateExport:
        """JSON-friendly ``meta`` and each group's tensors, lazily (they may alias the store's host memory)."""
        return state_io.export_state(self)

    def check_state(self, meta: Mapping[str, Any], groups: Sequence[tuple[Signature, Mapping[str, Any]]] | None = None) -> None:
        """Raise ConfigError unless ``meta`` and group state of these (signature, values) load here. Changes nothing."""
        state_io.check_state(self, meta, groups)

    def import_state(self, meta: Mapping[str, Any], groups, signatures=None) -> None:
        """Load ``meta`` and per-group state, all checked before anything changes (``groups`` may be lazy when
        ``signatures`` are given)."""
        state_io.import_state(self, meta, groups, signatures)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim-compatible: ``state`` maps parameter indices to torch's state keys ("step", "exp_avg",
        ...); ``hift`` holds the group order, step counter and skip counts. State tensors may alias the store's
        host memory (as torch's state_dict aliases live state): save or clone them before the next step."""
        self._refuse_sharded_state()
        return state_io.to_state_dict(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()`` output (or a torch.optim state dict of the same optimizer type, numbered
        as this optimizer's param_groups; see ``load_torch_state_dict`` to map another numbering). A refused
        load changes nothing."""
        self._refuse_sharded_state()
        state_io.load_state_dict(self, state_dict)

    def load_torch_state_dict(self, state_dict: Mapping[str, Any], params: Sequence[nn.Parameter]) -> None:
        """Load the per-parameter state of a plain torch.optim optimizer of the same type whose parameter
        number i is ``params[i]`` (e.g. ``list(model.parameters())``); this optimizer's hyper-parameters stay."""
        self._refuse_sharded_state()
        state_io.load_torch_state_dict(self, state_dict, params)

    def master_weights(self, gid: int, state) -> dict[str, Tensor]:
        """Parameter name -> fp32 master weight of group ``gid`` from its exported state (empty unless
        bf16-mixed keeps masters); checkpoints store these as the model's weights."""
        return self.path.master_weights(gid, state)

    def _restore_position(self, meta: Mapping[str, Any]) -> None:
        """After a load (everything checked): the saved position, and the wiring of its group."""
        if "format" in meta:
            self.order.load_state_dict(meta["order"])
            self.global_step = meta["global_step"]
            self.monitor.load_state_dict(meta["skips"])
            if self.scaler is not None and meta.get("loss_scale") is not None:
                self.scaler.load_state_dict(meta["loss_scale"])
        if self.order.current != self._wired:
            self._switch(self.order.current)
        else:
            self.zero_grad()
        self.path.prefetch(self.order.current)

    @property
    def recomputed_blocks(self) -> int:
        """Blocks run through activation checkpointing so far (0 with activation_checkpointing='off')."""
        return self._recompute.recomputed if self._recompute is not None else 0

    @property
    def mlp_chunk_runs(self) -> int:
        """MLP chunk forwards so far under mlp_chunk_tokens (recomputed blocks run theirs again; 0 when off)."""
        return self._tiled.chunk_runs if self._tiled is not None else 0

    # ------------------------------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Remove hooks, free the state store, and give the model its requires_grad flags back."""
        self.monitor.poll(block=True)
        self.path.synchronize()
        self._claim.release()
        self.path.close()


def _shard_plan(cfg: HiFTConfig, spec, layouts, num_state: int, reducer, device) -> ShardPlan | None:
    """shard_state: this rank's pieces of every group (refused where it cannot work)."""
    if not cfg.shard_state:
        return None
    if reducer is None:
        raise ConfigError("shard_state=True shards the optimizer state across data-parallel ranks; it needs "
                          "torch.distributed initialised with more than one process (torchrun --nproc-per-node N)")
    if spec is None:
        raise ConfigError(f"shard_state=True needs a fused optimizer (adamw, adagrad, sgd); {cfg.optimizer!r} runs "
                          "through torch.optim, which cannot update pieces of parameters")
    return ShardPlan(layouts, num_state, reducer.world, reducer.rank, device)


def _budget_bytes(cfg: HiFTConfig, device: torch.device, what: str) -> int:
    """memory_budget_gib in bytes, or what this process may use of its CUDA device now."""
    if cfg.memory_budget_gib is not None:
        return int(cfg.memory_budget_gib * 2**30)
    if device.type != "cuda":
        raise ConfigError(f"{what} on {device} needs memory_budget_gib= (the device's own memory is known on CUDA only)")
    return device_budget_bytes(device)


def _hold_pin_context(cfg: HiFTConfig, device: torch.device, store, spec, hyper, masters: bool):
    """The pinning context the native store will pin from, made before the "auto" plans read the device's free
    memory (when they do: no memory_budget_gib), so that its device memory is not planned as room for training.
    None when no plan reads the device or the state will not be pinned by the native store."""
    plans = cfg.layers_per_group == "auto" or cfg.activation_checkpointing == "auto"
    if not plans or cfg.memory_budget_gib is not None or device.type != "cuda" or not cfg.pin_context:
        return None
    if cfg.layers_per_group == "auto" and cfg.activation_gib is None:
        return None  # the plan refuses it at once: no context for nothing
    if os.environ.get("HIFT_ALLOC_MODE") == "hostalloc":  # a diagnostic mode that pins without the context
        return None
    if store is not None or cfg.state_store not in ("auto", "native"):
        return None
    if spec is None or not (masters or spec.state_names(hyper)):  # stateless: no store at all
        return None
    from .store.native_transport import hold_pin_context

    return hold_pin_context(device)


def _plan_groups(cfg: HiFTConfig, model: nn.Module, units: Grouping, spec, hyper, masters: bool, device, store) -> GroupPlan:
    """layers_per_group='auto': the plan for these units (one per group in ``units``) under the budget."""
    if store is not None:  # its state sizes would depend on the plan, and the plan on where the state lives
        raise ConfigError("layers_per_group='auto' plans the groups before any state store exists, so it cannot take "
                          "store=; choose the store with state_store=, or give layers_per_group as a number")
    if cfg.activation_gib is None:
        raise ConfigError(
            "layers_per_group='auto' needs activation_gib=: the device memory of one step's activations at your batch "
            "x sequence. Measure it with hift_engine.measure_activation_gib(model, batch) (hift train does), or give "
            "layers_per_group as a number"
        )
    esize = compute_dtype(cfg.precision).itemsize if masters else None
    numel = [sum(p.numel() for p in g.params) for g in units.groups]
    grad = [sum(p.numel() * (esize or p.element_size()) for p in g.params) for g in units.groups]
    trained = {id(p) for g in units.groups for p in g.params}
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in trained and p.device == device)
    moments = len(spec.state_names(hyper)) if spec is not None else 0
    num_state = masters + (moments / 2 if cfg.state_dtype == "bf16" else moments)  # in fp32 vectors
    resident = cfg.state_store == "resident" or (cfg.state_store == "auto" and device.type != "cuda")
    slots = None if resident or num_state == 0 else cfg.slots
    budget = _budget_bytes(cfg, device, "layers_per_group='auto'")
    if cfg.memory_budget_gib is None:  # the device's budget: what else is already on it is not ours to plan with
        budget -= other_device_bytes(model, device, torch.cuda.memory_allocated(device))
    bottom, per_unit = ([*cfg.activation_gib, 0.0] if isinstance(cfg.activation_gib, list) else [cfg.activation_gib, 0.0])[:2]
    transient = max(p.numel() * (esize or p.element_size()) for g in units.groups for p in g.params)
    return plan_groups(numel, grad, frozen, num_state, slots, budget, int(bottom * 2**30), int(per_unit * 2**30), transient)


def _memory_budget(cfg: HiFTConfig, device: torch.device, named) -> MemoryBudget:
    """activation_checkpointing='auto': the budget in bytes (the device's when not given), refused when the
    weights alone do not fit it."""
    if device.type != "cuda":
        raise ConfigError(
            "activation_checkpointing='auto' sizes itself by the CUDA allocator and the parameters are on "
            f"{device}; use 'always' (or 'off') there"
        )
    budget = _budget_bytes(cfg, device, "activation_checkpointing='auto'")
    weights = sum(p.numel() * p.element_size() for _, p in named if p.device.type == "cuda")
    if budget <= weights:
        raise ConfigError(
            f"memory_budget_gib={budget / 2**30:.2f} is below what the trained weights alone take on the device "
            f"({weights / 2**30:.2f} GiB); give a larger budget, or train in bf16-mixed (half the weight bytes)"
        )
    return MemoryBudget(budget, lambda: torch.cuda.memory_allocated(device))


def _blocks(model: nn.Module, grouping: Grouping, what: str) -> list[tuple[int, str, nn.Module]]:
    """(unit position, name, module) of the model's blocks: the units that are modules, in forward order."""
    modules = dict(model.named_modules())
    found = [(pos, u.name, modules[u.name]) for pos, u in enumerate(grouping.units) if u.name in modules and u.name]
    if not found:
        raise ConfigError(
            f"{what} needs the model's blocks as units (found automatically for Hugging Face decoders and any model "
            "with one ModuleList of blocks); with explicit groups= it cannot find them: turn it off"
        )
    return found


def _recompute(model: nn.Module, grouping: Grouping, budget: MemoryBudget | None = None, offload: bool = False,
               checkpoint_active: bool = False) -> Recompute:
    """Wrap the model's blocks for HiFT-aware checkpointing."""
    found = _blocks(model, grouping, "activation_checkpointing")
    return Recompute([m for _, _, m in found], [pos for pos, _, _ in found], budget, offload, checkpoint_active)


def _mlps(model: nn.Module, grouping: Grouping) -> list[nn.Module]:
    """mlp_chunk_tokens: the ``mlp`` submodule of every block (active or not), refused before anything is built."""
    return find_mlps([(name, m) for _, name, m in _blocks(model, grouping, "mlp_chunk_tokens")])
