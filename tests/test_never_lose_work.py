"""Sweeps that never lose work: resume from another machine through a tracking server, leases between concurrent
commands, training through a tracking-server outage, a fresh sqlite store opened by two processes at once,
and an epoch's metrics logged once after a kill between its checkpoint and its metrics.

Real subprocess sweeps on small subsets of the real data, a real `fashioncnn.cluster.server --backend sqlite` on
loopback; MLflow's HTTP retry budget is shortened through its environment variables, the package's waits
through config keys.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, local_store, run_cli, runs_of, start_server
from mlflow.tracking import MlflowClient

from fashioncnn.core.data import DEBIAN_DIR

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")]

SMALL = ["model.filter_in=8", "model.filter_out=8", "val_size=500", "speed.threads=1"]
# A short lease, so that a killed job's run can be taken over within the test.
SHORT_LEASE = ["lease.heartbeat_seconds=0.5", "lease.seconds=3"]
# MLflow's HTTP client: one retry after a second (its defaults retry for minutes). A refused
# connection fails in about a second; the timeout leaves a loaded machine's server time to answer.
FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def jobs_of(client: MlflowClient, experiment: str) -> list:
    return [r for r in runs_of(client, experiment) if r.data.tags.get("fashioncnn.role") == "job"]


def popen_cli(args, cwd, env=None):
    full = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONUNBUFFERED": "1"} | (env or {})
    return subprocess.Popen([sys.executable, "-m", "fashioncnn", *args], cwd=cwd, env=full, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_server(process) -> None:
    """kill -9 of the server and its children: what an outage looks like (and no graceful wait of 30 s)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


@pytest.fixture
def server(tmp_path):
    port = free_port()
    folder = tmp_path / "server"
    process, _ = start_server(["--backend", "sqlite", "--port", str(port)], folder)
    handle = {"port": port, "folder": folder, "process": process, "uri": f"http://127.0.0.1:{port}"}
    yield handle
    if handle["process"].poll() is None:
        kill_server(handle["process"])


def test_a_job_killed_on_one_machine_resumes_on_another_through_the_server(tmp_path, server):
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    machine_a.mkdir()
    machine_b.mkdir()
    args = ["seed=3", "subset=512", "epochs=3", *SMALL, *SHORT_LEASE, "experiment=anywhere", f"tracking_uri={server['uri']}"]
    killed = run_cli([*args, "debug.exit_after_checkpoint=2"], cwd=machine_a, env=FAST_HTTP)
    assert killed.returncode == 137, killed.stdout[-2000:] + killed.stderr[-3000:]
    client = MlflowClient(server["uri"])
    (run,) = jobs_of(client, "anywhere")
    assert run.info.status == "RUNNING" and steps(client, run.info.run_id, "test_acc") == [1]
    names = [Path(f.path).name for f in client.list_artifacts(run.info.run_id, "checkpoint")]
    assert len(names) == 1 and names[0].startswith("epoch-0002."), names  # epoch 1's was replaced
    assert not list((machine_a / "mlruns").glob("*.db"))  # nothing local but the checkpoint's copy

    time.sleep(3.5)  # the killed job's lease lapses
    dry = run_cli([*args, "--dry-run"], cwd=machine_b, env=FAST_HTTP)
    assert f"resume run {run.info.run_id} from its checkpoint" in dry.stdout, dry.stdout + dry.stderr[-2000:]
    resumed = run_cli(args, cwd=machine_b, env=FAST_HTTP)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "fetched the checkpoint of epoch 2 from the run's artifacts" in output and "after epoch 2" in output
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags["resumed"] == "true"
    assert client.list_artifacts(run.info.run_id, "checkpoint") == []  # deleted when the run finished
    assert not list((machine_b / "mlruns" / "checkpoints").rglob("*.pt"))

    reference = run_cli([*args, "experiment=anywhere-reference"], cwd=machine_b, env=FAST_HTTP)
    assert reference.returncode == 0, reference.stderr[-3000:]
    (uninterrupted,) = jobs_of(client, "anywhere-reference")
    for key in EPOCH_KEYS:
        assert steps(client, run.info.run_id, key) == [1, 2, 3], key  # epoch 2 logged once, after the resume
        assert history(client, run.info.run_id, key) == history(client, uninterrupted.info.run_id, key), key
    assert after.data.metrics["max_test_acc"] == uninterrupted.data.metrics["max_test_acc"]


def test_a_kill_between_an_epochs_checkpoint_and_its_metrics_logs_that_epoch_once(tmp_path):
    args = ["seed=4", "subset=256", "epochs=3", *SMALL, *SHORT_LEASE, "experiment=once"]
    killed = run_cli([*args, "debug.exit_after_checkpoint=2"], cwd=tmp_path)
    assert killed.returncode == 137, killed.stderr[-3000:]
    client = local_store(tmp_path)
    (run,) = jobs_of(client, "once")
    assert steps(client, run.info.run_id, "test_acc") == [1]  # epoch 2's checkpoint is written, its metrics not
    time.sleep(3.5)
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "after epoch 2" in again.stdout + again.stderr
    (resumed,) = jobs_of(client, "once")
    assert resumed.info.status == "FINISHED"
    for key in EPOCH_KEYS:
        assert steps(client, run.info.run_id, key) == [1, 2, 3], key


