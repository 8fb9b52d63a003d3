"""The cluster path for real: sweeps through `hydra/launcher=submitit_slurm` on a single-node SLURM cluster
(tests/conftest.py starts it: Debian's slurmctld, slurmd and munge on 127.0.0.1) into the team server on
PostgreSQL. The jobs run as SLURM jobs with their submitit folder in the test's directory, which the node
(this machine) sees.
"""

import os
import subprocess
import sys
import time

import pytest
from conftest import run_cli, runs_of
from mlflow.tracking import MlflowClient

from fashioncnn.core.data import DEBIAN_DIR

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")]

SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug"]
SMALL = ["model.filter_in=8", "model.filter_out=8", "val_size=500", "speed.threads=1", "log_model=false"]
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")


def parent_and_jobs(client: MlflowClient, experiment: str):
    runs = runs_of(client, experiment)
    parents = [r for r in runs if r.data.tags.get("fashioncnn.role") == "parent"]
    jobs = [r for r in runs if r.data.tags.get("fashioncnn.role") == "job"]
    return parents, jobs


def history(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in EPOCH_METRICS}


def start_cli(args, cwd, env=None):
    cwd.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | (env or {}) | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fashioncnn", *args], cwd=cwd, env=full_env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def submitit_logs(cwd) -> dict[str, str]:
    """SLURM job id -> the job's output and error logs, from submitit's folder in the sweep's directory.

    A sweep of several jobs is one job array (ids 4_0, 4_1, ...); a single job has a plain id.
    """
    folders = [folder for folder in cwd.glob("multirun/*/*/.submitit/*") if folder.is_dir()]
    return {folder.name: "".join(path.read_text() for path in sorted(folder.glob("*_0_log.*")))
            for folder in folders if any(folder.glob("*_0_log.*"))}


def test_a_sweep_on_slurm_nests_its_jobs_under_the_parent_run_in_the_team_server(slurm_cluster, postgres_server, tmp_path):
    args = ["-m", *SLURM, "conv=2,3", *SMALL, "subset=500", "epochs=1", "experiment=slurm-sweep", f"tracking_uri={postgres_server}"]
    result = run_cli(args, cwd=tmp_path, env=slurm_cluster.env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "2 jobs: 2 finished" in result.stdout
    # Accounting is off: one line says so, instead of submitit's warning at every poll.
    assert "Bypassing sacct error" not in output
    assert output.count("sacct does not work on this cluster (Slurm accounting storage is disabled)") == 1

    client = MlflowClient(postgres_server)
    (parent,), jobs = parent_and_jobs(client, "slurm-sweep")
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs_finished"] == 2
    assert sorted(r.data.tags["model_name"] for r in jobs) == ["M2.2.8.8", "M3.2.8.8"]
    for run in jobs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["sweep_id"] == parent.data.tags["sweep_id"]
        assert {"best_val_acc", "test_acc_at_best", "max_test_acc", "param_count"} <= set(run.data.metrics)
        assert list(history(client, run.info.run_id)["test_acc"]) == [1]
    # They ran as SLURM jobs: one submitit folder per array task, each with its job's log.
    logs = submitit_logs(tmp_path)
    assert len(logs) == 2, logs.keys()
    for run in jobs:
        assert sum(f"(run {run.info.run_id})" in log for log in logs.values()) == 1


def test_scancel_mid_epoch_ends_the_run_killed_and_the_same_command_resumes_it_with_identical_metrics(
        slurm_cluster, postgres_server, tmp_path):
    # 5 epochs: seconds of training left when scancel lands after epoch 1, even on a fast machine.
    common = [*SMALL, "subset=4000", "epochs=5", "system_metrics=false", f"tracking_uri={postgres_server}"]
    args = ["-m", *SLURM, "seed=1,2", *common, "experiment=slurm-resume"]
    sweep_dir = tmp_path / "sweep"
    sweep = start_cli(args, sweep_dir, env=slurm_cluster.env)
    client = MlflowClient(postgres_server)

    def epochs_logged(run_id: str) -> list[int]:
        return [m.step for m in client.get_metric_history(run_id, "test_acc")]

    deadline, run = time.monotonic() + 300, None
    while run is None or 1 not in epochs_logged(run.info.run_id):
        assert sweep.poll() is None, sweep.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "timed out waiting for epoch 1 of seed=2's run"
        time.sleep(0.5)
        if run is None and (experiment := client.get_experiment_by_name("slurm-resume")):
            run = next(iter(client.search_runs([experiment.experiment_id], "params.seed = '2'")), None)
    # Jobs of one sweep are one SLURM job array, in launch order: seed=2 is task 1.
    (task,) = [job for job in slurm_cluster.jobs() if job.endswith("_1")]
    slurm_cluster.command("scancel", task)
    output, _ = sweep.communicate(timeout=300)
    assert sweep.returncode == 1, output[-4000:]
    assert "2 jobs: 1 finished, 1 killed" in output, output[-4000:]

    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED", killed.info.status
    assert killed.data.tags["error"].startswith("interrupted")
    assert 1 <= len(epochs_logged(killed.info.run_id)) < 5
    assert "fashioncnn.job.signals.Terminated: signal 15" in submitit_logs(sweep_dir)[task]  # SLURM's SIGTERM, not a SIGKILL

    # The same config uninterrupted, on this machine (basic launcher), for comparison; beside the re-run.
    reference = start_cli(["seed=2", *common, "experiment=slurm-reference"], tmp_path / "reference")
    again = run_cli(args, cwd=sweep_dir, env=slurm_cluster.env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 jobs, 1 already finished" in again.stdout and "2 jobs: 1 finished, 1 skipped" in again.stdout
    resumed = client.get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert any("resumed from" in log and killed.info.run_id in log for job, log in submitit_logs(sweep_dir).items() if job != task)

    reference_output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_output[-3000:]
    (uninterrupted,) = runs_of(client, "slurm-reference")
    expected = history(client, uninterrupted.info.run_id)
    assert list(expected["test_acc"]) == [1, 2, 3, 4, 5]
    assert history(client, resumed.info.run_id) == expected  # every epoch's metrics, to float equality
    assert resumed.data.metrics["best_val_acc"] == uninterrupted.data.metrics["best_val_acc"]


def test_the_slurm_gpu_preset_composes_with_its_documented_overrides(tmp_path):
    preset = ["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"]
    shown = run_cli([*preset, "--cfg", "hydra"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-3000:]
    launcher = shown.stdout[shown.stdout.index("\n  launcher:"):shown.stdout.index("\n  sweeper:")]
    for line in ("_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "partition: gpu",
                 "gpus_per_node: 1", "tasks_per_node: 1", "cpus_per_task: 4", "mem_gb: 16", "timeout_min: 120",
                 "array_parallelism: 16"):
        assert f"\n    {line}\n" in launcher, line
    # The README's SLURM sweep, planned without a cluster: every job composes and validates.
    planned = run_cli(["-m", *preset, "conv=2,3", "lin=2,3,4", "lr=0.01,0.001", "--dry-run"], cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert "12 jobs: 12 to train, 0 to resume, 0 already finished" in planned.stdout
