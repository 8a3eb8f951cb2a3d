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


@pytest.mark.parametrize("offload", [False, True])
def test_same_gradients_for_every_active_group_and_less_saved_above_it(offload):
    """Also with the recomputed blocks' inputs offloaded to host memory (activation_offload)."""
    base = tiny_llama(layers=4)
    plain, ckpt = twin(base), twin(base)
    o_plain = HiFTOptimizer(plain, "adamw", lr=1e-3, seed=1, strategy="random")
    o_ckpt = HiFTOptimizer(ckpt, "adamw", lr=1e-3, seed=1, strategy="random", activation_checkpointing="always",
                           activation_offload=offload)
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
    with pytest.raises(ConfigError, match="activation_offload .* needs activation_checkpointing='always' or 'auto'"):
        HiFTConfig(activation_offload=True)
    with pytest.raises(ConfigError, match="sizes itself by the CUDA allocator"):
        HiFTOptimizer(tiny_llama(), "adamw", activation_checkpointing="auto")  # CPU parameters
    with pytest.raises(ConfigError, match="set one of them to 'auto' or drop memory_budget_gib"):
        HiFTConfig(activation_checkpointing="always", memory_budget_gib=20)
    for bad in (0, -1.0, float("inf"), "20", True):
        with pytest.raises(ConfigError, match="memory_budget_gib must be a positive number"):
            HiFTConfig(activation_checkpointing="auto", memory_budget_gib=bad)
    with pytest.raises(ConfigError, match="explicit groups"):
        HiFTOptimizer(tiny_llama(), "adamw", groups=[[".*"]], activation_checkpointing="always")


def test_a_deep_copy_runs_its_own_weights_and_gives_the_original_no_gradients():
    import copy

    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", activation_checkpointing="always")  # kept: a collected one unwraps
    clone = copy.deepcopy(model)
    assert "forward" in clone.model.layers[2].__dict__ and opt.recomputed_blocks == 0
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


