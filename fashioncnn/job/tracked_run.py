"""One job's MLflow run, from its claim to its final status: the run's life in one place.

`TrackedRun.open(cfg, decision, name)` waits for the store (a job may start during an outage), starts
the run or resumes the one the plan chose, and wins it against any other process on the same job
(fashioncnn.job.lease); None when the job is left alone, each case said in one line. Used as a context
manager, the run keeps its heartbeat and owns the delivery queue through which every metric and tag of
the job goes, the pruners' included, so that training outlives a tracking-server outage. On leaving it
sets the final status: FINISHED; KILLED on Ctrl-C or SIGTERM (the checkpoint stays for a resume); FAILED
with the error as a tag and its traceback as error.txt (a -m sweep goes on, a single run raises); or,
when the store stays away, one line and no status (the checkpoint stays; the lease lapses).
"""

from __future__ import annotations

import logging
import os
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Mapping

import mlflow
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fashioncnn.core.loop import EpochMetrics, TrainResult
from fashioncnn.core.sources import option_source
from fashioncnn.job import lease
from fashioncnn.job.decision import Decision
from fashioncnn.tracking import links, record, stores
from fashioncnn.tracking.delivery import Delivery
from fashioncnn.tracking.names import (
    DIVERGED_REASON_TAG,
    DIVERGED_TAG,
    FINGERPRINT_TAG,
    PARENT_TAG,
    PRUNED_EPOCH_TAG,
    PRUNED_REASON_TAG,
    PRUNED_TAG,
    ROLE_TAG,
    SWEEP_TAG,
)
from fashioncnn.tracking.secrets import mask_secrets

if TYPE_CHECKING:
    from torch import nn

    from fashioncnn.core.data import FashionMNIST

log = logging.getLogger(__name__)


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


class StoreAway(RuntimeError):
    """The tracking store did not come back before the job's end (tracking.outage_wait_seconds)."""


