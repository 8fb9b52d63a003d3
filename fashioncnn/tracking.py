"""Everything MLflow: where runs go, and what each run records.

Default store: sqlite at ./mlruns/mlflow.db with artifacts in ./mlruns/artifacts. MLflow 3 refuses a
plain file store without MLFLOW_ALLOW_FILE_STORE, and sqlite is what the MLflow UI and server read
fastest. Two processes creating a fresh sqlite store at the same moment crash on table creation, so
`prepare_store` runs once in the launching process (a Hydra callback) before any job starts.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fashioncnn.sources import option_source

if TYPE_CHECKING:  # the training loop's types only: importing torch here would slow every report
    from fashioncnn.train import EpochMetrics, TrainResult

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = Path("mlruns")
# Set by the command line for a -m sweep; jobs in other processes (joblib, submitit) inherit them.
SWEEP_ID_ENV = "FASHIONCNN_SWEEP_ID"
PARENT_RUN_ENV = "FASHIONCNN_PARENT_RUN_ID"
ROLE_TAG = "fashioncnn.role"  # "parent" for a sweep's parent run, "job" for each model's run
_PASSWORD_IN_URI = re.compile(r"(?<=://)([^:/@\s]+):([^@/\s]+)@")


def mask_secrets(text: str) -> str:
    """Replace the password of any user:password@ in URIs, so it never reaches logs, params or tags."""
    return _PASSWORD_IN_URI.sub(r"\1:***@", text)


class MaskSecrets(logging.Filter):
    """A logging filter (installed in conf/config.yaml) so no log line shows a password from a URI."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def default_tracking_uri() -> str:
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cfg: DictConfig) -> str:
    """The config key wins, then $MLFLOW_TRACKING_URI, then the local store in ./mlruns."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def prepare_store(tracking_uri: str, experiment: str) -> str:
    """Create the store's tables and the experiment if they are missing; return the experiment id."""
    if tracking_uri == default_tracking_uri():
        DEFAULT_STORE_DIR.mkdir(exist_ok=True)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    artifact_location = None
    if tracking_uri == default_tracking_uri():
        artifact_location = (DEFAULT_STORE_DIR / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(experiment, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our look-up and create; use theirs.
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


class PrepareStore(Callback):
    """Runs in the launching process before any job starts, whichever launcher runs the jobs."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        prepare_store(resolve_tracking_uri(config), config.experiment)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        prepare_store(resolve_tracking_uri(config), config.experiment)


def flatten(node: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, Mapping):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def run_tags(model_name: str, fingerprint: str) -> dict[str, str]:
    """Overrides, the chosen option of each config group, the model and sweep: what the UI filters on."""
    tags = {"model_name": model_name, "mlflow.runName": model_name, "fingerprint": fingerprint, ROLE_TAG: "job"}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        tags["hydra.overrides"] = " ".join(hydra_cfg.overrides.task) or "(defaults)"
        for group, option in hydra_cfg.runtime.choices.items():
            if not group.startswith("hydra") and option is not None:
                tags[f"group.{group}"] = str(option)
                provenance = option_source(group, str(option), list(hydra_cfg.searchpath))
                if provenance:  # which file (built-in or a team's directory, and which version) chose this
                    tags[f"source.{group}"], tags[f"source_sha.{group}"] = provenance
        if hydra_cfg.runtime.choices.get("retrained_from"):  # the run fashioncnn.retrain replays (its option name)
            tags["retrained_from"] = str(hydra_cfg.runtime.choices["retrained_from"])
        if hydra_cfg.mode.name == "MULTIRUN":
            tags["hydra.job.num"] = str(hydra_cfg.job.num)
    tags.update(sweep_tags())
    return {key: mask_secrets(value) for key, value in tags.items()}


def sweep_tags() -> dict[str, str]:
    """The sweep and parent run this process's jobs belong to (set by the command line for a -m sweep)."""
    tags = {}
    if os.environ.get(SWEEP_ID_ENV):
        tags["sweep_id"] = os.environ[SWEEP_ID_ENV]
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    return tags


def runs_with_fingerprint(client: MlflowClient, experiment_id: str, fingerprint: str) -> list[Run]:
    """All runs of this effective config in the experiment, newest first."""
    return client.search_runs(
        [experiment_id], filter_string=f"tags.fingerprint = '{fingerprint}'", order_by=["attributes.start_time DESC"], max_results=1000
    )


def start_run(cfg: DictConfig, model_name: str, fingerprint: str, resume_run_id: str | None = None) -> mlflow.ActiveRun:
    """A new run with the full config, or (resume_run_id) the same run again, moved into the current sweep."""
    tracking_uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(tracking_uri)
    if mask_secrets(tracking_uri) != tracking_uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # MLflow would print the URL with its password
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id)
        mlflow.set_tags({**sweep_tags(), "resumed": "true"})
        return run
    experiment_id = prepare_store(tracking_uri, cfg.experiment)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=model_name, tags=run_tags(model_name, fingerprint))
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    mlflow.log_params({key: mask_secrets(str(value)) for key, value in flatten(resolved)})
    mlflow.log_text(mask_secrets(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")
    return run


def record_failure(error: BaseException) -> None:
    """The error message as a tag and the traceback as an artifact of the active run."""
    message = mask_secrets(f"{type(error).__name__}: {error}")
    mlflow.set_tag("error", message[:5000])
    mlflow.log_text(mask_secrets("".join(traceback.format_exception(error))), "error.txt")


def log_epoch(metrics: EpochMetrics) -> None:
    mlflow.log_metrics(
        {
            "train_loss": metrics.train_loss,
            "train_acc": metrics.train_acc,
            "test_loss": metrics.test_loss,
            "test_acc": metrics.test_acc,
            "epoch_seconds": metrics.epoch_seconds,
        },
        step=metrics.epoch,
    )


def log_summary(result: TrainResult, param_count: int) -> None:
    mlflow.log_metrics(
        {
            "max_test_acc": result.max_test_acc,
            "mean_test_acc": result.mean_test_acc,
            "train_seconds": result.train_seconds,
            "param_count": float(param_count),
        }
    )