class _FakeAllocator:
    """Stands in for torch.cuda.memory_allocated on the CPU: every block that autograd records and that runs
    without checkpointing keeps ``per_element`` bytes per element of its input until the step ends."""

    def __init__(self, blocks, per_element, recompute):
        self.bytes, self.per_element, self.recompute = 0, per_element, recompute
        for block in blocks:
            block.register_forward_pre_hook(self._pre)
            block.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._count = self.recompute.recomputed

    def _post(self, module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        if out.requires_grad and self.recompute.recomputed == self._count:  # stored, not checkpointed
            self.bytes += self.per_element * args[0].numel()

    def __call__(self):
        return self.bytes


def test_auto_recomputes_the_lowest_blocks_only_when_the_rest_would_not_fit():
    """'auto' on a budget: nothing recomputed while everything fits; under a budget that holds n stored blocks,
    the lowest blocks above the active group are recomputed and the top n stored, and the gradients equal
    plain training for every active group."""
    from hift_engine.activation import MemoryBudget

    layers = 6
    base = tiny_llama(layers=layers)
    plain, auto = twin(base), twin(base)
    o_plain = HiFTOptimizer(plain, "adamw", lr=1e-3, seed=3, strategy="random")
    o_auto = HiFTOptimizer(auto, "adamw", lr=1e-3, seed=3, strategy="random", activation_checkpointing="always")
    fake = _FakeAllocator(auto.model.layers, 4, o_auto._recompute)
    batch0 = lm_batch(seed=0)
    x_numel = batch0["input_ids"].numel() * auto.config.hidden_size
    block = 4 * x_numel
    for budget_blocks in (100, 5, 2):
        budget = MemoryBudget(budget_blocks * block, fake, margin_bytes=0)
        budget.bytes_per_element = 4.0  # as measured (the first measurement is tested on the device)
        o_auto._recompute.budget = budget
        for step in range(o_plain.num_groups):
            batch = lm_batch(seed=step)
            fake.bytes = 0
            before = o_auto._recompute.recomputed
            lp, la = plain(**batch).loss, auto(**batch).loss
            assert torch.equal(lp, la)
            lp.backward()
            la.backward()
            for (n, p), q in zip(plain.named_parameters(), auto.parameters()):
                if p.grad is not None:
                    assert torch.equal(p.grad, q.grad), (budget_blocks, step, n)
            rc = o_auto._recompute
            above = sum(1 for pos in rc._positions if pos > rc.above)
            active = int(rc.above in rc._positions)  # the active group is a block: its activations count too
            stored = min(above, max(0, budget_blocks - 2 - active))  # 2: MemoryBudget's reserve_blocks
            assert rc.recomputed - before == above - stored, (budget_blocks, step)
            o_plain.step(), o_auto.step()
            o_plain.zero_grad(), o_auto.zero_grad()


def test_auto_recomputes_everything_above_until_a_block_was_measured():
    from hift_engine.activation import MemoryBudget

    budget = MemoryBudget(1 << 40, lambda: 0)
    x = torch.zeros(8, 16)
    assert not budget.fits(x, 1)  # nothing measured: recompute (the safe choice)
    budget.observe(-1000, x)  # a stored block kept 1000 bytes for 128 input elements
    assert budget.bytes_per_element == 1000 / 128 and budget.fits(x, 1)
    budget.observe(-10, x)  # a smaller block does not lower the estimate
    assert budget.bytes_per_element == 1000 / 128


def test_auto_decides_frozen_blocks_by_what_a_frozen_block_keeps_once_one_was_measured():
    """Frozen blocks keep less than active ones (no saved inputs for weight gradients): estimating them by the
    active block's size recomputed blocks that fit. Until a frozen block is measured the active estimate (an
    upper bound) decides; afterwards the frozen one does, for frozen blocks only."""
    from hift_engine.activation import MemoryBudget

    x = torch.zeros(8, 16)  # 128 elements
    budget = MemoryBudget(10 * 1000, lambda: 0, margin_bytes=0)  # room for 10 blocks of 1000 bytes
    budget.observe(-1000, x)  # an active block kept 1000 bytes
    assert not budget.fits(x, 9, frozen=True)  # 9 + 2 reserve blocks of the active size: 11000 > 10000
    budget.observe(-400, x, frozen=True)  # a frozen block kept 400
    assert budget.fits(x, 9, frozen=True)  # (9 + 2) x 400 = 4400
    assert not budget.fits(x, 9)  # the active group's blocks still use the active estimate
    assert budget.bytes_per_element == 1000 / 128


def _cuda_llama(layers=8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).cuda()
    model.config.use_cache = False
    return model


@pytest.mark.cuda
def test_auto_on_cuda_keeps_its_budget_and_recomputes_nothing_when_everything_fits(cuda_device):
    """On the device, with the real allocator: under a budget half-way between the weights and plain training's
    peak, 'auto' recomputes some blocks and stays inside it with the same losses; with the device's whole
    memory it recomputes nothing once a block was measured."""
    batches = [lm_batch(vocab=1024, batch=4, seq=1024, seed=s, device=cuda_device) for s in range(3)]
    base = _cuda_llama()
    plain = twin(base)
    o_plain = HiFTOptimizer(plain, "adamw", lr=1e-4, strategy="bottom2up")
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    losses = []
    for b in batches:  # the bottom groups: the most blocks above the active one
        loss = plain(**b).loss
        loss.backward()
        o_plain.step(), o_plain.zero_grad()
        losses.append(loss.item())
    peak_plain = torch.cuda.max_memory_allocated()
    o_plain.close()
    del plain, o_plain
    torch.cuda.empty_cache()

    auto = twin(base)
    budget = start + (512 << 20) + (peak_plain - start) // 2  # 512 MiB: MemoryBudget's smallest margin
    o_auto = HiFTOptimizer(auto, "adamw", lr=1e-4, strategy="bottom2up", activation_checkpointing="auto",
                           memory_budget_gib=budget / 2**30)
    o_auto._recompute.budget.margin_bytes = 512 << 20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for b, want in zip(batches, losses):
        loss = auto(**b).loss
        loss.backward()
        o_auto.step(), o_auto.zero_grad()
        assert loss.item() == pytest.approx(want, rel=1e-5)  # attention backward may sum in another order
    assert torch.cuda.max_memory_allocated() <= budget < peak_plain
    assert o_auto._recompute.recomputed > 0
    o_auto.close()

    roomy_model = twin(base)
    roomy = HiFTOptimizer(roomy_model, "adamw", strategy="bottom2up", activation_checkpointing="auto")  # the device's
    for cycle in range(2):
        before = roomy._recompute.recomputed
        for step in range(roomy.num_groups):
            roomy_model(**batches[step % 3]).loss.backward()
            roomy.step(), roomy.zero_grad()
        if cycle == 1:  # the first step (nothing measured yet) may recompute; after that everything fits
            assert roomy._recompute.recomputed == before
    roomy.close()


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=64, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)  # use_cache on by default


