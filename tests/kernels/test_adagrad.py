"""Triton AdaGrad vs torch.optim.Adagrad and a float64 reference."""

import random

import pytest
import torch

from hift_engine.kernels.adagrad import _adagrad_kernel, adagrad_update
from hift_engine.kernels.reference import adagrad_reference
from tests.kernels.harness import assert_nonfinite_skip_leaves_state, DEVICES, Group, assert_low_precision_close, assert_within_twice_torch, device_param, random_grads, runtime_scalars_are_not_constexpr

SIZES = {"1": [1], "22": [22], "4097": [4097], "1_000_003": [1_000_003], "odd_mix": [1, 22, 4097, 1000, 3, 65537]}


def _hyper(seed):
    r = random.Random(seed)
    return dict(
        lr=10 ** r.uniform(-3, -1), lr_decay=r.choice([0.0, r.uniform(0, 0.1)]), eps=10 ** r.uniform(-10, -6),
        weight_decay=r.choice([0.0, r.uniform(0.0, 0.1)]), maximize=r.random() < 0.3,
        initial_accumulator_value=r.choice([0.0, r.uniform(0, 0.5)]),
    )


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
@pytest.mark.parametrize("sizes", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("seed", [0, 1])
def test_adagrad_fp32_matches_torch_and_float64(device, sizes, seed):
    sizes = SIZES[sizes]
    steps = 2 if sum(sizes) > 100_000 else 4
    h = _hyper(seed)
    init = h.pop("initial_accumulator_value")
    grp = Group(sizes, torch.float32, device, 1, seed)
    grp.state.fill_(init)
    twins = [p.clone().requires_grad_() for p in grp.params]
    topt = torch.optim.Adagrad(twins, initial_accumulator_value=init, **h)
    p64 = [p.detach().double().cpu() for p in grp.params]
    s64 = [torch.full_like(p, init) for p in p64]
    for step in range(1, steps + 1):
        grads = random_grads(sizes, seed * 100 + step)
        grp.set_grads(grads)
        grp.steps += 1
        adagrad_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, **h)
        for t, g in zip(twins, grads):
            t.grad = g.to(device)
        topt.step()
        adagrad_reference(p64, [g.double() for g in grads], s64, [float(step)] * len(sizes), **h)
    assert_within_twice_torch(grp.params, [t.detach() for t in twins], p64)
    assert_within_twice_torch(grp.state_views(0), [topt.state[t]["sum"] for t in twins], s64, slack=1e-6)


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
def test_adagrad_bf16_params(device):
    sizes = SIZES["odd_mix"]
    h = _hyper(2)
    h.pop("initial_accumulator_value")
    grp = Group(sizes, torch.bfloat16, device, 1, 2)
    ref_p = [p.clone() for p in grp.params]
    s = [torch.zeros(n, device=device) for n in sizes]
    for step in range(1, 4):
        grads = [g.bfloat16() for g in random_grads(sizes, step)]
        grp.set_grads(grads)
        grp.steps += 1
        adagrad_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, **h)
        adagrad_reference(ref_p, [g.to(device) for g in grads], s, [float(step)] * len(sizes), **h)
    assert_low_precision_close(grp.params, ref_p, steps=3)


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
def test_adagrad_nonfinite_gradient_leaves_everything_untouched(device):
    assert_nonfinite_skip_leaves_state(adagrad_update, dict(lr=1e-2, lr_decay=0.0, eps=1e-10, weight_decay=0.0), 1, device)


def test_hot_path_scalars_are_runtime_arguments():
    assert runtime_scalars_are_not_constexpr(_adagrad_kernel, ["lr", "lr_decay", "eps", "weight_decay"])
