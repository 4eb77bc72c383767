"""Prefect flows: orchestration only; the stage logic lives in ``tasks``."""
