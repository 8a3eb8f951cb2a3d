"""The tensor table that lets one launch cover many tensors."""

import pytest
import torch

from hift_engine.kernels.table import build_tensor_table


def test_chunk_starts_and_columns():
    ps = [torch.zeros(1), torch.zeros(1025), torch.zeros(2048)]
    t = build_tensor_table(ps, [0, 64, 1152], [0, 64, 1152], [0, 1, 2], 1024)
    assert t.num_chunks == 1 + 2 + 2 and t.table.shape == (6, 3)
    assert t.table[4].tolist() == [0, 1, 3]
    assert t.table[0].tolist() == [p.data_ptr() for p in ps] and t.table[1].tolist() == [1, 1025, 2048]


@pytest.mark.parametrize(
    "params, block, match",
    [
        ([], 1024, "params is empty"),
        ([torch.zeros(4), torch.zeros(4, dtype=torch.float64)], 1024, "expected torch.float32"),
        ([torch.zeros(4, 4).t()], 1024, "dense and contiguous"),
        ([torch.zeros(4)], 1000, "power of two"),
    ],
)
def test_bad_inputs_are_named(params, block, match):
    n = len(params)
    with pytest.raises(ValueError, match=match):
        build_tensor_table(params, [0] * n, [0] * n, list(range(n)), block)
