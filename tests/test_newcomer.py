"""A newcomer's path, end to end, as the README tells it: plan a sweep (--dry-run), run it, register its best
model as the champion, classify a picture with it, and serve it with MLflow's own scoring server.

Everything runs in subprocesses, in a fresh folder with a fresh local store (./mlruns/mlflow.db; no
MLFLOW_TRACKING_URI from outside), on a small subset of the real Fashion-MNIST.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from conftest import free_port, local_store, run_cli, runs_of
from mlflow.models import Model
from PIL import Image

from fashioncnn.core.data import DEBIAN_DIR, read_idx
from fashioncnn.serving.flavor import CLASSES
from fashioncnn.serving.predict import read_inputs

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")]

EXPERIMENT = "fashioncnn"  # the default experiment, and so the registered model's default name
SWEEP = ["-m", "conv=2,3", "subset=512", "epochs=1", "model.filter_in=4", "model.filter_out=8", "lr=0.01", "system_metrics=false"]
TEST_IMAGE = 0  # the first image of Fashion-MNIST's test set
PING_WAIT_S = 120


def post_json(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, {"error": error.read().decode(errors="replace")}


def wait_for_ping(server: subprocess.Popen, url: str, log: Path) -> float:
    """Seconds until GET /ping answered 200; fails with the server's log if it exits or takes too long."""
    started = time.monotonic()
    while time.monotonic() - started < PING_WAIT_S:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode} before /ping answered:\n{log.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve: no answer on /ping within {PING_WAIT_S} s:\n{log.read_text()[-5000:]}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (mlflow and the uvicorn it started), SIGKILL a few seconds later."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


def test_a_newcomer_plans_runs_registers_predicts_and_serves(tmp_path):
    store_uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    seconds = {}

    # 1. Plan the sweep: the store, experiment and launcher on the first line, 2 jobs, nothing trained.
    started = time.monotonic()
    planned = run_cli([*SWEEP, "--dry-run"], cwd=tmp_path)
    seconds["dry-run"] = time.monotonic() - started
    assert planned.returncode == 0, planned.stderr[-3000:]
    lines = planned.stdout.splitlines()
    assert lines[0] == f"planned against store {store_uri}, experiment {EXPERIMENT}, launcher basic (one job after another, here)", lines[0]
    jobs = [line.split()[:2] for line in lines if re.match(r"#\d+ ", line) and line.endswith(": train")]
    assert jobs == [["#0", "M2.2.4.8"], ["#1", "M3.2.4.8"]], planned.stdout
    assert "2 jobs: 2 to train, 0 to resume, 0 already finished" in lines, planned.stdout
    assert not (tmp_path / "mlruns" / "mlflow.db").exists(), "a dry run created the store"

    # 2. The same sweep for real.
    started = time.monotonic()
    swept = run_cli(SWEEP, cwd=tmp_path)
    seconds["sweep"] = time.monotonic() - started
    assert swept.returncode == 0, swept.stderr[-3000:]
    client = local_store(tmp_path)
    runs = runs_of(client, EXPERIMENT)
    job_runs = [r for r in runs if r.data.tags.get("fashioncnn.role") == "job"]
    assert sorted(r.data.tags["model_name"] for r in job_runs) == ["M2.2.4.8", "M3.2.4.8"]
    assert [r.info.status for r in job_runs] == ["FINISHED", "FINISHED"]
    assert len({r.data.tags["sweep_id"] for r in job_runs}) == 1
    best = max(job_runs, key=lambda r: r.data.metrics["best_val_acc"])
    assert best.data.metrics["best_val_acc"] > 0.2, "the best run learnt nothing (chance is 0.1)"
    assert "2 jobs: 2 finished" in swept.stdout, swept.stdout[-3000:]

    # 3. Register the best run's model as the champion.
    started = time.monotonic()
    registered = run_cli(["register", EXPERIMENT], cwd=tmp_path)
    seconds["register"] = time.monotonic() - started
    assert registered.returncode == 0, registered.stderr[-3000:]
    assert registered.stdout.startswith(f"registered {EXPERIMENT} version 1 (alias champion): "), registered.stdout
    assert f"run {best.info.run_id}," in registered.stdout and f"models:/{EXPERIMENT}@champion" in registered.stdout
    version = client.get_model_version_by_alias(EXPERIMENT, "champion")
    assert (str(version.version), version.run_id) == ("1", best.info.run_id)
    model_uri = f"models:/{EXPERIMENT}@champion"

    # 4. Classify a real Fashion-MNIST test image, saved as a PNG.
    image = read_idx(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")[TEST_IMAGE]
    Image.fromarray(image).save(tmp_path / "item.png")
    started = time.monotonic()
    predicted = run_cli(["predict", model_uri, "item.png"], cwd=tmp_path)
    seconds["predict"] = time.monotonic() - started
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    (line,) = predicted.stdout.splitlines()
    match = re.fullmatch(r"item\.png  (.+)  (\d\.\d{3})", line)
    assert match, line
    cli_class, cli_probability = match.group(1), float(match.group(2))
    assert cli_class in CLASSES and 0.1 <= cli_probability <= 1, line

    # 5. Serve the champion with MLflow's scoring server and ask it about the same picture.
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    signature = Model.load(urlparse(logged.artifact_location).path).signature
    (spec,) = signature.inputs.inputs
    assert (spec.type, spec.shape) == (np.dtype(np.float32), (-1, 1, 28, 28))
    assert signature.outputs.inputs[0].shape == (-1, len(CLASSES))
    # The pixels `predict` gave the model: the PNG made into a Fashion-MNIST input, (28, 28) float32 in [0, 1].
    ((_, pixels),) = read_inputs(tmp_path / "item.png")
    payload = {"inputs": pixels.reshape(1, *spec.shape[1:]).astype(np.float32).tolist()}

    port = free_port()
    bin_dir = Path(sys.executable).parent  # the virtualenv's bin: `source .venv/bin/activate`, as the README says
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    # mlflow starts the scoring server as `uvicorn ...` found on PATH: without the virtualenv's bin there it
    # fails with "exec: uvicorn: not found" (or runs another Python's uvicorn).
    env |= {"MLFLOW_TRACKING_URI": store_uri, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "VIRTUAL_ENV": str(bin_dir.parent), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    started = time.monotonic()
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        seconds["serve: until /ping"] = wait_for_ping(server, url, log)
        status, answer = post_json(f"{url}/invocations", payload)
        seconds["serve"] = time.monotonic() - started
        assert status == 200, f"{status} {answer}\n{log.read_text()[-3000:]}"
        (scores,) = np.asarray(answer["predictions"], dtype=np.float64)
        assert scores.shape == (len(CLASSES),) and np.all(scores >= 0) and scores.sum() == pytest.approx(1, abs=1e-4), answer
        assert CLASSES[int(scores.argmax())] == cli_class, (answer, line)
        assert round(float(scores.max()), 3) == pytest.approx(cli_probability, abs=0.0011), (answer, line)
        # A malformed request is refused, not answered with made-up scores.
        status, refused = post_json(f"{url}/invocations", {"inputs": [[0.5] * 7]})
        assert status == 400, (status, refused)
    finally:
        stop(server)
    print("\n" + "  ".join(f"{step} {s:.1f} s" for step, s in seconds.items()))
