"""Regression tests for the engine-side reliability issues (issue 12): each failed on the code before its fix."""

import json
import os
import warnings

import pytest
import torch
from torch import nn

from hift_engine import CheckpointError, ConfigError, HiFTConfig, HiFTOptimizer, LayoutError
from hift_engine import checkpoint as ckpt
from tests.helpers import MLPStack, lm_batch, params_equal, tiny_llama, twin


def _two_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))


def _loss(model, use_second: bool):
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=model[0].weight.dtype)
    h = model[0](x)
    return (model[1](h) if use_second else h).pow(2).sum()


# --------------------------------------------------------------------------------------- 1. second optimizer
def test_second_optimizer_on_the_same_model_finds_the_same_groups():
    model = tiny_llama()
    o1 = HiFTOptimizer(model, "adamw")
    groups = [list(lay.names) for lay in o1.layouts]
    del o1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "another HiFTOptimizer was still attached" if o1 is not collected yet
        o2 = HiFTOptimizer(model, "adamw", amsgrad=True)
    assert [list(lay.names) for lay in o2.layouts] == groups
    assert o2.grouping.frozen == []


def test_replaced_optimizer_is_detached_and_refuses_to_step():
    model = tiny_llama()
    o1 = HiFTOptimizer(model, "adamw", lr=1e-2)
    with pytest.warns(UserWarning, match="still attached"):
        o2 = HiFTOptimizer(model, "adamw", lr=1e-2)
    model(**lm_batch()).loss.backward()
    active = set(o2.layouts[o2.active_group].names)
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == active  # o1's hooks are gone: they would have dropped these gradients
    with pytest.raises(ConfigError, match="replaced by a newer one"):
        o1.step()
    o2.step()


def test_close_then_new_optimizer_and_config_freeze_round_trip():
    model = tiny_llama()
    o1 = HiFTOptimizer(model, "adamw", freeze=["embedding"])
    o1.close()
    assert all(p.requires_grad for p in model.parameters())
    o2 = HiFTOptimizer(model, "adamw")
    assert o2.grouping.frozen == [] and o2.num_groups == o1.num_groups + 1


# --------------------------------------------------------------------------------------- 2/3. gradients
@pytest.mark.parametrize("zero", ["model", "optimizer", "none"])
def test_same_group_twice_follows_torch_after_any_zero_grad(zero):
    ref = _two_linears()
    model = twin(ref)
    opt = HiFTOptimizer(model, "sgd", lr=0.1, groups=[[".*"]], no_decay=[])
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(4):
        use_second = step not in (1, 2)
        for m, o in ((model, opt), (ref, torch_opt)):
            _loss(m, use_second).backward()
            o.step()
            if zero == "model":
                m.zero_grad()
            elif zero == "optimizer":
                o.zero_grad()
        assert params_equal(model, ref), f"step {step}"


def test_gradients_set_by_hand_are_applied():
    ref = _two_linears()
    model = twin(ref)
    opt = HiFTOptimizer(model, "adamw", lr=0.1, groups=[[".*"]], no_decay=[])
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    for m, o in ((model, opt), (ref, torch_opt)):
        m[0].weight.grad = torch.ones(2, 2)
        o.step()
        o.step()  # the gradient stays until zeroed: applied again
    assert not torch.equal(model[0].weight, _two_linears()[0].weight)
    assert params_equal(model, ref)
    # gradients from torch.autograd.grad assigned to .grad, on top of the arena's
    for m, o in ((model, opt), (ref, torch_opt)):
        o.zero_grad()
        g0, g1 = torch.autograd.grad(_loss(m, True), [m[0].weight, m[1].weight])
        m[0].weight.grad, m[1].weight.grad = g0, g1
        o.step()
    assert params_equal(model, ref)


def test_clipping_ignores_stale_arena_gradients():
    """After model.zero_grad() a parameter without a new gradient must not count in the clipping norm."""
    ref = _two_linears()
    model = twin(ref)
    opt = HiFTOptimizer(model, "sgd", lr=0.1, groups=[[".*"]], no_decay=[], max_grad_norm=0.5)
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        for m, o in ((model, opt), (ref, torch_opt)):
            _loss(m, step == 0).backward()
            if o is torch_opt:
                torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.grad is not None], 0.5)
            o.step()
            m.zero_grad()
        torch.testing.assert_close(list(model.parameters()), list(ref.parameters()), rtol=0, atol=1e-7)


