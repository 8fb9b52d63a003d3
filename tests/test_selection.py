"""Choosing a model honestly: the validation split, the best epoch by the selection metric, ranking by it."""

import numpy as np
import pytest
import torch
from conftest import write_idx
from mlflow.entities import Param, Run, RunData, RunInfo

from fashioncnn.core.config import ConfigError, ranking_metric
from fashioncnn.core.data import load, validation_indices
from fashioncnn.core.loop import EpochMetrics, improves, train
from fashioncnn.core.model import ModelSpec, build_model
from fashioncnn.sweep.plan import fingerprint
from fashioncnn.sweep.preflight import jobs_of
from fashioncnn.tracking.queries import ResultsError, resolve_metric


def compose(*args):
    ((_, cfg),) = jobs_of(list(args))
    return cfg


def test_the_hold_out_is_stratified_seeded_and_the_same_for_every_run():
    labels = np.repeat(np.arange(10), [700, 300, 500, 500, 500, 500, 500, 500, 500, 500])
    held = validation_indices(labels, 500)
    assert len(held) == 500 == len(set(held.tolist()))
    assert np.bincount(labels[held]).tolist() == [70, 30, 50, 50, 50, 50, 50, 50, 50, 50]  # as in the whole
    assert np.array_equal(held, validation_indices(labels, 500))  # seeded: every run validates on these
    assert not np.array_equal(held, validation_indices(labels, 500, seed=1))
    assert len(validation_indices(labels, 7)) == 7 and len(validation_indices(labels, 0)) == 0


def test_subset_trains_on_the_rest_and_validates_on_the_same_hold_out(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(100)  # each image tells its index
    for split, count, data in (("train", 100, images), ("t10k", 20, images[:20])):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", data[:count])
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", (np.arange(count) % 10).astype(np.uint8))

    def ids(tensor):  # back from normalised pixels to the image index
        from fashioncnn.core.data import MEAN, STD
        return sorted(round(float(v) * STD * 255 + MEAN * 255) for v in tensor[:, 0, 0, 0])

    whole = load(tmp_path, val_size=20, expected_counts=(100, 20), download=False)
    small = load(tmp_path, subset=10, val_size=20, expected_counts=(100, 20), download=False)
    assert ids(whole.val_images) == ids(small.val_images) and len(whole.val_labels) == 20
    assert torch.bincount(whole.val_labels).tolist() == [2] * 10
    assert not set(ids(whole.val_images)) & set(ids(whole.train_images)) and len(whole.train_labels) == 80
    assert len(small.train_labels) == 10 and set(ids(small.train_images)) <= set(ids(whole.train_images))
    assert whole.digest == small.digest and len(whole.digest) == 16
    assert len(load(tmp_path, val_size=0, expected_counts=(100, 20), download=False).val_labels) == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["val_size=-1"], "val_size=-1: not allowed, must be an integer from 0 (no validation split) to 59990"),
        (["subset=58000"], "subset=58000: not allowed with val_size=5000, at most 55000 training images remain"),
        (["val_size=0"], "select_metric=val_acc: needs a validation split, but val_size=0; set val_size"),
        (["select_metric=f1"], "select_metric=f1: Invalid value 'f1', expected one of [val_acc, val_loss, test_acc, test_loss]"),
    ],
)
def test_selection_settings_are_checked_before_training(args, message):
    with pytest.raises(ConfigError) as caught:
        compose(*args)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.mark.slow
def test_the_studys_protocol_and_the_old_runs_keep_their_fingerprints():
    study = compose("val_size=0", "select_metric=test_acc")
    # val_size=0 and the selection metric leave the fingerprint as it was before either existed
    assert fingerprint(study) == fingerprint(compose("val_size=0", "select_metric=test_acc", "log_model=false"))
    assert fingerprint(study) != fingerprint(compose())  # holding 5,000 images out trains another model
    for preset in ("step1-conv", "step3-channels", "step4-lr-variations"):
        cfg = jobs_of(["-m", f"+study={preset}"])[0][1]
        assert (cfg.val_size, cfg.select_metric.value) == (0, "test_acc")


def metrics(epoch, val_acc, val_loss=1.0, test_acc=0.5):
    return EpochMetrics(epoch, 1.0, 0.5, 1.0, test_acc, 1.0, val_loss, val_acc)


