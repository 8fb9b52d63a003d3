"""One job: train the model its config describes inside one MLflow run, new or resumed, as the plan decided.

The sweep's plan (fashioncnn.sweep) has already validated the config and decided what this job does; the
decision arrives in environment variables that Hydra sets for the job (`hydra.job.env_set`), in this
process or in a launcher's worker on another machine. Within a -m sweep a failing job is a FAILED run
with its error and traceback and the sweep goes on; a single run (no -m) raises as usual.
"""

from __future__ import annotations

import logging
import os
import sys

import mlflow
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fashioncnn.core.data import load
from fashioncnn.core.loop import EpochMetrics, train
from fashioncnn.core.machine import resolve_device
from fashioncnn.core.model import ModelSpec, build_model, count_parameters, run_name
from fashioncnn.core.sources import option_source
from fashioncnn.job import checkpoints, lease
from fashioncnn.job.pruning import make_pruner
from fashioncnn.job.signals import handle_sigterm
from fashioncnn.tracking import links, record, stores
from fashioncnn.tracking.delivery import Delivery
from fashioncnn.tracking.names import (
    CUT_SHORT_EPOCH_TAG,
    DIVERGED_TAG,
    EXPERIMENT_ID_ENV,
    FINGERPRINT_ENV,
    FINGERPRINT_TAG,
    PARENT_RUN_ENV,
    PARENT_TAG,
    PRUNED_EPOCH_TAG,
    PRUNED_TAG,
    RESUME_RUN_ENV,
    ROLE_TAG,
    SWEEP_ID_ENV,
    SWEEP_TAG,
)
from fashioncnn.tracking.secrets import mask_secrets
from fashioncnn.tracking.stores import resolve_tracking_uri

log = logging.getLogger(__name__)


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


class StoreAway(RuntimeError):
    """The tracking store did not come back before the job's end (tracking.outage_wait_seconds)."""


