"""HiFTOptimizer on CPU: equivalence with torch.optim at k = 1, one-group-per-step semantics, and state."""

import pytest
import torch
from torch import nn

from hift_engine import ConfigError, GroupingError, HiFTOptimizer, NonFiniteError
from tests.helpers import (MLPStack, lm_batch, max_diff, mlp_loss, page_rounded_bytes, params_equal, returns_within,
                           tiny_llama, twin)

STORES = ["resident", "torch", "native"]  # offloading slot policy over the pure-torch / C++ transport

TORCH_TWINS = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
    "adagrad": (torch.optim.Adagrad, dict(lr=5e-2, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-9, weight_decay=0.01)),
    "sgd": (torch.optim.SGD, dict(lr=5e-2, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd_plain": (torch.optim.SGD, dict(lr=5e-2)),
}


def _hift_for(case: str, model, **extra):
    cls, kw = TORCH_TWINS[case]
    name = {torch.optim.AdamW: "adamw", torch.optim.Adagrad: "adagrad", torch.optim.SGD: "sgd"}[cls]
    return HiFTOptimizer(model, name, groups=[[".*"]], no_decay=[], **kw, **extra)


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("case", sorted(TORCH_TWINS))
def test_single_group_matches_torch_optim(case, store):
    """k = 1 is plain full fine-tuning: every step equals torch.optim exactly (same ops, same order)."""
    model = tiny_llama()
    ref = twin(model)
    opt = _hift_for(case, model, state_store=store)
    cls, kw = TORCH_TWINS[case]
    ref_opt = cls(ref.parameters(), **kw)
    for step in range(22):
        batch = lm_batch(seed=step)
        for m, o in ((model, opt), (ref, ref_opt)):
            m(**batch).loss.backward()
            o.step()
            o.zero_grad()
        assert params_equal(model, ref), f"{case} diverged at step {step}: {max_diff(model, ref)}"


@pytest.mark.parametrize("store", STORES)
def test_clipping_matches_torch_clip_grad_norm(store):
    model = tiny_llama()
    ref = twin(model)
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, groups=[[".*"]], no_decay=[], max_grad_norm=0.05, state_store=store)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(20):
        batch = lm_batch(seed=step)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        ref(**batch).loss.backward()
        norm = nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
        assert norm > 0.05  # the clip is active
        assert params_equal(model, ref), f"diverged at step {step}"


@pytest.mark.parametrize("strategy", ["bottom2up", "top2down", "random"])
def test_only_active_group_changes_and_frozen_hold_no_grad(strategy):
    model = tiny_llama(layers=4)
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, strategy=strategy, seed=1)
    names = dict(model.named_parameters())
    for step in range(2 * opt.num_groups):
        active = set(opt.layouts[opt.active_group].names)
        before = {n: p.detach().clone() for n, p in names.items()}
        model(**lm_batch(seed=step)).loss.backward()
        for n, p in names.items():
            assert p.requires_grad == (n in active)
            if n not in active:
                assert p.grad is None, f"frozen {n} holds a gradient"
        opt.step()
        opt.zero_grad()
        changed = {n for n, p in names.items() if not torch.equal(p, before[n])}
        assert changed == active


def test_backward_does_not_reach_below_active_group():
    model = tiny_llama(layers=4)
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, strategy="top2down")
    layers = model.model.layers
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: seen.append((k, i[0].requires_grad))) for k, layer in enumerate(layers)]
    while opt.active_group != 2:  # group 2 = model.layers.1 (0 is the embedding)
        model(**lm_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    seen.clear()
    model(**lm_batch()).loss.backward()
    # Inputs of layers 0 and 1 need no grad: autograd records nothing below the active block.
    assert seen[0] == (0, False) and seen[1] == (1, False)
    assert seen[2] == (2, True)
    for h in hooks:
        h.remove()


def test_tied_weights_belong_to_embedding_and_grads_never_leak():
    model = tiny_llama(tie=True)
    opt = HiFTOptimizer(model, "sgd", lr=0.1)
    assert "lm_head.weight" not in [n for lay in opt.layouts for n in lay.names]
    assert "model.embed_tokens.weight" in opt.layouts[0].names
    head = opt.num_groups - 1
    while opt.active_group != head:
        model(**lm_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    emb = model.model.embed_tokens.weight
    before = emb.detach().clone()
    model(**lm_batch()).loss.backward()
    assert emb.grad is None
    opt.step()
    assert torch.equal(emb, before)


def test_gradient_dropped_when_someone_reenables_a_frozen_param():
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2)  # group 0 = embedding active
    w = model.model.layers[1].mlp.up_proj.weight
    w.requires_grad_(True)  # e.g. a wrapper that keeps requires_grad
    model(**lm_batch()).loss.backward()
    assert w.grad is None and opt.router.dropped >= 1


def _accumulate(model, opt, full):
    for half in (slice(0, 2), slice(2, 4)):
        (model(**{k: v[half] for k, v in full.items()}).loss / 2).backward()


def test_gradient_accumulation_equals_torch_accumulation_at_k1():
    model = tiny_llama()
    ref = twin(model)
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, groups=[[".*"]], no_decay=[])
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(10):
        for m, o in ((model, opt), (ref, ref_opt)):
            _accumulate(m, o, lm_batch(batch=4, seed=step))
            o.step()
            o.zero_grad()
    assert params_equal(model, ref)