class TrackedRun:
    """The job's run while it trains: its heartbeat, its delivery queue, its writes, its final status."""

    def __init__(self, cfg: DictConfig, decision: Decision, name: str, active: mlflow.ActiveRun) -> None:
        self.cfg, self.decision, self.name, self.active = cfg, decision, name, active
        self.uri = stores.resolve_tracking_uri(cfg)
        self.client = stores.store(self.uri).client
        self.run_id = active.info.run_id
        self.resumed = decision.resume_run_id is not None
        self.logged = record.logged_steps(self.client, self.run_id) if self.resumed else set()  # epochs it already has
        self.heartbeat = lease.Heartbeat(self.client, self.run_id, cfg.lease.heartbeat_seconds)
        self.delivery = Delivery(self.client, self.run_id, cfg.tracking.max_queued, cfg.tracking.retry_seconds)

    @classmethod
    def open(cls, cfg: DictConfig, decision: Decision, name: str) -> TrackedRun | None:
        uri, wait = stores.resolve_tracking_uri(cfg), cfg.tracking.outage_wait_seconds
        try:
            stores.wait_for_store(uri, wait, cfg.tracking.retry_seconds)
        except OSError as error:
            return store_away(name, f"tracking store {mask_secrets(uri)} did not answer for {wait:g} s "
                                    f"(tracking.outage_wait_seconds): {error}; nothing trained, run the same command again")
        active = _start_claimed_run(cfg, decision, name, uri)
        return None if active is None else cls(cfg, decision, name, active)

    # ---------------------------------------------------------------- every write of the job goes through these

    def log_metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        self.delivery.log(metrics=values, step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.delivery.log(tags=tags)

    def log_epoch(self, metrics: EpochMetrics) -> None:
        """An epoch's metrics, once: a resumed run re-trains no epoch it has, and logs those it lacks."""
        if metrics.epoch not in self.logged:
            self.log_metrics(record.epoch_values(metrics), step=metrics.epoch)
            self.logged.add(metrics.epoch)

    def log_datasets(self, data: FashionMNIST, subset: int | None) -> None:
        record.log_datasets(data, subset)

    def log_model(self, model: nn.Module) -> None:
        """The model as an MLflow model of this run (fashioncnn.serving.flavor)."""
        from fashioncnn.serving.flavor import log_model  # torch.export's import costs seconds: only when used

        log_model(model)

    def log_outcome(self, result: TrainResult, where: Mapping[str, str]) -> None:
        """Where the run ran, its verdict, and why it stopped early if it did; then waits for all of it to
        reach the store (StoreAway if it does not)."""
        self.set_tags(where)
        self.log_metrics(record.summary_values(result))
        if result.diverged:
            self.set_tags({DIVERGED_TAG: "true", DIVERGED_REASON_TAG: result.diverged})
        elif result.pruned:  # never picked, so no model to keep; the epoch is what the summary's saving counts from
            self.set_tags({PRUNED_TAG: "true", PRUNED_REASON_TAG: result.pruned, PRUNED_EPOCH_TAG: str(len(result.history))})
        wait = self.cfg.tracking.outage_wait_seconds
        if not self.delivery.drain(wait):
            raise StoreAway(f"tracking store {mask_secrets(self.uri)} did not answer for {wait:g} s "
                            f"(tracking.outage_wait_seconds) at the end of run {self.run_id}: its last metrics are not "
                            "delivered; its checkpoint stays: run the same command again to resume")

    def link(self) -> str:
        """For a tracking server, where to see the run (the UI in its model-training view)."""
        if not self.uri.startswith(("http://", "https://")):
            return ""
        return f"; {links.run_url(links.ui_base_for(self.uri), self.active.info.experiment_id, self.run_id)}"

    # ---------------------------------------------------------------- the final status

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> bool:
        tracking = self.cfg.tracking
        if kind is None:
            self._stop(drain_seconds=0)
            mlflow.end_run("FINISHED")
            return False
        if issubclass(kind, KeyboardInterrupt):
            self._stop(drain_seconds=tracking.retry_seconds * 2)
            mlflow.set_tag("error", "interrupted (Ctrl-C or SIGTERM); run the same command again to resume")
            mlflow.end_run("KILLED")
            return False
        if issubclass(kind, StoreAway):
            self._stop(drain_seconds=0)
            store_away(self.name, str(error))
            return True
        if not issubclass(kind, Exception):
            return False
        self._stop(drain_seconds=tracking.outage_wait_seconds)
        message, traceback_text = record.failure(error)
        mlflow.set_tag("error", message)
        mlflow.log_text(traceback_text, "error.txt")
        mlflow.end_run("FAILED")
        if not in_sweep():
            return False
        log.error("%s: FAILED (run %s); the sweep goes on", self.name, self.run_id, exc_info=(kind, error, trace))
        return True

    def _stop(self, drain_seconds: float) -> None:
        """The run's background threads end; what is queued gets up to `drain_seconds` to reach the store."""
        self.heartbeat.stop()
        self.delivery.drain(drain_seconds)
        self.delivery.close()


def store_away(name: str, message: str) -> None:
    """The tracking store is gone: one line, no traceback; a single run exits 1, a sweep goes on."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if not in_sweep():
        raise SystemExit(1)
    log.error("%s: %s; the sweep goes on", name, message)
    return None


def _start_claimed_run(cfg: DictConfig, decision: Decision, name: str, uri: str) -> mlflow.ActiveRun | None:
    """The job's run, started (or resumed) and won against any other process on the same job; None when
    the job is left alone (another process holds it, or the store failed: each said so)."""
    client, resume_run_id = stores.store(uri).client, decision.resume_run_id
    if resume_run_id and not lease.wins_resume(client, resume_run_id, cfg.lease.seconds):
        log.warning("%s: run %s is running elsewhere (another process holds its lease): left alone", name, resume_run_id)
        return None
    # The run starts before anything that can fail on this machine (device, data), so a failure is a
    # FAILED run with its error in MLflow, not just a traceback in a terminal.
    try:
        run = _start_run(cfg, decision, name)
    except Exception as error:
        if not uri.startswith(("http://", "https://")):
            raise
        if mlflow.active_run() is not None:
            mlflow.end_run("FAILED")  # best effort: the server may take it, else the lease lapses
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return store_away(name, f"tracking store {mask_secrets(uri)} failed while the run started: "
                                f"{mask_secrets(reason)}; nothing trained, run the same command again")
    if resume_run_id is None and not lease.wins_new_run(client, decision.experiment_id, decision.fingerprint,
                                                         client.get_run(run.info.run_id), cfg.lease.seconds, cfg.force):
        mlflow.end_run("KILLED")
        client.delete_run(run.info.run_id)  # a claim that lost: not a run of its own
        log.warning("%s: running elsewhere (another command started it at the same moment): left alone", name)
        return None
    return run


def _start_run(cfg: DictConfig, decision: Decision, name: str) -> mlflow.ActiveRun:
    """A new run with the full config, or (a resume) the same run again, moved into the current sweep."""
    mlflow.set_tracking_uri(stores.resolve_tracking_uri(cfg))
    # MLflow's own "View run at" line links to the GenAI view (and would show a password in the URI);
    # the job prints the package's link instead.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    system_metrics = bool(cfg.system_metrics)
    if decision.resume_run_id:
        run = mlflow.start_run(run_id=decision.resume_run_id, log_system_metrics=system_metrics)
        mlflow.set_tags({**_sweep_tags(decision), "resumed": "true", **lease.heartbeat_tags()})
        return run
    run = mlflow.start_run(experiment_id=decision.experiment_id, run_name=name, log_system_metrics=system_metrics,
                           tags=_run_tags(name, decision) | lease.heartbeat_tags())
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    mlflow.log_params({key: mask_secrets(str(value)) for key, value in record.flatten(resolved)})
    mlflow.log_text(mask_secrets(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")
    return run


def _run_tags(model_name: str, decision: Decision) -> dict[str, str]:
    """Overrides, the chosen option of each config group, the model and sweep: what the UI filters on."""
    tags = {"model_name": model_name, "mlflow.runName": model_name, FINGERPRINT_TAG: decision.fingerprint, ROLE_TAG: "job"}
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
    tags.update(_sweep_tags(decision))
    return {key: mask_secrets(value) for key, value in tags.items()}


def _sweep_tags(decision: Decision) -> dict[str, str]:
    """The sweep and parent run this job belongs to."""
    tags = {SWEEP_TAG: decision.sweep_id, PARENT_TAG: decision.parent_run_id}
    return {key: value for key, value in tags.items() if value}
