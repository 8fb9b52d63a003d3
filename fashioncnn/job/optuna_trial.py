"""The job's side of an Optuna trial: report the selection metric after each epoch, stop when Optuna prunes.

A job launched by `hydra/sweeper=optuna` finds its study, storage and trial in its decision
(fashioncnn.job.decision.TrialRef, put there by fashioncnn.sweep.search), and its pruning rule in its
config (`prune`, as the sweeper's study has it). It opens the study's RDB storage itself, so reports and
pruning decisions go through the shared storage from any worker (joblib, submitit), and Optuna's pruner
compares the trial with the study's other trials at the same epoch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Protocol

import optuna

from fashioncnn.job.decision import TrialRef
from fashioncnn.tracking.names import STUDY_TAG, TRIAL_TAG

if TYPE_CHECKING:
    from fashioncnn.core.loop import EpochMetrics



def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's RDB storage."""
    # Jobs report each epoch to the same sqlite file the sweeper reads: wait for its lock rather than fail.
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


class Rule(Protocol):
    """A pruning rule (fashioncnn.job.pruning): its name and Optuna's pruner for it."""

    name: str

    def optuna_pruner(self) -> optuna.pruners.BasePruner: ...


class OptunaTrialPruner:
    """Reports `select_metric` per epoch to the trial (step = epoch); its reason when the study's pruner says stop.

    Never after the last epoch, as in a grid: the training is done, and the trial ends COMPLETE.
    """

    def __init__(self, trial: TrialRef, rule: Rule, select_metric: str, epochs: int, run_id: str,
                 set_tags: Callable[[Mapping[str, str]], None] | None = None) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=trial.study, storage=open_storage(trial.storage), pruner=rule.optuna_pruner())
        self.trial = optuna.trial.Trial(study, trial.trial_id)
        self.metric, self.pruner, self.epochs, self.run_id = select_metric, rule.name, epochs, run_id
        self.reports = len(study.directions) == 1  # Optuna takes per-epoch values (and prunes) for one objective only
        self.trial.set_user_attr("mlflow_run_id", run_id)
        if set_tags is not None:
            set_tags({STUDY_TAG: trial.study, TRIAL_TAG: str(self.trial.number)})

    def restored(self, history: list[EpochMetrics]) -> None:
        """A run resumed under a re-queued trial: its epochs before the kill went to the interrupted trial.

        Without them this trial has no value at those epochs once COMPLETE, and the median pruner takes
        its median at such an epoch over the other trials alone (with one of them, that trial's value).
        They come from the checkpoint: the store may lack the last of them (a kill before its delivery).
        """
        for metrics in history if self.reports else []:
            value = getattr(metrics, self.metric)
            if value is not None and not metrics.cut_short:
                self.trial.report(float(value), metrics.epoch)

    def after_epoch(self, metrics: EpochMetrics) -> str | None:
        value = getattr(metrics, self.metric)
        if value is None or not self.reports:
            return None
        self.trial.report(float(value), metrics.epoch)
        if self.pruner != "none" and metrics.epoch < self.epochs and self.trial.should_prune():
            return f"optuna {self.pruner} pruner at epoch {metrics.epoch}: {self.metric} {value:.4f} (trial #{self.trial.number})"
        return None
