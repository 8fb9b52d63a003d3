"""Everything MLflow: where runs go, the tags that tie them together, and what each run records.

Default store: sqlite at ./mlruns/mlflow.db with artifacts in ./mlruns/artifacts. MLflow 3 refuses a
plain file store without MLFLOW_ALLOW_FILE_STORE, and sqlite is what the MLflow UI and server read
fastest. Each process talks to a store through one `Store` object (`store(uri)`), which looks each
experiment up once. Only the launching process creates the store and its experiments, before any job
starts, and a new sqlite store is built aside and linked into place (`open_sqlite_store`: two processes
creating one at the same moment break it); planning and `--dry-run` only read, and never create a
store that does not exist yet. A job's metrics and tags go through `deliver_through`'s queue
(delivery.py) so that a tracking-server outage does not stop training.

Kept free of torch, so reports and the command line start quickly.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import mlflow
from hydra.core.hydra_config import HydraConfig
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fashioncnn import lease
from fashioncnn.config import ranking_metric
from fashioncnn.sources import option_source

if TYPE_CHECKING:  # the training loop's types only: importing torch here would slow every report
    from fashioncnn.data import FashionMNIST
    from fashioncnn.delivery import Delivery
    from fashioncnn.train import EpochMetrics, TrainResult

log = logging.getLogger(__name__)
# MLflow's system-metrics monitor says three INFO lines per run that tell a user nothing.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

DEFAULT_STORE_DIR = Path("mlruns")
# A job's decision, handed to it by the sweep's plan through hydra.job.env_set (fashioncnn.sweep).
SWEEP_ID_ENV = "FASHIONCNN_SWEEP_ID"
PARENT_RUN_ENV = "FASHIONCNN_PARENT_RUN_ID"
EXPERIMENT_ID_ENV = "FASHIONCNN_EXPERIMENT_ID"
RESUME_RUN_ENV = "FASHIONCNN_RESUME_RUN_ID"
FINGERPRINT_ENV = "FASHIONCNN_FINGERPRINT"
# Tags: what the UI, reports, retrain and the plan filter on.
ROLE_TAG = "fashioncnn.role"  # "parent" for a sweep's parent run, "job" for each model's run
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "sweep_id"
FINGERPRINT_TAG = "fingerprint"
DIVERGED_TAG = "diverged"
# The epoch the divergence guard stopped a run in: its metrics there are of part of an epoch, which the
# run did not reach (pruners and Optuna trials leave it out).
CUT_SHORT_EPOCH_TAG = "cut_short_epoch"
PRUNED_TAG = "pruned"  # stopped early by a pruner: never picked by retrain or the registry
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


def resolve_tracking_uri(cfg: DictConfig | None = None, requested: str | None = None) -> str:
    """The config key (or `requested`) wins, then $MLFLOW_TRACKING_URI, then the local store in ./mlruns."""
    chosen = requested or (cfg.tracking_uri if cfg is not None else None)
    return chosen or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


class Store:
    """One tracking store as this process sees it: one client, and each experiment looked up once."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client: MlflowClient | None = None
        self._experiment_ids: dict[str, str] = {}

    @property
    def client(self) -> MlflowClient:
        # Made on first use: a client of a sqlite URI creates the database file and its tables.
        if self._client is None:
            path = sqlite_path(self.uri)
            self._client = open_sqlite_store(path) if path is not None else MlflowClient(self.uri)
        return self._client

    def exists(self) -> bool:
        """False for a local sqlite store not created yet: reading it would create it."""
        path = sqlite_path(self.uri)
        return path is None or path.exists()

    def check_reachable(self, timeout: float = 5.0) -> None:
        """For a tracking server: one request with a short timeout, so a wrong address fails in seconds
        (MLflow's own client retries for minutes). Raises OSError with the reason."""
        if not self.uri.startswith(("http://", "https://")):
            return
        import urllib.error
        import urllib.request

        from fashioncnn.links import without_credentials

        address = without_credentials(self.uri)  # urllib would take user:password@ for the host
        try:
            urllib.request.urlopen(f"{address}/health", timeout=timeout)
        except urllib.error.HTTPError:
            return  # it answered (a proxy or an auth layer may refuse /health): reachable
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise OSError(f"no answer within {timeout:g} s ({reason})") from error

    def experiment_id(self, name: str, create: bool = False) -> str | None:
        """The experiment's id; with `create`, the store and experiment are made when missing."""
        if name in self._experiment_ids:
            return self._experiment_ids[name]
        if not create and not self.exists():
            return None
        if create and self.uri == default_tracking_uri():
            DEFAULT_STORE_DIR.mkdir(exist_ok=True)
        found = self.client.get_experiment_by_name(name)
        if found is None and not create:
            return None
        if found is None:
            artifact_location = None
            if self.uri == default_tracking_uri():
                artifact_location = (DEFAULT_STORE_DIR / "artifacts").resolve().as_uri()
            try:
                self._experiment_ids[name] = self.client.create_experiment(name, artifact_location=artifact_location)
            except mlflow.exceptions.MlflowException:
                # Another process created it between our look-up and create; use theirs.
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found is not None:
            self._experiment_ids[name] = found.experiment_id
        return self._experiment_ids[name]

    def search(self, experiment_id: str, filter_string: str = "") -> list[Run]:
        """Every active run that matches, newest first, all pages."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=1000,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def runs_by_fingerprint(self, experiment_id: str) -> dict[str, list[Run]]:
        """The experiment's job runs grouped by the fingerprint of their effective config, newest first."""
        grouped: dict[str, list[Run]] = {}
        for run in self.search(experiment_id, f"tags.{FINGERPRINT_TAG} LIKE '%'"):
            if FINGERPRINT_TAG in run.data.tags:
                grouped.setdefault(run.data.tags[FINGERPRINT_TAG], []).append(run)
        return grouped


