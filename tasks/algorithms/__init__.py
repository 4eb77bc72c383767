"""The algorithms as a library, with no storage or orchestration in them.

- :mod:`tasks.algorithms.kernel_shap`: batched Kernel SHAP over a grid of image cells.
- :mod:`tasks.algorithms.metrics`: agreement, faithfulness and pointing metrics.
- :mod:`tasks.algorithms.vectors`: :class:`ExplainabilityVector` and its arithmetic.
"""
