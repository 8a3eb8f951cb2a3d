"""Cut a model into ordered units (embedding, one per block, head) and units into HiFT groups.

Units are found automatically for Hugging Face LLaMA-family decoders (LLaMA, Mistral, Qwen2/3, Gemma, Phi-3),
GPT-2, OPT, GPT-NeoX, BERT and RoBERTa, and for any model with one ``nn.ModuleList`` of blocks. Every trainable
parameter belongs to exactly one unit. Tied weights are registered once by PyTorch, under the first module that
owns them (for tied LMs: the input embedding), so they belong to the embedding unit and are trained with it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from torch import nn

from .errors import GroupingError

__all__ = ["Unit", "Group", "Grouping", "build_grouping", "FAMILIES", "name_matches"]

# model_type -> (path of the block list relative to the base model, embedding children of the base model).
# Everything of the base model that is neither a block nor an embedding goes to the head unit, together with
# task heads outside it (lm_head, score, classifier, ...). Registration order is not used for known families
# because some (OPT) register the final norm before the blocks.
_LLAMA_LIKE = ("layers", ("embed_tokens",))
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": ("h", ("wte", "wpe")),
    "opt": ("layers", ("embed_tokens", "embed_positions", "project_in")),
    "gpt_neox": ("layers", ("embed_in",)),
    "bert": ("encoder.layer", ("embeddings",)),
    "roberta": ("encoder.layer", ("embeddings",)),
}


@dataclass(frozen=True)
class Unit:
    """An indivisible piece of the model: 'embedding', a block (named by its module path), or 'head'."""

    name: str
    param_names: tuple[str, ...]


@dataclass
class Group:
    """Consecutive units trained together in one optimizer step."""

    index: int
    units: tuple[str, ...]
    param_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...] = field(repr=False)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def name_matches(pattern: str, name: str) -> bool:
    """A pattern matches a name if equal, a dotted prefix of it (module path), or a full regex match."""
    if name == pattern or name.startswith(pattern + "."):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _check_pattern(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        if not pattern.replace(".", "").replace("_", "").isalnum():
            raise GroupingError(f"{what} pattern {pattern!r} is neither a module name nor a valid regex: {e}") from None


@dataclass
class Grouping:
    units: list[Unit]
    groups: list[Group]
    frozen: list[str]  # parameter names never trained (requires_grad=False at setup, or matched by freeze)
    source: str  # how units were found, for describe()

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def describe(self, state_bytes_per_element: int = 8) -> str:
        """A table of the groups: units, parameter counts, and bytes of gradients and optimizer state."""

        def gib(n: float) -> str:
            return f"{n / 2**30:8.3f}"

        lines = [
            f"HiFT grouping ({self.source}): {len(self.units)} units -> {self.num_groups} groups, "
            f"{len(self.frozen)} frozen parameters",
            f"{'group':>5}  {'params':>14}  {'grads GiB':>9}  {'state GiB':>9}  units",
        ]
        total = total_state = 0
        for g in self.groups:
            grad_b = sum(p.numel() * p.element_size() for p in g.params)
            state_b = g.numel * state_bytes_per_element
            total += g.numel
            total_state += state_b
            units = ", ".join(g.units) if len(g.units) <= 3 else f"{g.units[0]} .. {g.units[-1]} ({len(g.units)})"
            lines.append(f"{g.index:>5}  {g.numel:>14,}  {gib(grad_b)}   {gib(state_b)}  {units}")
        lines.append(f"{'all':>5}  {total:>14,}  {'':9}  {gib(total_state)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- unit discovery
def _param_owner_names(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters())  # deduplicated: a tied weight appears once, under its first owner


def _find_block_list(model: nn.Module, path: str) -> tuple[str, nn.ModuleList] | None:
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and (name == path or name.endswith("." + path))
    ]
    if not found:
        return None
    return max(found, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _largest_module_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    total = sum(p.numel() for p in model.parameters()) or 1
    lists = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) >= 1 and any(True for _ in mod.parameters())
    ]
    # Keep outermost lists only (a block may itself hold a ModuleList of experts/heads).
    outer = [(n, m) for n, m in lists if not any(n != o and n.startswith(o + ".") for o, _ in lists)]
    if not outer:
        return None
    name, mod = max(outer, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    if len(outer) > 1 and sum(p.numel() for p in mod.parameters()) < 0.5 * total:
        return None  # several comparable block lists (e.g. encoder + decoder): ambiguous
    return name, mod


def _auto_units(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> tuple[list[Unit], str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type) if model_type else None
    located = _find_block_list(model, family[0]) if family else None
    if located is None:
        located = _largest_module_list(model)
        family = None
    if located is None:
        searched = (
            f"the block list '{FAMILIES[model_type][0]}' of model_type {model_type!r}, then " if model_type in FAMILIES else ""
        )
        raise GroupingError(
            f"cannot find the units of {type(model).__name__}: searched {searched}a single nn.ModuleList of blocks "
            "holding most parameters, and found none. Pass the groups explicitly, e.g. "
            "HiFTOptimizer(model, groups=[['embed'], ['blocks.0', 'blocks.1'], ['head']]) with module names or "
            "regexes that cover every trainable parameter."
        )
    list_name, blocks = located
    prefix = f"{list_name}."
    emb_prefixes: tuple[str, ...] = ()
    if family:  # embedding modules are children of the model that holds the block list
        base = list_name[: -len(family[0])].rstrip(".")
        emb_prefixes = tuple(f"{base}.{e}" if base else e for e in family[1])
    emb, head = [], []
    per_block: dict[str, list[str]] = {f"{prefix}{i}": [] for i in range(len(blocks))}
    seen_blocks = False
    for name, _ in named:
        if name.startswith(prefix):
            idx = name[len(prefix):].split(".", 1)[0]
            per_block[f"{list_name}.{idx}"].append(name)
            seen_blocks = True
        elif family:
            (emb if any(name_matches(e, name) for e in emb_prefixes) else head).append(name)
        else:  # generic rule: before the blocks -> embedding, after -> head
            (head if seen_blocks else emb).append(name)
    units = []
    if emb:
        units.append(Unit("embedding", tuple(emb)))
    units += [Unit(k, tuple(v)) for k, v in per_block.items() if v]
    if head:
        units.append(Unit("head", tuple(head)))
    how = f"{model_type} family" if family else f"generic: block list '{list_name}'"
    return units, how


def _explicit_units(named: list[tuple[str, nn.Parameter]], groups: Sequence[Sequence[str]]) -> list[Unit]:
    for gi, spec in enumerate(groups):
        for pat in spec:
            _check_pattern(pat, f"groups[{gi}]")
    owner: dict[str, int] = {}
    for name, _ in named:
        for gi, spec in enumerate(groups):
            if any(name_matches(pat, name) for pat in spec):
                if name in owner and owner[name] != gi:
                    raise GroupingError(
                        f"parameter {name!r} is matched by explicit groups {owner[name]} and {gi}; "
                        "every parameter must belong to exactly one group"
                    )
                owner[name] = gi
    missing = [n for n, _ in named if n not in owner]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise GroupingError(
            f"explicit groups do not cover these trainable parameters: {shown}. "
            "Add them to a group, or list them in freeze=[...] to never train them."
        )
    for gi, spec in enumerate(groups):
        if not any(o == gi for o in owner.values()):
            raise GroupingError(f"explicit group {gi} ({list(spec)}) matches no trainable parameter")
    return [
        Unit(f"group{gi}", tuple(n for n, _ in named if owner[n] == gi)) for gi in range(len(groups))
    ]


# ---------------------------------------------------------------------------------------------- public entry
def build_grouping(
    model: nn.Module,
    layers_per_group: int = 1,
    groups: Sequence[Sequence[str]] | None = None,
    freeze: Iterable[str] = (),
    trainable: Callable[[nn.Parameter], bool] | None = None,
    sizes: Sequence[int] | None = None,
) -> Grouping:
    """Units and groups of ``model``. Parameters for which ``trainable`` is False (default: those with
    ``requires_grad=False`` at this point) count as frozen. ``sizes``: units per group, bottom-up (from
    layers_per_group='auto'), instead of ``layers_per_group`` for every group."""
    if not isinstance(model, nn.Module):
        raise GroupingError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    freeze = tuple(freeze)
    for pat in freeze:
        _check_pattern(pat, "freeze")
    all_named = _param_owner_names(model)
    if not all_named:
        raise GroupingError(f"{type(model).__name__} has no parameters to train")
    trainable = trainable or (lambda p: p.requires_grad)
    frozen = [n for n, p in all_named if not trainable(p)]
    named = [(n, p) for n, p in all_named if trainable(p)]

    if groups is not None:
        if layers_per_group != 1:
            raise GroupingError(
                "layers_per_group applies to automatically found units; with explicit groups leave it at 1 "
                "(each explicit group is trained as one group)"
            )
        units = _explicit_units(named, groups)
        source = "explicit groups"
    else:
        units, source = _auto_units(model, named)

    if freeze:
        used = set()
        kept_units = []
        for u in units:
            if any(name_matches(pat, u.name) for pat in freeze):
                used.update(p for p in freeze if name_matches(p, u.name))
                frozen.extend(u.param_names)
                continue
            keep = []
            for n in u.param_names:
                hits = [p for p in freeze if name_matches(p, n)]
                if hits:
                    used.update(hits)
                    frozen.append(n)
                else:
                    keep.append(n)
            if keep:
                kept_units.append(Unit(u.name, tuple(keep)))
        unused = [p for p in freeze if p not in used]
        if unused:
            raise GroupingError(
                f"freeze patterns {unused} match no unit or trainable parameter; unit names are "
                f"{[u.name for u in units][:6]}... and parameter names look like {named[0][0]!r}"
            )
        units = kept_units
    if not units:
        raise GroupingError("every parameter is frozen: nothing left to train; remove some freeze patterns")

    by_name = dict(named)
    step = 1 if groups is not None or sizes is not None else layers_per_group
    if step > len(units):
        warnings.warn(
            f"hift_engine: layers_per_group={layers_per_group} is larger than the {len(units)} units of this model: "
            "one group holds everything (plain full fine-tuning)",
            stacklevel=3,
        )
    if sizes is not None and (sum(sizes) != len(units) or min(sizes) < 1):
        raise GroupingError(f"group sizes {list(sizes)} do not cover the model's {len(units)} units")
    starts = [sum(sizes[:i]) for i in range(len(sizes))] if sizes is not None else list(range(0, len(units), step))
    ends = starts[1:] + [len(units)]
    out_groups = []
    for gi, (start, end) in enumerate(zip(starts, ends)):
        chunk = units[start:end]
        names = tuple(n for u in chunk for n in u.param_names)
        out_groups.append(Group(gi, tuple(u.name for u in chunk), names, tuple(by_name[n] for n in names)))
    return Grouping(units=units, groups=out_groups, frozen=frozen, source=source)
