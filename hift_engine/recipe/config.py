"""The ``hift train`` config: sections model / data / optimizer / schedule / train, loaded from YAML or TOML.

Every option name is unique across sections, so command-line overrides are plain ``--lr 1e-5`` (or
``--optimizer.lr 1e-5``); values are parsed and type-checked against the schema, and unknown keys are errors.
The optimizer section is HiFTConfig itself.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import HiFTConfig, suggest
from ..errors import ConfigError
from ..schedule import SCHEDULES

__all__ = ["RunConfig", "ModelSection", "DataSection", "ScheduleSection", "TrainSection", "load_run_config"]


@dataclass
class ModelSection:
    path: str = "tiny"  # "tiny" (built-in byte-level LLaMA) or a local Hugging Face model directory
    dtype: str = "float32"
    tiny_hidden: int = 128
    tiny_layers: int = 2


@dataclass
class DataSection:
    data: str = "builtin:arithmetic"  # a .jsonl file (prompt/response or text), a .txt file, or builtin:arithmetic
    max_length: int = 64
    overlong: str = "truncate"  # examples longer than max_length: truncate | drop | error (counts are reported)
    prompt_key: str = "prompt"
    response_key: str = "response"
    text_key: str = "text"


@dataclass
class ScheduleSection:
    schedule: str = "cosine"
    warmup_steps: int = 0
    per_step: bool = False  # False: HiFT's delayed LR (advances once per cycle)
    min_lr_ratio: float = 0.0


@dataclass
class TrainSection:
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    output_dir: str = "runs/hift"
    plot: bool = True
    head_chunk_tokens: int = 0  # > 0: LM head + loss in chunks of this many tokens, no full logits (long sequences)


SECTIONS = {"model": ModelSection, "data": DataSection, "schedule": ScheduleSection, "train": TrainSection}
OVERLONG = ("truncate", "drop", "error")
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: HiFTConfig = field(default_factory=lambda: HiFTConfig(lr=3e-3, weight_decay=0.0))
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "RunConfig":
        for section in SECTIONS:
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                want = _TYPES[f.type] if isinstance(f.type, str) else f.type
                if want is float and isinstance(value, int) and not isinstance(value, bool):
                    setattr(obj, f.name, float(value))
                elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
                    raise ConfigError(f"{section}.{f.name} must be {want.__name__}, got {value!r}")
        t = self.train
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.save_every < 0:
            raise ConfigError(f"train.save_every must be >= 0 (0: only at the end), got {t.save_every}")
        if t.head_chunk_tokens < 0:
            raise ConfigError(f"train.head_chunk_tokens must be >= 0 (0: the model's own loss), got {t.head_chunk_tokens}")
        if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
        if self.schedule.schedule not in SCHEDULES:
            raise ConfigError(f"schedule.schedule must be one of {SCHEDULES}, got {self.schedule.schedule!r}")
        if not 0 <= self.schedule.warmup_steps <= t.steps:
            raise ConfigError(f"schedule.warmup_steps must be in [0, train.steps], got {self.schedule.warmup_steps}")
        if self.model.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.model.dtype!r}")
        if self.data.max_length < 4:
            raise ConfigError(f"data.max_length must be >= 4, got {self.data.max_length}")
        if self.data.overlong not in OVERLONG:
            raise ConfigError(f"data.overlong must be one of {OVERLONG}, got {self.data.overlong!r}")
        if self.model.tiny_hidden < 8 or self.model.tiny_hidden % 4 or self.model.tiny_layers < 1:
            raise ConfigError("model.tiny_hidden must be a multiple of 4 (>= 8) and model.tiny_layers >= 1")
        return self

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config file must hold a mapping of sections, got {type(data).__name__}")
        known = list(SECTIONS) + ["optimizer"]
        for key in data:
            if key not in known:
                raise ConfigError(f"unknown section {key!r}{suggest(str(key), known)}; sections: {', '.join(known)}")
        kwargs = {}
        for name, section_cls in SECTIONS.items():
            values = data.get(name) or {}
            if not isinstance(values, Mapping):
                raise ConfigError(f"section {name!r} must be a mapping, got {type(values).__name__}")
            fields = [f.name for f in dataclasses.fields(section_cls)]
            for key in values:
                if key not in fields:
                    raise ConfigError(f"unknown option {name}.{key}{suggest(str(key), fields)}; options: {', '.join(fields)}")
            kwargs[name] = section_cls(**values)
        opt = data.get("optimizer") or {}
        if not isinstance(opt, Mapping):
            raise ConfigError(f"section 'optimizer' must be a mapping, got {type(opt).__name__}")
        kwargs["optimizer"] = HiFTConfig.from_dict({"lr": 3e-3, "weight_decay": 0.0, **opt})
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["optimizer"] = self.optimizer.to_dict()
        return out

    def apply_overrides(self, overrides: Mapping[str, str]) -> "RunConfig":
        """``{"lr": "1e-5", "train.steps": "10"}``: values are strings from the command line, parsed by type."""
        data = self.to_dict()
        index = _option_index()
        for raw_key, raw in overrides.items():
            key = raw_key.replace("-", "_")
            section, _, name = key.rpartition(".")
            if not section:
                if name not in index:
                    raise ConfigError(f"unknown option --{raw_key}{suggest(name, list(index))}")
                section = index[name]
            if section not in data or name not in data[section]:
                raise ConfigError(f"unknown option --{raw_key}")
            data[section][name] = _parse(raw, data[section][name], f"--{raw_key}", _declared_type(section, name))
        new = RunConfig.from_dict(data)
        self.__dict__.update(new.__dict__)
        return self


def _option_index() -> dict[str, str]:
    index = {}
    for name, section_cls in SECTIONS.items():
        for f in dataclasses.fields(section_cls):
            index[f.name] = name
    for f in HiFTConfig.field_names():
        index.setdefault(f, "optimizer")
    return index


def _declared_type(section: str, name: str) -> str:
    """The schema's type of an option as written in its dataclass ("int", "str", "Any", ...)."""
    cls = HiFTConfig if section == "optimizer" else SECTIONS[section]
    t = next(f.type for f in dataclasses.fields(cls) if f.name == name)
    return t if isinstance(t, str) else t.__name__


