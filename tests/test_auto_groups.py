"""layers_per_group='auto': the fewest consecutive groups whose modelled step fits the memory budget."""

import pytest
import torch

from hift_engine import ConfigError, HiFTConfig, HiFTOptimizer
from hift_engine.auto_groups import margin_bytes, plan_groups
from tests.helpers import lm_batch, tiny_llama

MARGIN = 512 << 20  # the smallest margin: every budget below ~17 GiB


def test_units_are_packed_bottom_up_into_the_fewest_groups_that_fit():
    # units of 100, 10, 10, 10, 10, 100 fp32 params; AdamW (2 vectors) offloaded through 2 slots: a group of n
    # params costs 4n (gradients) + 2 x 8n (state slots) = 20n bytes on top of the fixed weights
    numel = [100, 10, 10, 10, 10, 100]
    grad = [4 * n for n in numel]
    weights = sum(grad)
    budget = MARGIN + weights + 20 * 120  # room for 120 params in the largest group
    plan = plan_groups(numel, grad, 0, 2, 2, budget, 0)
    assert plan.sizes == [3, 3]  # 100 + 10 + 10 | 10 + 10 + 100: each exactly 120
    assert plan.peak_bytes == MARGIN + weights + 20 * 120 == budget
    tighter = plan_groups(numel, grad, 0, 2, 2, budget - 20, 0)  # room for 119
    assert tighter.sizes == [2, 3, 1]  # 110 | 30 | 100: greedy from the bottom, the fewest consecutive groups
    roomy = plan_groups(numel, grad, 0, 2, 2, budget + 20 * 1000, 0)
    assert roomy.sizes == [6]  # everything fits: one group (full fine-tuning)


def test_activations_frozen_weights_and_resident_state_take_room_first():
    numel, grad = [100, 100, 100], [400, 400, 400]
    base = MARGIN + 1200 + 20 * 200
    assert plan_groups(numel, grad, 0, 2, 2, base, 0).sizes == [2, 1]
    assert plan_groups(numel, grad, 0, 2, 2, base, 20 * 100).sizes == [1, 1, 1]  # activations
    assert plan_groups(numel, grad, 20 * 100, 2, 2, base, 0).sizes == [1, 1, 1]  # frozen weights
    # resident state is fixed (all of it on the device); then only the gradient arena grows with the group
    resident = plan_groups(numel, grad, 0, 2, None, MARGIN + 1200 + 8 * 300 + 4 * 200, 0)
    assert resident.sizes == [2, 1] and resident.parts["resident_state"] == 8 * 300


def test_each_further_active_unit_adds_its_activations():
    numel, grad = [100, 100, 100], [400, 400, 400]
    base = MARGIN + 1200 + 20 * 200
    assert plan_groups(numel, grad, 0, 2, 2, base, 0, per_unit_activation_bytes=0).sizes == [2, 1]
    assert plan_groups(numel, grad, 0, 2, 2, base, 0, per_unit_activation_bytes=1).sizes == [1, 1, 1]  # 2 units: +1 byte
    assert plan_groups(numel, grad, 0, 2, 2, base + 1, 0, per_unit_activation_bytes=1).sizes == [2, 1]


def test_a_unit_too_big_for_the_budget_is_refused_with_the_numbers():
    with pytest.raises(ConfigError, match=r"even one unit per group does not fit.*unit 1 needs"):
        plan_groups([10, 1000], [40, 4000], 0, 2, 2, MARGIN + 4040 + 20 * 100, 0)


def test_margin_is_three_percent_above_17_gib():
    assert margin_bytes(1 << 30) == MARGIN and margin_bytes(100 << 30) == int(0.03 * (100 << 30))


def test_the_optimizer_trains_the_planned_groups_and_says_so():
    model = tiny_llama(layers=6, hidden=32, vocab=64)
    units = [sum(p.numel() for p in g.params) for g in HiFTOptimizer(tiny_llama(layers=6, hidden=32, vocab=64), "adamw").grouping.groups]
    weights = 4 * sum(units)
    # resident AdamW on the CPU: state fixed (8 B/param), gradients of the largest group grow: room for 3 blocks
    block = units[1]
    budget = MARGIN + weights + 8 * sum(units) + 4 * 3 * block + 100
    opt = HiFTOptimizer(model, "adamw", layers_per_group="auto", memory_budget_gib=budget / 2**30, activation_gib=0.0)
    assert opt.group_plan.sizes == [int(s) for s in opt.group_plan.sizes] and sum(opt.group_plan.sizes) == len(units)
    assert max(sum(units[a:b]) for a, b in _bounds(opt.group_plan.sizes)) <= 3 * block
    assert opt.num_groups == len(opt.group_plan.sizes) < len(units)
    assert "layers_per_group=auto" in opt.describe()
    for step in range(2 * opt.num_groups):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()


