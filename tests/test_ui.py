"""`make ui` serves the local store on 127.0.0.1: a real MLflow server process, queried over HTTP."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

from mlflow.tracking import MlflowClient

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_ui_serves_the_store_on_loopback(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment_id = client.create_experiment("ui-check")
    run = client.create_run(experiment_id, run_name="M2.2.32.32")
    client.log_metric(run.info.run_id, "max_test_acc", 0.9)

    port = free_port()
    server = subprocess.Popen(["make", "--no-print-directory", "ui", f"PORT={port}", f"STORE={store}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        announced = server.stdout.readline()
        assert announced.startswith(f"MLflow UI: http://127.0.0.1:{port}"), announced
        deadline, body = time.monotonic() + 120, None
        while body is None:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the MLflow UI did not answer within 120 s"
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-check")
                body = json.load(urllib.request.urlopen(request, timeout=5))
            except OSError:
                time.sleep(0.5)
        assert body["experiment"]["experiment_id"] == experiment_id
        with socket.socket() as s:  # bound to loopback only
            s.settimeout(2)
            addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1", "127.0.1.1"}
            for address in addresses:
                assert s.connect_ex((address, port)) != 0, f"the UI answers on {address}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
