"""One job: train the model its config describes inside one MLflow run, new or resumed, as the plan decided.

The sweep's plan (sweep.py) has already validated the config and decided what this job does; the
decision arrives in environment variables that Hydra sets for the job (`hydra.job.env_set`), in this
process or in a launcher's worker on another machine. Within a -m sweep a failing job is a FAILED run
with its error and traceback and the sweep goes on; a single run (no -m) raises as usual.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import hydra
import mlflow
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fashioncnn import links, tracking
from fashioncnn.data import load
from fashioncnn.model import ModelSpec, build_model, count_parameters, run_name
from fashioncnn.prune import PRUNED_EPOCH_TAG, make_pruner
from fashioncnn.train import EpochMetrics, resolve_device, train

log = logging.getLogger(__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run ends KILLED, its checkpoint stays for a resume."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signum}")


def handle_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def interrupted_exit_code(stop: KeyboardInterrupt) -> int:
    print("interrupted: run the same command again to resume where it stopped", file=sys.stderr)
    return 143 if isinstance(stop, Terminated) else 130


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


@hydra.main(config_path="pkg://fashioncnn.conf", config_name="config", version_base="1.3")
def hydra_app(cfg: DictConfig) -> float | None:
    """Hydra's task function: one job. Launched by sweep.run, never directly."""
    return train_and_log(cfg)


def train_and_log(cfg: DictConfig) -> float | None:
    """Train the model that `cfg` describes as one MLflow run; return its max test accuracy."""
    handle_sigterm()
    if tracking.EXPERIMENT_ID_ENV not in os.environ:
        raise RuntimeError("a fashioncnn job runs as part of a plan: start it with python -m fashioncnn")
    spec = ModelSpec.from_config(cfg.model)
    resume_run_id = os.environ.get(tracking.RESUME_RUN_ENV)
    # The run starts before anything that can fail on this machine (device, data), so a failure is a
    # FAILED run with its error in MLflow, not just a traceback in a terminal.
    name = run_name(cfg)
    run = tracking.start_run(cfg, name, os.environ[tracking.FINGERPRINT_ENV], os.environ[tracking.EXPERIMENT_ID_ENV], resume_run_id)
    checkpoint = tracking.checkpoint_path(cfg, run.info.run_id)
    try:
        if cfg.speed.threads:
            torch.set_num_threads(cfg.speed.threads)
        device = resolve_device(cfg.device, HydraConfig.get().job.num if _in_sweep() else None)
        data = load(cfg.data_dir, subset=cfg.subset, val_size=cfg.val_size)
        torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
        model = build_model(spec)
        param_count = count_parameters(model)
        if resume_run_id is None:
            mlflow.log_metric("param_count", param_count)
            tracking.log_datasets(data, cfg.subset)
        log.info("%s: %s parameters, %d training and %d validation images from %s, device %s", name,
                 f"{param_count:,}", len(data.train_labels), len(data.val_labels), data.source, device)
        pruner = make_pruner(cfg, run.info.run_id)

        def after_epoch(metrics: EpochMetrics) -> str | None:
            tracking.log_epoch(metrics)
            return pruner.after_epoch(metrics)

        result = train(cfg, model, data, device, on_epoch=after_epoch, checkpoint=checkpoint)
        tracking.log_where_it_ran(device, torch.get_num_threads(), result.precision)
        tracking.log_summary(result)
        if result.diverged:
            mlflow.set_tags({tracking.DIVERGED_TAG: "true", "diverged_reason": result.diverged})
        elif result.pruned:  # never picked, so no model to keep
            mlflow.set_tags({tracking.PRUNED_TAG: "true", "pruned_reason": result.pruned,
                             PRUNED_EPOCH_TAG: str(len(result.history))})  # what the summary's saving counts from
        elif cfg.log_model:
            from fashioncnn.serving import log_model  # torch.export's import costs seconds: only when used

            model.load_state_dict(result.best_state)
            log_model(model)
    except KeyboardInterrupt:
        mlflow.set_tag("error", "interrupted (Ctrl-C or SIGTERM); run the same command again to resume")
        mlflow.end_run("KILLED")
        raise
    except Exception as error:
        tracking.record_failure(error)
        mlflow.end_run("FAILED")
        if not _in_sweep():
            raise
        log.exception("%s: FAILED (run %s); the sweep goes on", name, run.info.run_id)
        return None

    if cfg.keep_checkpoint and checkpoint.exists():
        mlflow.log_artifact(str(checkpoint))
    checkpoint.unlink(missing_ok=True)
    mlflow.end_run("FINISHED")
    best = result.best
    log.info("%s: best epoch %d by %s: %s, test accuracy there %.4f (max %.4f), %.1fs training (run %s)%s",
             name, result.best_epoch, result.select_metric, f"{getattr(best, result.select_metric):.4f}",
             best.test_acc, result.max_test_acc, result.train_seconds, run.info.run_id, _link(cfg, run))
    return result.max_test_acc


def _link(cfg: DictConfig, run: mlflow.ActiveRun) -> str:
    """For a tracking server, where to see the run (the UI in its model-training view)."""
    uri = tracking.resolve_tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return ""
    return f"; {links.run_url(links.ui_base_for(uri), run.info.experiment_id, run.info.run_id)}"