def _parse(raw: str, current: Any, what: str, declared: str = "") -> Any:
    """Parse a command-line string by the option's declared type (``current`` when the schema says nothing).

    Options that may hold a list, a mapping or null (declared ``Any``/``dict``: no_decay, freeze, groups,
    weight_decay, max_grad_norm, optimizer_kwargs, ...) take JSON (``'[".*bias"]'``, ``null``, ``0.1``); a
    plain word that is not JSON (``auto``, ``adamw``) stays a string. Text starting with ``[`` or ``{`` must
    be valid JSON.
    """
    if declared in ("Any", "dict", "list") or (not declared and (current is None or isinstance(current, (list, tuple, dict)))):
        try:
            return json.loads(raw)
        except ValueError as e:
            if declared != "Any" or raw.lstrip()[:1] in ("[", "{", '"'):
                kind = "a JSON list" if raw.lstrip()[:1] == "[" else "JSON"
                raise ConfigError(f"{what}: cannot parse {raw!r} as {kind} ({e})") from None
            return raw
    try:
        if isinstance(current, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        return raw
    except ValueError as e:
        raise ConfigError(f"{what}: cannot parse {raw!r} as {type(current).__name__} ({e})") from None


def load_run_config(path: str | Path | None, overrides: Mapping[str, str] | None = None) -> RunConfig:
    """Load a YAML (.yaml/.yml) or TOML (.toml) file (or the defaults when ``path`` is None) and apply overrides."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            elif path.suffix == ".toml":
                try:
                    import tomllib
                except ImportError:  # Python 3.10
                    import tomli as tomllib
                data = tomllib.loads(text)
            else:
                raise ConfigError(f"config file {path}: use a .yaml, .yml or .toml file")
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any parser error is a config error with the file named
            raise ConfigError(f"config file {path}: cannot parse ({type(e).__name__}: {e})") from None
    cfg = RunConfig.from_dict(data)
    if overrides:
        cfg.apply_overrides(overrides)
    return cfg