def train_and_log(cfg: DictConfig) -> float | None:
    """Train the model that `cfg` describes as one MLflow run; return its max test accuracy."""
    handle_sigterm()
    if EXPERIMENT_ID_ENV not in os.environ:
        raise RuntimeError("a fashioncnn job runs as part of a plan: start it with python -m fashioncnn")
    spec = ModelSpec.from_config(cfg.model)
    resume_run_id = os.environ.get(RESUME_RUN_ENV)
    name = run_name(cfg)
    uri = stores.resolve_tracking_uri(cfg)
    try:
        stores.wait_for_store(uri, cfg.tracking.outage_wait_seconds, cfg.tracking.retry_seconds)
    except OSError as error:
        return _store_away(name, f"tracking store {mask_secrets(uri)} did not answer for "
                                 f"{cfg.tracking.outage_wait_seconds:g} s (tracking.outage_wait_seconds): {error}; "
                                 "nothing trained, run the same command again")
    run = _start_claimed_run(cfg, name, uri, resume_run_id)
    if run is None:
        return None
    client, run_id = stores.store(uri).client, run.info.run_id
    heartbeat = lease.Heartbeat(client, run_id, cfg.lease.heartbeat_seconds)
    delivery = Delivery(client, run_id, cfg.tracking.max_queued, cfg.tracking.retry_seconds)
    record.deliver_through(delivery)
    logged = record.logged_steps(client, run_id) if resume_run_id else set()
    stored = checkpoints.for_run(cfg, run_id)
    try:
        if cfg.speed.threads:
            torch.set_num_threads(cfg.speed.threads)
        device = resolve_device(cfg.device, HydraConfig.get().job.num if _in_sweep() else None)
        data = load(cfg.data_dir, subset=cfg.subset, val_size=cfg.val_size)
        torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
        model = build_model(spec)
        param_count = count_parameters(model)
        if resume_run_id is None:
            record.log_metrics({"param_count": param_count})
            record.log_datasets(data, cfg.subset)
        log.info("%s: %s parameters, %d training and %d validation images from %s, device %s", name,
                 f"{param_count:,}", len(data.train_labels), len(data.val_labels), data.source, device)
        pruner = make_pruner(cfg, run_id)

        def after_epoch(metrics: EpochMetrics) -> str | None:
            if metrics.cut_short:  # said before its metrics land, so that no sibling's pruner counts them as an epoch
                record.set_tags({CUT_SHORT_EPOCH_TAG: str(metrics.epoch)})
            if metrics.epoch not in logged:  # re-trained after a resume: its metrics are already there
                record.log_epoch(metrics)
            # The run ends anyway after an epoch cut short; reported, it would count in Optuna's rungs
            return None if metrics.cut_short else pruner.after_epoch(metrics)

        result = train(cfg, model, data, device, on_epoch=after_epoch, checkpoints=stored)
        for restored in result.history[:result.resumed_after_epoch]:
            if restored.epoch not in logged:  # killed between its checkpoint and its metrics
                record.log_epoch(restored)
        record.log_where_it_ran(device, torch.get_num_threads(), result.precision)
        record.log_summary(result)
        if result.diverged:
            record.set_tags({DIVERGED_TAG: "true", "diverged_reason": result.diverged})
        elif result.pruned:  # never picked, so no model to keep
            record.set_tags({PRUNED_TAG: "true", "pruned_reason": result.pruned,
                               PRUNED_EPOCH_TAG: str(len(result.history))})  # what the summary's saving counts from
        if not delivery.drain(cfg.tracking.outage_wait_seconds):
            raise StoreAway(f"tracking store {mask_secrets(uri)} did not answer for "
                            f"{cfg.tracking.outage_wait_seconds:g} s (tracking.outage_wait_seconds) at the end of run "
                            f"{run_id}: its last metrics are not delivered; its checkpoint stays: run the same command "
                            "again to resume")
        if not result.diverged and not result.pruned and cfg.log_model:
            from fashioncnn.serving.flavor import log_model

            model.load_state_dict(result.best_state)
            log_model(model)
    except KeyboardInterrupt:
        _stop(heartbeat, delivery, drain_seconds=cfg.tracking.retry_seconds * 2)
        mlflow.set_tag("error", "interrupted (Ctrl-C or SIGTERM); run the same command again to resume")
        mlflow.end_run("KILLED")
        raise
    except StoreAway as error:
        _stop(heartbeat, delivery, drain_seconds=0)
        return _store_away(name, str(error))
    except Exception as error:
        _stop(heartbeat, delivery, drain_seconds=cfg.tracking.outage_wait_seconds)
        record.record_failure(error)
        mlflow.end_run("FAILED")
        if not _in_sweep():
            raise
        log.exception("%s: FAILED (run %s); the sweep goes on", name, run_id)
        return None

    _stop(heartbeat, delivery, drain_seconds=0)
    stored.finish(keep=cfg.keep_checkpoint, timeout=cfg.tracking.outage_wait_seconds)
    mlflow.end_run("FINISHED")
    best = result.best
    log.info("%s: best epoch %d by %s: %s, test accuracy there %.4f (max %.4f), %.1fs training (run %s)%s",
             name, result.best_epoch, result.select_metric, f"{getattr(best, result.select_metric):.4f}",
             best.test_acc, result.max_test_acc, result.train_seconds, run_id, _link(cfg, run))
    return result.max_test_acc


def _start_claimed_run(cfg: DictConfig, name: str, uri: str, resume_run_id: str | None) -> mlflow.ActiveRun | None:
    """The job's run, started (or resumed) and won against any other process on the same job; None when
    the job is left alone (another process holds it, or the store failed: each said so)."""
    client = stores.store(uri).client
    if resume_run_id and not lease.wins_resume(client, resume_run_id, cfg.lease.seconds):
        log.warning("%s: run %s is running elsewhere (another process holds its lease): left alone", name, resume_run_id)
        return None
    # The run starts before anything that can fail on this machine (device, data), so a failure is a
    # FAILED run with its error in MLflow, not just a traceback in a terminal.
    fingerprint, experiment_id = os.environ[FINGERPRINT_ENV], os.environ[EXPERIMENT_ID_ENV]
    try:
        run = start_run(cfg, name, fingerprint, experiment_id, resume_run_id)
    except Exception as error:
        if not uri.startswith(("http://", "https://")):
            raise
        if mlflow.active_run() is not None:
            mlflow.end_run("FAILED")  # best effort: the server may take it, else the lease lapses
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return _store_away(name, f"tracking store {mask_secrets(uri)} failed while the run started: "
                                 f"{mask_secrets(reason)}; nothing trained, run the same command again")
    if resume_run_id is None and not lease.wins_new_run(client, experiment_id, fingerprint, client.get_run(run.info.run_id),
                                                         cfg.lease.seconds, cfg.force):
        mlflow.end_run("KILLED")
        client.delete_run(run.info.run_id)  # a claim that lost: not a run of its own
        log.warning("%s: running elsewhere (another command started it at the same moment): left alone", name)
        return None
    return run


