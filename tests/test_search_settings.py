"""A search's settings as Hydra's Optuna sweeper takes them, several objectives, and warm start from earlier runs."""

from __future__ import annotations

import hashlib
import json

import optuna
import pytest
from conftest import local_store, run_cli, runs_of

from fashioncnn.core.config import ConfigError
from fashioncnn.core.data import DEBIAN_DIR
from fashioncnn.core.sources import group_options
from fashioncnn.job.pruning import NoneRule
from fashioncnn.sweep import search
from fashioncnn.sweep.search_settings import Settings

needs_data = pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")
TINY = ["epochs=1", "subset=128", "val_size=200", "model.filter_in=4", "model.filter_out=4", "log_model=false",
        "system_metrics=false", "speed.threads=1"]


def test_the_keys_of_hydras_optuna_sweeper_are_read_as_there():
    settings = Settings.from_config({
        "direction": ["maximize", "minimize"], "objectives": ["best_val_acc", "param_count"], "study_name": "mine",
        "sampler": {"_target_": "optuna.samplers.RandomSampler", "seed": 3, "multivariate": True, "constant_liar": True},
        "n_trials": 5, "n_jobs": 2, "max_failure_rate": 0.5, "params": {"conv": "1,2"}, "storage": None,
    }).for_metric("best_val_acc")
    assert settings.sampler == {"_target_": "optuna.samplers.RandomSampler", "seed": 3}  # TPE's pinned options are TPE's
    assert (settings.sampler_name, settings.seed, settings.study_name, settings.n_trials, settings.n_jobs) == ("random", 3, "mine", 5, 2)
    assert (settings.objectives, settings.directions, settings.multi_objective) == (["best_val_acc", "param_count"],
                                                                                   ["maximize", "minimize"], True)
    assert settings.max_failure_rate == 0.5
    tpe = Settings.from_config({"sampler": "tpe", "seed": 4}).for_metric("best_val_loss")
    assert tpe.sampler == {"_target_": "optuna.samplers.TPESampler", "multivariate": True, "constant_liar": True, "seed": 4}
    assert (tpe.objectives, tpe.directions) == (["best_val_loss"], ["minimize"])
    built = search._sampler(tpe, [], trials_so_far=3)
    assert isinstance(built, optuna.samplers.TPESampler) and built._multivariate and built._constant_liar


@pytest.mark.parametrize("node,message", [
    ({"direction": "minimize"}, "hydra.sweeper.direction=minimize for best_val_acc, which is better when it is higher; use direction=maximize"),
    ({"objectives": ["best_val_acc", "param_count"], "direction": "maximize"},
     "hydra.sweeper.direction=maximize: 2 objectives (best_val_acc, param_count) need as many directions, e.g. direction=[maximize,minimize]"),
    ({"objectives": ["accuracy"]}, "hydra.sweeper.objectives: accuracy is not a metric every run of this search logs; allowed: best_val_acc, max_test_acc,"),
    ({"sampler": "cmaes"}, "hydra.sweeper.sampler=cmaes: allowed: tpe, random, grid, nsgaii, or a node with _target_"),
    ({"custom_search_space": "my.module.space"}, "hydra.sweeper.custom_search_space: not supported: a Python function cannot reach"),
    ({"max_failure_rate": 2}, "hydra.sweeper.max_failure_rate=2: must be a number from 0 to 1"),
    ({"warm_start": "yes"}, "hydra.sweeper.warm_start=yes: must be true or false"),
])
def test_settings_that_cannot_work_are_refused_in_one_line(node, message):
    with pytest.raises(ConfigError) as caught:
        Settings.from_config(node).for_metric("best_val_acc")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_study_of_one_objective_and_a_built_in_sampler_keeps_its_name():
    """The same command finds the same study as before samplers were nodes and objectives a list."""
    space, rest = search.take_space(["-m", search.SWEEPER_OVERRIDE, "conv=1,2", "epochs=2"], group_options())
    settings = Settings.from_config({"sampler": {"_target_": "optuna.samplers.TPESampler", "seed": 0, "multivariate": True,
                                                 "constant_liar": True}}).for_metric("best_val_acc")
    identity = {"space": {p.name: repr(p.distribution) for p in space}, "fixed": ["epochs=2"], "sampler": "tpe", "seed": 0,
                "pruner": "none:1:2:3"}
    expected = "exp-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    assert search._study_name(space, ["epochs=2"], settings, NoneRule(), "exp") == expected


