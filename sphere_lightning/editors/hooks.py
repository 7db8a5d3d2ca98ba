"""Reading activations at chosen token positions, and temporary weight changes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.interrupts import sigint_deferred
from sphere_lightning.models.architectures import ArchitectureSpec, linear_weight
from sphere_lightning.models.batching import model_device, pad_batch

#: Which side of a module an activation is read from.
ActivationSide = Literal["input", "output"]


class _StopForward(Exception):
    """Raised inside a hook once everything needed has been captured."""


@dataclass
class EncodedPrompt:
    """Token ids of one prompt and the position of the subject's last token in it."""

    ids: list[int]
    subject_last: int


def encode_with_subject(
    tokenizer: PreTrainedTokenizerBase, template: str, subject: str
) -> EncodedPrompt:
    """Tokenise ``template.format(subject)`` and locate the subject's last token.

    The subject's last token is the last token of the tokenised text up to and including the
    subject, as in ROME's ``subject_last`` lookup.
    """
    if template.count("{}") != 1:
        raise ValueError(f"Prompt template must contain exactly one '{{}}': {template!r}")
    prefix = template[: template.index("{}")]
    ids = tokenizer(template.format(subject))["input_ids"]
    subject_last = len(tokenizer(prefix + subject)["input_ids"]) - 1
    return EncodedPrompt(list(ids), min(subject_last, len(ids) - 1))


def capture(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    module_names: Sequence[str],
    read: ActivationSide = "input",
) -> dict[str, torch.Tensor]:
    """Run the model and return each module's full input or output activation.

    The forward pass stops right after the deepest requested module, so nothing above it runs.

    Args:
        read: ``"input"`` (first positional input, e.g. the key of an MLP out-projection) or
            ``"output"`` (e.g. the residual stream after a block).
    """
    if read not in get_args(ActivationSide):
        names = " or ".join(repr(name) for name in get_args(ActivationSide))
        raise ValueError(f"`read` should be {names}, got {read!r}")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    last = max(module_names, key=lambda n: order[n])
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, args, output):
            value = args[0] if read == "input" else output
            captured[name] = value[0] if isinstance(value, tuple) else value
            if name == last:
                raise _StopForward

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in module_names]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def gather_at_subject(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[EncodedPrompt],
    module_names: Sequence[str],
    *,
    read: ActivationSide = "input",
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Each module's activation at each prompt's subject-last token, ``(len(prompts), dim)``.

    By causality nothing after the subject's last token changes these activations, so each
    prompt runs only up to it, and prompts of similar length share a forward pass.
    """
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].subject_last)
    results: dict[str, torch.Tensor] = {}
    for start in range(0, len(prompts), batch_size):
        index = order[start : start + batch_size]
        chunk = [prompts[i] for i in index]
        ids, mask = pad_batch(
            [p.ids[: p.subject_last + 1] for p in chunk], tokenizer.pad_token_id, device
        )
        rows = torch.arange(len(chunk), device=device)
        cols = torch.tensor([p.subject_last for p in chunk], device=device)
        captured = capture(model, ids, mask, module_names, read)
        for name in module_names:
            # On the module's own device (each layer's, for a model placed across devices).
            value = captured[name][rows.to(captured[name].device), cols.to(captured[name].device)]
            value = value.float()
            if name not in results:
                results[name] = value.new_empty(len(prompts), value.shape[-1])
            results[name][torch.tensor(index, device=value.device)] = value
    return results


class WeightSnapshot:
    """Saves edited weights so temporary changes can be undone exactly."""

    def __init__(self, model: PreTrainedModel, spec: ArchitectureSpec) -> None:
        self.model = model
        self.spec = spec
        self.saved: dict[int, torch.Tensor] = {}

    def add(self, layer: int, delta: torch.Tensor) -> None:
        """Add ``delta`` (out × in) to the out-projection of ``layer``, saving it first."""
        weight = linear_weight(self.model.get_submodule(self.spec.mlp_out_name(layer)))
        if layer not in self.saved:
            self.saved[layer] = weight.detach().clone()
        with torch.no_grad():
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))

    def restore(self) -> None:
        """Copy every saved weight back (all of them, also when Ctrl-C arrives meanwhile)."""
        with torch.no_grad(), sigint_deferred():
            for layer, original in self.saved.items():
                linear_weight(self.model.get_submodule(self.spec.mlp_out_name(layer))).copy_(
                    original
                )
        self.saved.clear()

    def __enter__(self) -> WeightSnapshot:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