# --------------------------------------------------------------------------------------- 4. no_decay
def test_no_decay_substring_patterns_work_as_transformers_users_write_them():
    model = MLPStack()
    opt = HiFTOptimizer(model, "adamw", no_decay=["bias", "norm.weight"])
    plain = {n for n, p in model.named_parameters() for g in opt.param_groups if g["name"] == "no_decay" for q in g["params"] if q is p}
    assert {n for n, _ in model.named_parameters() if n.endswith("bias")} <= plain
    assert "norm.weight" in plain and "out.weight" not in plain


def test_no_decay_pattern_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="'LayerNrom' matches no trained parameter"):
        HiFTOptimizer(MLPStack(), "adamw", no_decay=["bias", "LayerNrom"])


# --------------------------------------------------------------------------------------- 5. longer schedule
@pytest.mark.parametrize("kind", ["cycle", "transformers"])
def test_resume_with_more_steps_follows_the_new_schedule(tmp_path, kind):
    """A finished run (LR at 0) extended to twice its length resumes half-way along the new schedule, with the
    LR that implies set at once (not at the next cycle boundary)."""
    def build(model, factor):
        opt = HiFTOptimizer(model, "adamw", lr=1e-2)
        total = factor * opt.num_groups
        return opt, (opt.cycle_scheduler("cosine", total_steps=total) if kind == "cycle"
                     else opt.transformers_scheduler("linear", total_steps=total))

    model = tiny_llama()
    opt, sched = build(model, 2)
    for _ in range(2 * opt.num_groups):
        model(**lm_batch()).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert opt.param_groups[0]["lr"] == 0.0
    ckpt.save_checkpoint(tmp_path, model, opt, sched)
    model2 = tiny_llama()
    opt2, sched2 = build(model2, 4)
    ckpt.load_checkpoint(tmp_path, model2, opt2, sched2)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5e-2)  # half-way along the new cosine / linear
    assert sched2.get_last_lr() == [pytest.approx(0.5e-2)] * len(opt2.param_groups)


# --------------------------------------------------------------------------------------- 6. float64
def test_float64_parameters_fused_refused_at_construction_generic_works():
    model = _two_linears().double()
    with pytest.raises(LayoutError, match="float64.*optimizer=torch.optim.AdamW"):
        HiFTOptimizer(model, "adamw", groups=[[".*"]])
    assert all(p.requires_grad for p in model.parameters())  # the refusal changed nothing
    ref = twin(model)
    opt = HiFTOptimizer(model, torch.optim.AdamW, lr=0.1, groups=[[".*"]], no_decay=[], max_grad_norm=0.5)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    for _ in range(3):
        for m, o in ((model, opt), (ref, torch_opt)):
            _loss(m, True).backward()
            if o is torch_opt:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            o.step()
            o.zero_grad()
    assert params_equal(model, ref)


# --------------------------------------------------------------------------------------- 7. fused/capturable generic (GPU)
@pytest.mark.cuda
@pytest.mark.parametrize("flag", ["fused", "capturable"])
def test_generic_torch_adamw_fused_or_capturable_on_cuda(flag):
    base = tiny_llama(device="cuda")
    model, ref = twin(base), twin(base)
    opt = HiFTOptimizer(model, torch.optim.AdamW, lr=1e-3, groups=[[".*embed.*"], [".*layers.*", ".*norm.*", "lm_head.*"]],
                        **{flag: True})
    for step in range(2 * opt.num_groups + 1):
        model(**lm_batch(seed=step, device="cuda")).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    assert not params_equal(model, ref)


