"""state_dtype="bf16": AdamW's moments in bf16 with stochastic rounding (masters stay fp32). Half the state
bytes; training tracks fp32 state; v decays where round-to-nearest would stall; checkpoints resume bit-exactly
and refuse a flat state laid out for the other dtype before anything changes."""

import os

import pytest
import torch

from hift_engine import CheckpointError, ConfigError, HiFTOptimizer, load_checkpoint, save_checkpoint
from tests.helpers import lm_batch, params_equal, tiny_llama

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1"))]


def _train(model, opt, steps, start=0):
    losses = []
    for i in range(start, start + steps):
        loss = model(**lm_batch(seed=i % 3)).loss
        getattr(opt, "scale_loss", lambda x: x)(loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kernels", BACKENDS)
def test_bf16_moments_track_fp32_moments(kernels):
    runs = {}
    for dtype in ("fp32", "bf16"):
        model = tiny_llama()
        opt = HiFTOptimizer(model, "adamw", lr=3e-3, layers_per_group=2, state_dtype=dtype, kernels=kernels)
        runs[dtype] = (_train(model, opt, 48), model)
    (fp32_losses, fp32_model), (bf16_losses, bf16_model) = runs["fp32"], runs["bf16"]
    fp32_end, bf16_end = sum(fp32_losses[-3:]) / 3, sum(bf16_losses[-3:]) / 3  # one loss per batch
    assert fp32_end < 0.92 * fp32_losses[0]  # it trains
    assert abs(bf16_end - fp32_end) < 0.01 * fp32_end, (fp32_end, bf16_end)
    assert not params_equal(fp32_model, bf16_model)  # bf16 moments really were used


@pytest.mark.parametrize("kernels", BACKENDS)
def test_v_decays_where_round_to_nearest_would_stall(kernels):
    """exp_avg_sq = 1 and zero gradients: v must fall as 0.999**t. Each step's change (0.1%) is below half a
    bf16 step of 1.0 (0.2%), so round-to-nearest would keep every v at exactly 1.0."""
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, groups=[[".*"]], state_dtype="bf16", kernels=kernels)
    (model(**lm_batch()).loss * 0.0).backward()
    opt.step()  # creates the state
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["exp_avg"].zero_()
        entry["exp_avg_sq"].fill_(1.0)
    opt.load_state_dict(sd)
    steps = 40
    for _ in range(steps):
        opt.zero_grad()
        (model(**lm_batch()).loss * 0.0).backward()
        opt.step()
    v = torch.cat([e["exp_avg_sq"].flatten().float() for e in opt.state_dict()["state"].values()])
    assert v.numel() > 5000
    assert abs(v.mean().item() - 0.999**steps) < 2e-3, (v.mean().item(), 0.999**steps)
    assert v.max().item() < 1.0


def _index(opt):
    return {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}


@pytest.mark.parametrize("kernels", BACKENDS)
def test_buckets_of_one_group_do_not_share_rounding_bits(kernels):
    """One group, two buckets (decay / no-decay). m = 1 and g = 0: the exact next m is 0.9, between the bf16
    values 0.8984375 and 0.90234375, rounded up about 40% of the time. With independent bits the first elements
    of the two buckets' first parameters agree about half the time; the reference path once reseeded its
    generator per bucket with the same (group, step) seed, so they agreed every time."""
    model = tiny_llama(hidden=64)
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, groups=[[".*"]], state_dtype="bf16", kernels=kernels, weight_decay=0.1)
    (model(**lm_batch()).loss * 0).backward()
    opt.step()
    opt.zero_grad()
    sd = opt.state_dict()
    for e in sd["state"].values():
        e["exp_avg"].fill_(1.0)
    opt.load_state_dict(sd)
    (model(**lm_batch()).loss * 0).backward()
    opt.step()
    lay, idx, sd = opt.layouts[0], _index(opt), opt.state_dict()
    firsts = [lay.params[b.members[0]] for b in lay.buckets]
    assert len(firsts) == 2
    m0, m1 = (sd["state"][idx[id(p)]]["exp_avg"].flatten() for p in firsts)
    n = min(m0.numel(), m1.numel())
    agree = (m0[:n] == m1[:n]).float().mean().item()
    assert agree < 0.9, f"{agree:.0%} of the rounding decisions are identical across buckets"