def test_two_commands_on_the_same_sweep_train_each_job_once(tmp_path):
    args = ["-m", "seed=1,2,3", "subset=256", "epochs=2", *SMALL, "lease.heartbeat_seconds=0.5", "lease.seconds=5",
            "experiment=leased"]
    first, second = popen_cli(args, tmp_path), popen_cli(args, tmp_path)
    outputs = [process.communicate(timeout=600)[0] for process in (first, second)]
    # A command that ends while the other still trains one of its jobs says so and exits 3: not done, not failed.
    assert {first.returncode, second.returncode} <= {0, 3}, outputs[0][-3000:] + outputs[1][-3000:]
    for process, output in zip((first, second), outputs):
        if process.returncode == 3:
            assert "still running elsewhere: #" in output and f"on {socket.gethostname()} (pid " in output, output[-3000:]
    client = local_store(tmp_path)
    jobs = jobs_of(client, "leased")
    by_fingerprint: dict[str, list] = {}
    for job in jobs:
        by_fingerprint.setdefault(job.data.tags["fingerprint"], []).append(job)
    assert len(by_fingerprint) == 3 and all(len(runs) == 1 for runs in by_fingerprint.values()), \
        {fp: [r.info.run_id for r in runs] for fp, runs in by_fingerprint.items()}
    for job in jobs:
        assert job.info.status == "FINISHED"
        assert steps(client, job.info.run_id, "test_acc") == [1, 2]  # trained once: each epoch logged once
    assert "running elsewhere" in (outputs[0] + outputs[1]).lower()  # the two commands met
    again = run_cli(args, cwd=tmp_path)  # every job ended: the same command has nothing left and exits 0
    assert again.returncode == 0 and "3 jobs: 3 skipped" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]


def test_training_outlives_a_tracking_server_outage(tmp_path, server):
    args = ["-m", "seed=1,2", "subset=1024", "epochs=4", *SMALL, "experiment=outage", f"tracking_uri={server['uri']}",
            "tracking.retry_seconds=0.5", "tracking.outage_wait_seconds=120", "lease.heartbeat_seconds=1"]
    sweep = popen_cli(args, tmp_path, env=FAST_HTTP)
    client = MlflowClient(server["uri"])

    def first_epoch_logged():
        found = client.get_experiment_by_name("outage")
        runs = client.search_runs([found.experiment_id]) if found else []
        return any(steps(client, r.info.run_id, "test_acc") for r in runs)

    deadline = time.monotonic() + 300
    while not first_epoch_logged():
        assert time.monotonic() < deadline and sweep.poll() is None, sweep.communicate()[0][-3000:]
        time.sleep(0.3)
    kill_server(server["process"])
    time.sleep(20)  # far beyond MLflow's (shortened) retry budget; the first job trains on meanwhile
    server["process"], _ = start_server(["--backend", "sqlite", "--port", str(server["port"])], server["folder"])
    output = sweep.communicate(timeout=600)[0]
    assert sweep.returncode == 0, output[-5000:]
    assert "tracking store not answering" in output and "queued metrics delivered in order" in output

    jobs = jobs_of(client, "outage")
    assert len(jobs) == 2
    for job in jobs:
        assert job.info.status == "FINISHED", job.info.run_id
        for key in EPOCH_KEYS:
            assert steps(client, job.info.run_id, key) == [1, 2, 3, 4], key  # every epoch, none twice
        assert "max_test_acc" in job.data.metrics and job.data.tags["ran.device"] == "cpu"


def test_a_job_fails_in_one_line_when_the_server_stays_away_and_keeps_its_checkpoint(tmp_path, server):
    # 12 epochs: the job is still training when the server goes, even on a fast machine.
    args = ["seed=5", "subset=1024", "epochs=12", *SMALL, "experiment=gone", f"tracking_uri={server['uri']}",
            "tracking.retry_seconds=0.5", "tracking.outage_wait_seconds=3", "log_model=false"]
    job = popen_cli(args, tmp_path, env=FAST_HTTP)
    client = MlflowClient(server["uri"])
    deadline = time.monotonic() + 300
    while not (client.get_experiment_by_name("gone") and any(steps(client, r.info.run_id, "test_acc") for r in jobs_of(client, "gone"))):
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()[0][-3000:]
        time.sleep(0.2)
    kill_server(server["process"])
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "did not answer for 3 s (tracking.outage_wait_seconds)" in errors[0], output[-3000:]
    assert "Traceback" not in output
    assert list((tmp_path / "mlruns" / "checkpoints").rglob("epoch-*.pt"))  # stays for a resume


def test_a_fresh_sqlite_store_opened_by_two_processes_at_once(tmp_path):
    """The sweep's store (fashioncnn.tracking.stores.store) and a plain MLflow client race to create the same new database."""
    for attempt in range(3):  # without the fix, 3 races in 4 broke a store here
        uri = f"sqlite:///{tmp_path / f'race{attempt}.db'}"
        start = time.time() + 4  # both past their imports, then at the same instant
        ours = (f"import time; from fashioncnn.tracking import stores; time.sleep(max(0, {start} - time.time())); "
                f"print(stores.store({uri!r}).experiment_id('race', create=True))")
        plain = (f"import time; from mlflow.tracking import MlflowClient; time.sleep(max(0, {start} - time.time())); "
                 f"MlflowClient({uri!r}).search_experiments()")
        processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for code in (ours, plain)]
        (out, err), _ = [p.communicate(timeout=120) for p in processes]
        assert processes[0].returncode == 0, err[-3000:]
        assert MlflowClient(uri).get_experiment_by_name("race").experiment_id == out.strip()
