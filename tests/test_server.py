"""A team's shared tracking server: a real PostgreSQL and a real `mlflow server` on 127.0.0.1, a real sweep into it."""

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, have_postgres, run_cli, start_server, stop_server
from mlflow.tracking import MlflowClient

from fashioncnn.cluster.server import _as_postgres_user, _postgres_bin
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

        count = subprocess.run(
            [*_as_postgres_user(), _postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(postgres_port), "-U", "postgres",
             "-d", "mlflow", "-tAc", "SELECT count(*) FROM runs"], capture_output=True, text=True, check=True)
        assert count.stdout.strip() == "3"  # the runs really are in PostgreSQL
        print(f"server start-up: {startup_seconds:.1f} s")
    finally:
        stop_server(server)
        shutil.rmtree(folder, ignore_errors=True)
