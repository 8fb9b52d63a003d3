"""Real `python -m fashioncnn` invocations in a subprocess, on real Fashion-MNIST subsets, into a real MLflow store."""

import pytest
import torch
import yaml
from conftest import local_store, run_cli, runs_of
from mlflow.tracking import MlflowClient

from fashioncnn.core.data import DEBIAN_DIR
from fashioncnn.core.machine import precision_used

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")]


def test_multirun_logs_every_combination_with_config_curves_and_tags(tmp_path):
    result = run_cli(["-m", "conv=2,3", "lin=2,3", "subset=256", "epochs=2", "experiment=sweep-test"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = local_store(tmp_path)
    runs = [r for r in runs_of(client, "sweep-test") if r.data.tags["fashioncnn.role"] == "job"]
    assert sorted(r.data.tags["model_name"] for r in runs) == ["M2.2.32.32", "M2.3.32.32", "M3.2.32.32", "M3.3.32.32"]
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1
    for run in runs:
        conv, lin = run.data.params["model.conv"], run.data.params["model.lin"]
        assert run.info.status == "FINISHED"
        assert run.info.run_name == run.data.tags["model_name"] == f"M{conv}.{lin}.32.32"
        assert run.data.tags["group.conv"] == conv and run.data.tags["group.lin"] == lin
        assert run.data.tags["group.channels"] == "32.32" and run.data.tags["group.lr"] == "0.001"
        assert f"conv='{conv}'" in run.data.tags["hydra.overrides"] and "subset=256" in run.data.tags["hydra.overrides"]
        # The full resolved config, flattened to dotted keys.
        assert run.data.params["optim.lr"] == "0.001" and run.data.params["epochs"] == "2"
        assert run.data.params["subset"] == "256" and run.data.params["optim.name"] == "adam"
        assert "param_count" not in run.data.params and run.data.metrics["param_count"] > 0  # once, as a metric
        for metric in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "epoch_seconds"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == [1, 2], metric
        test_acc = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "test_acc"), key=lambda m: m.step)]
        assert run.data.metrics["max_test_acc"] == pytest.approx(max(test_acc))
        assert run.data.metrics["mean_test_acc"] == pytest.approx(sum(test_acc) / 2)
        # The validation split picks the epoch; the test accuracy there is reported beside the study's maximum.
        val_acc = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)]
        best_epoch = int(run.data.metrics["best_epoch"])
        assert val_acc[best_epoch - 1] == max(val_acc) == pytest.approx(run.data.metrics["best_val_acc"])
        assert run.data.metrics["test_acc_at_best"] == pytest.approx(test_acc[best_epoch - 1])
        # What ran where, the data it saw, and its model.
        assert run.data.tags["ran.device"] == "cpu" and run.data.tags["ran.precision"] == precision_used("auto", torch.device("cpu"))
        assert run.data.tags["ran.torch"].startswith("2.") and int(run.data.tags["ran.threads"]) >= 1 and run.data.tags["ran.device_name"]
        inputs = {i.dataset.name: {t.key: t.value for t in i.tags} for i in run.inputs.dataset_inputs}
        assert inputs["fashion-mnist-train"]["mlflow.data.context"] == "train" and inputs["fashion-mnist-train"]["subset"] == "256"
        assert inputs["fashion-mnist-train"]["images"] == "256" and inputs["fashion-mnist-validation"]["images"] == "5000"
        assert inputs["fashion-mnist-test"]["images"] == "10000"
        (logged,) = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
        assert logged.name == "model"
        assert 0.1 < max(test_acc) <= 1
        epoch_seconds = client.get_metric_history(run.info.run_id, "epoch_seconds")
        assert run.data.metrics["train_seconds"] == pytest.approx(sum(m.value for m in epoch_seconds))
        config = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / run.info.run_id))))
        assert config["model"] == {"conv": int(conv), "lin": int(lin), "filter_in": 32, "filter_out": 32, "kernel_size": 3,
                                   "norm": "none", "dropout": 0.0}
    assert "M3.3.32.32: best epoch" in result.stdout  # progress and results are visible in the terminal
    launched = [line for line in result.stdout.splitlines() if " : conv=" in line]
    assert len(launched) == 4 and all(line.endswith("subset=256 epochs=2 experiment=sweep-test") for line in launched), launched
    assert "FASHIONCNN" not in result.stdout and "env_set" not in result.stdout and "hydra.sweeper" not in result.stdout
    assert "epoch 2/2" in result.stdout

    # The parent run is the sweep's front page.
    (parent,) = [r for r in runs_of(client, "sweep-test") if r.data.tags["fashioncnn.role"] == "parent"]
    assert parent.info.run_name == "conv=2,3 lin=2,3 subset=256 epochs=2 experiment=sweep-test"
    assert parent.data.tags["command"] == "python -m fashioncnn -m conv=2,3 lin=2,3 subset=256 epochs=2 experiment=sweep-test"
    assert parent.data.params == {"conv": "2,3", "lin": "2,3"}
    best = max(runs, key=lambda r: r.data.metrics["best_val_acc"])
    assert parent.data.metrics["best_val_acc"] == pytest.approx(best.data.metrics["best_val_acc"])
    assert parent.data.metrics["test_acc_at_best"] == pytest.approx(best.data.metrics["test_acc_at_best"])
    assert parent.data.metrics["jobs_finished"] == 4 and parent.data.metrics["jobs_failed"] == 0
    leaderboard = parent.data.tags["mlflow.note.content"]
    first = next(line for line in leaderboard.splitlines() if line.startswith("| 1 |"))
    assert f"[{best.data.tags['model_name']}](" in first and f"/runs/{best.info.run_id}?workflowType=machine_learning)" in first
    assert all(f"/runs/{r.info.run_id}?workflowType=machine_learning" in leaderboard for r in runs)
    assert f"in MLflow: http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning" in result.stdout


