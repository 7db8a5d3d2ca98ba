"""General-ability evaluation: zero-shot GLUE / NLI / MMLU tasks scored by option log-likelihood."""

from sphere_lightning.general.base import (
    GeneralExample,
    GeneralTask,
    HubDataset,
    MalformedExampleError,
    Record,
)
from sphere_lightning.general.metrics import METRICS, classification_metrics, matthews_corrcoef
from sphere_lightning.general.scoring import option_token_ids, score_options
from sphere_lightning.general.tasks import MMLU, MRPC, NLI, RTE, SST2, TASKS, CoLA, get_task

__all__ = [
    "METRICS",
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
