"""Sweeps that never lose work: real subprocess sweeps on small subsets of the real data."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import local_store, run_cli, runs_of
from mlflow.tracking import MlflowClient

from fashioncnn.core.data import DEBIAN_DIR

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")]

SMALL = ["model.filter_in=8", "model.filter_out=8"]


def parent_and_jobs(client: MlflowClient, experiment: str):
    runs = runs_of(client, experiment)
    parents = [r for r in runs if r.data.tags.get("fashioncnn.role") == "parent"]
    jobs = [r for r in runs if r.data.tags.get("fashioncnn.role") == "job"]
    return parents, jobs


def metric_history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_a_failing_job_does_not_stop_the_sweep_and_a_rerun_retries_only_it(tmp_path):
    args = ["-m", "debug.fail_at_epoch=1,null", "subset=128", "epochs=1", *SMALL, "experiment=failing"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    summary = result.stdout[result.stdout.index("(parent run"):]
    assert "FAILED" in summary and "FINISHED" in summary and "2 jobs: 1 failed, 1 finished" in summary

    client = local_store(tmp_path)
    (parent,), jobs = parent_and_jobs(client, "failing")
    assert parent.info.status == "FAILED"
    failed = next(r for r in jobs if r.info.status == "FAILED")
    finished = next(r for r in jobs if r.info.status == "FINISHED")
    assert failed.data.tags["error"] == "RuntimeError: injected failure at epoch 1 (debug.fail_at_epoch=1)"
    assert "Traceback" in open(client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path))).read()
    for job in jobs:
        assert job.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert job.data.tags["sweep_id"] == parent.data.tags["sweep_id"]
    table = open(client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))).read()
    assert failed.info.run_id in table and finished.info.run_id in table
    csv_rows = open(client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))).read().splitlines()
    assert csv_rows[0] == "job,model,overrides,status,best_val_acc,test_acc_at_best,max_test_acc,seconds,run_id" and len(csv_rows) == 3

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 1
    assert "1 already finished (re-attached to its parent run)" in again.stdout
    assert "2 jobs: 1 failed, 1 skipped" in again.stdout
    parents, jobs = parent_and_jobs(client, "failing")
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert sorted(r.info.status for r in jobs) == ["FAILED", "FAILED", "FINISHED"]  # only the failed job ran again


def test_a_diverging_model_stops_early_and_the_sweep_goes_on(tmp_path):
    guard = ["divergence.warmup_images=1024", "divergence.check_every=4", "divergence.patience=3"]
    args = ["-m", "optim.lr=50,0.001", "subset=4096", "epochs=3", *SMALL, *guard, "experiment=diverge"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = local_store(tmp_path)
    _, jobs = parent_and_jobs(client, "diverge")
    diverged = next(r for r in jobs if r.data.params["optim.lr"] == "50.0")
    healthy = next(r for r in jobs if r.data.params["optim.lr"] == "0.001")
    assert diverged.info.status == "FINISHED" and diverged.data.tags["diverged"] == "true"
    reason = diverged.data.tags["diverged_reason"]
    assert "chance level" in reason or "became nan" in reason or "above divergence.max_loss=100" in reason, reason
    assert list(metric_history(client, diverged.info.run_id, "test_acc")) == [1]  # stopped inside epoch 1
    assert diverged.data.tags["cut_short_epoch"] == "1"  # so no sibling's pruner counts it as an epoch reached
    assert "cut_short_epoch" not in healthy.data.tags
    assert list(metric_history(client, healthy.info.run_id, "test_acc")) == [1, 2, 3]
    assert "diverged" not in healthy.data.tags
    assert "DIVERGED" in result.stdout


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def start_cli(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([sys.executable, "-m", "fashioncnn", *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_9_mid_job_then_rerun_resumes_from_the_checkpoint_with_identical_metrics(tmp_path):
    # 20 epochs of 0.2-0.4 s: the kill lands seconds before the second job could finish, even on a fast machine.
    epochs = 20
    args = ["-m", "seed=1,2", "subset=512", f"epochs={epochs}", *SMALL, "experiment=resume", "lease.seconds=600"]
    checkpoints = tmp_path / "mlruns" / "checkpoints"
    sweep = start_cli(args, tmp_path)
    client = local_store(tmp_path)

    def second_job_has_logged_an_epoch():
        if not (tmp_path / "mlruns" / "mlflow.db").exists() or client.get_experiment_by_name("resume") is None:
            return False
        _, jobs = parent_and_jobs(client, "resume")
        second = [r for r in jobs if r.info.status == "RUNNING" and r.data.params.get("seed") == "2"]
        return bool(second) and bool(metric_history(client, second[0].info.run_id, "test_acc")) and any(checkpoints.glob("*.pt"))

    wait_for(second_job_has_logged_an_epoch, 300, "the second job's first logged epoch")
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    _, jobs = parent_and_jobs(client, "resume")
    killed = next(r for r in jobs if r.info.status == "RUNNING")  # kill -9 leaves no chance to say otherwise
    epochs_before = len(metric_history(client, killed.info.run_id, "test_acc"))
    assert 1 <= epochs_before < epochs

    # At once, within a long lease: its holder was a process of this machine, and it is gone.
    planned = run_cli([*args, "--dry-run"], cwd=tmp_path)
    assert f"resume run {killed.info.run_id} from its checkpoint" in planned.stdout, planned.stdout
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 jobs, 1 already finished" in again.stdout
    assert "resumed from" in again.stdout
    assert "2 jobs: 1 finished, 1 skipped" in again.stdout
    resumed = client.get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed"] == "true"
    assert not any(checkpoints.glob("*.pt"))  # cleaned up when the run finished

    reference = run_cli(["seed=2", "subset=512", f"epochs={epochs}", *SMALL, "experiment=reference"], cwd=tmp_path)
    assert reference.returncode == 0
    (uninterrupted,) = runs_of(client, "reference")
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert metric_history(client, resumed.info.run_id, key) == metric_history(client, uninterrupted.info.run_id, key), key

    third = run_cli(args, cwd=tmp_path)  # a finished sweep: nothing trains
    assert third.returncode == 0 and "2 jobs: 2 skipped" in third.stdout
    assert len(runs_of(client, "resume")) == len(jobs) + 1  # + the parent run; no new runs


def test_sigterm_marks_the_run_killed(tmp_path):
    process = start_cli(["subset=512", "epochs=50", *SMALL, "experiment=terminated"], tmp_path)
    wait_for(lambda: any((tmp_path / "mlruns" / "checkpoints").glob("*.pt")), 300, "the first checkpoint")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output[-3000:]
    (run,) = runs_of(local_store(tmp_path), "terminated")
    assert run.info.status == "KILLED"
    assert "run the same command again to resume" in output


def test_two_joblib_workers_on_a_fresh_store(tmp_path):
    args = ["-m", "conv=2,3", "lin=2,3", "subset=128", "epochs=1", *SMALL, "threads=1", "experiment=parallel",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = local_store(tmp_path)
    (parent,), jobs = parent_and_jobs(client, "parallel")
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["model_name"] for r in jobs) == ["M2.2.8.8", "M2.3.8.8", "M3.2.8.8", "M3.3.8.8"]
    for job in jobs:
        assert job.info.status == "FINISHED"
        assert job.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert len(metric_history(client, job.info.run_id, "test_acc")) == 1


def test_dry_run_lists_jobs_and_trains_nothing(tmp_path):
    result = run_cli(["-m", "conv=2,3", "lr=0.01,0.001", "--dry-run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[1] == "#0 M2.2.32.32   conv=2 lr=0.01: train"  # after the store, experiment and launcher
    assert "4 jobs: 4 to train, 0 to resume, 0 already finished" in lines
    assert lines[-1].startswith("estimated training time: ") and "for 4 jobs" in lines[-1]
    assert not (tmp_path / "mlruns").exists()  # a dry run only reads the store: it creates nothing
