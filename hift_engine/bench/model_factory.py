"""LLaMA-2-7B-shaped models for benchmarks: random init built directly on the GPU (no download, seconds).

hidden 4096, 11008 MLP, 32 heads, vocab 32000, fp32; ``layers`` picks the depth (32 = 6.738 B params; fewer
layers keep the width, for runs where baselines such as standard fine-tuning must fit on the card).
``shape="13b"``: LLaMA-2-13B's width (hidden 5120, 13824 MLP, 40 heads; 40 layers = 13.016 B params).
"""

from __future__ import annotations

import torch

__all__ = ["llama7b_config", "build_llama", "random_batch", "LLAMA2_7B_PARAMS"]

LLAMA2_7B_PARAMS = 6_738_415_616


# (hidden, intermediate, heads, default layers) of the LLaMA-2 sizes the benchmarks build
SHAPES = {"7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40)}


def llama7b_config(layers: int = 32, max_positions: int = 4096, shape: str = "7b"):
    from transformers import LlamaConfig

    hidden, inter, heads, _ = SHAPES[shape]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32000,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def build_llama(layers: int = 32, device: str | torch.device = "cuda", seed: int = 0, max_positions: int = 32768,
                dtype: torch.dtype = torch.float32, shape: str = "7b"):
    """A randomly initialised LlamaForCausalLM allocated and initialised on ``device`` in ``dtype`` (built in
    that dtype directly: a bf16 7B never exists in fp32 on the device)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = llama7b_config(layers, max_positions, shape)
    cfg._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return model.train()


def random_batch(batch: int, seq: int, device, seed: int = 0, vocab: int = 32000) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}