def open_sqlite_store(path: Path, attempts: int = 40, pause: float = 0.5) -> MlflowClient:
    """A client of the sqlite store at `path`, never racing another process that creates it.

    Two processes that create the same new database at once run MLflow's schema migrations over each other
    ("table ... already exists", or a database left with no schema version: broken for good). So a new
    store is built under a private name and linked into place only if no file is there yet; a file that
    another process is still writing is given time to settle, and opening it is retried."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        private = path.with_name(f".{path.name}.creating-{os.getpid()}")
        private.unlink(missing_ok=True)
        builder = MlflowClient(f"sqlite:///{private}")
        builder._tracking_client.store.engine.dispose()  # noqa: SLF001  (MLflow makes the tables on first access)
        try:
            os.link(private, path)  # atomic, and refuses when another process's file is already there
        except FileExistsError:
            pass
        finally:
            private.unlink(missing_ok=True)
    for attempt in range(attempts):
        if not _schema_complete(path) and attempt < attempts - 1:  # another process is still making its tables
            time.sleep(pause)
            continue
        try:
            return MlflowClient(f"sqlite:///{path}")  # opens the store (and makes its tables when there are none)
        except Exception as error:  # sqlalchemy's OperationalError or MLflow's schema check, depending on the moment
            if attempt == attempts - 1:
                raise
            log.debug("sqlite store %s being created by another process (%s); retrying", path, str(error).splitlines()[0])
            time.sleep(pause)
    raise AssertionError("unreachable")


def _schema_complete(path: Path) -> bool:
    """Whether the sqlite database at `path` has MLflow's schema at its latest version (read-only look)."""
    import sqlite3

    from mlflow.store.db.utils import _get_latest_schema_revision

    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5) as connection:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return False
    return row is not None and row[0] == _get_latest_schema_revision()


def wait_for_store(uri: str, seconds: float, pause: float) -> None:
    """For a tracking server: wait up to `seconds` for it to answer (a job starting during an outage);
    raises OSError with the reason when it does not."""
    deadline = time.monotonic() + seconds
    for attempt in itertools.count():
        try:
            store(uri).check_reachable()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            if attempt == 0:
                log.warning("tracking server %s not answering; waiting for it (up to %g s)", mask_secrets(uri), seconds)
            time.sleep(pause)


_stores: dict[str, Store] = {}


def store(uri: str) -> Store:
    """This process's Store for `uri`, created on first use."""
    if uri not in _stores:
        _stores[uri] = Store(uri)
    return _stores[uri]


