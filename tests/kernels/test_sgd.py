"""Triton SGD (momentum, dampening, nesterov, weight decay, first-step buffer init) vs torch.optim.SGD."""

import random

import pytest
import torch

from hift_engine.kernels.reference import sgd_reference
from hift_engine.kernels.sgd import _sgd_kernel, sgd_update
from tests.kernels.harness import assert_nonfinite_skip_leaves_state, DEVICES, Group, assert_low_precision_close, assert_within_twice_torch, device_param, random_grads, runtime_scalars_are_not_constexpr

SIZES = {"1": [1], "22": [22], "4097": [4097], "1_000_003": [1_000_003], "odd_mix": [1, 22, 4097, 1000, 3, 65537]}
VARIANTS = {
    "plain": dict(momentum=0.0, dampening=0.0, nesterov=False),
    "momentum": dict(momentum=0.9, dampening=0.1, nesterov=False),
    "nesterov": dict(momentum=0.85, dampening=0.0, nesterov=True),
}


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
@pytest.mark.parametrize("sizes", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sgd_fp32_matches_torch_and_float64(device, sizes, variant):
    sizes = SIZES[sizes]
    steps = 2 if sum(sizes) > 100_000 else 4
    r = random.Random(variant)
    h = dict(lr=10 ** r.uniform(-3, -1), weight_decay=r.choice([0.0, 0.05]), maximize=r.random() < 0.3, **VARIANTS[variant])
    grp = Group(sizes, torch.float32, device, 1, 0)
    twins = [p.clone().requires_grad_() for p in grp.params]
    topt = torch.optim.SGD(twins, **h)
    p64 = [p.detach().double().cpu() for p in grp.params]
    b64 = [torch.zeros_like(p) for p in p64]
    for step in range(1, steps + 1):
        grads = random_grads(sizes, step)
        grp.set_grads(grads)
        grp.steps += 1
        sgd_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, **h)
        for t, g in zip(twins, grads):
            t.grad = g.to(device)
        topt.step()
        sgd_reference(p64, [g.double() for g in grads], b64 if h["momentum"] else None, [float(step)] * len(sizes), **h)
    assert_within_twice_torch(grp.params, [t.detach() for t in twins], p64)
    if h["momentum"]:
        assert_within_twice_torch(grp.state_views(0), [topt.state[t]["momentum_buffer"] for t in twins], b64)


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
def test_sgd_first_step_initialises_buffer_to_gradient(device):
    grp = Group([22], torch.float32, device, 1, 0)
    grp.state.fill_(123.0)  # garbage: a first step must ignore it, as torch's buffer=None path does
    grads = random_grads([22], 4)
    grp.set_grads(grads)
    grp.steps += 1
    sgd_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.0)
    torch.testing.assert_close(grp.state_views(0)[0].cpu(), grads[0])


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
def test_sgd_bf16_params(device):
    sizes = SIZES["odd_mix"]
    h = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True)
    grp = Group(sizes, torch.bfloat16, device, 1, 2)
    ref_p = [p.clone() for p in grp.params]
    b = [torch.zeros(n, device=device) for n in sizes]
    for step in range(1, 4):
        grads = [g.bfloat16() for g in random_grads(sizes, step)]
        grp.set_grads(grads)
        grp.steps += 1
        sgd_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, **h)
        sgd_reference(ref_p, [g.to(device) for g in grads], b, [float(step)] * len(sizes), **h)
    assert_low_precision_close(grp.params, ref_p, steps=3)


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
def test_sgd_nonfinite_gradient_leaves_everything_untouched(device):
    assert_nonfinite_skip_leaves_state(sgd_update, dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0), 1, device)


def test_hot_path_scalars_are_runtime_arguments():
    assert runtime_scalars_are_not_constexpr(_sgd_kernel, ["lr", "momentum", "one_minus_dampening", "weight_decay"])
