"""One job of a sweep: validate the config, then, inside its MLflow run, load the data, build the model and train it."""

from __future__ import annotations

import logging

import mlflow
import torch
from omegaconf import DictConfig

from fashioncnn import tracking
from fashioncnn.config import validate
from fashioncnn.data import load
from fashioncnn.model import ModelSpec, build_model, count_parameters
from fashioncnn.train import resolve_device, train

log = logging.getLogger(__name__)


def train_and_log(cfg: DictConfig) -> float:
    """Train the model that `cfg` describes as one MLflow run; return its max test accuracy."""
    validate(cfg)
    spec = ModelSpec.from_config(cfg.model)
    # The run starts before anything that can fail on this machine (device, data), so a failure is a
    # FAILED run with its error in MLflow, not just a traceback in a terminal.
    with tracking.start_run(cfg, spec.name) as run:
        try:
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            device = resolve_device(cfg.device.value)
            data = load(cfg.data_dir, subset=cfg.subset)
            torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
            model = build_model(spec)
            param_count = count_parameters(model)
            mlflow.log_param("param_count", param_count)
            log.info("%s: %s parameters, %d training images from %s, device %s",
                     spec.name, f"{param_count:,}", len(data.train_labels), data.source, device)
            result = train(cfg, model, data, device, on_epoch=tracking.log_epoch)
        except BaseException as error:
            tracking.record_failure(error)
            raise
        tracking.log_summary(result, param_count)
    log.info("%s: max test accuracy %.4f, %.1fs training (run %s)", spec.name, result.max_test_acc, result.train_seconds, run.info.run_id)
    return result.max_test_acc
