"""hift_engine: hierarchical full-parameter fine-tuning (HiFT, arXiv 2401.15207) on one GPU.

Each optimizer step trains one group of layers; the optimizer state of idle groups lives in pinned host
memory and streams to and from the GPU on side streams, hidden behind forward and backward.
"""

from .auto_groups import measure_activation_gib
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import HiFTConfig
from .errors import (
    CheckpointError,
    ConfigError,
    GroupingError,
    HiFTError,
    HostMemoryError,
    LayoutError,
    NativeUnavailableError,
    NonFiniteError,
)
from .grouping import Grouping, build_grouping
from .optimizer import HiFTOptimizer
from .schedule import CycleLR, DelayedScheduler, GroupOrder

__version__ = "0.1.0"

__all__ = [
    "HiFTOptimizer",
    "HiFTConfig",
    "measure_activation_gib",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "build_grouping",
    "Grouping",
    "GroupOrder",
    "CycleLR",
    "DelayedScheduler",
    "HiFTError",
    "ConfigError",
    "GroupingError",
    "LayoutError",
    "NonFiniteError",
    "CheckpointError",
    "NativeUnavailableError",
    "HostMemoryError",
]
