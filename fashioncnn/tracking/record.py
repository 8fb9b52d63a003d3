"""What a job's run records: its epochs, its verdict, where it ran, its data, its failure.

The functions here say what is recorded; the job's run (fashioncnn.job.tracked_run) sends it, through
its delivery queue, so that a tracking-server outage does not stop training. Kept free of torch at
import, so reports and the command line start quickly.
"""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fashioncnn.core.config import ranking_metric
from fashioncnn.tracking.names import CUT_SHORT_EPOCH_TAG
from fashioncnn.tracking.secrets import mask_secrets

if TYPE_CHECKING:  # the training loop's types only: importing torch here would slow every report
    from fashioncnn.core.data import FashionMNIST
    from fashioncnn.core.loop import EpochMetrics, TrainResult


log = logging.getLogger(__name__)

# MLflow's system-metrics monitor says three INFO lines per run that tell a user nothing.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def flatten(node: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, Mapping):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value

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


def failure(error: BaseException) -> tuple[str, str]:
    """The error message (for the run's `error` tag) and its traceback (the artifact error.txt)."""
    message = mask_secrets(f"{type(error).__name__}: {error}")
    return message[:5000], mask_secrets("".join(traceback.format_exception(error)))


def epoch_values(metrics: EpochMetrics) -> dict[str, float]:
    """One epoch's metrics, logged at step = the epoch."""
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
    return values


def summary_values(result: TrainResult) -> dict[str, float]:
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
    return values


def where_it_ran(device: Any, threads: int, precision: str) -> dict[str, str]:
    """What actually ran: the device (not `auto`), its name, torch, threads and the precision used."""
    import platform

    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")),
                    platform.processor() or platform.machine())
    return {"ran.device": str(device), "ran.device_name": name, "ran.torch": torch.__version__,
            "ran.threads": str(threads), "ran.precision": precision}


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