# --------------------------------------------------------------------------------------- 8/9. checkpoints on disk
def _trained(steps=2):
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2)
    for _ in range(steps):
        model(**lm_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_resaving_a_step_never_hides_the_only_good_copy(tmp_path, monkeypatch):
    model, opt = _trained()
    first = ckpt.save_checkpoint(tmp_path, model, opt, step=5)
    real_rename = os.rename

    def rename_then_die(src, dst):
        real_rename(src, dst)
        raise KeyboardInterrupt("killed right after the rename")

    monkeypatch.setattr(ckpt.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, model, opt, step=5)
    monkeypatch.setattr(ckpt.os, "rename", real_rename)
    latest = ckpt.latest_checkpoint(tmp_path, verify=True)
    assert latest is not None and json.loads((latest / "manifest.json").read_text())["step"] == 5
    again = ckpt.save_checkpoint(tmp_path, model, opt, step=5)  # a clean re-save replaces both older copies
    assert ckpt.list_checkpoints(tmp_path) == [again] and first.name != again.name or again.exists()
    assert ckpt.latest_checkpoint(tmp_path) == again


def test_keep_last_prunes_by_recency_after_a_rollback(tmp_path):
    model, opt = _trained()
    for step in (10, 20):
        ckpt.save_checkpoint(tmp_path, model, opt, step=step)
    for step in (12, 14):  # rolled back to 10, the run goes on
        ckpt.save_checkpoint(tmp_path, model, opt, step=step, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000012", "ckpt-00000014"]
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt-00000014"


def test_bad_step_or_keep_last_is_refused_before_writing(tmp_path):
    model, opt = _trained(1)
    with pytest.raises(ConfigError, match="keep_last"):
        ckpt.save_checkpoint(tmp_path, model, opt, keep_last=0)
    with pytest.raises(ConfigError, match="step must be an integer >= 0"):
        ckpt.save_checkpoint(tmp_path, model, opt, step=-1)
    assert not any(tmp_path.iterdir())


def test_any_change_of_the_manifest_is_caught(tmp_path):
    model, opt = _trained(1)
    path = ckpt.save_checkpoint(tmp_path, model, opt)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["step"] = 4  # still valid JSON, still every file's right size and checksum
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest's own checksum"):
        ckpt.verify_checkpoint(path)


# --------------------------------------------------------------------------------------- 10. refused loads
def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], json.dumps(
        {k: v for k, v in opt.state_dict()["hift"].items()}, default=str), [dict(g, params=None) for g in opt.param_groups]


def _unchanged(model, opt, snap):
    params, meta, groups = snap
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    assert json.dumps({k: v for k, v in opt.state_dict()["hift"].items()}, default=str) == meta
    assert [dict(g, params=None) for g in opt.param_groups] == groups


def test_refused_checkpoint_loads_change_nothing(tmp_path):
    model, opt = _trained(3)
    no_sched = ckpt.save_checkpoint(tmp_path / "a", model, opt)
    model2, opt2 = _trained(1)
    sched2 = opt2.cycle_scheduler("cosine", total_steps=10)
    snap = _snapshot(model2, opt2)
    with pytest.raises(CheckpointError, match="saved without a scheduler"):
        ckpt.load_checkpoint(no_sched, model2, opt2, sched2)
    _unchanged(model2, opt2, snap)
    big = tiny_llama(vocab=80)
    big_opt = HiFTOptimizer(big, "adamw", lr=1e-2)
    snap = _snapshot(big, big_opt)
    with pytest.raises(CheckpointError, match="does not match this model"):
        ckpt.load_checkpoint(no_sched, big, big_opt)
    _unchanged(big, big_opt, snap)


def test_refused_state_dict_load_changes_nothing():
    model, opt = _trained(2)
    saved = opt.state_dict()
    model2 = tiny_llama()
    opt2 = HiFTOptimizer(model2, "adamw", lr=1e-3, amsgrad=True)
    model2(**lm_batch()).loss.backward()
    opt2.step()
    opt2.zero_grad()
    snap = _snapshot(model2, opt2)
    with pytest.raises(ConfigError, match="amsgrad"):
        opt2.load_state_dict(saved)
    _unchanged(model2, opt2, snap)
    broken = {**saved, "state": {**saved["state"], 0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}}}
    with pytest.raises(ConfigError, match="exp_avg of 'model.embed_tokens.weight' has shape"):
        HiFTOptimizer(model, "adamw", lr=1e-2).load_state_dict(broken)
    _unchanged(model2, opt2, snap)
    model2(**lm_batch()).loss.backward()
    opt2.step()  # still usable


