"""The TensorBoard tags a run logs: one prefix per family of scalars, and the single tags that
more than one part of the package writes or reads.

A tag is ``<prefix><name>``, e.g. ``energy/`` + ``layers.3.mlp.down_proj`` or ``diag/`` +
``key_leak/3``. The ``*_change/`` families hold the differences from the step-0 baseline of the
family without the suffix. ``summary.json`` and the experiment runner read the same names.
"""

from __future__ import annotations

#: Lifelong edit metrics (efficacy, generalization, specificity, fluency; ``_ci95`` half-widths).
EDIT = "edit/"
#: Edit metrics before the first edit, over every fact of the run.
EDIT_PRE = "edit_pre/"
#: The editor's own per-step scalars.
EDITOR = "editor/"
#: Wall time of each phase of a step or an observer.
TIME = "time/"
#: General-ability task metrics, ``general/<task>/<metric>``.
GENERAL = "general/"
#: Change of the general-ability metrics since the baseline.
GENERAL_CHANGE = "general_change/"
#: Drift of the model's next-token distribution on held-out text.
DRIFT = "drift/"
#: Hyperspherical energy of each edited weight, ``energy/<layer>``.
ENERGY = "energy/"
#: Change of the hyperspherical energy since the baseline.
ENERGY_CHANGE = "energy_change/"
#: Collapse diagnostics, ``diag/<quantity>/<layer>``.
DIAG = "diag/"
#: SPHERE projection scalars, ``sphere/<quantity>/<layer>``.
SPHERE = "sphere/"

#: Facts written into the model so far.
NUM_EDITED = EDIT + "num_edited"
#: Facts the latest (possibly sampled) evaluation scored.
NUM_EVALUATED = EDIT + "num_evaluated"
EFFICACY = EDIT + "efficacy"
GENERALIZATION = EDIT + "generalization"
SPECIFICITY = EDIT + "specificity"
FLUENCY = EDIT + "fluency"
#: KL divergence of the next-token distribution from the unedited model's.
DRIFT_KL = DRIFT + "kl"
DRIFT_PERPLEXITY = DRIFT + "perplexity"
#: Mean over layers of the energy change.
ENERGY_CHANGE_MEAN = ENERGY_CHANGE + "mean"