@pytest.mark.slow
@needs_data
def test_a_preset_gives_the_space_and_the_official_keys(tmp_path):
    (tmp_path / "team" / "study").mkdir(parents=True)
    (tmp_path / "team" / "study" / "mysearch.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    direction: maximize\n    study_name: my-study\n    n_trials: 3\n"
        "    sampler:\n      _target_: optuna.samplers.RandomSampler\n      seed: 7\n    params:\n      conv: 1,2\n"
        "      optim.lr: tag(log, interval(0.0001, 0.01))\nepochs: 1\n")
    args = ["-m", "hydra/sweeper=optuna", "+study=mysearch", "--config-dir", "team", "lin=2,3", "--dry-run"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("planned against store sqlite:///") and "experiment fashioncnn, launcher basic" in lines[0]
    assert lines[1].startswith("optuna search, study my-study in sqlite:///")
    assert lines[2] == "sampler random (seed 7), n_trials 3, 1 per batch, maximize best_val_acc, pruner none"
    space = "\n".join(lines)
    assert "conv: options 1, 2  (conv=1,2)" in space and "optim.lr: float in [0.0001, 0.01] log scale" in space
    assert "lin: options 2, 3  (lin=2,3)" in space  # the command line adds to the preset's space
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
@needs_data
def test_a_search_of_two_objectives_ends_with_its_pareto_set(tmp_path):
    args = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra/sweeper/sampler=nsgaii",
            "hydra.sweeper.direction=[maximize,minimize]", "hydra.sweeper.objectives=[best_val_acc,param_count]",
            "conv=1,2,3", *TINY, "experiment=two-goals"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 and all(len(t.values) == 2 for t in complete)
    front = study.best_trials
    assert f"Pareto set of the study ({len(front)} trials" in result.stdout
    for trial in front:
        assert f"#{trial.number}: best_val_acc {trial.values[0]:.6g}, param_count {trial.values[1]:.6g}" in result.stdout
    (parent,) = [r for r in runs_of(local_store(tmp_path), "two-goals") if r.data.tags["fashioncnn.role"] == "parent"]
    assert "### The study" in parent.data.tags["mlflow.note.content"]


@pytest.mark.slow
@needs_data
def test_a_search_starts_from_the_grids_runs_in_its_space(tmp_path):
    grid = run_cli(["-m", "conv=1,2", *TINY, "experiment=warm"], cwd=tmp_path)
    assert grid.returncode == 0, grid.stderr[-3000:]
    client = local_store(tmp_path)
    grid_runs = {r.data.tags["group.conv"]: r.info.run_id for r in runs_of(client, "warm") if r.data.tags["fashioncnn.role"] == "job"}
    # The grid sampler from its group: built when planned, never by Hydra with the sweeper (it needs the space).
    search_args = ["-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=1", "conv=1,2,3", *TINY,
                   "experiment=warm"]
    planned = run_cli([*search_args, "--dry-run"], cwd=tmp_path)
    assert "warm start: 2 finished run(s) of the experiment lie in the space" in planned.stdout
    cold = run_cli([*search_args, "hydra.sweeper.warm_start=false", "--dry-run"], cwd=tmp_path)
    assert "warm start" not in cold.stdout
    # Another fixed setting (epochs=2) is another configuration: none of the grid's runs lies in that search.
    other = run_cli([*search_args, "epochs=2", "--dry-run"], cwd=tmp_path)
    assert "warm start: 0 finished run(s)" in other.stdout

    result = run_cli(search_args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "warm start: told 2 finished run(s) of the experiment" in result.stdout
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert {t.params["conv"]: t.user_attrs["mlflow_run_id"] for t in trials[:2]} == grid_runs  # the study's first trials
    assert all(t.user_attrs["warm_start"] for t in trials[:2])
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.intermediate_values == {1: t.value} for t in trials[:2])
    assert len(trials) == 3 and not trials[2].user_attrs.get("warm_start")  # n_trials=1: one new trial beyond them
    again = run_cli(search_args, cwd=tmp_path)  # the study has them: not told twice, nothing left to run
    assert again.returncode == 0 and "warm start: told" not in again.stdout
    assert len(optuna.load_study(study_name=name, storage=storage).trials) == 3


def test_one_objective_other_than_the_ranking_metric_names_a_study_of_its_own_and_is_not_pruned():
    default = Settings.from_config({}).for_metric("best_val_acc")
    seconds = Settings.from_config({"objectives": "train_seconds"}).for_metric("best_val_acc")
    assert "objectives" not in default.identity() and seconds.identity()["objectives"] == [("train_seconds", "minimize")]
    args = ["-m", search.SWEEPER_OVERRIDE, "conv=1,2", "prune=median", "hydra.sweeper.objectives=[train_seconds]"]
    space, rest = search.take_space(args, group_options())
    with pytest.raises(ConfigError, match=r"^prune=median: the pruner judges each epoch's val_acc, the search's objectives are "
                                          r"train_seconds; prune only a search of best_val_acc alone"):
        search.plan(rest, args[1:], group_options(), space)


def made_up_runs(tmp_path, rows):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'store.db'}")
    experiment = client.create_experiment("warm", artifact_location=(tmp_path / "artifacts").as_uri())
    for conv, tags, metrics in rows:
        run = client.create_run(experiment, tags={"fashioncnn.role": "job", "fingerprint": f"fp{conv}", "group.conv": conv, **tags})
        for epoch, value in enumerate(metrics.pop("history", []), 1):
            client.log_metric(run.info.run_id, "val_acc", value, step=epoch)
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, "FINISHED")
    return client, [client.get_run(r.info.run_id) for r in client.search_runs([experiment])]