def test_the_best_epoch_is_the_selection_metrics():
    assert improves("val_acc", metrics(2, 0.8), metrics(1, 0.7))
    assert not improves("val_acc", metrics(2, 0.7), metrics(1, 0.7))  # a tie keeps the earlier epoch
    assert improves("val_loss", metrics(2, 0.1, val_loss=0.3), metrics(1, 0.9, val_loss=0.4))
    assert not improves("test_acc", metrics(2, 0.9, test_acc=0.4), metrics(1, 0.1, test_acc=0.5))
    assert ranking_metric("val_acc") == "best_val_acc" and ranking_metric("test_acc") == "max_test_acc"


def test_the_run_keeps_the_weights_of_its_best_epoch():
    from test_speed import tiny_data

    cfg = compose("model.filter_in=4", "model.filter_out=4", "epochs=4", "device=cpu", "optim.lr=0.05")
    data = tiny_data(train_count=256)
    snapshots = []
    torch.manual_seed(cfg.seed)
    model = build_model(ModelSpec.from_config(cfg.model))
    result = train(cfg, model, data, torch.device("cpu"),
                   on_epoch=lambda m: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}))
    val = [m.val_acc for m in result.history]
    assert result.best_epoch == val.index(max(val)) + 1
    for key, value in result.best_state.items():
        assert torch.equal(value, snapshots[result.best_epoch - 1][key])


def run_with(select_metric=None):
    params = [Param("select_metric", select_metric)] if select_metric else []
    return Run(RunInfo("r", "0", "u", "FINISHED", 0, 0, "active"), RunData(params=params))


def test_ranking_follows_the_runs_selection_metric():
    assert resolve_metric([run_with("val_acc"), run_with("val_acc")], "auto") == "best_val_acc"
    assert resolve_metric([run_with("test_acc")], "auto") == "max_test_acc"
    assert resolve_metric([run_with()], "auto") == "max_test_acc"  # runs from before validation splits
    assert resolve_metric([run_with("val_acc")], "mean_test_acc") == "mean_test_acc"
    with pytest.raises(ResultsError, match="selected by different metrics \\(best_val_acc, max_test_acc\\)"):
        resolve_metric([run_with("val_acc"), run_with("test_acc")], "auto")


def test_keys_added_since_keep_the_fingerprints_of_earlier_runs(monkeypatch):
    # Before the speed node, validation splits and divergence.max_loss, the fingerprint hashed exactly these keys.
    from fashioncnn.core import machine

    monkeypatch.setattr(machine, "bf16_is_native", lambda device: False)  # a machine without native bf16
    import hashlib
    import json

    from omegaconf import OmegaConf

    cfg = jobs_of(["-m", "+study=step1-conv"])[0][1]
    content = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    earlier = {key: content[key] for key in ("model", "optim", "epochs", "batch_size", "seed", "subset", "precision", "divergence", "debug")}
    earlier["divergence"] = {key: value for key, value in earlier["divergence"].items() if key != "max_loss"}
    earlier["model"] = {key: value for key, value in earlier["model"].items() if key not in ("norm", "dropout")}
    earlier["optim"] = {"name": "adam", "lr": content["optim"]["lr"]}  # before the optimizer was built from its _target_
    earlier["debug"] = {"fail_at_epoch": None}  # debug.exit_after_checkpoint is not a learned key
    earlier["precision"] = "fp32"  # auto, on a machine without native bf16 (see test_beyond for the other)
    assert content["precision"] == "auto"
    assert fingerprint(cfg) == hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint(compose("val_size=0", "select_metric=test_acc", "divergence.max_loss=50")) != fingerprint(
        compose("val_size=0", "select_metric=test_acc"))


