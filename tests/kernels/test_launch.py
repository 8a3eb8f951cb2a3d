"""Launch helpers: the device guard Triton launches run under."""

import contextlib

import torch

from hift_engine.kernels._launch import launch_device
from hift_engine.kernels.table import build_tensor_table


def test_cpu_tables_launch_without_a_cuda_context():
    table = build_tensor_table([torch.zeros(3)], [0], [0], [0], 1024)
    assert isinstance(launch_device(table), contextlib.nullcontext)
