"""The built-in demo: a tiny byte-level LLaMA trained with HiFT on arithmetic the project generates itself."""

from .task import ArithmeticTask
from .run import DemoResult, run_demo

__all__ = ["ArithmeticTask", "run_demo", "DemoResult"]