def _bounds(sizes):
    edges = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return list(zip(edges, edges[1:]))


def test_bad_auto_options_are_refused():
    with pytest.raises(ConfigError, match="needs activation_gib="):
        HiFTOptimizer(tiny_llama(), "adamw", layers_per_group="auto", memory_budget_gib=1)
    with pytest.raises(ConfigError, match="needs memory_budget_gib="):
        HiFTOptimizer(tiny_llama(), "adamw", layers_per_group="auto", activation_gib=0.1)
    with pytest.raises(ConfigError, match="set layers_per_group='auto' or drop activation_gib"):
        HiFTConfig(activation_gib=1.0)
    with pytest.raises(ConfigError, match="explicit groups"):
        HiFTConfig(layers_per_group="auto", groups=[[".*"]])
    with pytest.raises(ConfigError, match="torch.optim class"):
        HiFTConfig(layers_per_group="auto", optimizer=torch.optim.RMSprop)
    with pytest.raises(ConfigError, match="integer >= 1 .* or 'auto'"):
        HiFTConfig(layers_per_group="two")
    for bad in (-1, [1.0, -1.0], [1, 2, 3], "1"):
        with pytest.raises(ConfigError, match="activation_gib must be a number"):
            HiFTConfig(layers_per_group="auto", activation_gib=bad)
    assert HiFTConfig(layers_per_group="auto", activation_gib=(1.0, 0.5)).activation_gib == [1.0, 0.5]
    from hift_engine.store import ResidentStore

    with pytest.raises(ConfigError, match="cannot take store="):
        HiFTOptimizer(tiny_llama(), "adamw", layers_per_group="auto", memory_budget_gib=1, activation_gib=0.0,
                      store=lambda layouts, device: ResidentStore([lay.state_numel for lay in layouts], device))


def test_the_largest_gradient_transient_is_counted_in_the_plan():
    """Autograd hands the largest parameter's gradient over before it lands in the arena: the plan reserves it,
    so a budget that fits one group only without it gets two."""
    numel, grad = [100] * 4, [400] * 4  # per unit: 400 B of gradients + 2 slots x 2 fp32 vectors = 2000 B
    budget = 1600 + (512 << 20) + 4 * 2000  # weights + margin + exactly one group of all four units
    assert plan_groups(numel, grad, 0, 2, 2, budget, 0).sizes == [4]
    plan = plan_groups(numel, grad, 0, 2, 2, budget, 0, grad_transient_bytes=400)
    assert plan.sizes == [3, 1] and plan.parts["grad_transient"] == 400 and plan.peak_bytes <= budget


def test_memory_already_on_the_device_beyond_the_model_is_left_out_of_the_budget():
    """The device's budget is shared with whatever else is allocated (another model, a reference copy of the
    weights): only the allocation beyond the model's own parameters and buffers is subtracted."""
    from hift_engine.memory import other_device_bytes

    model = tiny_llama()
    own = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert other_device_bytes(model, torch.device("cpu"), own) == 0
    assert other_device_bytes(model, torch.device("cpu"), own + 12345) == 12345
    assert other_device_bytes(model, torch.device("cuda", 0), 999) == 999  # none of the model is on that device


@pytest.mark.cuda
def test_auto_groups_on_cuda_plan_around_memory_other_code_already_holds(cuda_device):
    """A bench run left a copy of the weights on the capped device and layers_per_group='auto' planned as if the
    card were empty: its slots overflowed at construction. Now a tensor allocated beside the model takes room
    from the plan: with just more than the plan's slack held elsewhere, the same plan no longer comes out."""
    model = tiny_llama().to(cuda_device)
    batch = {k: v.to(cuda_device) for k, v in lm_batch().items()}
    # 50 MiB more per unit in the active group: a tiny model's own bytes are too few for a 1 MiB shortfall to
    # change the plan, and this makes every unit taken off the largest group free room
    act = [0.01, 0.05]
    total = torch.cuda.get_device_properties(cuda_device).total_memory
    index = torch.cuda.current_device()  # set_per_process_memory_fraction needs an index, not plain "cuda"
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated(cuda_device) + 2**30) / total, index)
    try:
        alone = HiFTOptimizer(model, "adamw", lr=1e-3, layers_per_group="auto", activation_gib=act)
        plan = alone.group_plan
        alone.close()
        slack = plan.budget_bytes - plan.peak_bytes
        ballast = torch.empty(slack + (1 << 20), dtype=torch.uint8, device=cuda_device)
        beside = HiFTOptimizer(model, "adamw", lr=1e-3, layers_per_group="auto", activation_gib=act)
        assert beside.group_plan.budget_bytes <= plan.budget_bytes - slack - (1 << 20)
        assert beside.num_groups > alone.num_groups, (plan.describe(), beside.group_plan.describe())
        model(**batch).loss.backward()
        beside.step()
        beside.close()
        del ballast
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


