"""Context templates: the generated prefixes every prompt is also read through.

MEMIT, AlphaEdit and the official SPHERE code (``get_context_templates``) wrap each prompt in
``"{}"`` and in short texts the model writes itself, sampled by ``generate_fast``
(``util/generate.py``): plain top-5 sampling at temperature 1 from the raw logits, each text grown
to a fixed number of tokens with its prompt, with no EOS stop, no repetition penalty and none of
the model's own generation config. :func:`generate_context_templates` samples them the same way,
seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.errors import ConfigError, editor_flag
from sphere_lightning.fluency import top_k_generations

#: The words MEMIT's ``get_context_templates`` starts its samples from.
TEMPLATE_SEED_WORDS = ("The", "Therefore", "Because", "I", "You")

#: ``generate_fast``'s ``top_k``, as MEMIT calls it for the templates.
TEMPLATE_TOP_K = 5


@dataclass(frozen=True)
class TemplateOptions:
    """The context templates every prompt is also read through: the editor's ``templates``
    options. In a config: ``model.editor.init_args.templates.<field>``.

    Attributes:
        count: Generated prefixes the prompts are wrapped in (plus the bare prompt ``"{}"``).
        length: Length in tokens of each generated prefix.
    """

    count: int = 5
    length: int = 10

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ConfigError(f"{editor_flag('templates.count')} must be ≥ 0, got {self.count}")
        if self.length < 1:
            raise ConfigError(f"{editor_flag('templates.length')} must be ≥ 1, got {self.length}")


def template_seed_prompts(count: int) -> list[str]:
    """The prompt each of ``count`` templates is sampled from, in order.

    ``generate_fast`` unrolls its prompts as ``[p for p in prompts for _ in range(n)]`` with
    ``n = count // 5`` (MEMIT: ``n_gen // 5``), so each seed word's samples are adjacent. For a
    ``count`` that is not a multiple of 5 (which the reference never uses) the first ``count % 5``
    words get one sample more.
    """
    if count < 0:
        raise ValueError(f"`count` should be ≥ 0, got {count}")
    words = len(TEMPLATE_SEED_WORDS)
    return [
        word
        for i, word in enumerate(TEMPLATE_SEED_WORDS)
        for _ in range(count // words + (i < count % words))
    ]


def generate_context_templates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    length: int,
    seed: int,
) -> list[str]:
    """``"{}"`` plus ``count`` sampled prefixes, as MEMIT's ``get_context_templates``.

    Each prefix is :func:`~sphere_lightning.fluency.top_k_generations` of its seed word
    (:func:`template_seed_prompts`): top-5 sampling, ``length`` tokens counting the prompt's,
    decoded without special tokens, NFKD-normalised, ``"\\n\\n"`` replaced by a space; then, as
    the reference, braces are blanked (``{`` and ``}`` become spaces) and ``". {}"`` is appended.
    The draws come from a ``torch.Generator`` seeded with ``seed`` (the reference's are unseeded):
    the same model and seed give the same templates, and the global RNG is left alone.
    """
    prompts = template_seed_prompts(count)
    if not prompts:
        return ["{}"]
    texts = top_k_generations(
        model, tokenizer, prompts, top_k=TEMPLATE_TOP_K, max_out_len=length, seed=seed
    )
    return ["{}"] + [text.replace("{", " ").replace("}", " ") + ". {}" for text in texts]
