"""Stopping hopeless runs early: after each epoch a pruner says go on (None) or stop (the reason).

A pruned run ends FINISHED with `pruned=true` and its reason as tags (fashioncnn.job.tracked_run); it counts as done on a
re-run and is never picked by retrain or the registry (fashioncnn.tracking.queries.selectable).

The rule is the `prune` config group's option (none, median, asha), built by instantiate from its
`_target_` (NoneRule, MedianRule, AshaRule below): one set of keys, applied in two places. A search's
trial (hydra/sweeper=optuna) is judged by Optuna's pruner of the same rule, through the study
(fashioncnn.job.optuna_trial); a grid's job by the rule's store pruner, below.

The store pruners compare a run with its siblings: the other runs of the same sweep (the `sweep_id` tag, in
the same experiment), read from the tracking store. So they work alike with every launcher and across
machines: whatever ran a sibling, its per-epoch metrics are in the store. With the basic launcher the
siblings of job k are jobs 0..k-1, all ended, so the decisions depend on the grid's order alone.

Both rules compare the *best selection metric so far* (up to epoch e) of the run and of each sibling
that reached epoch e (finished it: a run the divergence guard stopped during epoch e did not): a run's
model is its best epoch, so that is what would be ranked. A run is never
stopped after its last epoch (nothing left to save) nor outside a sweep (no siblings).
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

import optuna
from mlflow.entities import Run
from omegaconf import DictConfig

from fashioncnn.core.components import build
from fashioncnn.core.config import lower_is_better
from fashioncnn.job import optuna_trial
from fashioncnn.job.decision import Decision
from fashioncnn.tracking import names, record, stores

if TYPE_CHECKING:
    from fashioncnn.core.loop import EpochMetrics

_ENDED = {"FINISHED", "FAILED", "KILLED"}


TagSink = Callable[[Mapping[str, str]], None]  # the job's run's set_tags: every write goes through the run


class Pruner(Protocol):
    def restored(self, history: list[EpochMetrics]) -> None:
        """A resumed run's epochs before the resume, from its checkpoint (before any after_epoch)."""
        ...

    def after_epoch(self, metrics: EpochMetrics) -> str | None:
        """None: train on; a one-line reason: stop the run after this epoch."""
        ...


class NeverPrune:
    def restored(self, history: list[EpochMetrics]) -> None:
        return None

    def after_epoch(self, metrics: EpochMetrics) -> str | None:
        return None


def best_so_far(history: dict[int, float], epoch: int, lower: bool) -> float | None:
    """The best value at steps 1..epoch, or None when the run has not reached `epoch`."""
    if epoch not in history:
        return None
    values = [value for step, value in history.items() if step <= epoch]
    return min(values) if lower else max(values)


def _worse(value: float, threshold: float, lower: bool) -> bool:
    return value > threshold if lower else value < threshold


def median_verdict(own: float, siblings: list[float], lower: bool, min_siblings: int) -> float | None:
    """The median that `own` falls short of (stop), or None (go on)."""
    if not siblings or len(siblings) < min_siblings:
        return None
    median = statistics.median(siblings)
    return median if _worse(own, median, lower) else None


def asha_rungs(epochs: int, min_epoch: int, reduction_factor: int) -> list[int]:
    """The epochs after which ASHA decides: min_epoch * reduction_factor**k, below `epochs`."""
    rungs, rung = [], min_epoch
    while rung < epochs:
        rungs.append(rung)
        rung *= reduction_factor
    return rungs


