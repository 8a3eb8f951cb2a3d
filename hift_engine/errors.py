"""Exception types. Every message says what was wrong and what to do about it."""

__all__ = [
    "HiFTError",
    "ConfigError",
    "GroupingError",
    "LayoutError",
    "NonFiniteError",
    "CheckpointError",
    "NativeUnavailableError",
    "HostMemoryError",
]


class HiFTError(Exception):
    """Base class of every error raised by hift_engine."""


class ConfigError(HiFTError, ValueError):
    """An option has a wrong type, an out-of-range value, or an unknown name."""


class GroupingError(HiFTError, ValueError):
    """The model cannot be cut into units/groups as asked."""


class LayoutError(HiFTError, ValueError):
    """Parameters cannot be laid out for the fused update (device, dtype, layout, or moved after setup)."""


class NonFiniteError(HiFTError, RuntimeError):
    """Too many consecutive optimizer steps were skipped for non-finite gradients."""


class CheckpointError(HiFTError, RuntimeError):
    """A checkpoint is missing, partial, corrupted, or does not match the model/optimizer."""


class NativeUnavailableError(HiFTError, RuntimeError):
    """A feature needs the C++/CUDA extension, which could not be built or loaded."""


class HostMemoryError(HiFTError, MemoryError):
    """The host cannot hold the optimizer state that the offloaded store would pin."""
