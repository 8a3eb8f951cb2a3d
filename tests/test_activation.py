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
