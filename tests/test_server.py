"""A team's shared tracking server: a real PostgreSQL and a real `mlflow server` on 127.0.0.1, a real sweep into it."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, have_postgres, run_cli, start_server, stop_server
from mlflow.tracking import MlflowClient

from fashioncnn.cluster.postgres import postgres_bin
from fashioncnn.core.data import DEBIAN_DIR

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")]


def test_basic_auth_server_refuses_anonymous_clients_and_takes_a_sweep_with_credentials(tmp_path):
    port = free_port()
    server, output = start_server(["--backend", "sqlite", "--port", str(port), "--auth"], tmp_path / "server")
    try:
        ini = tmp_path / "server" / "basic_auth.ini"
        assert any(line.startswith(f"basic auth: user admin, password in {ini}") for line in output)
        assert ini.stat().st_mode & 0o077 == 0  # readable by its owner only
        password = next(line.split(" = ", 1)[1].strip() for line in ini.read_text().splitlines() if line.startswith("admin_password"))
        assert password != "password1234" and len(password) >= 20
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401

        credentials = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        result = run_cli(["conv=3", "model.filter_in=4", "model.filter_out=4", "subset=64", "epochs=1", "experiment=authed",
                          f"tracking_uri=http://127.0.0.1:{port}"], cwd=tmp_path, env=credentials)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert password not in result.stdout + result.stderr
        os.environ.update(credentials)
        try:
            client = MlflowClient(f"http://127.0.0.1:{port}")
            (run,) = client.search_runs([client.get_experiment_by_name("authed").experiment_id])
            assert run.info.status == "FINISHED" and run.data.tags["model_name"] == "M3.2.4.4"
        finally:
            for key in credentials:
                os.environ.pop(key)
    finally:
        stop_server(server)


@pytest.mark.skipif(not have_postgres, reason="needs PostgreSQL (make test installs it: apt-get install postgresql)")
def test_sweep_into_a_postgres_backed_server_and_read_it_back_over_rest(tmp_path):
    # PostgreSQL runs as its own user, which cannot enter pytest's private tmp folders.
    folder = Path(tempfile.mkdtemp(prefix="fashioncnn-server-", dir="/tmp"))
    folder.chmod(0o755)
    port, postgres_port = free_port(), free_port()
    started = time.monotonic()
    server, output = start_server(["--port", str(port), "--postgres-port", str(postgres_port)], folder)
    try:
        assert output[-1].startswith(f"MLflow tracking server: http://127.0.0.1:{port}")
        startup_seconds = time.monotonic() - started

        secret_uri = f"http://alice:hunter2@127.0.0.1:{port}"
        result = run_cli(["-m", "conv=2,3", "model.filter_in=4", "model.filter_out=4", "subset=64", "epochs=1",
                          "experiment=shared", f"tracking_uri={secret_uri}"], cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "hunter2" not in result.stdout + result.stderr

        client = MlflowClient(f"http://127.0.0.1:{port}")  # MLflow's REST client
        runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
        (parent,) = [r for r in runs if r.data.tags["fashioncnn.role"] == "parent"]
        jobs = [r for r in runs if r.data.tags["fashioncnn.role"] == "job"]
        assert sorted(r.data.tags["model_name"] for r in jobs) == ["M2.2.4.4", "M3.2.4.4"]
        for run in jobs:
            assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert "max_test_acc" in run.data.metrics
            assert run.data.params["tracking_uri"] == "http://alice:***@127.0.0.1:%d" % port
            assert not any("hunter2" in value for value in [*run.data.params.values(), *run.data.tags.values()])
            config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))  # proxied artifacts
            assert "hunter2" not in open(config).read()
        assert any(folder.joinpath("artifacts").rglob("config.yaml"))

        psql = [postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(postgres_port), "-U", "postgres", "-d", "mlflow", "-tAc"]
        password = (folder / "postgres_password").read_text().strip()
        assert (folder / "postgres_password").stat().st_mode & 0o077 == 0 and password not in "".join(output)
        count = subprocess.run([*psql, "SELECT count(*) FROM runs"], capture_output=True, text=True, check=True,
                               env={**os.environ, "PGPASSWORD": password})
        assert count.stdout.strip() == "3"  # the runs really are in PostgreSQL
        if os.geteuid() == 0:  # another local user, as on a login node: no way in without the password
            other = subprocess.run(["runuser", "-u", "nobody", "--", *psql, "SELECT count(*) FROM runs"], capture_output=True,
                                   text=True, env={k: v for k, v in os.environ.items() if not k.startswith("PG")}, cwd="/")
            assert other.returncode != 0 and "password" in other.stderr, other.stderr
            for path in [folder / "postgres_password", folder / "artifacts", next(folder.joinpath("artifacts").rglob("config.yaml"))]:
                read = subprocess.run(["runuser", "-u", "nobody", "--", "cat" if path.is_file() else "ls", str(path)],
                                      capture_output=True, cwd="/")
                assert read.returncode != 0, path
        print(f"server start-up: {startup_seconds:.1f} s")
    finally:
        stop_server(server)
        shutil.rmtree(folder, ignore_errors=True)


def test_users_read_each_others_runs_but_cannot_delete_them_and_other_local_users_see_nothing(tmp_path):
    # Where other local users can walk (pytest's own folders are closed to them): the server must close its folder.
    parent = Path(tempfile.mkdtemp(prefix="fashioncnn-users-", dir="/tmp"))
    parent.chmod(0o755)
    folder = parent / "server"
    folder.mkdir()
    folder.chmod(0o755)
    (folder / "old-notes.txt").write_text("made before the server closed its folder")
    (folder / "old-notes.txt").chmod(0o644)
    port = free_port()
    server, output = start_server(["--backend", "sqlite", "--port", str(port), "--auth"], folder)
    try:
        assert any(line.startswith(f"tightened {folder}: ") for line in output)
        assert folder.stat().st_mode & 0o077 == 0 and (folder / "old-notes.txt").stat().st_mode & 0o077 == 0
        passwords = {}
        for name in ("alice", "bob"):
            added = run_cli(["user", "add", name, "--dir", str(folder), "--port", str(port)], cwd=tmp_path, module="fashioncnn.server")
            assert added.returncode == 0, added.stderr
            passwords[name] = added.stdout.split("password: ", 1)[1].split()[0]
        again = run_cli(["user", "add", "alice", "--dir", str(folder), "--port", str(port)], cwd=tmp_path, module="fashioncnn.server")
        assert again.returncode == 1 and again.stderr.startswith("error: user alice: the server refused (")

        def as_user(name, path, body=None):
            import base64
            import json

            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}", method="POST" if body else "GET",
                                             data=json.dumps(body).encode() if body else None, headers={
                                                 "Content-Type": "application/json",
                                                 "Authorization": "Basic " + base64.b64encode(f"{name}:{passwords[name]}".encode()).decode()})
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    return answer.status, json.loads(answer.read() or b"{}")
            except urllib.error.HTTPError as error:
                return error.code, {}

        status, made = as_user("alice", "experiments/create", {"name": "alice-exp"})
        assert status == 200
        status, run = as_user("alice", "runs/create", {"experiment_id": made["experiment_id"]})
        run_id = run["run"]["info"]["run_id"]
        assert as_user("bob", f"runs/get?run_id={run_id}")[0] == 200  # a teammate's run: readable
        assert as_user("bob", "runs/delete", {"run_id": run_id})[0] == 403  # but not deletable
        assert as_user("alice", "runs/delete", {"run_id": run_id})[0] == 200  # by its owner, yes
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert anonymous.value.code == 401
        if os.geteuid() == 0:  # another local user reads none of the server's files
            for path in (folder / "basic_auth.db", folder / "basic_auth.ini", folder / "old-notes.txt", folder / "artifacts"):
                read = subprocess.run(["runuser", "-u", "nobody", "--", "cat" if path.is_file() else "ls", str(path)],
                                      capture_output=True, cwd="/")
                assert read.returncode != 0, path
    finally:
        stop_server(server)
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.skipif(not have_postgres, reason="needs PostgreSQL (make test installs it: apt-get install postgresql)")
def test_a_backup_taken_while_the_server_runs_restores_into_a_new_folder_with_the_same_runs_and_models(tmp_path):
    backend = "postgres"  # the team's server (a sqlite server's backup: tests/test_bad_input.py)
    parent = Path(tempfile.mkdtemp(prefix="fashioncnn-backup-", dir="/tmp"))
    parent.chmod(0o755)  # PostgreSQL's own user walks to its cluster in the restored folder too
    folder, restored, archive = parent / "server", parent / "restored", parent / "team.tar.gz"
    port = free_port()
    server, _ = start_server(["--backend", backend, "--port", str(port), "--postgres-port", str(free_port())], folder)
    uri = f"http://127.0.0.1:{port}"
    try:
        fill_through_the_api(uri, tmp_path)
        taken = run_cli(["backup", str(archive), "--dir", str(folder)], cwd=tmp_path, module="fashioncnn.server")
        assert taken.returncode == 0, taken.stderr
        assert archive.stat().st_mode & 0o077 == 0
        before = _store_contents(uri)
    finally:
        stop_server(server)
    again = run_cli(["restore", str(archive), "--dir", str(folder)], cwd=tmp_path, module="fashioncnn.server")
    assert again.returncode == 2 and "exists and is not empty" in again.stderr  # never over a server folder
    made = run_cli(["restore", str(archive), "--dir", str(restored), "--postgres-port", str(free_port())], cwd=tmp_path,
                   module="fashioncnn.server")
    assert made.returncode == 0, made.stderr
    port = free_port()
    server, _ = start_server(["--backend", backend, "--port", str(port), "--postgres-port", str(free_port())], restored)
    try:
        uri = f"http://127.0.0.1:{port}"
        assert _store_contents(uri) == before
        (version,) = MlflowClient(uri).search_model_versions()
        model = subprocess.run([sys.executable, "-c", "import mlflow; m = mlflow.pyfunc.load_model("
                                f"'models:/{version.name}/{version.version}'); print(m.predict([1, 2, 3]))"],
                               capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, cwd=tmp_path)
        assert model.returncode == 0 and model.stdout.strip().endswith("[2, 4, 6]"), model.stderr[-2000:]  # the logged model works
    finally:
        stop_server(server)
        shutil.rmtree(parent, ignore_errors=True)


def _store_contents(uri):
    """Every run of the server with its status, params, tags and metric histories, and the registered models."""
    client = MlflowClient(uri)
    found = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            histories = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}
            found[run.info.run_id] = (experiment.name, run.info.status, run.data.params, run.data.tags, histories)
    models = sorted((v.name, v.version, v.run_id) for v in client.search_model_versions())
    return found, models


def test_several_sweeps_at_once_land_every_epoch_exactly_once(postgres_server, tmp_path):
    """A team's load, bounded: 4 commands x 2 jobs at the same time (one through the joblib launcher) against one
    server on loopback; every run ends FINISHED with each epoch's metrics logged once."""
    commands = []
    for index in range(4):
        args = ["-m", "conv=2,3", f"seed={index}", "model.filter_in=4", "model.filter_out=4", "subset=64", "val_size=100",
                "epochs=3", "speed.threads=1", "system_metrics=false", "log_model=false", f"experiment=load-{index}",
                f"tracking_uri={postgres_server}", *(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if index == 0 else [])]
        cwd = tmp_path / f"command-{index}"
        cwd.mkdir()
        commands.append(subprocess.Popen([sys.executable, "-m", "fashioncnn", *args], cwd=cwd, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
    for command in commands:
        output = command.communicate(timeout=600)[0]
        assert command.returncode == 0, output[-3000:]
    client = MlflowClient(postgres_server)
    for index in range(4):
        runs = client.search_runs([client.get_experiment_by_name(f"load-{index}").experiment_id], "tags.`fashioncnn.role` = 'job'")
        assert len(runs) == 2
        for run in runs:
            assert run.info.status == "FINISHED"
            for key in ("train_loss", "val_acc", "test_acc"):
                steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                assert sorted(steps) == [1, 2, 3], (run.info.run_id, key, steps)  # each epoch once: none lost, none twice
    started = time.monotonic()
    assert urllib.request.urlopen(f"{postgres_server}/health", timeout=10).status == 200  # still answering after the load
    assert time.monotonic() - started < 5


FILL = """
import sys, mlflow

class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return [2 * x for x in model_input]

mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("kept")
for index in range(3):
    with mlflow.start_run(tags={"fashioncnn.role": "job"}) as run:
        mlflow.log_params({"model.conv": index, "optim.lr": 0.01})
        for epoch in (1, 2):
            mlflow.log_metric("val_acc", 0.5 + index / 10 + epoch / 100, step=epoch)
        if index == 2:
            info = mlflow.pyfunc.log_model(name="model", python_model=Doubler())
mlflow.register_model(info.model_uri, "kept")
"""


def fill_through_the_api(uri, cwd):
    """Runs with params and per-epoch metrics, a logged model and its registered version, as a team's server holds them."""
    done = subprocess.run([sys.executable, "-c", FILL, uri], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]

