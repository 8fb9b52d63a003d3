"""Composition of the config groups, the numeric command line, and one-line errors for every bad value."""

import pytest
from conftest import run_cli

from fashioncnn.core.config import ConfigError, register_schema
from fashioncnn.core.sources import group_options
from fashioncnn.sweep.preflight import jobs_of

register_schema()


def test_study_groups_are_real_config_groups():
    options = group_options()
    assert {"conv", "lin", "channels", "lr"} <= set(options)
    assert options["conv"] == ["1", "2", "3"] and options["lr"] == ["0.0005", "0.001", "0.005", "0.01"]


def compose_one(*args):
    jobs = jobs_of(list(args))
    assert len(jobs) == 1
    return jobs[0][1]


def test_defaults_are_the_studys_best_model():
    cfg = compose_one()
    assert (cfg.model.conv, cfg.model.lin, cfg.model.filter_in, cfg.model.filter_out) == (2, 2, 32, 32)
    assert cfg.optim.lr == 0.001 and cfg.optim.name == "adam" and cfg.optim._target_ == "torch.optim.Adam"
    assert (cfg.epochs, cfg.batch_size, cfg.subset, cfg.device) == (5, 64, None, "auto")


def test_groups_compose_from_the_studys_spelling():
    cfg = compose_one("conv=3", "lin=4", "channels=64.128", "lr=0.005")
    assert (cfg.model.conv, cfg.model.lin, cfg.model.filter_in, cfg.model.filter_out) == (3, 4, 64, 128)
    assert cfg.optim.lr == 0.005


def test_values_outside_the_groups_are_set_directly():
    cfg = compose_one("optim.lr=0.0003", "model.filter_in=8", "epochs=2", "subset=500", "device=cpu", "seed=7")
    assert (cfg.optim.lr, cfg.model.filter_in, cfg.epochs, cfg.subset, cfg.device, cfg.seed) == (0.0003, 8, 2, 500, "cpu", 7)


