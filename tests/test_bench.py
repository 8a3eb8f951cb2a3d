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
        (["bench", "memory", "--activation-checkpointing", "always", "--checkpoint-active", "--mlp-chunk-tokens", "4096"],
         {"checkpoint_active": True, "mlp_chunk_tokens": 4096}),
        (["bench", "memory"], {"checkpoint_active": False, "mlp_chunk_tokens": 0}),
        (["bench", "step", "--layers-small", "2", "--layers-full", "0", "--profile"], {"layers_small": 2, "profile": True}),
        (["bench", "groups", "--cases", "fp32@47.5", "--offload-baseline"], {"cases": "fp32@47.5", "offload_baseline": True}),
        (["bench", "step", "--state-dtype", "fp32,bf16"], {"state_dtype": "fp32,bf16"}),
        (["bench", "memory", "--state-dtype", "bf16"], {"state_dtype": "bf16"}),
        (["bench", "kernels", "--optimizers", "adamw", "--state-dtype", "bf16"], {"state_dtype": "bf16"}),
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


@pytest.mark.parametrize("argv, match", [
    (["--checkpoint-active"], "--checkpoint-active .* needs --activation-checkpointing always or auto"),
    (["--activation-checkpointing", "off,off", "--checkpoint-active"], "needs --activation-checkpointing always or auto"),
    (["--mlp-chunk-tokens", "-1"], "--mlp-chunk-tokens -1: give tokens per chunk"),
])
def test_memory_bench_refuses_inconsistent_long_sequence_options_before_gpu_work(argv, match):
    with pytest.raises(SystemExit, match=match):
        main(["bench", "memory", *argv])


def test_step_bench_refuses_an_unknown_state_dtype_before_gpu_work():
    with pytest.raises(SystemExit, match="--state-dtype 'fp16': use fp32, bf16 or both"):
        main(["bench", "step", "--state-dtype", "fp16"])


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


def _trace(tmp_path, events):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def _gpu(cat, name, stream, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream, **args}}