@pytest.mark.parametrize("offload", [False, True])
def test_recomputed_gpt2_blocks_drop_their_positional_kv_cache(offload):
    """GPT-2 passes its KV cache to each block positionally: a recomputed block must not append to it again
    (with offload the gradients were wrong, 0.046 off)."""
    base = _tiny_gpt2()
    plain, ckpt = twin(base), twin(base)
    o_plain = HiFTOptimizer(plain, "adamw", lr=1e-3, strategy="bottom2up")
    o_ckpt = HiFTOptimizer(ckpt, "adamw", lr=1e-3, strategy="bottom2up", activation_checkpointing="always",
                           activation_offload=offload)
    batch = lm_batch()
    plain(**batch).loss.backward()
    ckpt(**batch).loss.backward()
    assert o_plain.active_group == 0 and o_ckpt.recomputed_blocks == 4
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n


def test_offloaded_blocks_free_their_device_inputs_and_keep_autocast():
    """The input of an offloaded block is not kept alive after forward (only its host copy; the blocks are
    called in a chain here, as a decoder calls them), backward recomputes under forward's autocast (bf16 on the
    CPU here: the same gradients as plain checkpointing), and a second backward through the graph is a clear
    error."""
    import gc
    import weakref

    base = tiny_llama(layers=4)
    ref, off = twin(base), twin(base)
    o_ref = HiFTOptimizer(ref, "adamw", strategy="bottom2up", activation_checkpointing="always")
    o_off = HiFTOptimizer(off, "adamw", strategy="bottom2up", activation_checkpointing="always", activation_offload=True)
    batch = lm_batch()
    pos = torch.arange(batch["input_ids"].shape[1])[None]

    def chain(model, keep):
        h = model.model.embed_tokens(batch["input_ids"])
        rope = model.model.rotary_emb(h, pos)
        for layer in model.model.layers:
            h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=pos)
            keep.append(weakref.ref(h))
        return h.float().pow(2).mean()

    kept_ref, kept_off = [], []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, loss_off = chain(ref, kept_ref), chain(off, kept_off)
    gc.collect()
    assert all(w() is None for w in kept_off[:-1])  # every block input gone from the device; host copies remain
    assert all(w() is not None for w in kept_ref[:-1])  # checkpointing keeps them (as the blocks' inputs)
    assert torch.equal(loss_ref, loss_off) and o_ref.recomputed_blocks == o_off.recomputed_blocks == 4
    loss_ref.backward()
    loss_off.backward(retain_graph=True)
    for (n, p), q in zip(ref.named_parameters(), off.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n
    with pytest.raises(RuntimeError, match="second backward"):
        loss_off.backward()


# ---------------------------------------------------------------------------------------- checkpoint_active
def _unit_spans(opt):
    """(first, last) unit position of every group, from the grouping (not from the optimizer's own table)."""
    position = {u.name: i for i, u in enumerate(opt.grouping.units)}
    return [(min(position[u] for u in g.units), max(position[u] for u in g.units)) for g in opt.grouping.groups]


def _count_accumulations(params):
    """A post-accumulate-grad hook per parameter (after the engine's): how often each saw a gradient land."""
    counts = {p: 0 for p in params}

    def hook(p):
        counts[p] += 1

    return counts, [p.register_post_accumulate_grad_hook(hook) for p in params]


@pytest.mark.parametrize("layers_per_group", [1, 2])
@pytest.mark.parametrize("offload", [False, True])
def test_checkpoint_active_recomputes_the_active_blocks_with_the_same_gradients_and_weights(offload, layers_per_group,
                                                                                           monkeypatch):
    """For every active-group position: the loss and every gradient equal plain training's; exactly the blocks
    from the active group's first unit upward are recomputed (without the option: only those above its last
    unit); each active parameter's gradient lands once, in the engine's gradient arena; after two cycles of
    steps the weights equal plain training's. With offload every recomputed block takes the offloaded path,
    including the lowest active block whose input needs no gradient (embedding frozen)."""
    from hift_engine import activation

    offloaded = [0]
    apply = activation._OffloadedBlock.apply
    monkeypatch.setattr(activation._OffloadedBlock, "apply", lambda *a: offloaded.__setitem__(0, offloaded[0] + 1) or apply(*a))
    base = tiny_llama(layers=4)
    plain, active, above = twin(base), twin(base), twin(base)
    common = dict(lr=1e-3, seed=1, strategy="random", layers_per_group=layers_per_group)
    o_plain = HiFTOptimizer(plain, "adamw", **common)
    o_active = HiFTOptimizer(active, "adamw", activation_checkpointing="always", activation_offload=offload,
                             checkpoint_active=True, **common)
    o_above = HiFTOptimizer(above, "adamw", activation_checkpointing="always", activation_offload=offload, **common)
    blocks = o_active._recompute._positions
    spans = _unit_spans(o_active)
    for step in range(2 * o_plain.num_groups):
        batch = lm_batch(seed=step)
        first, last = spans[o_active.active_group]
        before_active, before_above, before_off = o_active.recomputed_blocks, o_above.recomputed_blocks, offloaded[0]
        trained = o_active.layouts[o_active.active_group].params
        counts, handles = _count_accumulations(trained)
        lp, la, lb = plain(**batch).loss, active(**batch).loss, above(**batch).loss
        assert torch.equal(lp, la) and torch.equal(lp, lb)
        lp.backward(), la.backward(), lb.backward()
        for h in handles:
            h.remove()
        assert o_active.recomputed_blocks - before_active == sum(pos >= first for pos in blocks), step
        assert o_above.recomputed_blocks - before_above == sum(pos > last for pos in blocks), step
        if offload:
            recomputed = o_active.recomputed_blocks - before_active + o_above.recomputed_blocks - before_above
            assert offloaded[0] - before_off == recomputed, step
        views = o_active._grad_views[o_active.active_group]
        for i, p in enumerate(trained):  # once each, and in the arena (the engine's hook saw it)
            assert counts[p] == 1 and p.grad.data_ptr() == views[i].data_ptr(), (step, i)
        for (n, p), q in zip(plain.named_parameters(), active.parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad), (step, n)
        for o in (o_plain, o_active, o_above):
            o.step(), o.zero_grad()
    for (n, p), q in zip(plain.named_parameters(), active.parameters()):
        assert torch.equal(p, q), n
    o_active.close()
    assert all("forward" not in m.__dict__ for m in active.modules())


def test_checkpoint_active_accumulates_micro_batches_in_place():
    """Two backwards before a step (gradient accumulation): the recompute's gradients add up in the arena as
    plain training's do."""
    base = tiny_llama(layers=3)
    plain, active = twin(base), twin(base)
    o_plain = HiFTOptimizer(plain, "adamw", lr=1e-3, strategy="bottom2up")
    o_active = HiFTOptimizer(active, "adamw", lr=1e-3, strategy="bottom2up", activation_checkpointing="always",
                             checkpoint_active=True, activation_offload=True)
    for step in range(o_plain.num_groups):
        for micro in range(2):
            batch = lm_batch(seed=10 * step + micro)
            plain(**batch).loss.backward()
            active(**batch).loss.backward()
        for (n, p), q in zip(plain.named_parameters(), active.parameters()):
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad), (step, n)
        o_plain.step(), o_active.step()
        o_plain.zero_grad(), o_active.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), active.parameters()))


