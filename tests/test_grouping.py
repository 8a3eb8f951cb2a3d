"""Units and groups for Hugging Face families, generic ModuleList models, explicit groups and freezing."""

import pytest
from torch import nn

from hift_engine import GroupingError, build_grouping
from tests.helpers import MLPStack, tiny_llama

transformers = pytest.importorskip("transformers")


def _small(family):
    t = transformers
    small = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    if family == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **small))
    if family == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **small))
    if family == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **small))
    if family == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0))
    if family == "opt":
        return t.OPTForCausalLM(t.OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, **small))
    if family == "gpt_neox":
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(hidden_size=32, intermediate_size=64, **small))
    if family == "bert":
        return t.BertForSequenceClassification(t.BertConfig(hidden_size=32, intermediate_size=64, **small))
    if family == "roberta":
        return t.RobertaForMaskedLM(t.RobertaConfig(hidden_size=32, intermediate_size=64, **small))
    raise ValueError(family)


FAMILIES = {
    # family: (an embedding parameter, a head parameter)
    "llama": ("model.embed_tokens.weight", "model.norm.weight"),
    "mistral": ("model.embed_tokens.weight", "lm_head.weight"),
    "qwen2": ("model.embed_tokens.weight", "lm_head.weight"),
    "gpt2": ("transformer.wpe.weight", "transformer.ln_f.weight"),
    "opt": ("model.decoder.embed_positions.weight", "model.decoder.final_layer_norm.weight"),
    "gpt_neox": ("gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.weight"),
    "bert": ("bert.embeddings.word_embeddings.weight", "classifier.weight"),
    "roberta": ("roberta.embeddings.word_embeddings.weight", "lm_head.dense.weight"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_families_are_cut_into_embedding_blocks_head(family):
    model = _small(family)
    g = build_grouping(model, layers_per_group=1)
    names = [u.name for u in g.units]
    assert names[0] == "embedding" and names[-1] == "head" and len(names) == 4, names
    emb, head = FAMILIES[family]
    assert emb in g.units[0].param_names and head in g.units[-1].param_names
    covered = [n for u in g.units for n in u.param_names]
    assert sorted(covered) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    assert len(covered) == len(set(covered))


def test_layers_per_group_chunks_consecutive_units():
    g = build_grouping(tiny_llama(layers=5), layers_per_group=3)  # 7 units -> 3 groups
    assert [len(x.units) for x in g.groups] == [3, 3, 1]
    assert g.groups[0].units == ("embedding", "model.layers.0", "model.layers.1")


def test_generic_module_list_model():
    g = build_grouping(MLPStack(depth=3))
    assert [u.name for u in g.units] == ["embedding", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert g.units[0].param_names == ("embed.weight",)
    assert set(g.units[-1].param_names) == {"norm.weight", "norm.bias", "out.weight", "out.bias"}


def test_explicit_groups_by_name_and_regex():
    g = build_grouping(MLPStack(depth=2), groups=[["embed", "blocks.0"], [r"blocks\.1\..*", "norm", "out"]])
    assert g.num_groups == 2
    assert "blocks.0.1.weight" in g.groups[0].param_names and "out.bias" in g.groups[1].param_names


def test_frozen_at_setup_are_excluded():
    model = MLPStack(depth=2)
    model.embed.weight.requires_grad_(False)
    g = build_grouping(model)
    assert g.frozen == ["embed.weight"] and g.units[0].name == "blocks.0"


def test_no_units_error_says_what_was_searched():
    with pytest.raises(GroupingError, match="single nn.ModuleList of blocks"):
        build_grouping(nn.Sequential(nn.Linear(2, 2)))


def test_layers_per_group_with_explicit_groups_is_refused():
    with pytest.raises(GroupingError, match="leave it at 1"):
        build_grouping(MLPStack(), layers_per_group=2, groups=[[".*"]])


def test_explicit_group_matching_nothing_is_an_error():
    with pytest.raises(GroupingError, match="matches no trainable parameter"):
        build_grouping(MLPStack(depth=1), groups=[[".*"], ["nothing_here"]])


def test_describe_lists_params_and_state_bytes():
    g = build_grouping(tiny_llama(layers=2))
    text = g.describe(state_bytes_per_element=8)
    assert "embedding" in text and "model.layers.1" in text and "state GiB" in text
    total = sum(p.numel() for p in tiny_llama(layers=2).parameters())
    assert f"{total:,}" in text
