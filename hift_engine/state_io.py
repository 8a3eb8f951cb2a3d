"""One encoding of optimizer state: per-group export and import, shared by ``state_dict()`` and checkpoints.

A group's state travels as a :class:`GroupState`: CPU tensors plus JSON-friendly values. Its signature (the
names, shapes and dtypes of the tensors) can be checked without the data, so a checkpoint reader validates
everything from file headers before it changes anything. Which tensors a group holds is decided by its
update path (``optim.path``): the fused path stores ``steps`` and one flat ``state``, the generic path the
inner optimizer's per-parameter tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .errors import ConfigError
from .loss_scale import LossScaler

__all__ = [
    "STATE_FORMAT", "GroupState", "Signature", "StateExport", "signature_of", "export_state", "check_state",
    "import_state", "to_state_dict", "load_state_dict", "load_torch_state_dict",
]

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


# ---------------------------------------------------------------------------------------------- the operations
# They take a HiFTOptimizer (its methods of the same names call them).
def param_index(opt) -> dict[int, int]:
    """id(parameter) -> its number in ``opt.param_groups`` order (torch.optim's numbering)."""
    return {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}


def export_state(opt) -> StateExport:
    opt._check_live()  # a closed optimizer's store is freed: what it would export is not its state
    name_of = {id(p): n for lay in opt.layouts for n, p in zip(lay.names, lay.params)}
    meta = {
        "format": STATE_FORMAT,
        "optimizer": opt.path.name,
        "state_names": list(opt.path.state_names),
        "masters": bool(getattr(opt.path, "masters", False)),
        "precision": opt.config.precision,
        "state_dtype": opt.config.state_dtype,
        "loss_scale": opt.scaler.state_dict() if opt.scaler is not None else None,
        "param_names": [name_of[id(p)] for g in opt.param_groups for p in g["params"]],
        "groups": [list(lay.names) for lay in opt.layouts],
        "order": opt.order.state_dict(),
        "global_step": opt.global_step,
        "skips": opt.monitor.state_dict(),
        "param_groups": [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"} for g in opt.param_groups
        ],
    }
    if opt.shards is not None:  # each rank exports its own pieces; the world size fixes what a piece is
        meta["shard"] = {"world": opt.shards.world, "rank": opt.shards.rank}
    return StateExport(meta, (opt.path.export_group(gid) for gid in range(opt.num_groups)))


# torch.optim's per-group switches that say how to run, not what to compute: accepted from a torch state dict
# and not kept.
_TORCH_RUNTIME = ("foreach", "fused", "capturable", "differentiable")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_hyper(opt, saved: Sequence[Mapping[str, Any]]) -> None:
    """Saved hyper-parameters must be this optimizer's kind, valid, and keep its state layout."""
    spec = getattr(opt.path, "spec", None)
    if spec is None:
        return
    own = set(spec.defaults) | {"lr", "weight_decay", "name", "initial_lr", "params"}
    for g, s in zip(opt.param_groups, saved):
        foreign = sorted(set(s) - own - set(_TORCH_RUNTIME) - {"decoupled_weight_decay"})
        missing = sorted(set(spec.defaults) - set(s) - {"maximize"})
        if foreign or missing or (spec.name == "adamw" and s.get("decoupled_weight_decay") is False):
            raise ConfigError(
                f"the saved param_group {s.get('name', '?')!r} is not {spec.name}'s (unexpected {foreign}, missing "
                f"{missing}); it was saved by another optimizer"
            )
        merged = {**g, **{k: v for k, v in s.items() if k in own and k != "params"}}
        spec.normalize({k: merged[k] for k in spec.defaults})  # raises ConfigError naming a bad value
        for key in ("lr", "weight_decay"):
            if isinstance(merged[key], bool) or not isinstance(merged[key], (int, float)) or merged[key] < 0:
                raise ConfigError(f"the saved {key} {merged[key]!r} is not a number >= 0")
        if spec.structure(merged) != spec.structure(g):
            raise ConfigError(
                f"the saved state has {spec.structural} = {spec.structure(merged)}, this optimizer "
                f"{spec.structure(g)}; they fix the state layout. Create the optimizer with the saved options"
            )


def check_state(opt, meta: Mapping[str, Any], groups: Sequence[tuple[Signature, Mapping[str, Any]]] | None = None) -> None:
    """``meta`` without "format" is a plain torch.optim state dict (no HiFT position to check)."""
    opt._check_live()
    if "format" in meta:
        if meta["format"] != STATE_FORMAT:
            raise ConfigError(f"unsupported hift state format {meta['format']!r}")
        if meta.get("optimizer") != opt.path.name:
            raise ConfigError(f"saved for optimizer {meta.get('optimizer')!r}, this one is {opt.path.name!r}")
        mine = export_state(opt).meta
        if mine["masters"] and meta.get("masters") and meta.get("precision", mine["precision"]) != mine["precision"]:
            raise ConfigError(f"saved with precision {meta.get('precision')!r}, this optimizer has {mine['precision']!r}")
        if meta.get("loss_scale") is not None:
            LossScaler.check_state_dict(meta["loss_scale"])
        if bool(meta.get("masters", False)) != mine["masters"]:
            raise ConfigError(
                f"saved {'with' if meta.get('masters') else 'without'} fp32 master weights (precision "
                f"{'bf16-mixed' if meta.get('masters') else 'fp32/tf32'}); create the optimizer with the same precision"
            )
        if list(meta.get("param_names", [])) != mine["param_names"]:
            raise ConfigError("the saved parameter names differ from this model's; it belongs to another model")
        if [list(g) for g in meta.get("groups", [])] != mine["groups"]:
            sizes = [len(g) for g in meta.get("groups", [])]
            raise ConfigError(
                "the saved group layout differs (layers_per_group, groups or freeze changed); resume with the same "
                "grouping options" + (
                    f". With layers_per_group='auto' the plan depends on memory_budget_gib and activation_gib: give "
                    f"both as logged when the run started (the saved groups have {sizes} parameters each)"
                    if opt.config.layers_per_group == "auto" else ""
                )
            )
        saved_world = (meta.get("shard") or {}).get("world")
        world = opt.shards.world if opt.shards is not None else None
        if saved_world != world:
            raise ConfigError(
                (f"saved with shard_state over {saved_world} ranks" if saved_world else "saved with the state whole "
                 "(shard_state off)") + ", and this optimizer " + (f"shards it over {world} ranks" if world else
                 "keeps it whole") + ". Resume with the same number of processes and shard_state setting (resharding "
                "a checkpoint is not supported)"
            )
        opt.order.check_state_dict(meta.get("order"))
        skips = meta.get("skips")
        if not _is_count(meta.get("global_step")) or not (
            isinstance(skips, Mapping) and _is_count(skips.get("total")) and _is_count(skips.get("consecutive"))
        ):
            raise ConfigError(f"invalid saved position: global_step={meta.get('global_step')!r}, skips={skips!r}")
    saved = meta.get("param_groups") or []
    if len(saved) != len(opt.param_groups) or not all(isinstance(s, Mapping) for s in saved):
        raise ConfigError(f"saved {len(saved)} param_groups, this optimizer has {len(opt.param_groups)}")
    _check_hyper(opt, saved)
    if groups is None:
        return
    if len(groups) != opt.num_groups:
        raise ConfigError(f"saved state of {len(groups)} groups, this optimizer has {opt.num_groups}")
    # a group's flat state is laid out for its state_dtype (state_dict()'s per-parameter tensors are not: they
    # load into either, rounded or widened)
    saved_dtype, own_dtype = meta.get("state_dtype", "fp32"), opt.config.state_dtype
    if "format" in meta and saved_dtype != own_dtype and getattr(opt.path, "spec", None) is not None:
        raise ConfigError(
            f"saved with state_dtype={saved_dtype!r}, this optimizer has state_dtype={own_dtype!r}: the saved flat "
            f"state is laid out for {saved_dtype} moments. Resume with state_dtype={saved_dtype!r} (or move the state "
            "across with state_dict() / load_state_dict(), which converts)"
        )
    for gid, (sig, values) in enumerate(groups):
        opt.path.check_group(gid, sig, values)


def import_state(opt, meta: Mapping[str, Any], groups, signatures=None) -> None:
    if signatures is None:
        groups = list(groups)
        signatures = [(g.signature(), g.values) for g in groups]
    check_state(opt, meta, signatures)
    _apply(opt, meta, groups)


def _apply(opt, meta: Mapping[str, Any], groups) -> None:
    """Everything was checked: nothing below refuses."""
    for gid, gs in enumerate(groups):
        opt.path.import_group(gid, gs)
    drop = ("params",) + (_TORCH_RUNTIME + ("decoupled_weight_decay",) if getattr(opt.path, "spec", None) else ())
    for g, s in zip(opt.param_groups, meta["param_groups"]):  # the saved hyper-parameters win, as in torch.optim
        g.update({k: tuple(v) if isinstance(g.get(k), tuple) and isinstance(v, list) else v for k, v in s.items() if k not in drop})
    opt._restore_position(meta)


def to_state_dict(opt) -> dict[str, Any]:
    export, index, state = export_state(opt), param_index(opt), {}
    for gid, gs in enumerate(export.groups):
        for p, entry in zip(opt.layouts[gid].params, opt.path.to_torch(gid, gs)):
            if entry:
                state[index[id(p)]] = entry
    meta = export.meta
    hyper = meta.pop("param_groups")
    groups = [dict(h, params=[index[id(p)] for p in g["params"]]) for h, g in zip(hyper, opt.param_groups)]
    return {"state": state, "param_groups": groups, "hift": meta}


def load_state_dict(opt, state_dict: Mapping[str, Any]) -> None:
    if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict or "state" not in state_dict:
        raise ConfigError("load_state_dict: expected a dict with 'state' and 'param_groups' (from state_dict())")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, opt.param_groups)
    ):
        raise ConfigError(
            "load_state_dict: the saved optimizer has param_groups of sizes "
            f"{[len(s['params']) for s in saved_groups]}, this one {[len(g['params']) for g in opt.param_groups]}; "
            "it was saved for a different model, freeze list or weight-decay split"
        )
    hyper = [{k: v for k, v in s.items() if k != "params"} for s in saved_groups]
    meta = {**(state_dict.get("hift") or {}), "param_groups": hyper}
    saved, index = state_dict["state"], param_index(opt)
    entries = [[saved.get(index[id(p)], saved.get(str(index[id(p)]))) for p in lay.params] for lay in opt.layouts]
    check_state(opt, meta)  # everything is checked before anything changes
    for gid, e in enumerate(entries):
        opt.path.from_torch(gid, e, build=False)
    _apply(opt, meta, (opt.path.from_torch(gid, e) for gid, e in enumerate(entries)))


def load_torch_state_dict(opt, state_dict: Mapping[str, Any], params) -> None:
    ours, theirs = param_index(opt), list(params)
    state = {}
    for i, entry in state_dict.get("state", {}).items():
        if not 0 <= int(i) < len(theirs) or id(theirs[int(i)]) not in ours:
            raise ConfigError(f"load_torch_state_dict: parameter {i} of the saved state is not trained by this optimizer")
        state[ours[id(theirs[int(i)])]] = entry
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [ours[id(p)] for p in g["params"]]} for g in opt.param_groups]
    load_state_dict(opt, {"state": state, "param_groups": groups})
