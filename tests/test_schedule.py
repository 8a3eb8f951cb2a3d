"""Group order per strategy, cycles, and the delayed (per-cycle) learning rate."""

import math

import pytest
import torch

from hift_engine import ConfigError, CycleLR, DelayedScheduler, GroupOrder


@pytest.mark.parametrize("strategy", ["bottom2up", "top2down", "random"])
def test_each_group_once_per_cycle_and_peek_is_next(strategy):
    order = GroupOrder(7, strategy, seed=3)
    for _cycle in range(5):
        seen = []
        for _ in range(7):
            seen.append(order.current)
            nxt = order.peek()
            assert order.advance() == nxt
        assert sorted(seen) == list(range(7))
        if strategy == "bottom2up":
            assert seen == list(range(7))
        if strategy == "top2down":
            assert seen == list(range(6, -1, -1))


def test_random_differs_between_cycles_and_is_reproducible():
    a, b = GroupOrder(8, "random", seed=11), GroupOrder(8, "random", seed=11)
    orders = [a.cycle_order(c) for c in range(6)]
    assert len({tuple(o) for o in orders}) > 1
    assert orders == [b.cycle_order(c) for c in range(6)]
    assert GroupOrder(8, "random", seed=12).cycle_order(0) != orders[0] or GroupOrder(8, "random", seed=12).cycle_order(1) != orders[1]


def test_order_state_dict_resumes_mid_cycle():
    a = GroupOrder(5, "random", seed=2)
    for _ in range(13):
        a.advance()
    b = GroupOrder(5, "random", seed=2)
    b.load_state_dict(a.state_dict())
    assert [a.advance() for _ in range(12)] == [b.advance() for _ in range(12)]
    with pytest.raises(ConfigError, match="seed"):
        GroupOrder(5, "random", seed=3).load_state_dict(a.state_dict())


def _opt(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup", "polynomial"])
def test_cycle_lr_constant_within_cycle_and_spans_ceil_total_over_k(name):
    k, total, warmup = 4, 30, 6  # -> 8 cycles, 2 warmup cycles
    opt = _opt()
    sched = CycleLR(opt, name, total_steps=total, warmup_steps=warmup, steps_per_cycle=k)
    assert sched.total_cycles == math.ceil(total / k) and sched.warmup_cycles == 2
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for c in range(0, total, k):
        assert len(set(lrs[c : c + k])) == 1
    assert lrs[0] == 0.0 and lrs[4] == 0.5 and lrs[8] == 1.0  # warmup over cycles
    if name in ("linear", "cosine", "polynomial"):
        assert lrs[-1] < lrs[8] and lrs[-1] > 0.0  # still decaying at the last cycle, not finished early


def test_cycle_lr_per_step_mode_and_state_dict_is_plain():
    opt = _opt()
    sched = CycleLR(opt, "linear", total_steps=10, steps_per_cycle=1)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.7)
    state = sched.state_dict()
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    again = CycleLR(_opt(), "linear", total_steps=10, steps_per_cycle=1)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.get_last_lr() == sched.get_last_lr()


def test_cycle_lr_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="unknown LR schedule"):
        CycleLR(_opt(), "cosinus", total_steps=10)
    with pytest.raises(ConfigError, match="warmup_steps"):
        CycleLR(_opt(), "cosine", total_steps=10, warmup_steps=11)


def test_delayed_transformers_scheduler_steps_once_per_cycle():
    from transformers import get_scheduler

    opt = _opt()
    inner = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=5)
    sched = DelayedScheduler(inner, steps_per_cycle=3)
    lrs = []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0] * 3 + [0.8] * 3 + [pytest.approx(0.6)] * 3
