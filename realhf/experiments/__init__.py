"""Experiments: quickstart configs turned into ExperimentConfigs (imported by the CLI)."""

from realhf.experiments import common  # noqa: F401