class _Spec:
    def __init__(self, names):
        self.names = names

    def state_names(self, hyper):
        return self.names


@pytest.mark.parametrize(
    "options, store, spec, masters, held",
    [
        ({"layers_per_group": "auto"}, None, _Spec(["exp_avg", "exp_avg_sq"]), False, True),
        ({"layers_per_group": "auto", "activation_gib": None}, None, _Spec(["exp_avg"]), False, False),  # refused next
        ({"activation_checkpointing": "auto", "activation_gib": None}, None, _Spec(["exp_avg", "exp_avg_sq"]), False, True),
        ({"layers_per_group": "auto", "state_store": "native"}, None, _Spec(["sum"]), False, True),
        ({"layers_per_group": "auto", "precision": "bf16-mixed"}, None, _Spec([]), True, True),  # masters are state
        ({"layers_per_group": "auto", "memory_budget_gib": 20}, None, _Spec(["exp_avg"]), False, False),  # not read
        ({"layers_per_group": 1, "activation_gib": None}, None, _Spec(["exp_avg"]), False, False),  # no plan
        ({"layers_per_group": "auto", "pin_context": False}, None, _Spec(["exp_avg"]), False, False),
        ({"layers_per_group": "auto", "state_store": "resident"}, None, _Spec(["exp_avg"]), False, False),
        ({"layers_per_group": "auto", "state_store": "torch"}, None, _Spec(["exp_avg"]), False, False),
        ({"layers_per_group": "auto"}, object(), _Spec(["exp_avg"]), False, False),  # the user's store
        ({"layers_per_group": "auto"}, None, _Spec([]), False, False),  # stateless: no store
        ({"layers_per_group": "auto"}, None, None, False, False),  # a torch.optim optimizer: no store
    ],
)
def test_plans_reading_the_device_hold_the_pinning_context_first(monkeypatch, options, store, spec, masters, held):
    """Which constructions make the native store's pinning context before planning: exactly those whose "auto"
    plans read the device's free memory and whose state the native store will pin (the CUDA test below checks
    on a GPU that the context then exists when the plan reads the device)."""
    import hift_engine.store.native_transport as native_transport
    from hift_engine.optimizer import _hold_pin_context

    calls = []
    monkeypatch.setattr(native_transport, "hold_pin_context", lambda device: calls.append(device) or "held")
    cfg = HiFTConfig(**{"activation_gib": 1.0, **options})
    got = _hold_pin_context(cfg, torch.device("cuda", 0), store, spec, {}, masters)
    assert (got == "held") is held and len(calls) == int(held)
    assert _hold_pin_context(cfg, torch.device("cpu"), store, spec, {}, masters) is None  # no CUDA device, no context
    monkeypatch.setenv("HIFT_ALLOC_MODE", "hostalloc")  # pins without the context
    assert _hold_pin_context(cfg, torch.device("cuda", 0), store, spec, {}, masters) is None


@pytest.mark.cuda
@pytest.mark.parametrize("options", [{"layers_per_group": "auto", "activation_gib": [0.01, 0.0]},
                                     {"activation_checkpointing": "auto"}])
def test_auto_plans_read_the_device_after_the_pinning_context_exists(cuda_device, monkeypatch, options):
    """The "auto" plans read the device's free memory before the store exists, and the store's pinning context
    (about 260 MiB on an H200, outside torch's accounting) then took memory they had counted as free. Now the
    context is made first: at the moment a plan reads the device, asking for the context again takes nothing."""
    from hift_engine import _native
    from hift_engine import optimizer as optimizer_module

    module = _native.load()
    index = cuda_device.index if cuda_device.index is not None else torch.cuda.current_device()
    seen = []
    read_device = optimizer_module.device_budget_bytes

    def reading(device):
        before = torch.cuda.mem_get_info(index)[0]
        ctx, why = module.hold_pin_context(index)
        seen.append((ctx is not None, why, before - torch.cuda.mem_get_info(index)[0]))
        del ctx
        return read_device(device)

    monkeypatch.setattr(optimizer_module, "device_budget_bytes", reading)
    model = tiny_llama().to(cuda_device)
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, **options)
    assert seen, "the plan did not read the device"
    for exists, why, taken in seen:
        if not exists:
            pytest.skip(f"this driver gives no pinning context: {why}")
        assert taken < (16 << 20), f"the pinning context was made after the plan read the device ({taken >> 20} MiB)"
    stats = opt.store.alloc_stats()
    assert stats["pin_context"] and stats["pin_context_bytes"] > 0
    batch = {k: v.to(cuda_device) for k, v in lm_batch().items()}
    model(**batch).loss.backward()
    opt.step()
    opt.close()
