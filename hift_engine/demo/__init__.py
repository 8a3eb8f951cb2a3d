"""The built-in demo: a tiny byte-level LLaMA trained with HiFT on a task that needs no download: arithmetic the
project generates itself (the default), or next-byte prediction on Python's own email package source."""

from .run import DemoResult, run_demo
from .task import ArithmeticTask
from .text import TextTask

__all__ = ["ArithmeticTask", "TextTask", "run_demo", "DemoResult"]
