"""Quick checks of the pieces behind the slow resilience tests: who holds a lease, the loop's order of checkpoint
and metrics, and the divergence guard at lr=1e6."""

import socket
import subprocess
import sys
import time

import pytest
import torch
from mlflow.entities import Run, RunData, RunInfo, RunTag
from test_speed import CPU, compose, tiny_data

from fashioncnn.core.loop import train
from fashioncnn.core.model import ModelSpec, build_model
from fashioncnn.job.checkpoints import LocalCheckpoints
from fashioncnn.job.lease import held_elsewhere, holder_gone, this_holder, where
from fashioncnn.tracking.names import HEARTBEAT_TAG, HOLDER_TAG


def a_run(status: str, heartbeat: float | None, holder: str | None = None) -> Run:
    tags = [RunTag(HEARTBEAT_TAG, f"{heartbeat:.0f}")] if heartbeat is not None else []
    tags += [RunTag(HOLDER_TAG, holder)] if holder is not None else []
    return Run(RunInfo("r1", "1", "me", status, 0, None, "active"), RunData(tags=tags))


def test_only_a_running_run_with_a_fresh_heartbeat_is_held_elsewhere():
    now = time.time()
    assert held_elsewhere(a_run("RUNNING", now - 10), lease_seconds=300, now=now)
    assert not held_elsewhere(a_run("RUNNING", now - 301), lease_seconds=300, now=now)  # its process is gone
    assert not held_elsewhere(a_run("KILLED", now - 10), lease_seconds=300, now=now)  # ended: resumable at once
    assert not held_elsewhere(a_run("RUNNING", None), lease_seconds=300, now=now)  # an older version's run


def test_a_holder_on_this_host_holds_only_while_its_process_lives():
    now = time.time()
    assert held_elsewhere(a_run("RUNNING", now - 10, this_holder()), lease_seconds=300, now=now)  # alive: this process
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped: the PID names no process (or, reused, one that started later)
    gone = f"{socket.gethostname()} {ended.pid} {time.time() - 5:.2f}"
    assert holder_gone(a_run("RUNNING", now - 10, gone))
    assert not held_elsewhere(a_run("RUNNING", now - 10, gone), lease_seconds=300, now=now)  # taken over at once
    host, pid, _ = this_holder().rsplit(" ", 2)
    reused = f"{host} {pid} {time.time() - 3600:.2f}"  # this PID, but a process that started an hour ago: not this one
    assert not held_elsewhere(a_run("RUNNING", now - 10, reused), lease_seconds=300, now=now)
    elsewhere = f"another-host.example {ended.pid} 1.00"  # another machine's process cannot be seen: its heartbeat says
    assert held_elsewhere(a_run("RUNNING", now - 10, elsewhere), lease_seconds=300, now=now)
    assert not held_elsewhere(a_run("RUNNING", now - 301, elsewhere), lease_seconds=300, now=now)
    assert where(a_run("RUNNING", now, elsewhere)) == f"another-host.example (pid {ended.pid})"
    assert where(a_run("RUNNING", now)) == "another process"  # an older version's run names no holder


def test_an_epochs_checkpoint_is_stored_before_its_metrics_are_handed_on(tmp_path):
    cfg = compose("model.filter_in=4", "model.filter_out=4", "epochs=3", "device=cpu")
    stored = LocalCheckpoints(tmp_path / "run.pt")
    seen = []

    def on_epoch(metrics):
        seen.append((metrics.epoch, len(torch.load(stored.path, weights_only=False)["history"])))

    torch.manual_seed(cfg.seed)
    train(cfg, build_model(ModelSpec.from_config(cfg.model)), tiny_data(), CPU, on_epoch=on_epoch, checkpoints=stored)
    assert seen == [(1, 1), (2, 2), (3, 3)]  # a kill in between leaves a checkpoint that holds the epoch
    assert torch.load(stored.path, weights_only=False)["history"][-1]["cut_short"] is False  # whole epochs


def test_a_run_at_lr_1e6_is_stopped_as_diverged():
    cfg = compose("model.filter_in=4", "model.filter_out=4", "epochs=3", "device=cpu", "optim.lr=1000000",
                  "divergence.warmup_images=0", "divergence.check_every=1")
    torch.manual_seed(cfg.seed)
    result = train(cfg, build_model(ModelSpec.from_config(cfg.model)), tiny_data(), CPU)
    assert result.diverged and "above divergence.max_loss=100" in result.diverged, result.diverged  # finite (2.5e28), above chance
    assert len(result.history) == 1 and result.history[0].cut_short  # not shown to the pruners (fashioncnn.job.run)


def test_a_dataset_insert_lost_to_a_concurrent_job_is_retried_and_other_errors_are_not(monkeypatch):
    # Two SLURM jobs of one sweep logging the same new dataset at once: PostgreSQL refused the second insert.
    import mlflow

    from fashioncnn.tracking import record

    calls = []

    def log_input(dataset, context, tags):
        calls.append(context)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException('duplicate key value violates unique constraint "dataset_pk"')

    monkeypatch.setattr(mlflow, "log_input", log_input)
    record._log_input_once_created(object(), "train", {})
    assert calls == ["train", "train"]

    def refuse(dataset, context, tags):
        raise mlflow.exceptions.MlflowException("RESOURCE_DOES_NOT_EXIST: run gone")

    monkeypatch.setattr(mlflow, "log_input", refuse)
    with pytest.raises(mlflow.exceptions.MlflowException, match="run gone"):
        record._log_input_once_created(object(), "train", {})


def test_a_decision_travels_as_one_hydra_override_and_back():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fashioncnn.job.decision import Decision, TrialRef

    decision = Decision("7", "0123456789abcdef", "r" * 32, "sweep1", "p" * 32,
                        TrialRef("study 'quoted' \\ name", "sqlite:////tmp/a b/optuna.db", 3))
    override = OverridesParser.create().parse_override(decision.override())
    assert override.key_or_group == "hydra.job.env_set.FASHIONCNN_DECISION"  # a hydra.* override: not in the launch log
    assert Decision.from_json(override.value()) == decision
    assert Decision.from_json(Decision("7", "fp").to_json()) == Decision("7", "fp")


def test_a_value_handed_to_a_sweeper_keeps_a_users_interpolation_for_each_job():
    import json

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from fashioncnn.sweep.launch import jobs_override

    jobs = [["conv='2'", "experiment=run-${model.conv}", "tag='it''s'"], ["conv='3'", "experiment=run-${model.conv}"]]
    value = OverridesParser.create().parse_override(jobs_override(jobs)).value()
    # Hydra builds the sweeper from its (resolved) config: the jobs arrive as typed, each job resolves its own.
    assert json.loads(OmegaConf.create({"jobs": value, "model": {"conv": 9}}).jobs) == jobs
