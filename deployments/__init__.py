"""Deployment definitions, schedules and work pools for the pipeline's flows."""