@pytest.mark.parametrize("kernels", BACKENDS)
def test_amsgrad_stored_max_is_never_below_stored_v(kernels):
    """AMSGrad keeps max_exp_avg_sq >= exp_avg_sq (torch.optim always does). Rounded with independent random
    bits, v could round up where vmax (equal before rounding) rounded down: about 15% of elements did."""
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, groups=[[".*"]], state_dtype="bf16", kernels=kernels, amsgrad=True)
    for i in range(6):
        model(**lm_batch(seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()
    entries = list(opt.state_dict()["state"].values())
    bad = sum(int((e["max_exp_avg_sq"] < e["exp_avg_sq"]).sum()) for e in entries)
    assert bad == 0, f"{bad} elements with max_exp_avg_sq < exp_avg_sq"
    assert sum(int((e["max_exp_avg_sq"] > e["exp_avg_sq"]).sum()) for e in entries) > 0  # the max does its job


@pytest.mark.parametrize("precision, ratio", [("fp32", 1 / 2), ("bf16-mixed", 2 / 3)])
def test_bf16_moments_halve_the_moments_bytes(precision, ratio):
    sizes = {}
    for dtype in ("fp32", "bf16"):
        model = tiny_llama()
        if precision == "bf16-mixed":
            model = model.to(torch.bfloat16)
        opt = HiFTOptimizer(model, "adamw", lr=1e-3, state_store="torch", precision=precision, state_dtype=dtype)
        sizes[dtype] = sum(opt.store.numels)
        if dtype == "bf16":
            assert "moments=bf16" in opt.describe()
        opt.close()
    assert sizes["bf16"] == sizes["fp32"] * ratio


def test_bf16_mixed_with_bf16_moments_trains_like_fp32_moments():
    runs = {}
    for dtype in ("fp32", "bf16"):
        model = tiny_llama().to(torch.bfloat16)
        opt = HiFTOptimizer(model, "adamw", lr=3e-3, layers_per_group=2, precision="bf16-mixed", state_dtype=dtype)
        losses = _train(model, opt, 48)
        runs[dtype] = sum(losses[-3:]) / 3
    assert abs(runs["bf16"] - runs["fp32"]) < 0.02 * runs["fp32"], runs


@pytest.mark.parametrize("kernels", BACKENDS)
def test_resume_with_bf16_moments_is_bit_identical(tmp_path, kernels):
    def setup():
        model = tiny_llama()
        return model, HiFTOptimizer(model, "adamw", lr=1e-2, strategy="random", seed=3, state_dtype="bf16",
                                    kernels=kernels, state_store="torch")

    model, opt = setup()
    _train(model, opt, 5)
    path = save_checkpoint(tmp_path, model, opt)
    reference = _train(model, opt, 6, start=5)
    model2, opt2 = setup()
    load_checkpoint(path, model2, opt2)
    assert _train(model2, opt2, 6, start=5) == reference
    assert params_equal(model, model2)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_the_other_state_dtype_is_refused_before_anything_changes(tmp_path):
    model, opt = tiny_llama(), None
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, state_dtype="fp32")
    _train(model, opt, 3)
    path = save_checkpoint(tmp_path, model, opt)
    model2 = tiny_llama(seed=1)
    opt2 = HiFTOptimizer(model2, "adamw", lr=1e-2, state_dtype="bf16")
    _train(model2, opt2, 2)
    weights = {k: v.clone() for k, v in model2.state_dict().items()}
    state = opt2.state_dict()
    with pytest.raises(CheckpointError, match="state_dtype='fp32'.*state_dtype='bf16'"):
        load_checkpoint(path, model2, opt2)
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in weights.items())
    after = opt2.state_dict()
    assert after["hift"]["global_step"] == state["hift"]["global_step"] == 2
    for i, entry in state["state"].items():
        assert all(torch.equal(entry[k], after["state"][i][k]) for k in entry)


def test_state_dict_moves_between_state_dtypes():
    """state_dict() holds the moments as the optimizer keeps them (bf16 views with bf16 moments: no fp32 copy of
    the whole state, which a host sized for bf16 state may not have room for): fp32 state loads into bf16
    rounded (to nearest), back exactly, and into torch.optim.AdamW."""
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, state_dtype="fp32")
    _train(model, opt, 4)
    sd = opt.state_dict()
    opt_bf16 = HiFTOptimizer(tiny_llama(), "adamw", lr=1e-2, state_dtype="bf16")
    opt_bf16.load_state_dict(sd)
    moved = opt_bf16.state_dict()
    for i, entry in sd["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert moved["state"][i][k].dtype == torch.bfloat16
            assert torch.equal(moved["state"][i][k], entry[k].to(torch.bfloat16))
    back = HiFTOptimizer(tiny_llama(), "adamw", lr=1e-2, state_dtype="fp32")
    back.load_state_dict(moved)
    for i, entry in moved["state"].items():
        assert torch.equal(back.state_dict()["state"][i]["exp_avg_sq"], entry["exp_avg_sq"].float())
    groups = [[p for p in g["params"]] for g in opt_bf16.param_groups]  # torch's numbering is these groups' order
    opt_bf16.close()
    plain = torch.optim.AdamW([{"params": g} for g in groups], lr=1e-2)
    plain.load_state_dict(moved)
    first = plain.state[groups[0][0]]
    assert first["exp_avg"].dtype == torch.float32
    assert torch.equal(first["exp_avg"], moved["state"][0]["exp_avg"].float())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"state_dtype": "bfloat16"}, "state_dtype='bfloat16' is unknown"),
        ({"state_dtype": "bf16", "optimizer": "sgd", "momentum": 0.9}, "keeps AdamW's moments in bf16"),
        ({"state_dtype": "bf16", "optimizer": torch.optim.AdamW}, "keeps AdamW's moments in bf16"),
    ],
)
def test_bad_state_dtype_is_refused(kwargs, match):
    kwargs = dict(kwargs)
    optimizer = kwargs.pop("optimizer", "adamw")
    with pytest.raises(ConfigError, match=match):
        HiFTOptimizer(tiny_llama(), optimizer, lr=1e-3, **kwargs)


@pytest.mark.cuda
def test_bf16_moments_on_cuda_track_fp32_moments(cuda_device):
    runs = {}
    for dtype in ("fp32", "bf16"):
        model = tiny_llama(hidden=64, layers=4).to(cuda_device, torch.bfloat16)
        opt = HiFTOptimizer(model, "adamw", lr=3e-3, layers_per_group=2, precision="bf16-mixed", state_dtype=dtype)
        assert opt.kernel_backend == "triton" and opt.store.kind.startswith("offload")
        losses = []
        for i in range(30):
            loss = model(**lm_batch(seed=i % 3, device=cuda_device)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[dtype] = losses
        opt.close()
    assert runs["fp32"][-1] < 0.9 * runs["fp32"][0]
    assert abs(runs["bf16"][-1] - runs["fp32"][-1]) < 0.02 * runs["fp32"][-1], (runs["fp32"][-1], runs["bf16"][-1])
