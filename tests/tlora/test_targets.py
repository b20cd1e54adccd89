import pytest
import torch
from transformers.pytorch_utils import Conv1D

from tlora import find_targets
from tlora.targets import weight_out_in


def test_llama_groups_qkv_and_gate_up(tiny_model):
    model = tiny_model("llama")
    targets = find_targets(model, "all-linear")
    assert "lm_head" not in targets.names
    assert len(targets) == 2 * 7
    assert targets.groups["model.layers.0.self_attn.q_proj"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert targets.groups["model.layers.1.mlp.gate_proj"] == ["model.layers.1.mlp.gate_proj",
                                                              "model.layers.1.mlp.up_proj"]
    assert targets["model.layers.1.self_attn.k_proj"].group == "model.layers.1.self_attn.q_proj"
    k = targets["model.layers.0.self_attn.k_proj"]
    assert (k.d_out, k.d_in, k.layout) == (16, 32, "out_in")  # GQA: 2 kv heads of 8


def test_gpt2_conv1d_shapes(tiny_model):
    model = tiny_model("gpt2")
    targets = find_targets(model, ["c_attn", "c_fc"])
    t = targets["transformer.h.0.attn.c_attn"]
    assert (t.d_out, t.d_in, t.layout) == (96, 32, "in_out")
    module = model.get_submodule(t.name)
    assert isinstance(module, Conv1D)
    assert weight_out_in(module).shape == (96, 32)
    assert len(targets.groups) == 4  # c_attn and c_fc each read their own layernorm output


def test_bert_regex_and_groups(tiny_model):
    model = tiny_model("bert")
    targets = find_targets(model, r".*attention\.self\.(query|key|value)")
    assert len(targets) == 6 and len(targets.groups) == 2


def test_list_matches_suffix_not_substring(tiny_model):
    model = tiny_model("llama")
    assert find_targets(model, ["q_proj"]).names == ["model.layers.0.self_attn.q_proj",
                                                    "model.layers.1.self_attn.q_proj"]
    assert find_targets(model, ["model.layers.1.mlp.up_proj"]).names == ["model.layers.1.mlp.up_proj"]


def test_no_match_lists_what_exists(tiny_model):
    with pytest.raises(ValueError, match=r"no target module matched.*q_proj"):
        find_targets(tiny_model("llama"), ["query"])


def test_grouping_leaves_no_hooks(tiny_model):
    model = tiny_model("llama")
    find_targets(model)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.is_grad_enabled()
