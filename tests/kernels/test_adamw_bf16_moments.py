"""AdamW with bf16 moments (state_dtype="bf16"): one step against float64 from the same stored state, the moments
stored within one bf16 step of the exact value, and stochastic rounding that is unbiased where round-to-nearest
would stall (v's 0.1% per-step change is below half a bf16 step)."""

import pytest
import torch

from hift_engine.kernels.adamw import adamw_update
from tests.kernels.harness import DEVICES, Group, device_param

SIZES = [1, 22, 4097, 1000, 65]


def _group(device, master, amsgrad, seed=0):
    """A Group plus a flat state [fp32 master if master | bf16 m | bf16 v | bf16 vmax if amsgrad] with random
    contents (v, vmax positive); the model's weights are the rounded masters."""
    dtype = torch.bfloat16 if master else torch.float32
    grp = Group(SIZES, dtype, device, 0, seed)
    n_mom = 3 if amsgrad else 2
    stride = grp.stride
    grp.state = torch.zeros(master * stride + n_mom * stride // 2, dtype=torch.float32, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    if master:  # bf16-exact masters, as a bf16 model gives: the weights are then the masters in any rounding mode
        grp.state[:stride].copy_(torch.randn(stride, generator=g).to(torch.bfloat16))
        for p, o in zip(grp.params, grp.offsets):
            p.copy_(grp.state[o : o + p.numel()])
    moments = grp.state[master * stride :].view(torch.bfloat16)
    moments[:stride].copy_(torch.randn(stride, generator=g) * 1e-2)
    moments[stride : 2 * stride].copy_(torch.rand(stride, generator=g) * 1e-4)
    if amsgrad:
        moments[2 * stride :].copy_(moments[stride : 2 * stride].float() + (torch.rand(stride, generator=g) * 1e-4).to(device))
    grp.set_grads([torch.randn(p.numel(), generator=g) * 1e-2 for p in grp.params])
    return grp, moments


def _views(grp, flat):
    return [flat[o : o + p.numel()] for o, p in zip(grp.offsets, grp.params)]


def _bf16_step(x: torch.Tensor) -> torch.Tensor:
    """The gap between the two bf16 values around each element of x (float64)."""
    exp = torch.frexp(x.float().abs().clamp_min(1e-30))[1]
    return torch.ldexp(torch.ones_like(x), exp - 8).double()


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
@pytest.mark.parametrize("master", [False, True], ids=["fp32-weights", "bf16-mixed"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_bf16_moments_one_step_against_float64(device, master, amsgrad):
    h = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=amsgrad, maximize=False)
    grp, moments = _group(device, master, amsgrad)
    stride = grp.stride
    # float64 reference from exactly what is stored
    p0 = [v.double().cpu() for v in (_views(grp, grp.state[:stride]) if master else grp.params)]
    m0 = [v.double().cpu() for v in _views(grp, moments[:stride])]
    v0 = [v.double().cpu() for v in _views(grp, moments[stride : 2 * stride])]
    vmax0 = [v.double().cpu() for v in _views(grp, moments[2 * stride :])] if amsgrad else None
    g64 = [v.double().cpu() for v in grp.grad_views()]
    grp.steps.fill_(3.0)
    adamw_update(grp.table, grp.steps, grp.grads, grp.state, stride, None, master=master, moment_bf16=True, seed=7, **h)
    b1, b2, t = h["beta1"], h["beta2"], 3.0
    for i in range(len(SIZES)):
        m = m0[i] + (1 - b1) * (g64[i] - m0[i])
        v = v0[i] * b2 + (1 - b2) * g64[i] ** 2
        vm = torch.maximum(vmax0[i], v) if amsgrad else v
        step = h["lr"] / (1 - b1**t) * m / (vm.sqrt() / (1 - b2**t) ** 0.5 + h["eps"])
        p = p0[i] * (1 - h["lr"] * h["weight_decay"]) - step
        got_p = (_views(grp, grp.state[:stride]) if master else grp.params)[i].double().cpu()
        # a few fp32 roundings of the terms; 1 - beta2**t in fp32 at step 3 is only good to ~2**-24 / 0.003
        bound = 4 * 2.0**-24 * (p0[i].abs() + step.abs() / (1 - b2**t)) + 1e-12
        assert ((got_p - p).abs() <= bound).all(), (i, ((got_p - p).abs() / bound).max())
        if master:  # the model's copy is the master rounded to bf16
            assert ((grp.params[i].double().cpu() - got_p).abs() < _bf16_step(got_p)).all()
        stored = [(_views(grp, moments[:stride])[i], m), (_views(grp, moments[stride : 2 * stride])[i], v)]
        if amsgrad:
            stored.append((_views(grp, moments[2 * stride :])[i], vm))
        for got, exact in stored:
            err = (got.double().cpu() - exact).abs()
            assert (err < _bf16_step(exact) * 1.001 + 1e-30).all(), "a moment landed more than one bf16 step away"


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
def test_bf16_moments_round_stochastically_without_bias(device):
    """v = 1, g = 0: the exact next v is 0.999, between the bf16 values 0.99609375 and 1. Round to nearest
    stores 1.0 (v never decays); stochastic rounding stores 1.0 about 74% of the time and 0.996 otherwise, so
    the mean is 0.999. The rounding bits also change with the step count."""
    n = 1 << 16
    grp = Group([n], torch.float32, device, 0, 0)
    grp.state = torch.zeros(grp.stride, dtype=torch.float32, device=device)  # m | v, bf16
    moments = grp.state.view(torch.bfloat16)
    moments[grp.stride :].fill_(1.0)
    grp.grads.zero_()
    h = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    before = grp.state.clone()
    grp.steps.fill_(5.0)
    adamw_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, moment_bf16=True, seed=11, **h)
    v = moments[grp.stride :].double().cpu()
    assert set(v.unique().tolist()) == {0.99609375, 1.0}
    assert abs(v.mean().item() - 0.999) < 1e-4, v.mean().item()
    assert torch.equal(moments[: grp.stride].float().cpu(), torch.zeros(grp.stride))  # m stays 0
    first = v.clone()
    grp.state.copy_(before)
    grp.steps.fill_(6.0)
    adamw_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, moment_bf16=True, seed=11, **h)
    second = moments[grp.stride :].double().cpu()
    assert not torch.equal(first, second)  # another step, other random bits
    grp.state.copy_(before)
    grp.steps.fill_(5.0)
    adamw_update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, moment_bf16=True, seed=11, **h)
    assert torch.equal(first, moments[grp.stride :].double().cpu())  # the same step: the same bits (resume is exact)


def test_bf16_moments_argument_checks():
    grp = Group([100], torch.float32, "cpu", 0, 0)
    short = torch.zeros(grp.stride - 1)
    with pytest.raises(ValueError, match="needs 1 fp32 vectors x stride"):
        adamw_update(grp.table, grp.steps, grp.grads, short, grp.stride, None, lr=1e-3, beta1=0.9, beta2=0.999,
                     eps=1e-8, weight_decay=0.0, moment_bf16=True)
