"""Triton AdamW vs torch.optim.AdamW and a float64 reference; skip on non-finite; no recompile on LR change."""

import random

import pytest
import torch

from hift_engine.kernels.adamw import _adamw_kernel, adamw_update
from hift_engine.kernels.reference import adamw_reference
from tests.kernels.harness import (
    assert_nonfinite_skip_leaves_state,
    DEVICES,
    assert_low_precision_close,
    Group,
    assert_within_twice_torch,
    compile_count,
    device_param,
    random_grads,
    runtime_scalars_are_not_constexpr,
)

SIZES = {"1": [1], "22": [22], "4097": [4097], "1_000_003": [1_000_003], "odd_mix": [1, 22, 4097, 1000, 3, 65537]}


def _hyper(seed):
    r = random.Random(seed)
    return dict(
        lr=10 ** r.uniform(-4, -2), beta1=r.uniform(0.8, 0.95), beta2=r.uniform(0.95, 0.9999),
        eps=10 ** r.uniform(-8, -6), weight_decay=r.choice([0.0, r.uniform(0.0, 0.1)]),
        amsgrad=r.random() < 0.5, maximize=r.random() < 0.3,
    )


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
@pytest.mark.parametrize("sizes", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("seed", [0, 1])
def test_adamw_fp32_matches_torch_and_float64(device, sizes, seed):
    sizes = SIZES[sizes]
    steps = 2 if sum(sizes) > 100_000 else 4
    h = _hyper(seed)
    grp = Group(sizes, torch.float32, device, 3, seed)
    twins = [p.clone().requires_grad_() for p in grp.params]
    topt = torch.optim.AdamW(
        twins, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], weight_decay=h["weight_decay"],
        amsgrad=h["amsgrad"], maximize=h["maximize"],
    )
    p64 = [p.detach().double().cpu() for p in grp.params]
    m64, v64, vmax64 = ([torch.zeros_like(p) for p in p64] for _ in range(3))
    for step in range(1, steps + 1):
        grads = random_grads(sizes, seed * 100 + step)
        grp.set_grads(grads)
        grp.steps += 1
        adamw_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, **h)
        for t, g in zip(twins, grads):
            t.grad = g.to(device)
        topt.step()
        adamw_reference(p64, [g.double() for g in grads], m64, v64, vmax64, [float(step)] * len(sizes), **h)
    assert_within_twice_torch(grp.params, [t.detach() for t in twins], p64)
    assert_within_twice_torch(grp.state_views(0), [topt.state[t]["exp_avg"] for t in twins], m64)
    assert_within_twice_torch(grp.state_views(1), [topt.state[t]["exp_avg_sq"] for t in twins], v64, slack=1e-12)


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adamw_low_precision_params_with_fp32_state(device, dtype):
    """bf16/fp16 params, fp32 state: the kernel equals the fp32-math reference up to one rounding of p."""
    sizes = SIZES["odd_mix"]
    h = _hyper(3)
    grp = Group(sizes, dtype, device, 3, 3)
    ref_p = [p.clone() for p in grp.params]
    m, v, vmax = ([torch.zeros(n, device=device) for n in sizes] for _ in range(3))
    for step in range(1, 4):
        grads = [g.to(dtype) for g in random_grads(sizes, step)]
        grp.set_grads(grads)
        grp.steps += 1
        adamw_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, **h)
        adamw_reference(ref_p, [g.to(device) for g in grads], m, v, vmax, [float(step)] * len(sizes), **h)
    assert_low_precision_close(grp.params, ref_p, steps=3)
    torch.testing.assert_close(torch.cat(grp.state_views(0)), torch.cat(m), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
def test_adamw_nonfinite_gradient_leaves_everything_untouched(device):
    assert_nonfinite_skip_leaves_state(adamw_update, dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01), 2, device)


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
def test_adamw_clip_coefficient_is_applied_from_device(device):
    sizes = [4097]
    a, b = Group(sizes, torch.float32, device, 2, 1), Group(sizes, torch.float32, device, 2, 1)
    grads = random_grads(sizes, 9)
    a.set_grads(grads)
    b.set_grads([g * 0.25 for g in grads])
    for grp, flags in ((a, torch.tensor([0.25, 0.0], device=device)), (b, None)):
        grp.steps += 1
        adamw_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, flags, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    torch.testing.assert_close(a.params[0], b.params[0], rtol=1e-6, atol=1e-7)


def test_hot_path_scalars_are_runtime_arguments():
    assert runtime_scalars_are_not_constexpr(
        _adamw_kernel, ["lr", "one_minus_beta1", "beta2", "one_minus_beta2", "log2_beta1", "log2_beta2", "eps", "decay_factor"]
    )


@pytest.mark.cuda
def test_lr_change_does_not_recompile():
    grp = Group([4097, 22], torch.float32, "cuda", 2, 0)
    grp.set_grads(random_grads([4097, 22], 0))
    h = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    grp.steps += 1
    adamw_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, lr=1e-3, **h)
    before = compile_count(_adamw_kernel)
    for lr in (2e-3, 5e-4, 1e-5, 0.1):
        grp.steps += 1
        adamw_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, lr=lr, **{**h, "weight_decay": lr})
    assert before is not None and compile_count(_adamw_kernel) == before
