"""From a run to a model anyone can use: log_model, register the best run, predict from pictures and IDX files.

One real sqlite MLflow store for the module: a small network trained a few steps on synthetic images
(channels_last, as train() leaves it) and logged in a real run, next to made-up runs that score higher
but must never be registered (diverged, FAILED, pruned). Loading, registering and predicting run in
fresh processes, as users run them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import write_idx
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw

from fashioncnn.core.data import MEAN, STD
from fashioncnn.core.model import ModelSpec, build_model
from fashioncnn.serving import flavor, predict, register
from fashioncnn.tracking.queries import ResultsError

# Made-up runs without a select_metric param rank, like runs from before validation splits, by max_test_acc.
RANKED_BY = "max_test_acc"

EXPERIMENT = "fashioncnn"
SWEEP = "sweep-serving-test"


def synthetic_batch(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] whose class is where a bright bar lies, so a few steps of training separate them."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = torch.rand(count, 1, 28, 28, generator=generator) * 0.2
    for i, label in enumerate(labels.tolist()):
        images[i, 0, 2 + 2 * label : 4 + 2 * label, 4:24] = 1.0
    return images, labels


def trained_network() -> torch.nn.Module:
    torch.manual_seed(0)
    network = build_model(ModelSpec(2, 2, 8, 8)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)
    for step in range(20):  # enough to classify these bars all but perfectly
        images, labels = synthetic_batch(64, step)
        logits = network(((images - MEAN) / STD).contiguous(memory_format=torch.channels_last))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network


def run_module(cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` as a user runs it."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("serving")
    (folder / "cwd").mkdir()  # where the commands run: a default store created by mistake would land there
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(folder / "artifacts").as_uri())
    network = trained_network()
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # start_run and log_model use the global store (and set the variable)
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name="M2.2.8.8",
                              tags={"fashioncnn.role": "job", "sweep_id": SWEEP, "model_name": "M2.2.8.8"}) as run:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                info = flavor.log_model(network)
            mlflow.log_metric(RANKED_BY, 0.80)
    finally:
        mlflow.set_tracking_uri(previous)

    def job(status: str, value: float, **tags: str) -> str:
        made = client.create_run(experiment_id, tags={"fashioncnn.role": "job", "sweep_id": SWEEP, "model_name": "M9.9.9.9", **tags})
        client.log_metric(made.info.run_id, RANKED_BY, value)
        client.set_terminated(made.info.run_id, status)
        return made.info.run_id

    # Each scores higher than the logged run and must be passed over; `worse` is a fine candidate that loses.
    others = {"diverged": job("FINISHED", 0.99, diverged="true"), "failed": job("FAILED", 0.98),
              "pruned": job("FINISHED", 0.97, pruned="true"), "worse": job("FINISHED", 0.50)}
    return {"folder": folder, "cwd": folder / "cwd", "uri": uri, "client": client, "network": network, "info": info,
            "run_id": run.info.run_id, "warnings": [str(w.message) for w in caught], **others}


@pytest.fixture(scope="module")
def registered(store: dict) -> subprocess.CompletedProcess:
    return run_module(store["cwd"], "fashioncnn.register", EXPERIMENT, "--tracking-uri", store["uri"])


# ------------------------------------------------------------------------------------------- log_model


def test_classifier_takes_batches_with_or_without_the_channel_axis_and_returns_probabilities():
    classifier = flavor.Classifier(build_model(ModelSpec(2, 2, 8, 8))).eval()
    images, _ = synthetic_batch(5, 0)
    with torch.no_grad():
        with_channel, without = classifier(images), classifier(images[:, 0])
    assert with_channel.shape == (5, 10)
    torch.testing.assert_close(with_channel, without)
    torch.testing.assert_close(with_channel.sum(1), torch.ones(5))


def test_log_model_makes_a_logged_model_of_the_run_and_leaves_the_network_as_it_was(store):
    info, client = store["info"], store["client"]
    assert info.model_uri == f"models:/{info.model_id}"
    logged = client.get_logged_model(info.model_id)
    assert (logged.name, logged.source_run_id, str(logged.status)) == ("model", store["run_id"], "READY")
    assert [o.model_id for o in client.get_run(store["run_id"]).outputs.model_outputs] == [info.model_id]
    signature = {key: json.loads(text) for key, text in info.signature.to_dict().items() if text}
    assert signature == {"inputs": [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 1, 28, 28]}}],
                         "outputs": [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 10]}}]}
    assert flavor.model_uri_of_run(client, store["run_id"]) == info.model_uri
    # The channels_last weights were copied to contiguous ones: torch's pt2 archive warns about the others.
    assert not [w for w in store["warnings"] if "complete tensor" in w], store["warnings"]
    assert store["network"][3].weight.is_contiguous(memory_format=torch.channels_last)
    assert store["network"][3].weight.requires_grad


@pytest.mark.slow
def test_the_logged_model_loads_in_a_fresh_process_and_predicts_as_the_network_does(store):
    images, _ = synthetic_batch(6, 1000)
    batch = torch.cat([images, torch.rand(2, 1, 28, 28)]).numpy()
    np.save(store["folder"] / "batch.npy", batch)
    code = (
        "import json, sys, mlflow, numpy as np\n"
        f"mlflow.set_tracking_uri({store['uri']!r})\n"
        f"p = mlflow.pyfunc.load_model({store['info'].model_uri!r}).predict(np.load({str(store['folder'] / 'batch.npy')!r}))\n"
        "print(json.dumps(np.asarray(p).tolist()))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", code], cwd=store["cwd"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = np.array(json.loads(done.stdout.splitlines()[-1]))
    with torch.no_grad():
        expected = flavor.Classifier(store["network"]).eval()(torch.from_numpy(batch)).numpy()
    assert loaded.shape == (8, 10)
    np.testing.assert_allclose(loaded.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(loaded, expected, atol=1e-5)
    assert (loaded.argmax(1) == expected.argmax(1)).all()
    assert len(set(loaded.argmax(1))) > 1  # trained: not one class for everything


def test_model_uri_of_run_falls_back_to_a_pre_mlflow3_model_folder_and_names_a_run_without_a_model(store):
    client = store["client"]
    with pytest.raises(ResultsError, match=rf"^run {store['worse']} has no logged model: .*retrain it$"):
        flavor.model_uri_of_run(client, store["worse"])
    with pytest.raises(ResultsError, match="not found"):
        flavor.model_uri_of_run(client, "0" * 32)
    old = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id, run_name="old-style")
    client.log_text(old.info.run_id, "flavors: {}\n", "model/MLmodel")
    client.set_terminated(old.info.run_id, "KILLED")  # not a candidate of the register test
    assert flavor.model_uri_of_run(client, old.info.run_id) == f"runs:/{old.info.run_id}/model"


# ------------------------------------------------------------------------------------------- register


@pytest.mark.slow
def test_register_picks_the_best_finished_run_that_has_not_diverged_or_been_pruned(store, registered):
    assert registered.returncode == 0, registered.stderr
    line = registered.stdout.strip()
    assert line == (f"registered {EXPERIMENT} version 1 (alias champion): M2.2.8.8 run {store['run_id']}, "
                    f"{RANKED_BY}=0.8000  models:/{EXPERIMENT}@champion")
    client = store["client"]
    version = client.get_model_version_by_alias(EXPERIMENT, "champion")
    assert (str(version.version), version.run_id, version.source) == ("1", store["run_id"], store["info"].model_uri)
    logged = client.get_logged_model(store["info"].model_id)
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": EXPERIMENT, "version": version.version}]
    assert version.tags == {"sweep_id": SWEEP, "source_run_id": store["run_id"], "model_name": "M2.2.8.8",
                            "metric": RANKED_BY, "metric_value": "0.8"}
    assert not list(store["cwd"].iterdir())  # nothing went to a default store in the working directory
    again = register.register(client, SWEEP)  # the same best model again: the same version, not a copy
    assert again.startswith(f"registered {EXPERIMENT} version 1 (alias champion): M2.2.8.8 run {store['run_id']}")
    assert len(client.search_model_versions(f"name = '{EXPERIMENT}'")) == 1


def test_register_refuses_what_has_nothing_to_register(store):
    runs = [store["client"].get_run(store[key]) for key in ("diverged", "failed", "pruned")]
    with pytest.raises(ResultsError, match=r"^sweep x: none of its 3 runs finished without diverging or being pruned "
                                           r"\(1 FAILED, 1 diverged, 1 pruned\)$"):
        register.best_run(runs, RANKED_BY, "sweep x")
    with pytest.raises(ResultsError, match="--metric nope: unknown metric"):
        register.best_run([store["client"].get_run(store["worse"])], "nope", "sweep x")


@pytest.mark.slow
def test_register_of_a_run_without_a_model_is_one_line_and_exit_2(store, registered):
    done = run_module(store["cwd"], "fashioncnn.register", store["worse"], "--tracking-uri", store["uri"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: run {store['worse']} has no logged model: it was trained with "
                                        "log_model=false or before models were logged; retrain it"]


# -------------------------------------------------------------------------------------------- predict


def dark_on_light() -> Image.Image:
    """A dark garment photographed on white, 100 wide and 140 high."""
    image = Image.new("RGB", (100, 140), (245, 245, 240))
    ImageDraw.Draw(image).rectangle([35, 20, 64, 119], fill=(40, 40, 90))
    return image


def light_on_dark() -> Image.Image:
    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).rectangle([9, 3, 18, 24], fill=220)
    return image


def test_pictures_are_inverted_when_their_background_is_light_and_keep_their_aspect_ratio():
    assert predict.has_light_background(np.asarray(dark_on_light().convert("L")))
    assert not predict.has_light_background(np.asarray(light_on_dark()))
    for image in (dark_on_light(), light_on_dark()):
        pixels = predict.prepare_image(image)
        assert pixels.shape == (28, 28) and pixels.dtype == np.float32
        assert pixels.min() >= 0 and pixels.max() <= 1
        assert pixels[:, :6].max() < 0.1 and pixels[:, -6:].max() < 0.1 and pixels[14, 14] > 0.6  # light, tall, on black
        rows, cols = np.flatnonzero(pixels.max(1) > 0.5), np.flatnonzero(pixels.max(0) > 0.5)
        assert rows.size >= 26 and 7 <= cols.size <= 12  # trimmed to the object, longest side 28, not stretched
    transparent = Image.new("RGBA", (50, 50), (0, 0, 0, 0))  # a cut-out: dark garment, transparent around it
    ImageDraw.Draw(transparent).rectangle([10, 10, 39, 39], fill=(30, 30, 30, 255))
    assert predict.prepare_image(transparent)[14, 14] > 0.6


@pytest.mark.slow
def test_predict_prints_one_line_per_picture_and_per_image_of_an_idx_file(store, registered):
    assert registered.returncode == 0, registered.stderr
    folder = store["folder"]
    dark_on_light().save(folder / "coat.jpg")
    light_on_dark().save(folder / "dress.png")
    images, _ = synthetic_batch(3, 7)
    write_idx(folder / "three-idx3-ubyte.gz", (images[:, 0].numpy() * 255).round().astype(np.uint8))
    files = [str(folder / name) for name in ("coat.jpg", "dress.png", "three-idx3-ubyte.gz")]
    done = run_module(store["cwd"], "fashioncnn.predict", f"models:/{EXPERIMENT}@champion", *files, "--tracking-uri", store["uri"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    labels = [files[0], files[1]] + [f"{files[2]}#{i}" for i in range(3)]
    assert [line.split("  ")[0] for line in lines] == labels
    for line in lines:
        _, name, probability = line.split("  ")
        assert name in flavor.CLASSES and 0.1 <= float(probability) <= 1
    with torch.no_grad():
        expected = flavor.Classifier(store["network"]).eval()(images).argmax(1)
    assert [line.split("  ")[1] for line in lines[2:]] == [flavor.CLASSES[i] for i in expected]


@pytest.mark.slow
def test_predict_errors_are_one_line_and_exit_2(store, registered):
    assert registered.returncode == 0, registered.stderr
    folder, uri = store["folder"], store["uri"]
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    light_on_dark().save(folder / "ok.png")
    (folder / "notes.png").write_text("not a picture")
    cases = {  # arguments: the one line expected on stderr (a regular expression)
        ("models:/x@champion", str(folder / "missing.png")): re.escape(f"error: {folder / 'missing.png'}: no such file"),
        ("models:/x@champion", str(folder / "notes.png")): re.escape(f"error: {folder / 'notes.png'}: not a PNG/JPEG image or an IDX file"),
        ("models:/nope@champion", str(folder / "ok.png")): rf"error: models:/nope@champion: .*nope.*; registered models: {EXPERIMENT}",
    }
    running = {args: subprocess.Popen([sys.executable, "-m", "fashioncnn.predict", *args, "--tracking-uri", uri], cwd=store["cwd"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in cases}
    for args, expected in cases.items():
        stdout, stderr = running[args].communicate(timeout=300)
        assert running[args].returncode == 2 and stdout == "", (args, stdout, stderr)
        assert len(stderr.splitlines()) == 1 and re.match(expected, stderr), (args, stderr)


@pytest.mark.slow
def test_predict_takes_a_run_id_for_its_model_and_names_what_exists_when_a_model_is_missing(store, registered):
    assert registered.returncode == 0, registered.stderr
    client = store["client"]
    assert predict.resolve(client, store["run_id"]) == store["info"].model_uri
    assert predict.resolve(client, f"models:/{EXPERIMENT}@champion") == f"models:/{EXPERIMENT}@champion"
    with pytest.raises(ResultsError, match=rf"^run {store['worse']} has no logged model"):  # the command's line: see register's test
        predict.resolve(client, store["worse"])
    with pytest.raises(ResultsError, match="not a model"):
        predict.resolve(client, EXPERIMENT)
    assert predict._what_exists(client, f"models:/{EXPERIMENT}@nope") == f"; {EXPERIMENT} has versions 1, aliases @champion = version 1"
    assert predict._what_exists(client, "models:/nope/1") == f"; registered models: {EXPERIMENT}"


def test_a_picture_with_too_many_pixels_is_refused_before_it_is_decoded(tmp_path):
    import struct
    import zlib

    def png_header(width, height):  # a valid PNG's first chunks: the size is all Image.open reads
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))

    for side in (5000, 20000):  # above the limit; far above it (PIL's own decompression-bomb guard fires first)
        bomb = tmp_path / f"bomb-{side}.png"
        bomb.write_bytes(png_header(side, side))
        with pytest.raises(predict.InputError) as refused:
            predict.read_inputs(bomb)
        assert str(refused.value).startswith(f"{bomb}: ") and "above the limit of 16,777,216 (4096x4096); shrink it first" in str(refused.value)
