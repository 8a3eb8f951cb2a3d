"""HiFT-aware activation checkpointing: the blocks above the active group are recomputed; gradients identical."""

import pytest
import torch

from hift_engine import ConfigError, HiFTConfig, HiFTOptimizer
from tests.helpers import lm_batch, tiny_llama, twin


def _saved_bytes(model, batch):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    return loss, total[0]


def test_same_gradients_for_every_active_group_and_less_saved_above_it():
    base = tiny_llama(layers=4)
    plain, ckpt = twin(base), twin(base)
    o_plain = HiFTOptimizer(plain, "adamw", lr=1e-3, seed=1, strategy="random")
    o_ckpt = HiFTOptimizer(ckpt, "adamw", lr=1e-3, seed=1, strategy="random", activation_checkpointing="always")
    for step in range(2 * o_plain.num_groups):
        batch = lm_batch(seed=step)
        lp, bytes_plain = _saved_bytes(plain, batch)
        lc, bytes_ckpt = _saved_bytes(ckpt, batch)
        assert torch.equal(lp, lc)
        lp.backward()
        lc.backward()
        for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad), (step, n)
        above = o_ckpt.active_group < o_ckpt.num_groups - 2  # some block lies above the active group
        assert bytes_ckpt < bytes_plain if above else bytes_ckpt == bytes_plain
        o_plain.step(), o_ckpt.step()
        o_plain.zero_grad(), o_ckpt.zero_grad()
    assert o_ckpt._recompute.recomputed > 0
    o_ckpt.close()
    assert all("forward" not in m.__dict__ for m in ckpt.modules())  # the model is given back unwrapped


def test_a_replacing_optimizer_rewraps_once_and_errors_are_clear():
    model = tiny_llama()
    first = HiFTOptimizer(model, "adamw", activation_checkpointing="always")  # noqa: F841 - still alive
    with pytest.warns(UserWarning, match="still attached"):
        opt = HiFTOptimizer(model, "adamw", activation_checkpointing="always")
    layer = model.model.layers[0]
    assert layer.forward.__self__ is layer and layer._hift_recompute() is opt._recompute  # wrapped once, by opt
    model(**lm_batch()).loss.backward()
    opt.step()
    with pytest.raises(ConfigError, match="not built yet"):
        HiFTConfig(activation_checkpointing="auto")
    with pytest.raises(ConfigError, match="explicit groups"):
        HiFTOptimizer(tiny_llama(), "adamw", groups=[[".*"]], activation_checkpointing="always")


def test_a_deep_copy_runs_its_own_weights_and_gives_the_original_no_gradients():
    import copy

    model = tiny_llama()
    HiFTOptimizer(model, "adamw", activation_checkpointing="always")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.model.layers[2].parameters():
            p.add_(0.1)
    fresh = copy.deepcopy(clone)
    for m in fresh.modules():  # the same weights without any wrapper
        for name in ("forward", "_hift_recompute", "_hift_position"):
            m.__dict__.pop(name, None)
    batch = lm_batch()
    for p in clone.parameters():
        p.requires_grad_(True)
    loss = clone(**batch).loss
    assert torch.equal(loss, fresh(**batch).loss)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