def test_single_run_and_mlflow_tracking_uri_from_the_environment(tmp_path):
    other = tmp_path / "elsewhere.db"
    result = run_cli(["channels=16.32", "lr=0.01", "subset=128", "epochs=1", "experiment=env-store"], cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{other}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # (MLflow still puts artifacts in ./mlruns by default)
    (run,) = runs_of(MlflowClient(f"sqlite:///{other}"), "env-store")
    assert run.data.tags["model_name"] == "M2.2.16.32" and run.data.params["optim.lr"] == "0.01"
    assert "sweep_id" not in run.data.tags


def test_tracking_uri_key_wins_and_passwords_never_show(tmp_path):
    store = tmp_path / "key.db"
    result = run_cli([f"tracking_uri=sqlite:///{store}", "subset=64", "epochs=1", "experiment=key-store"], cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": "http://alice:hunter2@127.0.0.1:1/"})
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(MlflowClient(f"sqlite:///{store}"), "key-store")
    assert run.info.status == "FINISHED"
    assert "hunter2" not in result.stdout + result.stderr


def test_determinism_same_seed_same_metrics(tmp_path):
    # force=true: the second job has the same config as the first and would otherwise be skipped as done.
    args = ["-m", "seed=3,3", "force=true", "subset=192", "epochs=2", "model.filter_in=8", "model.filter_out=8", "experiment=determinism"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = local_store(tmp_path)
    first, second = [r for r in runs_of(client, "determinism") if r.data.tags["fashioncnn.role"] == "job"]
    for metric in ("train_loss", "train_acc", "test_loss", "test_acc"):
        history = [[m.value for m in sorted(client.get_metric_history(r.info.run_id, metric), key=lambda m: m.step)] for r in (first, second)]
        assert history[0] == history[1], metric
    other = run_cli(["seed=4", "subset=192", "epochs=2", "model.filter_in=8", "model.filter_out=8", "experiment=determinism"], cwd=tmp_path)
    assert other.returncode == 0
    third = next(r for r in runs_of(client, "determinism") if r.data.params["seed"] == "4")
    assert third.data.metrics["max_test_acc"] != first.data.metrics["max_test_acc"] or \
        third.data.metrics["test_loss"] != first.data.metrics["test_loss"]


def test_a_failing_job_is_a_failed_run_with_its_error(tmp_path, tiny_dataset):
    # Data with the wrong number of images is refused before anything trains (one line, no store) ...
    refused = run_cli([f"data_dir={tiny_dataset}", "subset=10", "epochs=1", "experiment=fails"], cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: {tiny_dataset}: train images have shape (60, 28, 28) (uint8), expected (60000, 28, 28) uint8"]
    assert not (tmp_path / "mlruns").exists()
    # ... and a job that fails while it trains is a FAILED run with its error and traceback, not a RUNNING one.
    result = run_cli(["subset=64", "epochs=1", "debug.fail_at_epoch=1", "experiment=fails"], cwd=tmp_path)
    assert result.returncode != 0
    assert "injected failure at epoch 1" in result.stderr
    client = local_store(tmp_path)
    (run,) = runs_of(client, "fails")
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: injected failure at epoch 1 (debug.fail_at_epoch=1)"
    traceback_file = client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))
    assert "Traceback" in open(traceback_file).read()


def test_the_best_model_of_a_sweep_registered_and_used_from_fresh_processes(tmp_path):
    # The README's "use the best model" path: sweep, register, predict, each a command of its own.
    from PIL import Image, ImageDraw

    result = run_cli(["-m", "lr=0.01,0.001", "subset=1000", "epochs=1", "experiment=use-it"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = local_store(tmp_path)
    jobs = [r for r in runs_of(client, "use-it") if r.data.tags["fashioncnn.role"] == "job"]
    best = max(jobs, key=lambda r: r.data.metrics["best_val_acc"])

    registered = run_cli(["use-it", "--name", "shirts"], cwd=tmp_path, module="fashioncnn.register")
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout.startswith(f"registered shirts version 1 (alias champion): M2.2.32.32 run {best.info.run_id}, best_val_acc=")
    version = client.get_model_version_by_alias("shirts", "champion")
    assert version.tags["source_run_id"] == best.info.run_id and version.tags["metric"] == "best_val_acc"

    image = Image.new("L", (90, 120), 255)  # a dark trouser-like shape on white, as a photo would be
    ImageDraw.Draw(image).rectangle([25, 5, 65, 115], fill=30)
    image.save(tmp_path / "photo.png")
    predicted = run_cli(["models:/shirts@champion", str(tmp_path / "photo.png")], cwd=tmp_path, module="fashioncnn.predict")
    assert predicted.returncode == 0, predicted.stderr
    (line,) = predicted.stdout.strip().splitlines()
    file, label, probability = line.split("  ")
    assert file.endswith("photo.png") and label in {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                                     "Sneaker", "Bag", "Ankle boot"} and 0 < float(probability) <= 1


def test_log_model_false_keeps_no_model_and_the_registry_says_why(tmp_path):
    result = run_cli(["subset=256", "epochs=1", "log_model=false", "system_metrics=false", "experiment=no-model"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = local_store(tmp_path)
    (run,) = runs_of(client, "no-model")
    assert not client.search_logged_models([run.info.experiment_id])
    refused = run_cli(["no-model"], cwd=tmp_path, module="fashioncnn.register")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: run {run.info.run_id} has no logged model: it was trained with log_model=false or before models were logged; retrain it"]
