"""General-ability evaluation: zero-shot GLUE / NLI / MMLU / BoolQ tasks scored by option
log-likelihood, NQ-open, GSM8K and the reference's NLI protocol by greedy generation."""

from sphere_lightning.general.base import (
    GeneralExample,
    GeneralTask,
    HubDataset,
    MalformedExampleError,
    Record,
)

# Importing ``downstream`` (here, so any import of the package does) adds BoolQ, NQ-open, GSM8K
# and the reference's NLI protocol to ``TASKS``.
from sphere_lightning.general.downstream import (
    BoolQTask,
    GenerationExample,
    GenerationTask,
    GSM8KTask,
    NLIReferenceTask,
    NQOpenTask,
    nli_reference_answer,
)
from sphere_lightning.general.metrics import METRICS, classification_metrics, matthews_corrcoef
from sphere_lightning.general.scoring import option_token_ids, score_options
from sphere_lightning.general.tasks import MMLU, MRPC, NLI, RTE, SST2, TASKS, CoLA, get_task

__all__ = [
    "METRICS",
    "BoolQTask",
    "GSM8KTask",
    "GenerationExample",
    "GenerationTask",
    "NLIReferenceTask",
    "NQOpenTask",
    "MMLU",
    "MRPC",
    "NLI",
    "RTE",
    "SST2",
    "TASKS",
    "CoLA",
    "GeneralExample",
    "GeneralTask",
    "HubDataset",
    "MalformedExampleError",
    "Record",
    "classification_metrics",
    "get_task",
    "matthews_corrcoef",
    "nli_reference_answer",
    "option_token_ids",
    "score_options",
]
