"""Label-free drift: how far the edited model's next-token distributions moved from the original."""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from typing_extensions import override

from sphere_lightning.callbacks.observer import EditObserver
from sphere_lightning.context import EditingContext, weights_swapped
from sphere_lightning.editors.statistics import generate_corpus
from sphere_lightning.errors import ConfigError, MissingFileError, callback_flag
from sphere_lightning.models.batching import model_device
from sphere_lightning.tags import DRIFT_KL, DRIFT_PERPLEXITY


def original_weights_swapped_in(pl_module: EditingContext) -> AbstractContextManager[None]:
    """Temporarily put ``pl_module.original_weights`` back into the edited layers; on exit (also
    on error) the current weights are restored bit for bit (:func:`weights_swapped`)."""
    return weights_swapped(pl_module, pl_module.original_weights)


def next_token_drift(
    original_logits: torch.Tensor | None,
    current_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed KL(original ‖ current) and summed NLL over a right-padded batch, and their count.

    Positions scored are those whose next token is part of the text (every non-padding position
    but each text's last). KL is over the full vocabulary, in float32:
    ``Σ_v p₀(v) (log p₀(v) − log p(v))``. ``original_logits=None`` gives a KL sum of 0.

    Args:
        original_logits: ``(batch, length, vocab)`` logits of the unedited model, or None.
        current_logits: ``(batch, length, vocab)`` logits of the current model.
        input_ids: ``(batch, length)`` token ids (right padding).
        attention_mask: ``(batch, length)``, 1 on text, 0 on padding.
    """
    scored = attention_mask[:, 1:].bool()
    current = current_logits[:, :-1][scored].float().log_softmax(-1)
    targets = input_ids[:, 1:][scored]
    nll = -current.gather(-1, targets[:, None]).sum()
    if original_logits is None:
        kl = torch.zeros((), device=current.device)
    else:
        original = original_logits[:, :-1][scored].float().log_softmax(-1)
        kl = F.kl_div(current, original, log_target=True, reduction="sum")
    return kl, nll, int(scored.sum())


def read_paragraphs(path: str | Path, limit: int) -> list[str]:
    """Up to ``limit`` non-empty paragraphs (separated by blank lines) of a text file."""
    raw = Path(path).expanduser().read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", raw)]
    return [p for p in paragraphs if p][:limit]


class DriftCallback(EditObserver):
    """Log how far the model's next-token distributions drift from the original model's.

    On held-out text, logs ``drift/kl``, the mean over token positions of
    KL(original ‖ current) between next-token distributions over the full vocabulary, and
    ``drift/perplexity``, the current model's perplexity ``exp(mean NLL)`` over the same
    positions. Both are logged at step 0 (before the first edit, where the KL is 0) and after
    every ``every_n_steps``-th step (see :class:`~sphere_lightning.callbacks.EditObserver`).
    Needs no labels, so it watches general-ability damage on any text. The latest values are
    :attr:`kl` and :attr:`perplexity` (``summary.json``: ``drift.{kl,perplexity}``).

    The original model's distributions are never stored (``num_texts × max_length × vocab``
    floats is 400 MB for SmolLM2's vocabulary at the defaults): each measurement runs every
    batch twice, once as it is and once with ``pl_module.original_weights`` copied into the
    edited layers (:func:`original_weights_swapped_in`), which are then restored bit for bit.
    Only the edited layers differ from the original model, so this is the original model
    exactly.

    Args:
        text: A local ``.txt`` file whose paragraphs (separated by blank lines) are the held-out
            texts; by default the model writes them itself before the first edit (sampled with
            ``seed``, from the original weights, on the model's device: a CPU and a GPU write
            different texts from the same seed, so their drift KL compares only with a file).
        every_n_steps: Measure after every n-th step.
        num_texts: Number of texts (the first ``num_texts`` paragraphs of a file).
        max_length: Tokens per text (longer texts are truncated; generated texts are this long).
        batch_size: Texts per forward pass.
        seed: Seed of the generated texts.
    """

    summary_key = "drift"

    def __init__(
        self,
        text: str | None = None,
        every_n_steps: int = 1,
        num_texts: int = 32,
        max_length: int = 64,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps)
        for flag, value in [
            ("num_texts", num_texts),
            ("max_length", max_length),
            ("batch_size", batch_size),
        ]:
            if value < 1:
                raise ConfigError(
                    f"{callback_flag(type(self).__name__, flag)} should be ≥ 1, got {value}"
                )
        if max_length < 2:
            raise ConfigError(
                f"{callback_flag(type(self).__name__, 'max_length')} should be ≥ 2 (a token and "
                f"its successor), got {max_length}"
            )
        if text is not None and not Path(text).expanduser().is_file():
            raise MissingFileError(
                f"Drift text file not found: {text} (set "
                f"{callback_flag(type(self).__name__, 'text')} to a .txt file)"
            )
        self.text = text
        self.num_texts = num_texts
        self.max_length = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.texts: list[str] = []
        self._encoded: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def kl(self) -> float | None:
        """Mean KL(original ‖ current) at the last measurement."""
        return self.latest.get(DRIFT_KL)

    @property
    def perplexity(self) -> float | None:
        """Perplexity of the current model at the last measurement."""
        return self.latest.get(DRIFT_PERPLEXITY)

    def load_texts(self, pl_module: EditingContext) -> list[str]:
        """The held-out texts: the file's paragraphs, or text the original model writes."""
        if self.text is not None:
            texts = read_paragraphs(self.text, self.num_texts)
            source = self.text
        else:
            with original_weights_swapped_in(pl_module):
                texts = generate_corpus(
                    pl_module.model,
                    pl_module.tokenizer,
                    self.num_texts,
                    self.max_length,
                    seed=self.seed,
                    desc="Generating drift text",
                )
            texts = [t for t in texts if t.strip()]
            source = "generated text"
        if not texts:
            raise ValueError(f"Drift texts from {source} are empty")
        return texts

    def _batches(self, pl_module: EditingContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The texts tokenised once into right-padded ``(input_ids, attention_mask)`` batches."""
        if self._encoded is None:
            tokenizer = pl_module.tokenizer
            padding_side = tokenizer.padding_side
            tokenizer.padding_side = "right"  # scored positions then need no position shift
            try:
                self._encoded = []
                for start in range(0, len(self.texts), self.batch_size):
                    enc = tokenizer(
                        self.texts[start : start + self.batch_size],
                        return_tensors="pt",
                        padding=True,
                        truncation=True,
                        max_length=self.max_length,
                    )
                    self._encoded.append((enc["input_ids"], enc["attention_mask"]))
            finally:
                tokenizer.padding_side = padding_side
            if sum(int(mask[:, 1:].sum()) for _, mask in self._encoded) == 0:
                raise ValueError("Drift texts hold no token with a successor: nothing to score")
        return self._encoded

    @torch.no_grad()
    def kl_and_perplexity(
        self, pl_module: EditingContext, with_original: bool = True
    ) -> tuple[float, float]:
        """``(KL(original ‖ current), perplexity)`` of the current model on the texts.

        With ``with_original=False`` the original model is not run and the KL is reported as 0
        (right only while no edit has been applied).
        """
        if not self.texts:
            self.texts = self.load_texts(pl_module)
        model = pl_module.model
        device = model_device(model)
        kl_sum = torch.zeros((), dtype=torch.float64)
        nll_sum = torch.zeros((), dtype=torch.float64)
        count = 0
        for input_ids, attention_mask in self._batches(pl_module):
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            current = model(input_ids=input_ids, attention_mask=attention_mask).logits
            original = None
            if with_original:
                with original_weights_swapped_in(pl_module):
                    original = model(input_ids=input_ids, attention_mask=attention_mask).logits
            kl, nll, n = next_token_drift(original, current, input_ids, attention_mask)
            kl_sum += kl.double().cpu()
            nll_sum += nll.double().cpu()
            count += n
        return float(kl_sum / count), float(torch.exp(nll_sum / count))

    @override
    def measure(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, float]:
        if not self.texts:
            self.texts = self.load_texts(pl_module)  # not part of the timed measurement
        with self.timed("drift"):
            # Before the first edit the original model is the current one: its KL is 0.
            kl, perplexity = self.kl_and_perplexity(pl_module, trainer.global_step > 0)
        return {DRIFT_KL: kl, DRIFT_PERPLEXITY: perplexity}

    @override
    def summary(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, Any]:
        return {"kl": self.kl, "perplexity": self.perplexity}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "texts": list(self.texts)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.texts = list(state_dict.get("texts", []))
        self._encoded = None