def test_gradient_accumulation_keeps_one_group_and_matches_big_batch():
    model = tiny_llama()
    ref = twin(model)
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, strategy="random", seed=4)
    ref_opt = HiFTOptimizer(ref, "adamw", lr=1e-2, strategy="random", seed=4)
    for step in range(10):
        full = lm_batch(batch=4, seed=step)
        g = opt.active_group
        _accumulate(model, opt, full)
        assert opt.active_group == g and ref_opt.active_group == g
        opt.step()
        opt.zero_grad()
        ref(**full).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    # Two half-batch sums vs one full-batch sum: equal up to float summation order.
    torch.testing.assert_close(list(model.parameters()), list(ref.parameters()), rtol=1e-4, atol=1e-5)


def test_model_zero_grad_set_to_none_between_steps_is_harmless():
    """transformers.Trainer calls model.zero_grad(): .grad becomes None; the hooks route the fresh grads back."""
    model = tiny_llama()
    ref = twin(model)
    opt = HiFTOptimizer(model, "adamw", lr=1e-2)
    ref_opt = HiFTOptimizer(ref, "adamw", lr=1e-2)
    for step in range(12):
        batch = lm_batch(seed=step)
        model(**batch).loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        ref(**batch).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert params_equal(model, ref)


def test_params_without_grad_are_not_updated():
    """As torch.optim: a parameter that got no gradient this step is skipped (no decay, no step count)."""
    model = MLPStack()
    model.unused = nn.Linear(4, 4)  # registered, never called in forward
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, weight_decay=0.1, groups=[[".*"]])
    unused = model.unused.weight
    before = unused.detach().clone()
    used = model.blocks[0][1].weight.detach().clone()
    for step in range(3):
        mlp_loss(model, step).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(unused, before) and not torch.equal(model.blocks[0][1].weight, used)
    idx = opt.layouts[0].names.index("unused.weight")
    assert opt.layouts[0].steps[idx].item() == 0
    assert opt.layouts[0].steps[0].item() == 3


def test_weight_decay_exclusions_like_transformers():
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.1
    assert all("norm" in n for n in no_decay) and "model.norm.weight" in no_decay
    assert "lm_head.weight" in decay and "model.layers.0.mlp.up_proj.weight" in decay


