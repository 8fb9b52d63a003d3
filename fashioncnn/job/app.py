"""The job's entry: Hydra's task function.

Light on purpose: Hydra imports the task function's module to answer `--help` or `--cfg job`, so torch
and MLflow load only once a job really runs (fashioncnn.job.run).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="pkg://fashioncnn.conf", config_name="config", version_base="1.3")
def hydra_app(cfg: DictConfig) -> float | None:
    """Hydra's task function: one job. Launched by fashioncnn.sweep.launch, never directly."""
    from fashioncnn.job.run import train_and_log

    return train_and_log(cfg)


def run_hydra(argv: list[str]) -> None:
    """Run fashioncnn's Hydra app with these arguments, in this process: a sweep's launch, or --help and --cfg."""
    from fashioncnn.core.config import register_schema

    register_schema()
    sys.argv = [sys.argv[0], *argv]
    hydra_app()
