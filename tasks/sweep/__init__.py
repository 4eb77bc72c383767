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

from tasks.lazy import lazy_exports

# Each name is imported from its module on first use, so that importing one light module
# of the package (a config) does not import the heavy ones (torch, open_clip).
_EXPORTS = {
    "AccuracyData": "tasks.sweep.accuracy",
    "assemble_sweep": "tasks.sweep.report",
    "baseline_tensor": "tasks.sweep.evaluation",
    "check_vector": "tasks.sweep.inputs",
    "EvalData": "tasks.sweep.inputs",
    "evaluate_kernel_shap": "tasks.sweep.evaluation",
    "evaluate_sem": "tasks.sweep.evaluation",
    "evaluate_target": "tasks.sweep.evaluation",
    "load_accuracy_data": "tasks.sweep.accuracy",
    "load_reference": "tasks.sweep.inputs",
    "load_sweep": "tasks.sweep.report",
    "load_target": "tasks.sweep.inputs",
    "load_vector": "tasks.sweep.inputs",
    "LOWER_IS_BETTER": "tasks.sweep.config",
    "measure_accuracy": "tasks.sweep.accuracy",
    "PLOT_FILE": "tasks.sweep.report",
    "ProgressCallback": "tasks.sweep.evaluation",
    "QUALITY_METRICS": "tasks.sweep.config",
    "read_output": "tasks.sweep.report",
    "RESULTS_FILE": "tasks.sweep.report",
    "select_lambda": "tasks.sweep.selection",
    "sem_label_maps": "tasks.sweep.evaluation",
    "split_baseline": "tasks.sweep.evaluation",
    "SUMMARY_FILE": "tasks.sweep.report",
    "sweep_storage": "tasks.sweep.config",
    "sweep_target": "tasks.sweep.stage",
    "SweepConfig": "tasks.sweep.config",
    "SweepResult": "tasks.sweep.report",
    "TABLE_SCHEMA": "tasks.sweep.config",
    "target_fingerprint": "tasks.sweep.inputs",
    "TargetModel": "tasks.sweep.inputs",
    "TargetOutcome": "tasks.sweep.report",
    "TargetSpec": "tasks.sweep.config",
    "validate_sweep": "tasks.sweep.stage",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
