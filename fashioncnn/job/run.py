"""One job: train the model its config describes inside one MLflow run, new or resumed, as the plan decided.

The sweep's plan (fashioncnn.sweep) has already validated the config and decided what this job does; the
decision arrives in the job's own Hydra config (fashioncnn.job.decision), in this process or in a
launcher's worker on another machine. The run's life, from its claim to its final status, is
fashioncnn.job.tracked_run's; here is what the job does inside it.
"""

from __future__ import annotations

import logging

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fashioncnn.core.data import load
from fashioncnn.core.loop import EpochMetrics, TrainResult, train
from fashioncnn.core.machine import resolve_device
from fashioncnn.core.model import ModelSpec, build_model, count_parameters, run_name
from fashioncnn.job import checkpoints
from fashioncnn.job.decision import Decision
from fashioncnn.job.pruning import Pruner, make_pruner
from fashioncnn.job.signals import handle_sigterm
from fashioncnn.job.tracked_run import TrackedRun, in_sweep
from fashioncnn.tracking import record
from fashioncnn.tracking.names import CUT_SHORT_EPOCH_TAG

log = logging.getLogger(__name__)


def train_and_log(cfg: DictConfig) -> float | None:
    """Train the model that `cfg` describes as one MLflow run; return its max test accuracy (None: not trained here)."""
    handle_sigterm()
    decision = Decision.of_this_job()
    if decision is None:
        raise RuntimeError("a fashioncnn job runs as part of a plan: start it with python -m fashioncnn")
    run = TrackedRun.open(cfg, decision, run_name(cfg))
    if run is None:
        return None
    with run:
        return _train_in(run, cfg, decision).max_test_acc
    return None  # the run FAILED (recorded) or the store stayed away (said), and the sweep goes on


def _train_in(run: TrackedRun, cfg: DictConfig, decision: Decision) -> TrainResult:
    if cfg.speed.threads:
        torch.set_num_threads(cfg.speed.threads)
    device = resolve_device(cfg.device, HydraConfig.get().job.num if in_sweep() else None)
    data = load(cfg.data_dir, subset=cfg.subset, val_size=cfg.val_size)
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    model = build_model(ModelSpec.from_config(cfg.model))
    param_count = count_parameters(model)
    if not run.resumed:
        run.log_metrics({"param_count": param_count})
        run.log_datasets(data, cfg.subset)
    log.info("%s: %s parameters, %d training and %d validation images from %s, device %s", run.name,
             f"{param_count:,}", len(data.train_labels), len(data.val_labels), data.source, device)
    pruner = make_pruner(cfg, run.run_id, decision, run.set_tags)
    stored = checkpoints.for_run(cfg, run.run_id)
    result = train(cfg, model, data, device, on_epoch=lambda metrics: _after_epoch(run, pruner, metrics), checkpoints=stored,
                   on_resume=lambda history: _resumed(run, pruner, history))
    run.log_outcome(result, record.where_it_ran(device, torch.get_num_threads(), result.precision))
    if not result.diverged and not result.pruned and cfg.log_model:
        model.load_state_dict(result.best_state)
        run.log_model(model)
    stored.finish(keep=cfg.keep_checkpoint, timeout=cfg.tracking.outage_wait_seconds)
    best = result.best
    log.info("%s: best epoch %d by %s: %s, test accuracy there %.4f (max %.4f), %.1fs training (run %s)%s",
             run.name, result.best_epoch, result.select_metric, f"{getattr(best, result.select_metric):.4f}",
             best.test_acc, result.max_test_acc, result.train_seconds, run.run_id, run.link())
    return result


def _resumed(run: TrackedRun, pruner: Pruner, history: list[EpochMetrics]) -> None:
    """The epochs a checkpoint restored: to the run, which may lack the last of them (a kill between an epoch's
    checkpoint and its metrics' delivery), and to the pruner, which judges the run's whole history."""
    for metrics in history:
        run.log_epoch(metrics)
    pruner.restored(history)


def _after_epoch(run: TrackedRun, pruner: Pruner, metrics: EpochMetrics) -> str | None:
    """Each epoch's metrics to the run, then to the pruner: a reason it returns stops the run."""
    if metrics.cut_short:  # said before its metrics land, so that no sibling's pruner counts them as an epoch
        run.set_tags({CUT_SHORT_EPOCH_TAG: str(metrics.epoch)})
    run.log_epoch(metrics)
    # The run ends anyway after an epoch cut short; reported, it would count in Optuna's rungs
    return None if metrics.cut_short else pruner.after_epoch(metrics)
