"""Benchmark plumbing on CPU: argument handling, JSON schema, plots, and a clear message without a GPU."""

import json

import pytest
import torch

from hift_engine.bench.common import SCHEMA_VERSION, print_table, write_result
from hift_engine.cli.main import build_parser, main


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["bench", "kernels", "--shape", "block", "--optimizers", "adamw"], {"shape": "block", "optimizers": "adamw"}),
        (["bench", "offload", "--reps", "3", "--alloc-gib", "1"], {"reps": 3, "alloc_gib": 1.0}),
        (["bench", "memory", "--layers", "4", "--batches", "1,2", "--seq-probe", ""], {"layers": 4, "batches": "1,2"}),
        (["bench", "step", "--layers-small", "2", "--layers-full", "0", "--profile"], {"layers_small": 2, "profile": True}),
    ],
)
def test_bench_arguments_parse(argv, expect):
    args = build_parser().parse_args(argv)
    for k, v in expect.items():
        assert getattr(args, k) == v
    assert args.out == "benchmarks/results" and callable(args.func)


def test_bad_bench_arguments_are_rejected():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "kernels", "--shape", "huge"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "teleport"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("name", ["kernels", "offload", "memory", "step"])
def test_bench_without_gpu_says_so(name, tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["bench", name, "--out", str(tmp_path)])


def test_result_json_schema(tmp_path, capsys):
    rows = [{"provider": "x", "ms": 1.5}, {"provider": "y", "ms": None}]
    text = print_table(rows, ["provider", "ms"], title="t")
    assert "provider" in text and "1.500" in text
    path = write_result(tmp_path, "unit", rows, {"ok": True}, extra_field=3)
    record = json.loads(path.read_text())
    assert record["benchmark"] == "unit" and record["schema"] == SCHEMA_VERSION
    assert record["rows"] == rows and record["summary"] == {"ok": True} and record["extra_field"] == 3
    for key in ("date", "commit", "torch", "device", "triton"):
        assert key in record["env"]
    assert not list(tmp_path.glob("*.tmp"))


def test_memory_plot_from_json(tmp_path):
    pytest.importorskip("matplotlib")
    from hift_engine.bench.plot import plot_memory

    rows = [
        {"run": f"batch{b}x512", "group": g, "peak_allocated_gib": 25 + b, "peak_reserved_gib": 26 + b + g / 10}
        for b in (1, 2, 4)
        for g in range(34)
    ] + [{"run": "flat0", "group": 0, "peak_reserved_gib": 1.0}]
    path = write_result(tmp_path, "memory", rows, {"cap": {"cap_gib": 47.5}, "params": 6.7e9})
    png = plot_memory(path)
    assert png.exists() and png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_official_style_baseline_store_round_trips():
    from hift_engine.bench.baselines import OfficialStyleStore

    store = OfficialStyleStore([10, 6], "cpu", [4, 2])
    state, fresh = store.activate(0)
    assert fresh
    state.copy_(torch.arange(10.0))
    store.release(0, keep=False)  # synchronous copies to pageable memory, as the official code does
    assert store.stats.bytes_d2h == 40 and torch.equal(store.host_state(0), torch.arange(10.0))
    again, fresh = store.activate(0)
    assert not fresh and torch.equal(again, torch.arange(10.0))