def test_generic_optimizer_matches_torch_at_k1_and_trains_per_layer():
    model = tiny_llama()
    ref = twin(model)
    opt = HiFTOptimizer(model, torch.optim.RMSprop, lr=1e-3, alpha=0.9, groups=[[".*"]], no_decay=[])
    ref_opt = torch.optim.RMSprop(ref.parameters(), lr=1e-3, alpha=0.9)
    for step in range(20):
        for m, o in ((model, opt), (ref, ref_opt)):
            m(**lm_batch(seed=step)).loss.backward()
            o.step()
            o.zero_grad()
    assert params_equal(model, ref)

    per_layer = tiny_llama()
    opt = HiFTOptimizer(per_layer, torch.optim.RMSprop, lr=3e-3)
    batch = lm_batch()
    first = per_layer(**batch).loss.item()
    for _ in range(4 * opt.num_groups):
        per_layer(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert per_layer(**batch).loss.item() < first - 0.1


@pytest.mark.parametrize("optimizer", ["adamw", "adagrad", "sgd", "rmsprop"])
@pytest.mark.parametrize("strategy", ["bottom2up", "random"])
def test_state_dict_round_trip_resumes_exactly(optimizer, strategy):
    opt_arg = torch.optim.RMSprop if optimizer == "rmsprop" else optimizer
    kw = {"momentum": 0.9} if optimizer == "sgd" else {}
    model = tiny_llama()
    resumed = twin(model)
    opt = HiFTOptimizer(model, opt_arg, lr=1e-2, strategy=strategy, seed=7, state_store="torch" if optimizer != "rmsprop" else "auto", **kw)
    losses = []
    for step in range(13):
        if step == 7:
            sd = opt.state_dict()
            saved = {n: p.detach().clone() for n, p in model.named_parameters()}
            import io

            buf = io.BytesIO()
            torch.save(sd, buf)
        loss = model(**lm_batch(seed=step)).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    # A new optimizer on a copy of the weights at step 7 continues identically.
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            p.copy_(saved[n])
    opt2 = HiFTOptimizer(resumed, opt_arg, lr=999.0, strategy=strategy, seed=7, **kw)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["lr"] == 1e-2  # saved hyper-parameters win, as in torch.optim
    for step in range(7, 13):
        loss = resumed(**lm_batch(seed=step)).loss
        assert loss.item() == losses[step]
        loss.backward()
        opt2.step()
        opt2.zero_grad()
    assert params_equal(model, resumed)


def test_torch_adamw_state_dict_loads_into_single_group():
    model = tiny_llama()
    ref = twin(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(3):
        ref(**lm_batch(seed=step)).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            p.copy_(q)
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, weight_decay=0.0, groups=[[".*"]], no_decay=[])
    opt.load_state_dict(ref_opt.state_dict())
    for step in range(3, 6):
        for m, o in ((model, opt), (ref, ref_opt)):
            m(**lm_batch(seed=step)).loss.backward()
            o.step()
            o.zero_grad()
    assert params_equal(model, ref)


def test_load_state_dict_rejects_other_model_and_layout():
    a = HiFTOptimizer(tiny_llama(layers=3), "adamw", lr=1e-2)
    b = HiFTOptimizer(tiny_llama(layers=4), "adamw", lr=1e-2)
    with pytest.raises(ConfigError, match="param_groups of sizes"):
        b.load_state_dict(a.state_dict())
    c = HiFTOptimizer(tiny_llama(layers=3), "adamw", lr=1e-2, layers_per_group=2)
    with pytest.raises(ConfigError, match="group layout differs"):
        c.load_state_dict(a.state_dict())
    d = HiFTOptimizer(tiny_llama(layers=3), "sgd", lr=1e-2)
    with pytest.raises(ConfigError, match="optimizer 'adamw'"):
        d.load_state_dict(a.state_dict())


@pytest.mark.parametrize("store", STORES)
def test_nonfinite_gradient_skips_update_with_state_untouched(store):
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, groups=[[".*"]], state_store=store, max_consecutive_skips=3)
    for step in range(2):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    weights = [p.detach().clone() for p in model.parameters()]
    state = opt.store.host_state(0).clone()
    steps = opt.layouts[0].steps.clone()
    model(**lm_batch(seed=5)).loss.backward()
    model.model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("nan")
    opt.step()
    opt.zero_grad()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert torch.equal(opt.store.host_state(0), state)
    assert torch.equal(opt.layouts[0].steps, steps)
    assert opt.nonfinite_skips == 1
    for _ in range(2):  # two more bad steps -> the third in a row raises
        model(**lm_batch()).loss.backward()
        model.lm_head.weight.grad.fill_(float("inf"))
        if _ == 1:
            before_step = opt.global_step
            with pytest.raises(NonFiniteError, match="3 consecutive"):
                opt.step()
            assert opt.global_step == before_step + 1  # the step completed before raising
        else:
            opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_freeze_option_never_trains_those_units():
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, freeze=["embedding", "model.layers.1"])
    frozen = {"model.embed_tokens.weight"} | {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    trained = {n for lay in opt.layouts for n in lay.names}
    assert not (frozen & trained) and opt.num_groups == 3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(2 * opt.num_groups):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n


def test_closure_is_supported():
    model = tiny_llama()
    opt = HiFTOptimizer(model, "sgd", lr=0.1)

    def closure():
        opt.zero_grad()
        loss = model(**lm_batch()).loss
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.requires_grad


def test_lr_scheduler_changes_lr_and_is_delayed():
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1.0)
    sched = opt.cycle_scheduler("linear", total_steps=5 * opt.num_groups)
    lrs = []
    for _ in range(3 * opt.num_groups):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    k = opt.num_groups
    assert lrs[:k] == [1.0] * k and lrs[k : 2 * k] == [0.8] * k and lrs[2 * k :] == [pytest.approx(0.6)] * k


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(strategy="sideways"), ConfigError, "strategy='sideways' is unknown"),
        (dict(layers_per_group=0), ConfigError, "layers_per_group must be an integer >= 1"),
        (dict(groups=[["model.layers.0"], ["model.layers.0", "model.norm", "lm_head", "embed", "model.layers.1", "model.layers.2"]]), GroupingError, "matched by explicit groups 0 and 1"),
        (dict(groups=[["model.layers"]]), GroupingError, "do not cover these trainable parameters"),
        (dict(betas=(0.9, 1.5)), ConfigError, r"betas\[1\] must be < 1"),
        (dict(momentum=0.9), ConfigError, "adamw does not take option"),
        (dict(lr=-1.0), ConfigError, "lr must be a finite number >= 0"),
        (dict(freeze=["no_such_module"]), GroupingError, "match no unit"),
    ],
)
def test_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        HiFTOptimizer(tiny_llama(), "adamw", **kwargs)