def _store_away(name: str, message: str) -> None:
    """The tracking store is gone: one line, no traceback; a single run exits 1, a sweep goes on."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if not _in_sweep():
        raise SystemExit(1)
    log.error("%s: %s; the sweep goes on", name, message)
    return None


def _stop(heartbeat: lease.Heartbeat, delivery: Delivery, drain_seconds: float) -> None:
    """The run's background threads end; what is queued gets up to `drain_seconds` to reach the store."""
    heartbeat.stop()
    delivery.drain(drain_seconds)
    delivery.close()
    record.deliver_through(None)


def _link(cfg: DictConfig, run: mlflow.ActiveRun) -> str:
    """For a tracking server, where to see the run (the UI in its model-training view)."""
    uri = stores.resolve_tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return ""
    return f"; {links.run_url(links.ui_base_for(uri), run.info.experiment_id, run.info.run_id)}"


def run_tags(model_name: str, fingerprint: str) -> dict[str, str]:
    """Overrides, the chosen option of each config group, the model and sweep: what the UI filters on."""
    tags = {"model_name": model_name, "mlflow.runName": model_name, FINGERPRINT_TAG: fingerprint, ROLE_TAG: "job"}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        tags["hydra.overrides"] = " ".join(hydra_cfg.overrides.task) or "(defaults)"
        for group, option in hydra_cfg.runtime.choices.items():
            if not group.startswith("hydra") and option is not None:
                tags[f"group.{group}"] = str(option)
                provenance = option_source(group, str(option), list(hydra_cfg.searchpath))
                if provenance:  # which file (built-in or a team's directory, and which version) chose this
                    tags[f"source.{group}"], tags[f"source_sha.{group}"] = provenance
        if hydra_cfg.runtime.choices.get("retrained_from"):  # the run fashioncnn.results.retrain replays (its option name)
            tags["retrained_from"] = str(hydra_cfg.runtime.choices["retrained_from"])
        if hydra_cfg.mode.name == "MULTIRUN":
            tags["hydra.job.num"] = str(hydra_cfg.job.num)
    tags.update(sweep_tags())
    return {key: mask_secrets(value) for key, value in tags.items()}


def sweep_tags() -> dict[str, str]:
    """The sweep and parent run this job belongs to (handed to it by the sweep's plan)."""
    tags = {}
    if os.environ.get(SWEEP_ID_ENV):
        tags[SWEEP_TAG] = os.environ[SWEEP_ID_ENV]
    if os.environ.get(PARENT_RUN_ENV):
        tags[PARENT_TAG] = os.environ[PARENT_RUN_ENV]
    return tags


def start_run(cfg: DictConfig, model_name: str, fingerprint: str, experiment_id: str,
              resume_run_id: str | None = None) -> mlflow.ActiveRun:
    """A new run with the full config, or (resume_run_id) the same run again, moved into the current sweep."""
    tracking_uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(tracking_uri)
    # MLflow's own "View run at" line links to the GenAI view (and would show a password in the URI);
    # the job prints the package's link instead.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    system_metrics = bool(cfg.system_metrics)
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)
        mlflow.set_tags({**sweep_tags(), "resumed": "true", **lease.heartbeat_tags()})
        return run
    run = mlflow.start_run(experiment_id=experiment_id, run_name=model_name,
                           tags=run_tags(model_name, fingerprint) | lease.heartbeat_tags(), log_system_metrics=system_metrics)
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    mlflow.log_params({key: mask_secrets(str(value)) for key, value in record.flatten(resolved)})
    mlflow.log_text(mask_secrets(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")
    return run
