"""HiFTConfig: every engine option in one validated dataclass.

The same object backs the Python API (HiFTOptimizer keyword arguments), config files and CLI overrides,
so a value is checked once, in one place, with a message naming the option.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
from .optim import FUSED_SPECS

__all__ = ["HiFTConfig", "STRATEGIES", "STATE_STORES", "KERNEL_BACKENDS", "FUSED_OPTIMIZERS", "PRECISIONS", "STATE_DTYPES", "suggest"]

STRATEGIES = ("bottom2up", "top2down", "random")
STATE_STORES = ("auto", "resident", "torch", "native")
KERNEL_BACKENDS = ("auto", "triton", "reference")
PRECISIONS = ("fp32", "tf32", "bf16-mixed", "fp16-mixed")
CHECKPOINTING = ("off", "auto", "always")
DATA_PARALLEL = ("auto", "on", "off")
STATE_DTYPES = ("fp32", "bf16")
FUSED_OPTIMIZERS = tuple(FUSED_SPECS)


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices``, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"optimizer={path!r}: cannot import that class ({e}); give a built-in name {FUSED_OPTIMIZERS} or an importable torch.optim.Optimizer subclass") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _str_list(name: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name} must be a list of non-empty strings (module names or regexes), got {value!r}")
    return tuple(value)


@dataclass
class HiFTConfig:
    """All engine options. Defaults give per-layer HiFT with AdamW, bottom-to-top order.

    optimizer:        "adamw" | "adagrad" | "sgd" (fused kernels on CUDA), or any torch.optim.Optimizer
                      subclass (generic path; its state of idle groups is still moved off the device).
    lr, weight_decay: base hyper-parameters; weight decay is decoupled for AdamW, L2 for AdaGrad/SGD
                      (exactly as torch.optim); weight_decay=None takes the optimizer's torch default
                      (AdamW 0.01, AdaGrad and SGD 0).
    layers_per_group: consecutive units (embedding, each block, head) per group; k = ceil(units / m). "auto":
                      the fewest groups whose step fits memory_budget_gib (auto_groups.py has the memory
                      model); needs activation_gib (hift train measures it; see measure_activation_gib).
    activation_gib:   with layers_per_group="auto": device memory of one step's activations at the training
                      batch x sequence with the bottom unit active, or [that, what each further active unit
                      adds] as measure_activation_gib returns it.
    strategy:         "bottom2up" (embedding first), "top2down", or "random" (fresh permutation per cycle).
    seed:             seeds the random order; the order is a pure function of (seed, cycle).
    groups:           explicit groups: a list of groups, each a list of module/parameter names or regexes.
    freeze:           names/regexes of units, modules or parameters that are never trained.
    no_decay:         "auto" (biases and norm weights, like transformers), a list of patterns, or []. A pattern
                      matches a parameter name when found anywhere in it (re.search: "bias" and
                      "LayerNorm.weight" work as transformers users write them); one matching nothing is an error.
    max_grad_norm:    clip the active group's gradient norm to this value (None: no clipping).
    skip_nonfinite:   skip the active group's update when its gradients hold inf/NaN (state untouched).
    max_consecutive_skips: raise NonFiniteError after this many skips in a row (0: never raise).
    state_store:      "auto" (CUDA: native pinned store, else torch; CPU: resident), "resident" (all state
                      on the device), "torch" (pure-torch pinned offload), "native" (C++ pinned offload).
    slots:            device buffers for offloaded state, each the size of the largest group's state (>= 2).
    transfer_chunk_mib: the native store paces each state transfer: a worker thread issues it in pieces of
                      this many MiB, one in flight at a time, so a small copy of the compute stream
                      (loss.item(), a check inside the model's forward) waits for one piece, not for a
                      whole group's state on the same copy engine. 0: one copy per transfer (the torch
                      store always does that).
    pin_context:      the native store pins its host buffers from a second CUDA context of the device, so that
                      pinning (seconds of it, in the background during the first cycle) does not hold up the
                      training thread's launches and copies: 7B bf16-mixed batch 4's first cycle ran at 1.05-1.32x
                      later ones instead of 1.46-1.73x. cudaMalloc still waits for it, so the store pins only the
                      first write-back's buffer before the first update, and the first cycle now runs at
                      1.001-1.009x (README, "first-step-pinning"). It costs that context's device memory for the
                      whole run, outside torch's accounting (about 260 MiB on an H200; 524 MiB for a moment while
                      it is made); the "auto" plans that read the device's free memory make it first, so they plan
                      around it. False pins in the process's own context (no extra memory; a slower first cycle).
    kernels:          "auto" (Triton on CUDA, reference elsewhere), "triton", "reference".
    precision:        "fp32" (weights as given, fp32 state), "tf32" (fp32 weights, TF32 matmuls: sets torch's
                      process-wide TF32 switches), "bf16-mixed" (bf16 weights on the device, fp32 master
                      weights kept with each group's optimizer state and streamed with it; fused optimizers),
                      "fp16-mixed" (the same with fp16 weights and dynamic loss scaling: call
                      ``loss = opt.scale_loss(loss)`` before backward).
    state_dtype:      "fp32" (default) or "bf16": AdamW's moments (exp_avg, exp_avg_sq, max_exp_avg_sq) kept in
                      bf16, stored with stochastic rounding, so the state takes 4 instead of 8 bytes per
                      parameter (8 instead of 12 with bf16-mixed masters, which stay fp32) in host memory and on
                      every transfer. Fused AdamW only; not with shard_state. state_dict() gives the bf16
                      moments as they are; loading fp32 moments rounds them to bf16.
    activation_checkpointing: "off"; "always": the blocks above the active group keep only their inputs and
                      are recomputed in backward (the active group and the blocks below it cost nothing extra);
                      "auto": only as many of those blocks as needed to stay inside memory_budget_gib are
                      recomputed, decided block by block in forward from measured sizes (short sequences
                      recompute nothing). CUDA only.
    activation_offload: with activation_checkpointing "always"/"auto": the recomputed blocks keep their inputs in
                      pinned host memory instead of on the device (copied out in forward, back in backward).
    checkpoint_active: with activation_checkpointing "always"/"auto": the active group's blocks are recomputed
                      too (keeping only their inputs, on the host with activation_offload), so backward holds
                      one block's full activations at a time; costs one more forward of the active group per
                      step. Under "auto" the active blocks are candidates like those above (the lowest are
                      recomputed first, only when the budget needs it). Blocks below the active group are never
                      recomputed.
    mlp_chunk_tokens: > 0: each block's ``mlp`` submodule runs over the sequence in chunks of this many tokens,
                      each chunk checkpointed, so the MLP's intermediates exist for one chunk at a time (in
                      forward, backward and any recompute); 0: off. Needs blocks with an ``mlp`` child
                      (LLaMA, Mistral, Qwen2, GPT-2, GPT-NeoX; not OPT or BERT). Costs one more MLP forward per
                      block backpropagated through.
    memory_budget_gib: device memory (GiB, as torch's allocator counts it) the "auto" options keep inside; default: what
                      this process may use when the optimizer is built (its memory fraction of the card, or the
                      free memory plus what torch has reserved, whichever is smaller); layers_per_group="auto"
                      also leaves out what is already allocated there beyond the model's own weights.
    data_parallel:    "auto" (average the active group's gradients over the ranks when torch.distributed is
                      initialised with more than one process), "on" (insist on it), "off".
    shard_state:      under data parallelism, each rank keeps the optimizer state (and fp32 masters) of 1/N of every
                      group and updates that part; the updated weights are then broadcast (ZeRO-1, sharding.py).
                      Host memory and state traffic per rank fall by N. Fused optimizers only (adamw, adagrad,
                      sgd); checkpoints hold every rank's piece and resume on the same number of processes.
    optimizer_kwargs: optimizer-specific options (betas, eps, amsgrad, momentum, nesterov, ...).
    """

    optimizer: Any = "adamw"
    lr: float = 1e-5
    weight_decay: Any = None
    layers_per_group: Any = 1
    strategy: str = "bottom2up"
    seed: int = 0
    groups: Any = None
    freeze: Any = ()
    no_decay: Any = "auto"
    max_grad_norm: Any = None
    skip_nonfinite: bool = True
    max_consecutive_skips: int = 10
    state_store: str = "auto"
    slots: int = 2
    transfer_chunk_mib: int = 16
    pin_context: bool = True
    kernels: str = "auto"
    precision: str = "fp32"
    state_dtype: str = "fp32"
    activation_checkpointing: str = "off"
    activation_offload: bool = False
    checkpoint_active: bool = False
    mlp_chunk_tokens: int = 0
    memory_budget_gib: Any = None
    activation_gib: Any = None
    data_parallel: str = "auto"
    shard_state: bool = False
    optimizer_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "HiFTConfig":
        import torch

        opt = self.optimizer
        if isinstance(opt, str) and "." in opt:  # "torch.optim.RMSprop", as to_dict() writes a class
            opt = self.optimizer = _import_class(opt)
        if isinstance(opt, str):
            if opt.lower() not in FUSED_OPTIMIZERS:
                raise ConfigError(
                    f"optimizer={opt!r} is not a built-in optimizer; use one of {FUSED_OPTIMIZERS}"
                    f"{suggest(opt.lower(), FUSED_OPTIMIZERS)}, or pass a torch.optim.Optimizer subclass"
                )
            self.optimizer = opt.lower()
        elif not (isinstance(opt, type) and issubclass(opt, torch.optim.Optimizer)):
            raise ConfigError(
                f"optimizer must be a name {FUSED_OPTIMIZERS} or a torch.optim.Optimizer subclass, got {opt!r}"
            )
        if not _is_number(self.lr) or self.lr < 0:
            raise ConfigError(f"lr must be a finite number >= 0, got {self.lr!r}")
        if self.lr == 0:
            warnings.warn("hift_engine: lr=0: no parameter will change (only optimizer state advances)", stacklevel=3)
        if self.weight_decay is not None and (not _is_number(self.weight_decay) or self.weight_decay < 0):
            raise ConfigError(
                f"weight_decay must be a finite number >= 0, or None for the optimizer's torch default, got {self.weight_decay!r}"
            )
        if self.layers_per_group != "auto" and (not _is_int(self.layers_per_group) or self.layers_per_group < 1):
            raise ConfigError(
                f"layers_per_group must be an integer >= 1 (units per group) or 'auto', got {self.layers_per_group!r}"
            )
        auto_groups = self.layers_per_group == "auto"
        if auto_groups and self.groups is not None:
            raise ConfigError("layers_per_group='auto' sizes the automatically found units' groups; with explicit groups= leave it at 1")
        if auto_groups and not isinstance(self.optimizer, str):
            raise ConfigError("layers_per_group='auto' models the built-in optimizers' state (adamw, adagrad, sgd); "
                              "with a torch.optim class give layers_per_group as a number")
        act = self.activation_gib
        if act is not None:
            values = list(act) if isinstance(act, (list, tuple)) else [act]
            if not 1 <= len(values) <= 2 or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf") for v in values
            ):
                raise ConfigError(f"activation_gib must be a number of GiB >= 0, or [bottom, per active unit], got {act!r}")
            if isinstance(act, tuple):
                self.activation_gib = list(act)
            if not auto_groups:
                raise ConfigError("activation_gib sizes layers_per_group='auto'; set layers_per_group='auto' or drop activation_gib")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"strategy={self.strategy!r} is unknown; use one of {STRATEGIES}"
                f"{suggest(str(self.strategy), STRATEGIES)}"
            )
        if not _is_int(self.seed):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.groups is not None:
            if not isinstance(self.groups, (list, tuple)) or not self.groups:
                raise ConfigError(
                    "groups must be a non-empty list of groups, each a list of module names or regexes, "
                    f"got {self.groups!r}"
                )
            self.groups = [_str_list(f"groups[{i}]", g) for i, g in enumerate(self.groups)]
        self.freeze = _str_list("freeze", self.freeze) if self.freeze else ()
        if self.no_decay != "auto":
            self.no_decay = _str_list("no_decay", self.no_decay) if self.no_decay else ()
        if self.max_grad_norm is not None and (not _is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise ConfigError(f"max_grad_norm must be a number > 0 or None (no clipping), got {self.max_grad_norm!r}")
        for name in ("skip_nonfinite", "activation_offload", "checkpoint_active", "shard_state", "pin_context"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not _is_int(self.max_consecutive_skips) or self.max_consecutive_skips < 0:
            raise ConfigError(
                f"max_consecutive_skips must be an integer >= 0 (0 = never stop), got {self.max_consecutive_skips!r}"
            )
        if self.state_store not in STATE_STORES:
            raise ConfigError(
                f"state_store={self.state_store!r} is unknown; use one of {STATE_STORES}"
                f"{suggest(str(self.state_store), STATE_STORES)}"
            )
        if not _is_int(self.slots) or self.slots < 2:
            raise ConfigError(f"slots must be an integer >= 2 (device buffers for streamed state), got {self.slots!r}")
        if not _is_int(self.transfer_chunk_mib) or self.transfer_chunk_mib < 0:
            raise ConfigError(f"transfer_chunk_mib must be an integer >= 0 (0: one copy per group), got {self.transfer_chunk_mib!r}")
        if self.kernels not in KERNEL_BACKENDS:
            raise ConfigError(
                f"kernels={self.kernels!r} is unknown; use one of {KERNEL_BACKENDS}"
                f"{suggest(str(self.kernels), KERNEL_BACKENDS)}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision={self.precision!r} is unknown; use one of {PRECISIONS}{suggest(str(self.precision), PRECISIONS)}"
            )
        if self.precision.endswith("-mixed") and not isinstance(self.optimizer, str):
            raise ConfigError(
                f"precision={self.precision!r} keeps fp32 masters with the fused optimizers' state; use optimizer='adamw', "
                "'adagrad' or 'sgd' (a torch.optim class keeps its own state: train it with precision='fp32')"
            )
        if self.state_dtype not in STATE_DTYPES:
            raise ConfigError(f"state_dtype={self.state_dtype!r} is unknown; use one of {STATE_DTYPES}"
                              f"{suggest(str(self.state_dtype), STATE_DTYPES)}")
        if self.state_dtype == "bf16" and (not isinstance(self.optimizer, str) or self.optimizer.lower() != "adamw"):
            raise ConfigError(f"state_dtype='bf16' keeps AdamW's moments in bf16; optimizer={self.optimizer!r} keeps "
                              "fp32 state. Use optimizer='adamw', or state_dtype='fp32'")
        if self.state_dtype == "bf16" and self.shard_state:
            raise ConfigError("state_dtype='bf16' does not go with shard_state=True yet (the sharded pieces are laid out "
                              "for fp32 state); use one or the other")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ConfigError(
                f"activation_checkpointing={self.activation_checkpointing!r} is unknown; use one of {CHECKPOINTING}"
            )
        if self.activation_offload and self.activation_checkpointing == "off":
            raise ConfigError("activation_offload keeps recomputed blocks' inputs on the host; it needs "
                              "activation_checkpointing='always' or 'auto'")
        if self.checkpoint_active and self.activation_checkpointing == "off":
            raise ConfigError("checkpoint_active recomputes the active group's blocks in addition to the blocks above "
                              "it; it needs activation_checkpointing='always' or 'auto' (or drop checkpoint_active)")
        if not _is_int(self.mlp_chunk_tokens) or self.mlp_chunk_tokens < 0:
            raise ConfigError(f"mlp_chunk_tokens must be an integer >= 0 (tokens per MLP chunk; 0: off), "
                              f"got {self.mlp_chunk_tokens!r}")
        budget = self.memory_budget_gib
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < float("inf"):
                raise ConfigError(f"memory_budget_gib must be a positive number of GiB (or None: the device's), got {budget!r}")
            if self.activation_checkpointing != "auto" and self.layers_per_group != "auto":
                raise ConfigError(
                    f"memory_budget_gib={budget} sizes activation_checkpointing='auto' and layers_per_group='auto', "
                    "but neither is set; set one of them to 'auto' or drop memory_budget_gib"
                )
        if self.data_parallel not in DATA_PARALLEL:
            raise ConfigError(f"data_parallel={self.data_parallel!r} is unknown; use one of {DATA_PARALLEL}")
        if self.shard_state and self.data_parallel == "off":
            raise ConfigError("shard_state=True shards the optimizer state across data-parallel ranks; it cannot "
                              "go with data_parallel='off'")
        if not isinstance(self.optimizer_kwargs, Mapping):
            raise ConfigError(f"optimizer_kwargs must be a mapping, got {type(self.optimizer_kwargs).__name__}")
        self.optimizer_kwargs = dict(self.optimizer_kwargs)
        return self

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HiFTConfig":
        """Build from a mapping (config file section); unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"the optimizer config must be a mapping of option names to values, got {type(data).__name__}")
        names = cls.field_names()
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown option {key!r}{suggest(str(key), names)}; valid options: {', '.join(names)}")
        return cls(**{str(k): v for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not isinstance(self.optimizer, str):
            out["optimizer"] = f"{self.optimizer.__module__}.{self.optimizer.__qualname__}"
        out["freeze"] = list(self.freeze)
        if self.groups is not None:
            out["groups"] = [list(g) for g in self.groups]
        if self.no_decay != "auto":
            out["no_decay"] = list(self.no_decay)
        return out