def test_model_without_units_errors_with_guidance():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(GroupingError, match="Pass the groups explicitly"):
        HiFTOptimizer(model, "adamw")
    opt = HiFTOptimizer(model, "adamw", groups=[["0"], ["2"]])
    assert opt.num_groups == 2


def test_sgd_nesterov_validation_matches_torch():
    with pytest.raises(ConfigError, match="nesterov"):
        HiFTOptimizer(tiny_llama(), "sgd", lr=0.1, nesterov=True)


def test_structural_hyperparameter_change_is_refused():
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2)
    opt.param_groups[0]["amsgrad"] = True
    model(**lm_batch()).loss.backward()
    with pytest.raises(ConfigError, match="fix the state layout"):
        opt.step()


def test_add_param_group_is_refused_and_close_restores_requires_grad():
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2)
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    opt.close()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_wait_host_memory_pins_every_group_before_the_first_step(device, monkeypatch):
    """wait_host_memory(): the native store holds every host buffer after the first one's until the first update;
    when the call returns all of them are there, and training matches an optimizer that did not wait, bit for bit
    (on CUDA: pinned from the pinning context, copied on the side streams)."""
    for name in ("HIFT_PIN_FIRST", "HIFT_BACKGROUND_ALLOC"):  # diagnostics that change what is pinned when
        monkeypatch.delenv(name, raising=False)
    model = tiny_llama(layers=3, device=device)
    ref_model = twin(model)
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, state_store="native")
    ref = HiFTOptimizer(ref_model, "adamw", lr=1e-2, state_store="native")
    transport, everything = opt.store.transport, page_rounded_bytes(opt.store.numels)
    assert transport.host_bytes < everything, "before the call only the first write-back's buffer is pinned"
    opt.wait_host_memory()
    assert transport.host_bytes == everything
    for s in range(2 * opt.num_groups):
        for m, o in ((model, opt), (ref_model, ref)):
            m(**lm_batch(seed=s, device=device)).loss.backward()
            o.step()
            o.zero_grad()
    assert transport.host_bytes == everything
    assert params_equal(model, ref_model)
    opt.close()
    ref.close()
    with pytest.raises(ConfigError, match="closed"):
        opt.wait_host_memory()


@pytest.mark.parametrize("store", ["native-foreground", "torch", "resident", "generic"])
def test_wait_host_memory_without_a_background_allocator(store, monkeypatch):
    """Where nothing allocates in the background (the native store with HIFT_BACKGROUND_ALLOC=0, the torch
    transport) the call allocates every buffer itself; with no state off the device it returns at once; training
    goes on as usual afterwards."""
    if store == "native-foreground":
        monkeypatch.setenv("HIFT_BACKGROUND_ALLOC", "0")
    model = tiny_llama(layers=2)
    if store == "generic":
        opt = HiFTOptimizer(model, torch.optim.SGD, lr=1e-2)
    else:
        opt = HiFTOptimizer(model, "adamw", lr=1e-2, state_store=store.split("-")[0])
    assert returns_within(opt.wait_host_memory, 60)
    if store == "native-foreground":
        assert opt.store.transport.host_bytes == page_rounded_bytes(opt.store.numels)
    elif store == "torch":
        assert opt.store.transport.host_bytes == 4 * sum(opt.store.numels)
    model(**lm_batch()).loss.backward()
    opt.step()
    opt.close()
