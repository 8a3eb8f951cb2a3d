"""One group of parameters laid out the way the engine lays it out, stepped three ways: the Triton kernel,
the matching torch.optim optimizer, and the pure-torch reference in float64. A kernel passes when its error
against float64 is at most twice torch's own (plus a rounding-size slack)."""

from __future__ import annotations

import inspect
import random

import torch

from hift_engine.kernels.table import build_tensor_table
from hift_engine.layout import ALIGN

DEVICES = ["cpu", "cuda"]


def device_param(dev):
    """cuda: marked (skipped without a GPU). cpu: Triton on CPU tensors needs the interpreter, which conftest
    switches on only on machines without a GPU, so on a GPU machine the CPU variants skip."""
    import os

    import pytest

    if dev == "cuda":
        return pytest.param(dev, marks=pytest.mark.cuda)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return pytest.param(dev, marks=pytest.mark.skipif(not interpreted, reason="Triton on CPU needs TRITON_INTERPRET=1"))


class Group:
    """Params (separate tensors), a flat grad buffer and a flat fp32 state, with the engine's offsets."""

    def __init__(self, sizes, dtype, device, num_state, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.params = [(torch.randn(n, generator=g) * 0.5).to(device=device, dtype=dtype) for n in sizes]
        self.offsets, off = [], 0
        for n in sizes:
            self.offsets.append(off)
            off += -(-n // ALIGN) * ALIGN
        self.stride = off
        self.grads = torch.zeros(off, dtype=dtype, device=device)
        self.state = torch.zeros(max(1, num_state) * off, dtype=torch.float32, device=device)
        self.steps = torch.zeros(len(sizes), dtype=torch.float32, device=device)
        self.table = build_tensor_table(self.params, self.offsets, self.offsets, list(range(len(sizes))), 1024)

    def grad_views(self):
        return [self.grads[o : o + p.numel()] for o, p in zip(self.offsets, self.params)]

    def state_views(self, k):
        base = k * self.stride
        return [self.state[base + o : base + o + p.numel()] for o, p in zip(self.offsets, self.params)]

    def set_grads(self, grads):
        for view, grad in zip(self.grad_views(), grads):
            view.copy_(grad)


def random_grads(sizes, seed, nan_at=None):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(n, generator=g) * 10 ** random.Random(seed).uniform(-3, 0) for n in sizes]
    for x in out:  # exact zeros exercise the eps paths
        x[:: 7] = 0.0
    if nan_at is not None:
        out[nan_at][0] = float("nan")
    return out


def errors(kernel, torch_out, ref64):
    """(max |kernel - ref64|, max |torch - ref64|) over all tensors."""
    k = max((a.double().cpu() - r).abs().max().item() for a, r in zip(kernel, ref64))
    t = max((a.double().cpu() - r).abs().max().item() for a, r in zip(torch_out, ref64))
    return k, t


def assert_within_twice_torch(kernel, torch_out, ref64, slack=1e-7):
    k, t = errors(kernel, torch_out, ref64)
    assert k <= 2 * t + slack, f"kernel error {k:.3e} vs torch error {t:.3e} (float64 reference)"


def compile_count(kernel) -> int | None:
    """Compiled variants of a @triton.jit kernel (None under the interpreter, which compiles nothing)."""
    caches = getattr(kernel, "device_caches", None)
    if caches:
        return sum(len(entry[0]) for entry in caches.values())
    cache = getattr(kernel, "cache", None)
    if cache:
        return sum(len(v) for v in cache.values())
    return None


def runtime_scalars_are_not_constexpr(kernel, names):
    import triton.language as tl

    fn = getattr(kernel, "fn", kernel)
    params = inspect.signature(fn).parameters
    return all(params[n].annotation is not tl.constexpr for n in names)


def assert_low_precision_close(kernel, reference, steps: int) -> None:
    """bf16/fp16 params: at most one ulp (at the tensor's largest magnitude) of difference per step.

    Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest, so on CPU a parameter can
    drift by one ulp per step; on the GPU the two agree except at rounding ties.
    """
    for a, b in zip(kernel, reference):
        ulp = torch.finfo(b.dtype).eps * b.float().abs().max().item()
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= steps * ulp + 1e-7, f"low-precision params differ by {diff:.3e} > {steps} x ulp {ulp:.3e}"


ODD_MIX = [1, 22, 4097, 1000, 3, 65537]


def assert_nonfinite_skip_leaves_state(update, hyper, num_state, device):
    """A step whose flags say skip (what the engine computes for inf/NaN gradients) must leave parameters and
    state bit-identical, even with a NaN actually present in the gradients."""
    grp = Group(ODD_MIX, torch.float32, device, num_state, 5)
    grp.set_grads(random_grads(ODD_MIX, 1))
    grp.steps += 1
    update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, None, **hyper)
    params, state = [p.clone() for p in grp.params], grp.state.clone()
    grp.set_grads(random_grads(ODD_MIX, 2, nan_at=3))
    update(grp.table, grp.steps, grp.grads, grp.state, grp.stride, torch.tensor([1.0, 1.0], device=device), **hyper)
    assert all(torch.equal(a, b) for a, b in zip(grp.params, params))
    assert torch.equal(grp.state, state)
