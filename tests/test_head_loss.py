"""The chunked LM head + cross-entropy: the same loss and gradients as the plain head, without full logits."""

import pytest
import torch

from hift_engine import ConfigError, HiFTOptimizer
from hift_engine.head_loss import causal_lm_loss, linear_cross_entropy
from tests.helpers import lm_batch, tiny_llama, twin


@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
def test_matches_cross_entropy_of_the_full_logits_in_float64(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[::4] = -100
    loss = linear_cross_entropy(hidden, weight, labels, chunk)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)  # the loss is accumulated in fp32
    gh, gw = torch.autograd.grad(loss, [hidden, weight])
    rh, rw = torch.autograd.grad(ref, [hidden, weight])
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-7)


def test_causal_lm_loss_equals_the_models_own_loss_and_gradients():
    model = tiny_llama()
    ref = twin(model)
    batch = lm_batch(seq=20)
    batch["labels"] = batch["labels"].clone()
    batch["labels"][:, :5] = -100  # a prompt without loss
    loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], chunk_tokens=7)
    expected = ref(**batch).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_under_hift_only_the_active_group_gets_gradients():
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-3)
    for _ in range(opt.num_groups):
        active = set(opt.layouts[opt.active_group].names)
        batch = lm_batch()
        causal_lm_loss(model, batch["input_ids"], batch["labels"], chunk_tokens=16).backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == active
        opt.step()
        opt.zero_grad()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"hidden \[N, H\]"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="chunk_tokens"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), 0)


def test_hift_train_with_a_chunked_head_matches_the_plain_loss(tmp_path):
    from hift_engine.recipe import load_run_config, train

    runs = {}
    for chunk in ("0", "16"):
        cfg = load_run_config(None, {"steps": "4", "batch_size": "4", "output_dir": str(tmp_path / chunk), "plot": "false",
                                     "head_chunk_tokens": chunk, "log_every": "1"})
        runs[chunk] = train(cfg, progress=False)
    assert runs["16"]["first_loss"] == pytest.approx(runs["0"]["first_loss"], rel=1e-5)
    assert runs["16"]["last_loss"] == pytest.approx(runs["0"]["last_loss"], rel=1e-3)
    with pytest.raises(ConfigError, match="head_chunk_tokens"):
        load_run_config(None, {"head_chunk_tokens": "-1"})


def test_models_that_transform_their_logits_are_refused():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0  # as Gemma 2 (Cohere: logit_scale, Granite: logits_scaling)
    batch = lm_batch()
    with pytest.raises(ConfigError, match="transforms its logits"):
        causal_lm_loss(model, batch["input_ids"], batch["labels"])


def test_autocast_does_not_bias_the_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(64, 32, generator=g) * 4).requires_grad_()
    weight = torch.randn(100, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, 16)
    gw = torch.autograd.grad(loss, weight)[0]
    ref = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().t(), labels)
    rw = torch.autograd.grad(ref, [weight])[0]
    torch.testing.assert_close(gw.double(), rw.double(), rtol=1e-4, atol=1e-6)  # autocast off inside: fp32 throughout