# --------------------------------------------------------------------------------------- 16. smaller ones
def test_reduce_lr_on_plateau_and_closure_optimizers_are_refused_up_front():
    opt = HiFTOptimizer(tiny_llama(), "adamw")
    with pytest.raises(ConfigError, match="reduce_lr_on_plateau"):
        opt.transformers_scheduler("reduce_lr_on_plateau", 10)
    with pytest.raises(ConfigError, match="requires a closure"):
        HiFTOptimizer(tiny_llama(), torch.optim.LBFGS)


def test_config_round_trips_with_an_optimizer_class():
    cfg = HiFTConfig(optimizer=torch.optim.RMSprop, lr=1e-3)
    assert HiFTConfig.from_dict(cfg.to_dict()).optimizer is torch.optim.RMSprop
    with pytest.raises(ConfigError, match="cannot import"):
        HiFTConfig(optimizer="nowhere.Nothing")


def test_lr_zero_and_oversized_groups_warn():
    with pytest.warns(UserWarning, match="lr=0"):
        HiFTConfig(lr=0.0)
    with pytest.warns(UserWarning, match="larger than the 5 units"):
        HiFTOptimizer(tiny_llama(), "adamw", layers_per_group=9)


def test_torch_state_dict_of_an_opt_model_loads_by_parameter():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16)
    ref = OPTForCausalLM(cfg)
    model = twin(ref)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 8))
    ref(input_ids=ids, labels=ids).loss.backward()
    torch_opt.step()
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, no_decay=[])  # the final norm moves to the head unit
    with pytest.raises(ConfigError, match="load_torch_state_dict"):
        opt.load_state_dict(torch_opt.state_dict())
    opt.load_torch_state_dict(torch_opt.state_dict(), list(model.parameters()))  # ref's order, model's tensors
    got = opt.state_dict()["state"]
    index = {id(p): i for i, p in enumerate(opt.param_groups[0]["params"])}
    for p_ref, p in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(got[index[id(p)]]["exp_avg"], torch_opt.state[p_ref]["exp_avg"], rtol=0, atol=0)


# --------------------------------------------------------------------------------------- found in review
def test_grad_is_none_until_a_gradient_arrives_and_in_place_writes_are_applied():
    ref = _two_linears()
    model = twin(ref)
    opt = HiFTOptimizer(model, "sgd", lr=0.1, groups=[[".*"]], no_decay=[])
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    assert all(p.grad is None for p in model.parameters())
    for m, o in ((model, opt), (ref, torch_opt)):
        for p in m.parameters():  # the usual idiom: assign when None, else accumulate in place
            g = torch.ones_like(p)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        o.step()
    assert params_equal(model, ref) and not params_equal(model, _two_linears())


def test_zero_grad_clears_writes_made_outside_backward():
    ref = _two_linears()
    model = twin(ref)
    opt = HiFTOptimizer(model, "sgd", lr=0.1, groups=[[".*"]], no_decay=[])
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for m, o in ((model, opt), (ref, torch_opt)):
        m[0].weight.grad = torch.full((2, 2), 100.0)
        o.zero_grad()
        _loss(m, True).backward()
        o.step()
    assert params_equal(model, ref)


def test_zero_grad_without_set_to_none_keeps_zero_gradients_as_torch():
    ref = _two_linears()
    model = twin(ref)
    opt = HiFTOptimizer(model, "adamw", lr=0.1, groups=[[".*"]], no_decay=[])
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    for step in range(3):
        for m, o in ((model, opt), (ref, torch_opt)):
            _loss(m, step == 0).backward()  # the second layer gets no gradient after the first step
            o.step()
            o.zero_grad(set_to_none=False)  # ...but keeps a zero one, so AdamW still moves it
        assert params_equal(model, ref), f"step {step}"


