"""Stage 4: the transfer sweep, theta_T + lambda * tau_X over targets and lambdas.

For every target domain the target model theta_T (fine-tuned for prediction only from the same
pretrained base as the vector) is edited with each lambda of a grid and evaluated on the target's
validation and test splits: accuracy, and the quality of the self-explaining model's single-pass
attributions for the label class (agreement with a Kernel SHAP reference of theta_T, insertion
and deletion AUC with the edited model itself, pointing game where object masks exist). Kernel
SHAP explanations of theta_T at several budgets are evaluated the same way, as the baseline that
costs ``budget`` model inferences per image instead of one. lambda is selected on validation:
the best explanation quality whose accuracy is at most ``accuracy_tolerance`` points below
lambda = 0. Outputs live under ``{output_uri}/sweeps/{name}/``.

- :mod:`tasks.sweep.config`: :class:`SweepConfig`, :class:`TargetSpec`, the table's schema.
- :mod:`tasks.sweep.inputs`: reading the vector, theta_T and the references; their checks and
  fingerprints.
- :mod:`tasks.sweep.evaluation`: the evaluation engine (SEM and Kernel SHAP rows).
- :mod:`tasks.sweep.accuracy`: accuracy on a target's whole split (forward passes only).
- :mod:`tasks.sweep.selection`: selecting lambda on validation.
- :mod:`tasks.sweep.report`: the table, plot and summary; reading a done sweep back.
- :mod:`tasks.sweep.plots`: the PNG figures.
- :mod:`tasks.sweep.stage`: the steps an orchestrator runs (validate, one target, assemble).
"""

from tasks.sweep.accuracy import AccuracyData, load_accuracy_data, measure_accuracy
from tasks.sweep.config import (
    LOWER_IS_BETTER,
    QUALITY_METRICS,
    TABLE_SCHEMA,
    SweepConfig,
    TargetSpec,
    sweep_storage,
)
from tasks.sweep.evaluation import (
    ProgressCallback,
    baseline_tensor,
    evaluate_kernel_shap,
    evaluate_sem,
    evaluate_target,
    sem_label_maps,
    split_baseline,
)
from tasks.sweep.inputs import (
    EvalData,
    TargetModel,
    check_vector,
    load_reference,
    load_target,
    load_vector,
    target_fingerprint,
)
from tasks.sweep.report import (
    PLOT_FILE,
    RESULTS_FILE,
    SUMMARY_FILE,
    SweepResult,
    TargetOutcome,
    assemble_sweep,
    load_sweep,
    read_output,
)
from tasks.sweep.selection import select_lambda
from tasks.sweep.stage import sweep_target, validate_sweep

__all__ = [
    "LOWER_IS_BETTER",
    "PLOT_FILE",
    "QUALITY_METRICS",
    "RESULTS_FILE",
    "SUMMARY_FILE",
    "TABLE_SCHEMA",
    "AccuracyData",
    "EvalData",
    "ProgressCallback",
    "SweepConfig",
    "SweepResult",
    "TargetModel",
    "TargetOutcome",
    "TargetSpec",
    "assemble_sweep",
    "baseline_tensor",
    "split_baseline",
    "check_vector",
    "evaluate_kernel_shap",
    "evaluate_sem",
    "evaluate_target",
    "load_accuracy_data",
    "load_reference",
    "load_sweep",
    "load_target",
    "load_vector",
    "measure_accuracy",
    "read_output",
    "select_lambda",
    "sem_label_maps",
    "sweep_storage",
    "sweep_target",
    "target_fingerprint",
    "validate_sweep",
]