def test_trace_summary_finds_the_gap_behind_a_queued_copy(tmp_path):
    from hift_engine.bench.trace import summarize_trace

    big = 1_500_000_000
    events = [
        _gpu("kernel", "gemm", 7, 0, 10_000),
        _gpu("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 20, 10_000, 28_000, bytes=big),
        # a 4-byte copy on the compute stream that could only start when the big copy finished
        _gpu("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 7, 38_000, 2, bytes=4),
        _gpu("kernel", "gemm", 7, 38_010, 10_000),
        _gpu("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 21, 12_000, 28_000, bytes=big),
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 9_000, "dur": 29_000, "args": {}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5, "args": {}},
    ]
    s = summarize_trace(_trace(tmp_path, events))
    assert s["compute_stream"] == 7
    assert s["streams"]["20"]["copy_bytes"] == big and s["streams"]["20"]["role"] == "side"
    (gap,) = s["largest_compute_gaps"]
    assert gap["gap_ms"] == 28.0 and gap["after"].startswith("Memcpy DtoH") and gap["after_cat"] == "gpu_memcpy"
    assert s["compute_gap_total_ms"] == pytest.approx(28.0)
    assert s["compute_stream_copies"][0]["bytes"] == 4
    assert [c["stream"] for c in s["side_copies"]] == [20, 21]
    assert s["blocking_runtime_calls"][0]["name"] == "cudaStreamSynchronize"
    assert 0 < s["compute_busy_fraction"] < 1


def test_trace_summary_without_gpu_events(tmp_path):
    from hift_engine.bench.trace import summarize_trace

    assert "error" in summarize_trace(_trace(tmp_path, [{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}]))


def test_converge_runs_every_cpu_method_on_real_text_and_compares_at_equal_updates(tmp_path, capsys):
    """A tiny run of hift bench converge: every method trains from the same pretrained weights, the curves and
    the equal-updates comparison are written, and a method that cannot run here is a row with a note."""
    out = tmp_path / "res"
    rc = main(["bench", "converge", "--hidden", "32", "--layers", "2", "--seq", "32", "--batch", "4",
               "--pretrain-steps", "5", "--updates", "2", "--eval-points", "2", "--eval-batches", "2",
               "--switch-every", "2", "--methods", "full,hift-1,hift-2,badam,hift-auto", "--out", str(out)])
    assert rc == 0
    data = json.loads(next(out.glob("converge-*.json")).read_text())
    methods = {s["method"]: s for s in data["summary"]["methods"]}
    assert methods["full"]["steps"] == 2 and methods["full"]["groups_k"] == 1
    assert methods["hift-1"]["groups_k"] == 4 and methods["hift-1"]["steps"] == 8  # embedding, 2 blocks, head
    assert methods["hift-2"]["groups_k"] == 2 and methods["badam"]["steps"] == 8
    assert "activation_gib" in methods["hift-auto"]["note"]  # the CPU cannot measure it: a row with the reason
    for name in ("full", "hift-1", "hift-2", "badam"):
        rows = [r for r in data["rows"] if r["method"] == name]
        assert rows[0]["step"] == 0 and rows[-1]["updates_per_param"] == 2.0
        assert len({r["heldout_loss"] for r in rows}) > 1  # it trained
        assert methods[name]["heldout_at_full_updates"] == rows[-1]["heldout_loss"]
    assert data["summary"]["corpus"]["heldout_files"] > 0 and len(data["summary"]["corpus"]["sha256"]) == 64
    if __import__("importlib").util.find_spec("matplotlib"):
        assert next(out.glob("converge-*.png")).stat().st_size > 0


def test_converge_refuses_an_unknown_method():
    with pytest.raises(SystemExit, match="unknown method 'adam'"):
        main(["bench", "converge", "--methods", "full,adam"])


def test_groups_cases_parse_and_bad_ones_are_refused_before_any_gpu_work():
    from hift_engine.bench.groups import parse_cases

    assert parse_cases("fp32@47.5, bf16-mixed@23.5") == [("fp32", 47.5), ("bf16-mixed", 23.5)]
    for bad in ("fp32", "fp64@10", "fp32@-1", "bf16-mixed@lots", ""):
        with pytest.raises(SystemExit, match="--cases"):
            main(["bench", "groups", "--cases", bad])


def test_converge_isolated_methods_give_the_in_process_results(tmp_path):
    """--isolate on (the GPU default) runs each method in a spawned process from the saved pretrained weights;
    on the CPU the results must be the in-process ones exactly."""
    finals = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        rc = main(["bench", "converge", "--hidden", "32", "--layers", "2", "--seq", "32", "--batch", "4",
                   "--pretrain-steps", "3", "--updates", "2", "--eval-points", "2", "--eval-batches", "2",
                   "--methods", "full,hift-2", "--isolate", mode, "--out", str(out)])
        assert rc == 0
        data = json.loads(next(out.glob("converge-*.json")).read_text())
        finals[mode] = {s["method"]: (s["steps"], s["final_heldout_loss"]) for s in data["summary"]["methods"]}
    assert finals["on"] == finals["off"] and finals["on"]["hift-2"][0] == 4


def test_copy_summary_windows_the_copies():
    from hift_engine.bench.step_timer import copy_summary

    times = [(2.0, 2_000_000), (4.0, 2_000_000), (1.0, 4_000_000)]
    s = copy_summary(times, 1, 3)
    assert s["copies"] == 2 and s["mean_ms"] == 2.5 and s["max_ms"] == 4.0
    assert s["GBps"] == pytest.approx(6e6 / 5e-3 / 1e9) and s["per_copy_ms"] == [4.0, 1.0]
    assert copy_summary(times, 3, 3) == {"copies": 0}


@pytest.mark.cuda
def test_step_timer_tells_a_gpu_bound_loop_from_a_host_bound_one():
    """GPU-bound (each step queues ~20 ms of GPU sleep, the host runs ahead): steps take the GPU's time, the GPU is
    never idle between them and the host leads it. Host-bound (the host sleeps 30 ms between steps, the GPU
    works 1 ms a step): the GPU waits between steps and the host never leads."""
    import time

    from hift_engine.bench.step_timer import StepTimer

    torch.cuda._sleep(1_000)
    torch.cuda.synchronize()
    for host_sleep, gpu_cycles in ((0.0, 40_000_000), (0.03, 2_000_000)):
        timer = StepTimer(torch.device("cuda"))
        torch.cuda.synchronize()
        timer.start()
        for _ in range(6):
            timer.begin()
            torch.cuda._sleep(gpu_cycles)
            timer.end()
            time.sleep(host_sleep)  # between steps: the GPU, done with its 1 ms, waits for the next one
        torch.cuda.synchronize()
        s = timer.summary(1, 6)
        assert len(s["per_step"]["gpu_ms"]) == 5
        if host_sleep == 0.0:
            assert s["mean_gpu_ms"] > 10 and s["mean_gpu_idle_ms"] < 1 and s["mean_host_lead_ms"] > 20, s
        else:
            assert s["mean_gpu_ms"] < 10 and s["mean_gpu_idle_ms"] > 15 and s["mean_host_lead_ms"] < 5, s