def asha_verdict(own: float, siblings: list[float], lower: bool, reduction_factor: int, min_siblings: int) -> float | None:
    """The value `own` must reach to be promoted, when it does not (stop), or None (promoted).

    The top max(1, n // reduction_factor) of the n runs at the rung (the run itself included) go on;
    ties with the last promoted value go on too.
    """
    if len(siblings) < min_siblings:
        return None
    ranked = sorted([*siblings, own], reverse=not lower)
    threshold = ranked[max(1, len(ranked) // reduction_factor) - 1]
    return threshold if _worse(own, threshold, lower) else None


class Siblings:
    """The per-epoch selection metric of a run's siblings, read from the tracking store.

    One search per decision (which runs exist and whether they ended), plus the metric history of a
    sibling only when the cached one cannot answer: an ended run's history never changes, a running
    one's is fetched again only when it lacks the epoch asked about.
    """

    def __init__(self, store: stores.Store, experiment_id: str, sweep_id: str, run_id: str, fingerprint: str,
                 metric: str) -> None:
        self.store, self.experiment_id, self.sweep_id = store, experiment_id, sweep_id
        self.run_id, self.fingerprint, self.metric = run_id, fingerprint, metric
        self._histories: dict[str, dict[int, float]] = {}
        self._ended: set[str] = set()

    def _history(self, run_id: str) -> dict[int, float]:
        return {m.step: m.value for m in self.store.client.get_metric_history(run_id, self.metric)}

    def histories_at(self, epoch: int) -> list[dict[int, float]]:
        """The histories of the siblings that reached `epoch` (one per configuration: its newest run)."""
        found = self.store.find_runs(self.experiment_id, f"tags.{names.SWEEP_TAG} = '{self.sweep_id}'")
        newest: dict[str, Run] = {}
        for run in found:  # newest first
            tags = run.data.tags
            if tags.get(names.ROLE_TAG) == "parent" or run.info.run_id == self.run_id:
                continue
            # Earlier attempts at this run's own config are not its siblings.
            if tags.get(names.FINGERPRINT_TAG) == self.fingerprint:
                continue
            newest.setdefault(tags.get(names.FINGERPRINT_TAG, run.info.run_id), run)
        reached = []
        for run in newest.values():
            run_id, status = run.info.run_id, run.info.status
            if self.metric not in run.data.metrics:
                continue  # no epoch finished yet
            cached = self._histories.get(run_id)
            if cached is None or (run_id not in self._ended and epoch not in cached):
                self._histories[run_id] = cached = self._history(run_id)
                if status in _ENDED:
                    self._ended.add(run_id)
            if epoch in (history := record.epochs_reached(run, cached)):
                reached.append(history)
        return reached


class _SiblingPruner(ABC):
    """What both rules share: the run's own best so far, the siblings at the same epoch, the tags."""

    rule = ""

    def __init__(self, run_id: str, epochs: int, metric: str, siblings: Siblings,
                 set_tags: TagSink | None = None) -> None:
        self.run_id, self.epochs, self.metric, self.siblings = run_id, epochs, metric, siblings
        self.set_tags = set_tags  # where the verdict's detail tags go (the job's run); None: nowhere (unit tests)
        self.lower = lower_is_better(metric)
        self.own: dict[int, float] = {}

    @abstractmethod
    def _decides_at(self, epoch: int) -> bool: ...

    @abstractmethod
    def _verdict(self, own: float, siblings: list[float]) -> float | None:
        """The threshold the run falls short of (stop), or None (go on)."""

    @abstractmethod
    def _reason(self, epoch: int, own: float, threshold: float, count: int) -> str: ...

    def restored(self, history: list[EpochMetrics]) -> None:
        self.own.update({m.epoch: getattr(m, self.metric) for m in history if getattr(m, self.metric) is not None})

    def after_epoch(self, metrics: EpochMetrics) -> str | None:
        epoch = metrics.epoch
        value = getattr(metrics, self.metric)
        if value is None:
            return None
        self.own[epoch] = value
        if epoch >= self.epochs or not self._decides_at(epoch):
            return None
        own = best_so_far(self.own, epoch, self.lower)
        assert own is not None  # this epoch was just recorded
        others = [best_so_far(h, epoch, self.lower) for h in self.siblings.histories_at(epoch)]
        others_at = [v for v in others if v is not None]
        threshold = self._verdict(own, others_at)
        if threshold is None:
            return None
        reason = self._reason(epoch, own, threshold, len(others_at))
        if self.set_tags is not None:
            values = (self.rule, self.metric, f"{own:.6g}", f"{threshold:.6g}", str(len(others_at)))
            self.set_tags(dict(zip(names.PRUNED_DETAIL_TAGS, values)))
        return reason


class MedianPruner(_SiblingPruner):
    rule = "median"

    def __init__(self, run_id: str, epochs: int, metric: str, siblings: Siblings, set_tags: TagSink | None = None,
                 warmup_epochs: int = 0, min_siblings: int = 3) -> None:
        super().__init__(run_id, epochs, metric, siblings, set_tags)
        self.warmup_epochs, self.min_siblings = warmup_epochs, min_siblings

    def _decides_at(self, epoch: int) -> bool:
        return epoch > self.warmup_epochs

    def _verdict(self, own: float, siblings: list[float]) -> float | None:
        return median_verdict(own, siblings, self.lower, self.min_siblings)

    def _reason(self, epoch: int, own: float, threshold: float, count: int) -> str:
        return (f"median rule at epoch {epoch}: best {self.metric} so far {own:.4f} is "
                f"{'above' if self.lower else 'below'} the median {threshold:.4f} of {count} sibling runs at that epoch")


class AshaPruner(_SiblingPruner):
    rule = "asha"

    def __init__(self, run_id: str, epochs: int, metric: str, siblings: Siblings, set_tags: TagSink | None = None,
                 reduction_factor: int = 3, min_epoch: int = 1, min_siblings: int = 2) -> None:
        super().__init__(run_id, epochs, metric, siblings, set_tags)
        self.reduction_factor, self.min_siblings = reduction_factor, min_siblings
        self.rungs = asha_rungs(self.epochs, min_epoch, reduction_factor)

    def _decides_at(self, epoch: int) -> bool:
        return epoch in self.rungs

    def _verdict(self, own: float, siblings: list[float]) -> float | None:
        return asha_verdict(own, siblings, self.lower, self.reduction_factor, self.min_siblings)

    def _reason(self, epoch: int, own: float, threshold: float, count: int) -> str:
        n = count + 1
        return (f"asha rung {self.rungs.index(epoch)} (epoch {epoch}): best {self.metric} so far {own:.4f} is not in "
                f"the top {max(1, n // self.reduction_factor)} of {n} runs at this rung "
                f"(needs {'<=' if self.lower else '>='} {threshold:.4f})")


@dataclass(frozen=True)
class NoneRule:
    """prune=none: every run trains to its last epoch."""

    name = "none"

    def study_key(self) -> str:
        return "none:1:2:3"  # a search's study name rests on it: the same command finds the same study

    def store_pruner(self, run_id: str, epochs: int, metric: str, siblings: Siblings, set_tags: TagSink | None) -> Pruner | None:
        return None

    def optuna_pruner(self) -> optuna.pruners.BasePruner:
        return optuna.pruners.NopPruner()

    def describe(self) -> str:
        return "none"


@dataclass(frozen=True)
class MedianRule:
    """prune=median: stop a run whose best so far falls below the median of the others at the same epoch.

    In a grid the others are its sweep's runs in the store; in a search, Optuna's MedianPruner over the
    study's trials (n_startup_trials=min_siblings finished trials, from epoch warmup_epochs + 1)."""

    warmup_epochs: int = 0
    min_siblings: int = 3
    name = "median"

    def store_pruner(self, run_id: str, epochs: int, metric: str, siblings: Siblings, set_tags: TagSink | None) -> Pruner | None:
        return MedianPruner(run_id, epochs, metric, siblings, set_tags, self.warmup_epochs, self.min_siblings)

    def optuna_pruner(self) -> optuna.pruners.BasePruner:
        # Optuna judges steps from n_warmup_steps on, the store's rule epochs past warmup_epochs (step = epoch).
        return optuna.pruners.MedianPruner(n_startup_trials=self.min_siblings, n_warmup_steps=self.warmup_epochs + 1)

    def study_key(self) -> str:
        return f"median:{self.warmup_epochs + 1}:{self.min_siblings}:3"

    def describe(self) -> str:
        return f"median (from epoch {self.warmup_epochs + 1}, once {self.min_siblings} others reached it)"


@dataclass(frozen=True)
class AshaRule:
    """prune=asha: asynchronous successive halving, rungs at min_epoch * reduction_factor**k.

    In a grid at each rung only the top 1/reduction_factor of the sweep's runs there go on (with fewer
    than min_siblings others there, every run goes on); in a search, Optuna's SuccessiveHalvingPruner
    (min_resource=min_epoch, the same reduction_factor)."""

    reduction_factor: int = 3
    min_epoch: int = 1
    min_siblings: int = 2
    name = "asha"

    def store_pruner(self, run_id: str, epochs: int, metric: str, siblings: Siblings, set_tags: TagSink | None) -> Pruner | None:
        return AshaPruner(run_id, epochs, metric, siblings, set_tags, self.reduction_factor, self.min_epoch, self.min_siblings)

    def optuna_pruner(self) -> optuna.pruners.BasePruner:
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=self.min_epoch, reduction_factor=self.reduction_factor)

    def study_key(self) -> str:
        return f"asha:{self.min_epoch}:2:{self.reduction_factor}"

    def describe(self) -> str:
        return f"asha (successive halving: first rung at epoch {self.min_epoch}, reduction factor {self.reduction_factor})"


PruningRule = NoneRule | MedianRule | AshaRule


def pruning_rule(prune: DictConfig) -> PruningRule:
    """The rule of a config's `prune` node (conf/prune), built by instantiate from its `_target_`."""
    return build("prune", prune)


def make_pruner(cfg: DictConfig, run_id: str, decision: Decision | None = None, set_tags: TagSink | None = None) -> Pruner:
    """`cfg.prune`'s rule as this job applies it to the run `run_id`: through its Optuna trial in a search
    (hydra/sweeper=optuna: the trial also hears every epoch), else against the sweep's runs in the store;
    outside a sweep, never. Its tags go to `set_tags` (the job's run)."""
    if decision is None:
        return NeverPrune()
    rule, metric = pruning_rule(cfg.prune), str(getattr(cfg.select_metric, "value", cfg.select_metric))
    if decision.trial is not None:
        return optuna_trial.OptunaTrialPruner(decision.trial, rule, metric, cfg.epochs, run_id, set_tags)
    if not decision.sweep_id:
        return NeverPrune()
    store = stores.store(stores.resolve_tracking_uri(cfg))
    siblings = Siblings(store, decision.experiment_id, decision.sweep_id, run_id, decision.fingerprint, metric)
    return rule.store_pruner(run_id, cfg.epochs, metric, siblings, set_tags) or NeverPrune()


def saved_seconds(epochs: int, pruned_epoch: int, train_seconds: float) -> float:
    """The training a pruned run did not do: its remaining epochs at its own measured seconds per epoch."""
    if pruned_epoch <= 0:
        return 0.0
    return max(0, epochs - pruned_epoch) * train_seconds / pruned_epoch

