"""The engine on a GPU: Triton kernels, offloaded state streamed on side streams, no host sync in a step."""

import pytest
import torch

from hift_engine import HiFTOptimizer
from tests.helpers import lm_batch, params_equal, tiny_llama, twin

pytestmark = pytest.mark.cuda


def _train(model, steps, **kw):
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, **kw)
    losses = []
    for step in range(steps):
        loss = model(**lm_batch(seed=step, device="cuda")).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    opt.store.synchronize()
    return opt, losses


@pytest.mark.parametrize("store", ["torch", "native"])
@pytest.mark.parametrize("strategy", ["bottom2up", "random"])
def test_offloaded_equals_resident_bit_for_bit(store, strategy):
    base = tiny_llama(layers=4, hidden=64, device="cuda")
    a, b = twin(base), twin(base)
    opt_a, la = _train(a, 3 * 6 + 2, state_store="resident", strategy=strategy, seed=1, max_grad_norm=1.0)
    opt_b, lb = _train(b, 3 * 6 + 2, state_store=store, strategy=strategy, seed=1, max_grad_norm=1.0)
    assert opt_b.store.kind == f"offload-{store}" and opt_b.kernel_backend == "triton"
    assert la == lb and params_equal(a, b)
    assert opt_b.store.stats.bytes_h2d > 0 and opt_b.store.stats.bytes_d2h > 0


def test_triton_single_group_tracks_torch_adamw():
    model = tiny_llama(hidden=64, device="cuda")
    ref = twin(model)
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, weight_decay=0.01, groups=[[".*"]], no_decay=[])
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(20):
        for m, o in ((model, opt), (ref, ref_opt)):
            m(**lm_batch(seed=step, device="cuda")).loss.backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(list(model.parameters()), list(ref.parameters()), rtol=1e-4, atol=1e-5)


def _step_refusing_syncs(opt):
    """opt.step() and zero_grad() with torch raising on any host sync they make."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_step_makes_no_host_sync():
    model = tiny_llama(layers=3, hidden=64, device="cuda")
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, max_grad_norm=1.0, state_store="native")
    for step in range(2 * opt.num_groups):  # warm up: compile kernels, build tables, allocate host buffers
        model(**lm_batch(seed=step, device="cuda")).loss.backward()
        opt.step()
        opt.zero_grad()
    for step in range(opt.num_groups):
        model(**lm_batch(seed=step, device="cuda")).loss.backward()
        _step_refusing_syncs(opt)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
@pytest.mark.parametrize("store", ["resident", "native"])
def test_first_cycle_makes_no_host_sync(store, precision):
    """From the very first step, as later: a sync in the first cycle (a kernel table copied from pageable memory at
    each group's first update did this) makes the host wait for the GPU once a step and loses its lead."""
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    warm = tiny_llama(layers=3, hidden=64, device="cuda").to(dtype)
    model = twin(warm)
    kw = {"max_grad_norm": 1.0, "state_store": store, "precision": precision}
    _train(warm, 2 * 5, **kw)  # compiles the kernels these shapes use (compilation is not what is tested)
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, **kw)
    torch.cuda.synchronize()
    for step in range(opt.num_groups + 1):
        model(**lm_batch(seed=step, device="cuda")).loss.backward()
        _step_refusing_syncs(opt)
    torch.cuda.synchronize()
    opt.close()


def test_generic_optimizer_state_leaves_the_device():
    model = tiny_llama(hidden=64, device="cuda")
    ref = twin(model)
    opt = HiFTOptimizer(model, torch.optim.RMSprop, lr=1e-3, groups=[[".*"]], no_decay=[])
    ref_opt = torch.optim.RMSprop(ref.parameters(), lr=1e-3)
    for step in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            m(**lm_batch(seed=step, device="cuda")).loss.backward()
            o.step()
            o.zero_grad()
    assert params_equal(model, ref)
    per_layer = tiny_llama(hidden=64, device="cuda")
    opt = HiFTOptimizer(per_layer, torch.optim.RMSprop, lr=1e-3)
    for step in range(opt.num_groups + 1):
        per_layer(**lm_batch(seed=step, device="cuda")).loss.backward()
        opt.step()
        opt.zero_grad()
    opt.path.synchronize()
    idle = [gid for gid in range(opt.num_groups) if gid != opt.active_group and gid != 0]
    for gid in idle:
        for st in opt.path.inners[gid].state.values():
            assert st["square_avg"].device.type == "cpu" and st["square_avg"].is_pinned()


def test_nonfinite_skip_on_cuda_leaves_state_untouched():
    model = tiny_llama(hidden=64, device="cuda")
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, groups=[[".*"]], state_store="native")
    model(**lm_batch(device="cuda")).loss.backward()
    opt.step()
    opt.zero_grad()
    weights = [p.detach().clone() for p in model.parameters()]
    state = opt.store.host_state(0).clone()
    model(**lm_batch(seed=3, device="cuda")).loss.backward()
    model.lm_head.weight.grad[0, 0] = float("inf")
    opt.step()
    assert opt.nonfinite_skips == 1
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert torch.equal(opt.store.host_state(0), state)


def test_demo_runs_on_cuda():
    from hift_engine.demo import run_demo

    r = run_demo(steps=120, batch_size=32, eval_problems=10, device="cuda", printer=None)
    assert sum(r.losses[-10:]) < sum(r.losses[:10])


@pytest.mark.parametrize("index", range(max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)))
def test_triton_update_runs_on_the_parameters_device(index):
    """Triton launches on the current device: the launchers make the parameters' device current. cuda:0 is
    checked explicitly; on a machine with several GPUs every device is, with another one current."""
    device = torch.device("cuda", index)
    base = tiny_llama(hidden=64, device=device)
    model, ref = twin(base), twin(base)
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, groups=[[".*"]], kernels="triton")
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    other = (index + 1) % torch.cuda.device_count()
    with torch.cuda.device(other):  # a different current device, where there is one
        for m, o in ((model, opt), (ref, torch_opt)):
            m(**lm_batch(device=device)).loss.backward()
            o.step()
            o.zero_grad()
    torch.cuda.synchronize(device)
    assert model.lm_head.weight.device == device
    torch.testing.assert_close(list(model.parameters()), list(ref.parameters()), rtol=1e-5, atol=1e-6)
