"""One table of the architectures the framework can edit.

Every place that needs to know where a model keeps its MLP out-projection, its layer stack, its
final norm or its LM head asks this table; nothing else in the code branches on model names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from sphere_lightning.errors import ConfigError


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the editable parts of one family of causal LMs live.

    Attributes:
        layers: Dotted path from the model to the ``nn.ModuleList`` of transformer blocks.
        mlp_out: Dotted path, inside one block, to the MLP out-projection (the edited weight).
        final_norm: Dotted path from the model to the norm applied before the LM head.
        lm_head: Dotted path from the model to the LM head.
    """

    layers: str
    mlp_out: str
    final_norm: str
    lm_head: str

    def layer_name(self, layer: int) -> str:
        """Module name of block ``layer``."""
        return f"{self.layers}.{layer}"

    def mlp_out_name(self, layer: int) -> str:
        """Module name of the MLP out-projection of block ``layer``."""
        return f"{self.layers}.{layer}.{self.mlp_out}"

    def weight_name(self, layer: int) -> str:
        """Parameter name of the edited weight of block ``layer``."""
        return f"{self.mlp_out_name(layer)}.weight"

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The model's stack of transformer blocks."""
        return model.get_submodule(self.layers)

    def num_layers(self, model: nn.Module) -> int:
        """How many transformer blocks the model has."""
        return len(self.blocks(model))

    def check_layers(self, model: nn.Module, layers: list[int], flag: str = "layers") -> None:
        """Raise a :class:`~sphere_lightning.errors.ConfigError` naming ``flag`` if any of
        ``layers`` is not a block of ``model``."""
        n = self.num_layers(model)
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ConfigError(
                f"`{flag}` = {list(layers)} names layer(s) {bad}, but the model has {n} layers "
                f"(valid: 0..{n - 1})"
            )


_LLAMA_LIKE = ArchitectureSpec("model.layers", "mlp.down_proj", "model.norm", "lm_head")

#: ``config.model_type`` → spec. Add a row here to support a new architecture.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "gpt2": ArchitectureSpec("transformer.h", "mlp.c_proj", "transformer.ln_f", "lm_head"),
    "gptj": ArchitectureSpec("transformer.h", "mlp.fc_out", "transformer.ln_f", "lm_head"),
    "gpt_neox": ArchitectureSpec(
        "gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "lm_head"
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi": ArchitectureSpec("model.layers", "mlp.fc2", "model.final_layernorm", "lm_head"),
    "phi3": _LLAMA_LIKE,
}


class UnknownArchitectureError(ConfigError):
    """Raised for a model whose architecture has no row in :data:`ARCHITECTURES`."""


def architecture_of(model_or_config: PreTrainedModel | PretrainedConfig) -> ArchitectureSpec:
    """Look up the spec of a model (or its config) by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnknownArchitectureError(
            f"Cannot edit a model of architecture model_type={model_type!r} (`model.model`): "
            f"known architectures are {sorted(ARCHITECTURES)}. "
            "To add it, register a row: `sphere_lightning.models.ARCHITECTURES["
            f"{model_type!r}] = ArchitectureSpec(layers=..., mlp_out=..., final_norm=..., "
            "lm_head=...)` giving the dotted module paths of the block list, the MLP "
            "out-projection inside a block, the final norm and the LM head."
        ) from None


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as an (out × in) view, whatever its storage convention.

    GPT-2's ``Conv1D`` stores (in × out); every editor, transform and metric sees the
    ``nn.Linear`` convention through this view.
    """
    if isinstance(module, Conv1D):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"Cannot edit {type(module).__name__}: expected nn.Linear or Conv1D")


def stores_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight (in × out), the transpose of :func:`linear_weight`.

    True for GPT-2's ``Conv1D``, False for ``nn.Linear``: the rows of the stored tensor are then
    the input units, not the output units.
    """
    linear_weight(module)  # the same TypeError for a module that cannot be edited
    return isinstance(module, Conv1D)