def test_checkpoint_active_needs_checkpointing():
    with pytest.raises(ConfigError, match="checkpoint_active .* needs activation_checkpointing='always' or 'auto'"):
        HiFTConfig(checkpoint_active=True)
    with pytest.raises(ConfigError, match="checkpoint_active must be true or false"):
        HiFTConfig(activation_checkpointing="always", checkpoint_active="yes")
    assert HiFTConfig(activation_checkpointing="auto", checkpoint_active=True).checkpoint_active


# ---------------------------------------------------------------------------------------- mlp_chunk_tokens
def _gpt2(dropout=0.0, layers=3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=64, n_positions=64, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False)
    return GPT2LMHeadModel(cfg)


_TILED_SETUPS = {
    "alone": {},
    "always+active": dict(activation_checkpointing="always", checkpoint_active=True),
    "always+active+offload": dict(activation_checkpointing="always", checkpoint_active=True, activation_offload=True),
}


def _assert_grads_close(plain, tiled, what):
    """Chunked weight gradients are sums over chunks: equal to plain training's up to fp32 summation order (an
    element near zero may differ relatively more: the absolute tolerance is relative to the tensor's scale)."""
    for (n, p), q in zip(plain.named_parameters(), tiled.parameters()):
        assert (p.grad is None) == (q.grad is None), (what, n)
        if p.grad is not None:
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what} {n}: {m}")


