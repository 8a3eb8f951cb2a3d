"""``hift train``: config schema (config.py), data (data.py), model loading (model.py), the output directory
and resume choice (rundir.py), and the training loop (loop.py)."""

from .config import RunConfig, load_run_config
from .loop import TrainingInterrupted, train

__all__ = ["RunConfig", "load_run_config", "train", "TrainingInterrupted"]
