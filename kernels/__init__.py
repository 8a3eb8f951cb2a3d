"""Optimizer update kernels: Triton kernels (adamw.py, adagrad.py, sgd.py) and their pure-PyTorch references.

Importing this package does not import Triton; the kernel modules do, so CPU-only installs without Triton
still get the reference path. Shipped as ``hift_engine.kernels`` (see pyproject's package-dir).
"""

from .reference import adagrad_reference, adamw_reference, sgd_reference
from .table import TensorTable, build_tensor_table

__all__ = [
    "adamw_reference",
    "adagrad_reference",
    "sgd_reference",
    "TensorTable",
    "build_tensor_table",
]