@pytest.mark.parametrize("chunk", [5, 64])  # 12 tokens: 5 + 5 + 2, and one chunk longer than the sequence
@pytest.mark.parametrize("setup", list(_TILED_SETUPS))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiled_mlp_gives_plain_training_gradients_and_weights(family, setup, chunk):
    """For every active-group position, alone and inside checkpointing of the active group and the blocks
    above it (with and without offload): the loss and gradients of plain training; after a cycle and a half
    of optimizer steps, its weights. The blocks' MLPs really ran in chunks (ceil(12 / chunk) per block).
    SGD, not AdamW: Adam divides by the gradient's own magnitude, so the last-bit differences of near-zero
    gradient elements (summation order) would become lr-sized weight differences and the next steps'
    comparison would be between different weights."""
    base = tiny_llama(layers=3) if family == "llama" else _gpt2()
    plain, tiled = twin(base), twin(base)
    o_plain = HiFTOptimizer(plain, "sgd", lr=0.1, seed=2, strategy="random")
    o_tiled = HiFTOptimizer(tiled, "sgd", lr=0.1, seed=2, strategy="random", mlp_chunk_tokens=chunk,
                            **_TILED_SETUPS[setup])
    for step in range(3 * o_plain.num_groups // 2):
        batch = lm_batch(seed=step)
        runs = o_tiled.mlp_chunk_runs
        lp, lt = plain(**batch).loss, tiled(**batch).loss
        assert o_tiled.mlp_chunk_runs - runs == 3 * -(-12 // chunk)  # the forward alone, before any recompute
        torch.testing.assert_close(lt, lp, rtol=1e-6, atol=0)
        lp.backward(), lt.backward()
        _assert_grads_close(plain, tiled, (setup, step))
        o_plain.step(), o_tiled.step()
        o_plain.zero_grad(), o_tiled.zero_grad()
    for (n, p), q in zip(plain.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    o_tiled.close()
    assert all("forward" not in m.__dict__ for m in tiled.modules())  # blocks and MLPs given back unwrapped


def _plain_chunks(model, chunk):
    """The reference for dropout: the same chunks run one after the other without checkpointing, so the forward
    draws the same dropout masks in the same order as the tiled MLP; the backward uses the stored masks."""
    import types

    def forward(self, x):
        return torch.cat([type(self).forward(self, c.contiguous()) for c in x.split(chunk, dim=-2)], dim=-2)

    for block in model.transformer.h:
        block.mlp.forward = types.MethodType(forward, block.mlp)


@pytest.mark.parametrize("setup", list(_TILED_SETUPS))
def test_tiled_mlp_recomputes_gpt2_dropout_with_the_forward_masks(setup):
    """GPT-2 drops out inside its MLP: a chunk's recompute must apply the mask its forward drew (checkpoint
    restores the RNG state), or the gradients would differ from the stored-mask reference."""
    base = _gpt2(dropout=0.2)
    ref, tiled = twin(base), twin(base)
    _plain_chunks(ref, 5)
    o_ref = HiFTOptimizer(ref, "sgd", lr=0.1, strategy="bottom2up")  # SGD: see the test above
    o_tiled = HiFTOptimizer(tiled, "sgd", lr=0.1, strategy="bottom2up", mlp_chunk_tokens=5, **_TILED_SETUPS[setup])
    for step in range(o_ref.num_groups - 1):  # every group with a block in it or below it
        batch = lm_batch(seed=step)
        torch.manual_seed(100 + step)
        lr_ = ref(**batch).loss
        torch.manual_seed(100 + step)
        lt = tiled(**batch).loss
        torch.testing.assert_close(lt, lr_, rtol=1e-6, atol=0)
        lr_.backward(), lt.backward()
        _assert_grads_close(ref, tiled, (setup, step))
        o_ref.step(), o_tiled.step()
        o_ref.zero_grad(), o_tiled.zero_grad()


@pytest.mark.parametrize("seq, chunk", [(12, 4), (12, 5), (7, 1), (3, 8)])
def test_tiled_mlp_runs_ceil_seq_over_chunk_chunks_per_block_forward(seq, chunk):
    """Chunking actually happens (with and without autograd recording): ceil(seq / chunk) MLP runs per block,
    on chunks of at most ``chunk`` tokens."""
    model = tiny_llama(layers=3)
    opt = HiFTOptimizer(model, "adamw", mlp_chunk_tokens=chunk)
    seen = []
    for layer in model.model.layers:
        layer.mlp.gate_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2]))
    batch = lm_batch(seq=seq)
    chunks = 3 * -(-seq // chunk)
    loss = model(**batch).loss
    assert opt.mlp_chunk_runs == chunks == len(seen) and max(seen) <= chunk and sum(seen) == 3 * seq
    loss.backward()  # the bottom group is active: every block's chunks are recomputed, chunk by chunk
    assert opt.mlp_chunk_runs == chunks and len(seen) == 2 * chunks and max(seen) <= chunk
    with torch.no_grad():
        model(**batch)
    assert opt.mlp_chunk_runs == 2 * chunks and len(seen) == 3 * chunks


def test_tiled_mlp_refuses_blocks_without_an_mlp_and_leaves_the_model_untouched():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt_model = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                         vocab_size=64, max_position_embeddings=64, word_embed_proj_dim=32))
    with pytest.raises(ConfigError, match=r"OPTDecoderLayer\) has no `mlp` submodule; mlp_chunk_tokens supports "
                                          r"models whose blocks have an `mlp` submodule"):
        HiFTOptimizer(opt_model, "adamw", mlp_chunk_tokens=4)
    assert all(p.requires_grad for p in opt_model.parameters())
    assert all("forward" not in m.__dict__ for m in opt_model.modules())
    with pytest.raises(ConfigError, match="explicit groups"):
        HiFTOptimizer(tiny_llama(), "adamw", groups=[[".*"]], mlp_chunk_tokens=4)
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(ConfigError, match="mlp_chunk_tokens must be an integer >= 0"):
            HiFTConfig(mlp_chunk_tokens=bad)