def test_warm_start_tells_finished_runs_complete_and_diverged_ones_pruned_once(tmp_path):
    from types import SimpleNamespace

    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    from fashioncnn.sweep import warm_start
    from fashioncnn.tracking import stores

    client, runs = made_up_runs(tmp_path, [
        ("1", {}, {"best_val_acc": 0.80, "history": [0.70, 0.80]}),
        ("2", {"diverged": "true"}, {"best_val_acc": 0.10, "history": [0.10]}),
        ("3", {}, {"best_val_acc": float("nan")}),  # no finite value to tell: left out
        ("4", {}, {"best_val_acc": 0.85}),  # outside the space (conv 1, 2, 3)
    ])
    space = [search.Param("conv", "conv=1,2,3", CategoricalDistribution(["1", "2", "3"]), group=True)]
    plan = SimpleNamespace(space=space, distributions={"conv": space[0].distribution}, base=SimpleNamespace(select_metric="val_acc"),
                           settings=SimpleNamespace(objectives=["best_val_acc"]))
    by_conv = {r.data.tags["group.conv"]: r for r in runs}
    found = [(run, warm_start.values_in_space(run, space)) for run in (by_conv["1"], by_conv["2"])]
    assert [warm_start.values_in_space(by_conv[c], space) for c in "1234"] == [{"conv": "1"}, {"conv": "2"}, {"conv": "3"}, None]
    assert [warm_start.tellable(by_conv[c], ["best_val_acc"]) for c in "123"] == [True, True, False]
    study = optuna.create_study(direction="maximize")
    store = stores.Store(f"sqlite:///{tmp_path / 'store.db'}")
    assert warm_start.tell(study, plan, found, store) == 2
    complete, pruned = sorted(study.trials, key=lambda t: t.params["conv"])
    assert (complete.state, complete.value, complete.intermediate_values) == (TrialState.COMPLETE, 0.80, {1: 0.70, 2: 0.80})
    assert (pruned.state, pruned.params, pruned.user_attrs["warm_start"]) == (TrialState.PRUNED, {"conv": "2"}, True)
    assert complete.user_attrs["mlflow_run_id"] == by_conv["1"].info.run_id
    assert warm_start.tell(study, plan, found, store) == 0 and len(study.trials) == 2  # told once
    assert warm_start.asked(study.trials) == []  # they do not count towards n_trials
