"""The edit request: one fact to write into the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sphere_lightning.errors import DataError

#: What a :class:`Probe` measures: whether the edit carries over (``portability``) or leaves
#: other knowledge alone (``locality``).
ProbeKind = Literal["portability", "locality"]


@dataclass(frozen=True)
class Probe:
    """One KnowEdit probe of an edit: a full prompt and the answer it should get.

    Attributes:
        kind: ``portability`` (the edit should carry over: a paraphrased subject, a one-hop
            consequence) or ``locality`` (other knowledge should stay as it was).
        family: The probe family as the data names it, e.g. ``Subject_Aliasing``,
            ``Reasoning``, ``Logical_Generalization``, ``Relation_Specificity``,
            ``Forgetfulness``.
        prompt: The prompt, subject written in.
        answer: The answer scored: the first of ``aliases``, as EasyEdit scores it.
        aliases: Every accepted answer the data lists (``answer`` first).
    """

    kind: ProbeKind
    family: str
    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("portability", "locality"):
            raise DataError(f"Probe kind must be 'portability' or 'locality', got {self.kind!r}")
        if not self.prompt.strip() or not self.answer.strip():
            raise DataError(f"Probe {self.family!r}: empty prompt or answer")


@dataclass(frozen=True)
class EditRequest:
    """One counterfactual (or question-answering) edit.

    Attributes:
        case_id: Identifier of the record in its source data set.
        subject: The entity the fact is about; it must appear in ``prompt`` through ``{}``.
        prompt: Template with exactly one ``{}`` where the subject goes, e.g.
            ``"The mother tongue of {} is"``.
        target_new: The answer the edit writes (without a leading space).
        target_true: The answer the unedited model is expected to give (CounterFact), or the
            reference answer (zsRE). ``None`` when unknown.
        paraphrase_prompts: Full prompts (subject already filled in) that ask for the same fact
            in other words; used for generalization.
        neighborhood_prompts: Full prompts about other subjects, used for specificity.
        neighborhood_answers: The answer expected for each neighborhood prompt. Empty means every
            neighborhood prompt should still be answered with ``target_true`` (CounterFact).
        generation_prompts: Prompts ROME's CounterFact gives for free generation (fluency is
            measured on samples from them); empty for layouts without them.
        probes: KnowEdit's portability and locality probes; empty for other layouts.
    """

    case_id: int | str
    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = field(default_factory=tuple)
    neighborhood_prompts: tuple[str, ...] = field(default_factory=tuple)
    neighborhood_answers: tuple[str, ...] = field(default_factory=tuple)
    generation_prompts: tuple[str, ...] = field(default_factory=tuple)
    probes: tuple[Probe, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.prompt.count("{}") != 1:
            raise DataError(
                f"EditRequest {self.case_id!r}: field 'prompt' must contain exactly one '{{}}' "
                f"for the subject, got {self.prompt!r}"
            )
        if not self.subject.strip():
            raise DataError(f"EditRequest {self.case_id!r}: field 'subject' is empty")
        if not self.target_new.strip():
            raise DataError(f"EditRequest {self.case_id!r}: field 'target_new' is empty")
        if self.neighborhood_answers and len(self.neighborhood_answers) != len(
            self.neighborhood_prompts
        ):
            raise DataError(
                f"EditRequest {self.case_id!r}: 'neighborhood_answers' has "
                f"{len(self.neighborhood_answers)} entries but 'neighborhood_prompts' has "
                f"{len(self.neighborhood_prompts)}"
            )

    @property
    def filled_prompt(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)


@dataclass(frozen=True)
class EditBatch:
    """A batch of requests and their positions in the run's edit order."""

    requests: list[EditRequest]
    positions: list[int]

    def __len__(self) -> int:
        return len(self.requests)
