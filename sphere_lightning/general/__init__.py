"""General-ability evaluation: zero-shot GLUE / NLI / MMLU / BoolQ tasks scored by option
log-likelihood, NQ-open and GSM8K by greedy generation."""

from sphere_lightning.general.base import (
    GeneralExample,
    GeneralTask,
    HubDataset,
    MalformedExampleError,
    Record,
)

# Importing ``downstream`` (here, so any import of the package does) adds BoolQ, NQ-open and
# GSM8K to ``TASKS``.
from sphere_lightning.general.downstream import (
    BoolQTask,
    GenerationExample,
    GenerationTask,
    GSM8KTask,
    NQOpenTask,
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
    "option_token_ids",
    "score_options",
]
