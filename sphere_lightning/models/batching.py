"""Batching token ids for a causal LM: answer tokens, padded batches, and where inputs go.

Shared by the editors, the edit metrics (:mod:`sphere_lightning.scoring`,
:mod:`sphere_lightning.evaluation`), fluency and the drift observer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


def encode_target(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of an answer as it follows a prompt (a leading space, no special tokens)."""
    text = target if target.startswith(" ") else " " + target
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"Target {target!r} tokenises to nothing")
    return list(ids)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)``."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings (of its first parameter
    for a model without them). A model placed across devices (``device_map``) moves the hidden
    states from block to block itself."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device
