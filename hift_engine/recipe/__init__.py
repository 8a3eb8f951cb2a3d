"""``hift train``: config schema (config.py), data (data.py), and the training loop (loop.py)."""

from .config import RunConfig, load_run_config
from .loop import train

__all__ = ["RunConfig", "load_run_config", "train"]