def test_tiled_mlp_refuses_an_mlp_that_is_not_token_wise():
    from hift_engine.tiled_mlp import TiledMLP

    class Pooling(torch.nn.Module):  # mixes tokens: chunking would change its result
        def forward(self, x):
            return x.mean(dim=-2, keepdim=True)

    mlp = Pooling()
    tiled = TiledMLP([mlp], 4)
    with pytest.raises(ConfigError, match="maps \\(2, 4, 8\\) to \\(2, 1, 8\\); tiling needs a token-wise MLP"):
        mlp(torch.zeros(2, 8, 8))
    with pytest.raises(ConfigError, match="called on the hidden states alone"):
        mlp(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8))
    tiled.remove()
    assert mlp(torch.ones(2, 8, 8)).shape == (2, 1, 8)


def test_a_deep_copy_runs_its_own_tiled_mlps():
    import copy

    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", mlp_chunk_tokens=5)
    clone = copy.deepcopy(model)
    mlp = clone.model.layers[1].mlp
    assert mlp.forward.__self__ is mlp
    with torch.no_grad():
        mlp.down_proj.weight.add_(0.1)
    runs = opt.mlp_chunk_runs
    with torch.no_grad():
        changed = clone(**lm_batch()).logits
        original = model(**lm_batch()).logits
    assert not torch.allclose(changed, original) and opt.mlp_chunk_runs - runs == 2 * 3 * 3


def test_hift_train_passes_the_long_sequence_options_through(tmp_path):
    """`hift train --checkpoint_active true --mlp_chunk_tokens N` reaches the optimizer (same first loss)."""
    from hift_engine.recipe import load_run_config, train

    runs = {}
    for name, extra in {"plain": {}, "tiled": {"activation_checkpointing": "always", "checkpoint_active": "true",
                                               "mlp_chunk_tokens": "16"}}.items():
        cfg = load_run_config(None, {"steps": "3", "batch_size": "4", "output_dir": str(tmp_path / name), "plot": "false",
                                     "log_every": "1", **extra})
        runs[name] = train(cfg, progress=False)
    assert cfg.optimizer.checkpoint_active and cfg.optimizer.mlp_chunk_tokens == 16
    assert runs["tiled"]["first_loss"] == pytest.approx(runs["plain"]["first_loss"], rel=1e-6)
    assert runs["tiled"]["last_loss"] == pytest.approx(runs["plain"]["last_loss"], rel=1e-4)