def test_a_load_refused_late_leaves_position_and_wiring_intact():
    model = MLPStack(depth=2)
    opt = HiFTOptimizer(model, "adamw", lr=1e-2)
    mlp = __import__("tests.helpers", fromlist=["mlp_loss"]).mlp_loss
    mlp(model, 0).backward()
    opt.step()
    opt.zero_grad()
    saved = opt.state_dict()
    other = MLPStack(depth=2)
    opt2 = HiFTOptimizer(other, "adamw", lr=1e-2)
    bad = {**saved, "hift": {**saved["hift"], "global_step": "four"}}
    with pytest.raises(ConfigError, match="invalid saved position"):
        opt2.load_state_dict(bad)
    bad_step = {**saved, "state": {k: {**v, "step": torch.tensor(-1.0)} for k, v in saved["state"].items()}}
    with pytest.raises(ConfigError, match="not a finite count"):
        opt2.load_state_dict(bad_step)
    bad_betas = {**saved, "param_groups": [{**g, "betas": [0.9]} for g in saved["param_groups"]]}
    with pytest.raises(ConfigError, match="betas"):
        opt2.load_state_dict(bad_betas)
    assert opt2.global_step == 0 and opt2.active_group == 0 and opt2.param_groups[0]["lr"] == 1e-2
    active = set(opt2.layouts[opt2.active_group].names)
    assert {n for n, p in other.named_parameters() if p.requires_grad} == active


def test_a_replaced_optimizer_refuses_loads_and_zero_grad():
    model = _two_linears()
    o1 = HiFTOptimizer(model, "adamw", groups=[["0"], ["1"]])
    saved = o1.state_dict()
    with pytest.warns(UserWarning, match="still attached"):
        o2 = HiFTOptimizer(model, "adamw", groups=[["0"], ["1"]])
    for call in (lambda: o1.load_state_dict(saved), o1.zero_grad):
        with pytest.raises(ConfigError, match="replaced by a newer one"):
            call()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.weight"] and o2.active_group == 0


def test_a_state_dict_of_another_optimizer_type_is_refused():
    model = _two_linears()
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    _loss(model, True).backward()
    sgd.step()
    opt = HiFTOptimizer(twin(model), "adamw", lr=1e-2, groups=[[".*"]], no_decay=[])
    with pytest.raises(ConfigError, match="saved by another optimizer"):
        opt.load_state_dict(sgd.state_dict())
    assert opt.param_groups[0]["lr"] == 1e-2
    rms_model = _two_linears()
    rms = HiFTOptimizer(rms_model, torch.optim.RMSprop, lr=1e-2, groups=[[".*"]], no_decay=[])
    broken = {"state": {0: {"step": torch.tensor(1.0), "square_avg": torch.zeros(3)}},
              "param_groups": [dict(rms.state_dict()["param_groups"][0])]}
    with pytest.raises(ConfigError, match="square_avg of '0.weight' has shape"):
        rms.load_state_dict(broken)


def test_generic_state_dict_loads_into_plain_torch():
    model = _two_linears()
    opt = HiFTOptimizer(model, torch.optim.RMSprop, lr=1e-2, groups=[[".*"]], no_decay=[])
    _loss(model, True).backward()
    opt.step()
    copy = twin(model)
    plain = torch.optim.RMSprop(copy.parameters())
    plain.load_state_dict(opt.state_dict())
    assert plain.param_groups[0]["alpha"] == 0.99 and plain.param_groups[0]["lr"] == 1e-2
    _loss(copy, True).backward()
    plain.step()  # raised KeyError('alpha') when param_groups held only the options the user passed


def test_checkpoint_with_fewer_groups_is_named_as_a_layout_difference(tmp_path):
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", layers_per_group=2)
    ckpt.save_checkpoint(tmp_path, model, opt)
    model2 = tiny_llama()
    with pytest.raises(CheckpointError, match="group layout differs"):
        ckpt.load_checkpoint(tmp_path, model2, HiFTOptimizer(model2, "adamw"))


@pytest.mark.parametrize("store", ["torch", "resident"])
def test_a_closed_optimizer_cannot_be_saved(store, tmp_path):
    """close() frees the state store: a checkpoint of it afterwards wrote freed memory as the moments (torch
    store) or kept the step counts without the moments (resident). Refused like step() and zero_grad()."""
    from hift_engine import save_checkpoint

    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-3, state_store=store)
    model(**lm_batch()).loss.backward()
    opt.step()
    opt.close()
    with pytest.raises(ConfigError, match="closed"):
        save_checkpoint(tmp_path / "ckpt", model, opt)
    with pytest.raises(ConfigError, match="closed"):
        opt.state_dict()
    assert not [p for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith(".")]