def test_a_sweep_expands_to_every_combination():
    jobs = jobs_of(["-m", "conv=2,3", "lin=2,3,4"])
    assert sorted((c.model.conv, c.model.lin) for _, c in jobs) == [(c, l) for c in (2, 3) for l in (2, 3, 4)]
    assert jobs[0][0] == ["conv='2'", "lin='2'"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["lr=abc"], "lr=abc: no option 'abc' in config group 'lr'; available: 0.0005, 0.001, 0.005, 0.01; "
                     "a value outside the group is set directly, e.g. optim.lr=0.0003"),
        (["lr=-1"], "lr=-1: no option '-1' in config group 'lr'; available: 0.0005, 0.001, 0.005, 0.01"),
        (["optim.lr=-1"], "optim.lr=-1.0: not allowed, must be a number > 0"),
        (["optim.lr=abc"], "optim.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
        (["epochs=0"], "epochs=0: not allowed, must be an integer >= 1"),
        (["epochs=abc"], "epochs=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        (["batch_size=-4"], "batch_size=-4: not allowed, must be an integer >= 1"),
        (["subset=0"], "subset=0: not allowed, must be null (all images) or an integer from 1 to 60000"),
        (["subset=70000"], "subset=70000: not allowed, must be null (all images) or an integer from 1 to 60000"),
        (["device=gpu"], "device=gpu: not allowed, must be one of auto, cpu, cuda, cuda:N"),
        (["optim=rmsprop"], "optim=rmsprop: no option 'rmsprop' in config group 'optim'; available: adam, adamw, sgd"),
        (["optim.momentum=0.5"], "optim.momentum=0.5: not allowed with optim=adam (torch.optim.Adam has no momentum)"),
        (["optim._target_=torch.optim.RMSprop"], "optim._target_=torch.optim.RMSprop: optim.name=adam is the built-in option"),
        (["foo=1"], "foo=1: unknown key 'foo'; every key: python -m fashioncnn --cfg job"),
        (["+foo=1"], "foo: unknown key; every key: python -m fashioncnn --cfg job"),
        (["epoch=3"], "epoch=3: unknown key 'epoch'; did you mean epochs?"),
        (["optim.l=0.1"], "optim.l=0.1: unknown key 'optim.l'; did you mean optim.lr or"),
        (["study=step1-conv"], "study=step1-conv: study is not chosen by default, so it is added with a +: +study=step1-conv"),
        (["-m", "conv=2,", "3"], "conv=2, 3: a space after a comma splits the list into two arguments; write conv=2,3 (no space)"),
        (["-m", "conv=2,3", "hydra.sweeper.n_trial=1"], "hydra.sweeper.n_trial=1: unknown key 'hydra.sweeper.n_trial'; "
                                                         "did you mean hydra.sweeper.n_trials?"),
        (["conv=4"], "conv=4: no option '4' in config group 'conv'; available: 1, 2, 3; "
                     "a value outside the group is set directly, e.g. model.conv=4"),
        (["channels=32.16"], "channels=32.16: no option '32.16' in config group 'channels'; available: 16.32, 32.32, 32.64, 64.128"),
        (["model.conv=4"], "M4.2.32.32: conv block 4 gets a 2x2 feature map, too small for a 3x3 kernel"),
        (["lr=0.01,0.001"], "lr=0.01,0.001: several values sweep only in multirun mode: python -m fashioncnn -m lr=0.01,0.001"),
        (["-m", "conv=2,3", "lr=0.01,abc"], "lr=abc: no option 'abc' in config group 'lr'"),
        (["-m", "conv=1,2,3", "model.lin=9"], "M3.9.32.32: linear layer widths"),
    ],
)
def test_bad_values_fail_with_one_line_naming_key_value_and_what_is_allowed(args, message):
    with pytest.raises(ConfigError) as caught:
        jobs_of(args)
    text = str(caught.value)
    assert text.startswith(message)
    assert "\n" not in text


@pytest.mark.slow
def test_a_bad_sweep_is_refused_before_any_job_trains(tmp_path):
    # conv=2 and conv=3 would be fine; conv=4 in the same sweep refuses the whole sweep up front.
    result = run_cli(["-m", "model.conv=2,3,4", "subset=64", "epochs=1"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: M4.2.32.32: conv block 4 gets a 2x2 feature map, too small for a 3x3 kernel; with kernel 3 on "
        "28x28 images at most 3 conv blocks fit (model.conv=4) (in job model.conv=4 subset=64 epochs=1)"
    ]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "multirun").exists()


def test_mlflows_experiment_variable_names_the_default_experiment_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-lr")
    assert compose_one().experiment == "team-lr"
    assert compose_one("experiment=mine").experiment == "mine"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    assert compose_one().experiment == "fashioncnn"


def test_the_closing_ui_hint_names_the_store_in_use(tmp_path):
    from fashioncnn.tracking.links import ui_hint
    from fashioncnn.tracking.stores import default_tracking_uri

    assert ui_hint(default_tracking_uri()) == "start the UI with: make ui"
    assert ui_hint(f"sqlite:///{tmp_path}/team.db") == f"start the UI with: mlflow ui --backend-store-uri sqlite:///{tmp_path}/team.db"
    assert ui_hint("http://alice:secret@127.0.0.1:5000") == ""  # a server is its own UI: the run's link says where


def test_a_local_store_keeps_its_artifacts_beside_its_database(tmp_path, monkeypatch):
    from fashioncnn.tracking.stores import Store

    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here, whatever the store
    store = Store(f"sqlite:///{tmp_path / 'team' / 'other.db'}")
    experiment_id = store.experiment_id("elsewhere", create=True)
    assert store.client.get_experiment(experiment_id).artifact_location == (tmp_path / "team" / "artifacts").as_uri()
    assert not (tmp_path / "mlruns").exists()
