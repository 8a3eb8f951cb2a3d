"""Bad input gets a clear error that says what was wrong and what to do; fuzzed loaders never crash otherwise."""

import json
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from hift_engine import CheckpointError, ConfigError, HiFTConfig, HiFTOptimizer, HostMemoryError, LayoutError
from hift_engine import checkpoint as ckpt
from hift_engine import store as store_mod
from tests.helpers import MLPStack, lm_batch, tiny_llama


def test_parameters_on_several_devices():
    model = MLPStack()
    model.out.weight = nn.Parameter(torch.empty(model.out.weight.shape, device="meta"))
    with pytest.raises(LayoutError, match="several devices.*move the whole model first"):
        HiFTOptimizer(model, "adamw")


def test_non_contiguous_parameter():
    model = MLPStack()
    model.blocks[0][1].weight = nn.Parameter(torch.randn(16, 16).t())
    with pytest.raises(LayoutError, match="not contiguous.*make it contiguous"):
        HiFTOptimizer(model, "adamw")


def test_sparse_parameter():
    model = MLPStack()
    model.blocks[0][1].bias = nn.Parameter(torch.zeros(16).to_sparse())
    with pytest.raises(LayoutError, match="sparse"):
        HiFTOptimizer(model, "adamw")


def test_integer_parameter():
    model = MLPStack()
    model.blocks[0][1].bias = nn.Parameter(torch.zeros(16, dtype=torch.int64), requires_grad=False)
    model.blocks[0][1].bias.requires_grad_(False)
    HiFTOptimizer(model, "adamw")  # frozen integer buffers-as-parameters are fine: never trained


def test_model_cast_after_setup():
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2)
    model.half()
    with pytest.raises(LayoutError, match="now torch.float16.*create HiFTOptimizer after moving or casting"):
        opt.step()


def test_host_memory_too_small_is_said_before_allocating(monkeypatch):
    monkeypatch.setattr(store_mod, "available_host_bytes", lambda: 1 << 20)
    with pytest.raises(HostMemoryError, match=r"needs 0\.0 GiB of pinned host memory.*only 0\.0 GiB is available"):
        HiFTOptimizer(tiny_llama(hidden=256), "adamw", state_store="torch")
    monkeypatch.setenv("HIFT_HOST_MEMORY_CHECK", "0")  # a host whose memory grows on demand: the user says so
    HiFTOptimizer(tiny_llama(hidden=256), "adamw", state_store="torch").close()


# ------------------------------------------------------------------------------------------------ fuzzing
_values = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True),
    st.text(string.printable, max_size=12), st.lists(st.text(max_size=6), max_size=3),
)
_keys = st.one_of(st.sampled_from(HiFTConfig.field_names()), st.text(string.ascii_letters + "_", min_size=1, max_size=15))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=6))
def test_config_loader_fuzz_only_raises_config_errors(data):
    try:
        HiFTConfig.from_dict(data)
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.lists(_values, max_size=3), st.text(max_size=10), st.integers(), st.none()))
def test_config_loader_fuzz_non_mappings(data):
    with pytest.raises(ConfigError):
        HiFTConfig.from_dict(data)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2)
    sched = opt.cycle_scheduler("cosine", total_steps=10)
    for step in range(3):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    path = ckpt.save_checkpoint(root, model, opt, sched)
    files = list(json.loads((path / "manifest.json").read_text())["files"]) + ["manifest.json"]
    return path, {f: (path / f).read_bytes() for f in files}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["manifest.json", "meta.json", "model.safetensors", "optim/group-0000.safetensors",
                              "rng.safetensors", "scheduler.pt"]),
       mode=st.sampled_from(["truncate", "garbage", "flip"]), where=st.floats(0.0, 1.0), junk=st.binary(max_size=64))
def test_checkpoint_reader_fuzz_only_raises_checkpoint_errors(saved, which, mode, where, junk):
    path, original = saved
    f = path / which
    data = original[which]
    cut = int(len(data) * where)
    if mode == "truncate":
        damaged = data[:cut]
    elif mode == "garbage":
        damaged = junk
    else:
        b = bytearray(data)
        if b:
            b[min(cut, len(b) - 1)] ^= 0x5A
        damaged = bytes(b)
    try:
        f.write_bytes(damaged)
        model = tiny_llama()
        opt = HiFTOptimizer(model, "adamw", lr=1e-2)
        sched = opt.cycle_scheduler("cosine", total_steps=10)
        if damaged == data:
            ckpt.load_checkpoint(path, model, opt, sched)
        else:
            with pytest.raises(CheckpointError):
                ckpt.load_checkpoint(path, model, opt, sched)
            # also with checksum verification off: the readers themselves must fail cleanly
            try:
                ckpt.load_checkpoint(path, model, opt, sched, verify=False)
            except CheckpointError:
                pass
    finally:
        for name, content in original.items():
            (path / name).write_bytes(content)


_EXAMPLES = {p: open(p).read() for p in ("configs/tiny.yaml", "configs/llama2-7b-fp32-48gb.yaml")}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=st.sampled_from(sorted(_EXAMPLES)), cut=st.floats(0.0, 1.0), junk=st.text(max_size=40),
       suffix=st.sampled_from([".yaml", ".toml"]))
def test_config_file_loader_fuzz_only_raises_config_errors(tmp_path, source, cut, junk, suffix):
    from hift_engine.recipe import load_run_config

    text = _EXAMPLES[source]
    f = tmp_path / f"fuzz{suffix}"
    f.write_text(text[: int(len(text) * cut)] + junk)
    try:
        load_run_config(f)
    except ConfigError:
        pass
