"""torch-style hyper-parameter groups ("decay" and "no_decay") of the trained parameters.

These are the ``param_groups`` LR schedulers and transformers.Trainer see; the HiFT layer groups are a
separate partition (``grouping``).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from torch import nn

from .errors import ConfigError

__all__ = ["default_no_decay", "no_decay_names", "build_param_groups"]

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


def no_decay_names(model: nn.Module, patterns: Any, names: Sequence[str]) -> set[str]:
    """``patterns``: "auto", or regexes that match a parameter name when found anywhere in it (``re.search``, so
    transformers' usual ``["bias", "LayerNorm.weight"]`` works as written; anchor with ^...$ for a full match).
    A pattern that matches no trained parameter is an error: it is almost always a typo."""
    if patterns == "auto":
        return default_no_decay(model)
    out: set[str] = set()
    for pat in patterns:
        try:
            hits = {n for n in names if re.search(pat, n)}
        except re.error as e:
            raise ConfigError(f"no_decay pattern {pat!r} is not a valid regex: {e}") from None
        if not hits:
            raise ConfigError(
                f"no_decay pattern {pat!r} matches no trained parameter; names look like {list(names[:3])}. "
                "Fix the pattern, or leave it out"
            )
        out |= hits
    return out


def build_param_groups(
    named: Sequence[tuple[str, nn.Parameter]], no_decay: set[str], lr: float, weight_decay: float, hyper: dict[str, Any]
) -> list[dict[str, Any]]:
    decay = [p for n, p in named if n not in no_decay]
    plain = [p for n, p in named if n in no_decay]
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, **hyper, "name": "decay"})
    if plain:
        groups.append({"params": plain, "lr": lr, "weight_decay": 0.0, **hyper, "name": "no_decay"})
    return groups