def flatten(node: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, Mapping):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


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
        if hydra_cfg.runtime.choices.get("retrained_from"):  # the run fashioncnn.retrain replays (its option name)
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
    mlflow.log_params({key: mask_secrets(str(value)) for key, value in flatten(resolved)})
    mlflow.log_text(mask_secrets(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")
    return run


_delivery: Delivery | None = None  # the active run's queue (job.py), else the fluent API logs directly


def deliver_through(delivery: Delivery | None) -> None:
    """Send the active run's metrics and tags through `delivery` (None: straight to the store)."""
    global _delivery
    _delivery = delivery


def log_metrics(values: Mapping[str, float], step: int | None = None) -> None:
    if _delivery is not None:
        _delivery.log(metrics=values, step=step or 0)
    else:
        mlflow.log_metrics(dict(values), step=step)


def set_tags(tags: Mapping[str, str]) -> None:
    if _delivery is not None:
        _delivery.log(tags=tags)
    else:
        mlflow.set_tags(dict(tags))


def epochs_reached(run: Run, history: Mapping[int, float]) -> dict[int, float]:
    """`history` (a metric of `run` per epoch) without the epoch the divergence guard cut short.

    Counted, that part-epoch at chance level would lower a median and swell a rung: every grid at a high
    learning rate would prune less.
    """
    cut_short = run.data.tags.get(CUT_SHORT_EPOCH_TAG)
    return {step: value for step, value in history.items() if cut_short is None or step != int(cut_short)}


def logged_steps(client: MlflowClient, run_id: str) -> set[int]:
    """The epochs whose metrics the run already has (a resumed run logs each epoch once)."""
    return {metric.step for metric in client.get_metric_history(run_id, "test_acc")}


def record_failure(error: BaseException) -> None:
    """The error message as a tag and the traceback as an artifact of the active run."""
    message = mask_secrets(f"{type(error).__name__}: {error}")
    mlflow.set_tag("error", message[:5000])
    mlflow.log_text(mask_secrets("".join(traceback.format_exception(error))), "error.txt")


def log_epoch(metrics: EpochMetrics) -> None:
    values = {
        "train_loss": metrics.train_loss,
        "train_acc": metrics.train_acc,
        "test_loss": metrics.test_loss,
        "test_acc": metrics.test_acc,
        "epoch_seconds": metrics.epoch_seconds,
    }
    if metrics.val_acc is not None:
        values |= {"val_loss": metrics.val_loss, "val_acc": metrics.val_acc}
    if metrics.lr is not None:
        values["lr"] = metrics.lr
    log_metrics(values, step=metrics.epoch)


def log_summary(result: TrainResult) -> None:
    """The run's verdict: its best epoch by the selection metric, what the test set says there, the study's figures."""
    best = result.best
    values = {
        "max_test_acc": result.max_test_acc,  # the study's figure (the test set picks the epoch)
        "mean_test_acc": result.mean_test_acc,
        "train_seconds": result.train_seconds,
        "best_epoch": float(result.best_epoch),
        "test_acc_at_best": best.test_acc,  # the honest figure: the epoch was picked without the test set
    }
    if result.select_metric != "test_acc":
        values[ranking_metric(result.select_metric)] = getattr(best, result.select_metric)
    if result.seconds_to_90 is not None:  # time-to-accuracy, as speedrun records compare
        values["seconds_to_90"] = result.seconds_to_90
    log_metrics(values)


def log_where_it_ran(device: Any, threads: int, precision: str) -> None:
    """What actually ran: the device (not `auto`), its name, torch, threads and the precision used."""
    import platform

    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")),
                    platform.processor() or platform.machine())
    set_tags({"ran.device": str(device), "ran.device_name": name, "ran.torch": torch.__version__,
                     "ran.threads": str(threads), "ran.precision": precision})


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def log_datasets(data: FashionMNIST, subset: int | None) -> None:
    """Fashion-MNIST as MLflow datasets (the runs table's Dataset column): one per split, with the
    digest of the files read, where they were read from, and what was taken from them."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers the local-file source twice and says so, harmlessly
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(data.source))
    splits = [("train", len(data.train_labels)), ("validation", len(data.val_labels)), ("test", len(data.test_labels))]
    for context, count in splits:
        if count == 0:
            continue
        # Each split is its own dataset: MLflow keeps one input per dataset and run, whatever its context.
        digest = hashlib.sha256(f"{data.digest}/{context}/{len(data.val_labels)}/{subset}".encode()).hexdigest()[:16]
        tags = {"images": str(count)} | ({"subset": str(subset)} if context == "train" and subset is not None else {})
        _log_input_once_created(MetaDataset(source, name=f"fashion-mnist-{context}", digest=digest), context, tags)


def _log_input_once_created(dataset: Any, context: str, tags: dict[str, str], attempts: int = 4) -> None:
    """mlflow.log_input, again when it loses a race: two jobs logging the same new dataset at the same moment
    both insert it, and the store refuses the second (PostgreSQL: "duplicate key ... dataset_pk"); the next
    attempt finds the dataset and only links the run to it."""
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context, tags=tags)
            return
        except mlflow.exceptions.MlflowException as error:
            lost_race = "dataset_pk" in str(error) or "UNIQUE constraint failed: datasets" in str(error)
            if not lost_race or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
