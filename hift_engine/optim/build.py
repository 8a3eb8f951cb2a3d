"""From a HiFTConfig to the pieces of an optimizer: the fused spec (or a torch.optim class) with its validated
options, and the update path over the group layouts."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..config import HiFTConfig
from ..errors import ConfigError, LayoutError
from ..layout import GradArena, GroupLayout
from ..schedule import GroupOrder
from ..store import StateStore, make_store
from . import FUSED_SPECS
from .base import FusedSpec
from .fused import FusedPath, resolve_kernels
from .generic import GenericPath, generic_default_weight_decay, generic_defaults
from .path import UpdatePath

__all__ = ["optimizer_options", "make_path"]


def optimizer_options(cfg: HiFTConfig, named: Sequence[tuple[str, nn.Parameter]]) -> tuple[FusedSpec | None, dict, float]:
    """(fused spec or None for a torch.optim class, its options with torch's defaults, weight decay)."""
    if not isinstance(cfg.optimizer, str):
        wd = generic_default_weight_decay(cfg.optimizer) if cfg.weight_decay is None else cfg.weight_decay
        return None, {**generic_defaults(cfg.optimizer), **cfg.optimizer_kwargs}, wd
    spec = FUSED_SPECS[cfg.optimizer]()
    wide = [n for n, p in named if p.dtype == torch.float64]
    if wide:
        raise LayoutError(
            f"parameter {wide[0]!r} is float64; the fused optimizers keep float32 state. Cast the model to float32 "
            "(or bf16), or pass a torch.optim class (optimizer=torch.optim.AdamW) for float64 state"
        )
    wd = spec.default_weight_decay if cfg.weight_decay is None else cfg.weight_decay
    return spec, spec.normalize(cfg.optimizer_kwargs), wd


def make_path(
    cfg: HiFTConfig, spec: FusedSpec | None, hyper: dict[str, Any], layouts: Sequence[GroupLayout], grad_views,
    arena: GradArena, param_groups: list[dict], device: torch.device, store=None, masters: bool = False,
) -> tuple[UpdatePath, str]:
    """(update path, kernel backend name). ``store``: None (from ``cfg.state_store``), a StateStore, or a
    callable ``(layouts, device) -> StateStore``."""
    if spec is None:
        if store is not None:
            raise ConfigError("store= applies to the fused optimizers (adamw, adagrad, sgd); a torch.optim class keeps its own state")
        return GenericPath(cfg.optimizer, hyper, layouts, param_groups, device), "generic"
    if store is None and layouts[0].num_state:
        first_cycle = GroupOrder(len(layouts), cfg.strategy, cfg.seed).cycle_order(0)  # host buffers in this order
        store = make_store(cfg.state_store, [lay.state_numel for lay in layouts], device, cfg.slots,
                           chunk_bytes=cfg.transfer_chunk_mib << 20, alloc_order=first_cycle,
                           pin_context=cfg.pin_context)
    elif callable(store) and not isinstance(store, StateStore):
        store = store(layouts, device)
    backend = resolve_kernels(cfg.kernels, device)
    apply_coef = cfg.max_grad_norm is not None or cfg.precision == "fp16-mixed"
    path = FusedPath(spec, layouts, grad_views, arena, param_groups, store, backend, apply_coef, masters=masters)
    return path, backend
