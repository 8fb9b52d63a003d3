"""Stopping hopeless runs early: after each epoch a pruner says go on (None) or stop (the reason).

A pruned run ends FINISHED with `pruned=true` and its reason as tags (job.py); it counts as done on a
re-run and is never picked by retrain or the registry (results.selectable).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from omegaconf import DictConfig

from fashioncnn import trial_pruner

if TYPE_CHECKING:
    from fashioncnn.train import EpochMetrics


class Pruner(Protocol):
    def after_epoch(self, metrics: EpochMetrics) -> str | None:
        """None: train on; a one-line reason: stop the run after this epoch."""
        ...


class NeverPrune:
    def after_epoch(self, metrics: EpochMetrics) -> str | None:
        return None


def make_pruner(cfg: DictConfig, run_id: str) -> Pruner:
    """The pruner that `cfg` asks for, for the run `run_id`."""
    if (trial := trial_pruner.from_environment(cfg, run_id)) is not None:  # an Optuna trial: its study's pruner
        return trial
    return NeverPrune()