def made_up_runs(tmp_path, configs):
    """FINISHED job runs in a real store: configs maps an lr to its seeds' best_val_acc."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'store.db'}")
    experiment = client.create_experiment("seeds", artifact_location=(tmp_path / "artifacts").as_uri())
    for lr, values in configs.items():
        for seed, value in enumerate(values):
            run = client.create_run(experiment, run_name="M2.2.32.32", tags={"fashioncnn.role": "job", "model_name": "M2.2.32.32"})
            for key, param in (("optim.lr", lr), ("seed", seed), ("select_metric", "val_acc"), ("device", "cpu")):
                client.log_param(run.info.run_id, key, param)
            client.log_metric(run.info.run_id, "best_val_acc", value)
            client.log_metric(run.info.run_id, "max_test_acc", value)
            client.set_terminated(run.info.run_id, "FINISHED")
    return client, [client.get_run(r.info.run_id) for r in client.search_runs([experiment])]


def test_configurations_rank_by_the_mean_of_their_seeds(tmp_path):
    from fashioncnn.results.retrain import pick
    from fashioncnn.tracking.queries import rank_configurations, within_noise

    # lr 0.01 has the single best run (0.95) but the lower mean; lr 0.001 is better on average.
    _, runs = made_up_runs(tmp_path, {"0.01": [0.95, 0.80, 0.81], "0.001": [0.90, 0.91, 0.89], "0.1": [0.5]})
    ranked = rank_configurations(runs, "best_val_acc")
    assert [(c.runs[0].data.params["optim.lr"], c.n) for c in ranked] == [("0.001", 3), ("0.01", 3), ("0.1", 1)]
    assert ranked[0].mean == pytest.approx(0.90) and ranked[0].std == pytest.approx(0.01)
    assert ranked[0].text() == "0.9000 ± 0.0100 (n=3)" and ranked[2].text() == "0.5000 (n=1)"
    assert ranked[0].runs[0].data.metrics["best_val_acc"] == 0.91  # a configuration's best seed first
    assert within_noise(ranked[0], ranked[1]) is True  # 0.90 against 0.853 ± 0.084: within noise
    assert within_noise(ranked[0], ranked[2]) is False
    picked, _ = pick(runs, "best_val_acc", 2, None, "seeds")
    assert [r.data.params["optim.lr"] for r in picked] == ["0.001", "0.01"]


def test_the_registry_takes_the_best_configuration_by_its_mean(tmp_path):
    from fashioncnn.serving.register import best_configuration

    _, runs = made_up_runs(tmp_path, {"0.01": [0.95, 0.80, 0.81], "0.001": [0.90, 0.91, 0.89]})
    best = best_configuration(runs, "best_val_acc", "seeds")
    assert best.runs[0].data.params["optim.lr"] == "0.001" and best.n == 3


@pytest.mark.slow
def test_the_report_says_whether_the_top_two_differ_by_more_than_seed_noise(tmp_path):
    from fashioncnn.results import report

    client, _ = made_up_runs(tmp_path, {"0.01": [0.95, 0.80, 0.81], "0.001": [0.90, 0.91, 0.89]})
    built = report.build(["seeds"], tmp_path / "report", uri=client.tracking_uri, attach=False)
    assert "best first by `best_val_acc`" in built.markdown
    assert ("Top two by mean `best_val_acc`: M2.2.32.32 lr=0.001 and M2.2.32.32 lr=0.01 differ by 4.67%, against a larger "
            "standard deviation of 8.39%: **within seed noise**") in built.markdown
    (tmp_path / "b").mkdir()
    client2, _ = made_up_runs(tmp_path / "b", {"0.01": [0.80, 0.81], "0.001": [0.90, 0.91]})
    apart = report.build(["seeds"], tmp_path / "report2", uri=client2.tracking_uri, attach=False)
    assert "**more than seed noise**" in apart.markdown


def test_seconds_to_90_counts_training_time_until_the_accuracy_first_reaches_it():
    from fashioncnn.core.loop import TrainResult

    history = [EpochMetrics(e, 1, 1, 1, test, 10.0, None, val) for e, val, test in ((1, 0.85, 0.91), (2, 0.90, 0.89), (3, 0.95, 0.95))]
    assert TrainResult(history=history).seconds_to_90 == 20.0  # by validation accuracy where there is one
    assert TrainResult(history=[EpochMetrics(e, 1, 1, 1, t, 10.0) for e, t in ((1, 0.85), (2, 0.91))]).seconds_to_90 == 20.0
    assert TrainResult(history=[EpochMetrics(1, 1, 1, 1, 0.5, 10.0)]).seconds_to_90 is None


def test_an_empty_source_name_is_named_as_empty(tmp_path):
    from mlflow.tracking import MlflowClient

    from fashioncnn.tracking.queries import ResultsError, select

    with pytest.raises(ResultsError, match=r"^an empty name: give an experiment name, a sweep id or a run id"):
        select(MlflowClient(f"sqlite:///{tmp_path / 'store.db'}"), " ")


def test_predict_before_any_register_says_to_register(tmp_path):
    from mlflow.tracking import MlflowClient

    from fashioncnn.serving.predict import _what_exists

    client = MlflowClient(f"sqlite:///{tmp_path / 'store.db'}")
    assert _what_exists(client, "models:/shirts@champion") == (
        "; no model is registered yet: register a sweep's best with python -m fashioncnn.register EXPERIMENT")
