"""hydra/sweeper=optuna: the search space from Hydra's sweep syntax (quick), and real searches in subprocesses (slow)."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import local_store, run_cli, runs_of
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from fashioncnn.core.config import ConfigError
from fashioncnn.core.data import DEBIAN_DIR
from fashioncnn.core.sources import group_options
from fashioncnn.sweep import search

OPTIONS = group_options()
needs_data = pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")
SMALL = ["subset=300", "val_size=300", "model.filter_in=8", "model.filter_out=8", "log_model=false", "system_metrics=false"]


def space_of(*args):
    space, rest = search.take_space(["-m", search.SWEEPER_OVERRIDE, *args], OPTIONS)
    return {p.name: p for p in space}, rest


def test_sweep_syntax_becomes_optuna_distributions():
    space, rest = space_of("optim.lr=tag(log, interval(1e-4,1e-2))", "model.conv=int(interval(1,3))", "label_smoothing=interval(0,0.2)",
                           "optim=choice(adam,sgd)", "seed=range(0,10,2)", "epochs=2")
    assert rest == ["-m", search.SWEEPER_OVERRIDE, "epochs=2"]  # a single value is fixed
    assert space["optim.lr"].distribution == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["model.conv"].distribution == IntDistribution(1, 3)  # Hydra's int(...) cast
    assert space["label_smoothing"].distribution == FloatDistribution(0.0, 0.2)
    assert space["optim"].distribution == CategoricalDistribution(["adam", "sgd"])
    assert space["seed"].distribution == IntDistribution(0, 8, step=2)
    assert space["optim.lr"].override(0.00123) == "optim.lr=0.00123"
    assert space["optim"].override("sgd") == "optim='sgd'"


def test_config_groups_search_their_option_names():
    space, _ = space_of("conv=range(1,4)", "lin=2,4", "channels=glob(32*)", "lr=interval(0.001,0.01)")
    assert space["conv"].distribution == CategoricalDistribution(["1", "2", "3"])
    assert space["lin"].distribution == CategoricalDistribution(["2", "4"])
    assert space["channels"].distribution == CategoricalDistribution(["32.32", "32.64"])
    # interval on a group whose options are numbers: the options within it
    assert space["lr"].distribution == CategoricalDistribution(["0.001", "0.005", "0.01"])
    assert space["conv"].override("2") == "conv='2'" and space["lr"].override("0.005") == "lr='0.005'"


@pytest.mark.parametrize("arg,message", [
    ("optim.lr=interval(0.1,0.01)", "optim.lr=interval(0.1,0.01): an interval's low end must be below its high end (got 0.1 and 0.01)"),
    ("optim.lr=tag(log, interval(0,1))", "optim.lr=tag(log, interval(0,1)): a log scale needs a low end above 0 (got 0)"),
    ("channels=interval(16,64)", "channels=interval(16,64): interval(...) on a config group picks the options whose number lies in "
                                 "it, but the options of 'channels' (16.32, 32.32, 32.64, 64.128) are not each one number"),
    ("norm=interval(0,1)", "norm=interval(0,1): interval(...) on a config group picks the options whose number lies in it, but the "
                           "options of 'norm' (batch, none) are not each one number"),
    ("conv=interval(4,9)", "conv=interval(4,9): no option of config group 'conv' lies within [4, 9]; available: 1, 2, 3"),
    ("experiment=a,b", "experiment=a,b: experiment cannot be searched"),
    ("seed=choice(1,null)", "seed=choice(1,null): TypeError while evaluating 'choice(1,null)'"),
])
def test_bad_search_spaces_are_one_line_errors(arg, message):
    with pytest.raises(ConfigError) as caught:
        space_of(arg)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_storage_sits_next_to_the_tracking_store_and_a_server_needs_one(tmp_path):
    assert search.storage_url(None, f"sqlite:///{tmp_path}/mlruns/mlflow.db") == f"sqlite:///{tmp_path}/mlruns/optuna.db"
    assert search.storage_url("postgresql://u:p@db/optuna", "http://tracking:5000") == "postgresql://u:p@db/optuna"
    with pytest.raises(ConfigError) as caught:
        search.storage_url(None, "http://me:secret@tracking:5000")
    assert str(caught.value) == ("tracking store http://me:***@tracking:5000: a tracking server needs hydra.sweeper.storage for the "
                                 "Optuna study, a database every worker reaches, e.g. hydra.sweeper.storage=postgresql://user:pass@dbhost/optuna")


def test_settings_and_the_pruning_rule():
    for node, message in (({"sampler": "cmaes"}, "hydra.sweeper.sampler=cmaes: allowed: tpe, random, grid"),
                          ({"n_trials": 0}, "hydra.sweeper.n_trials=0: must be an integer >= 1")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            search.Settings.from_config(node)
    # The search's pruner is the prune group's rule, one for the study: not a searched key.
    args = ["-m", search.SWEEPER_OVERRIDE, "prune=median,asha", "conv=1,2"]
    space, rest = search.take_space(args, OPTIONS)
    with pytest.raises(ConfigError, match=r"^prune=median,asha: a search has one pruning rule"):
        search.plan(rest, args[2:], OPTIONS, space)
    space, _ = space_of("optim.lr=interval(0.001,0.01)")
    with pytest.raises(ConfigError, match="sampler=grid needs values it can list"):
        search.grid_space(list(space.values()))
    space, _ = space_of("model.conv=range(1,4)", "lr=0.001,0.01")
    assert search.grid_space(list(space.values())) == {"model.conv": [1, 2, 3], "lr": ["0.001", "0.01"]}


# ------------------------------------------------------------------------------------------- real searches


def study_of(cwd, experiment):
    storage = f"sqlite:///{cwd / 'mlruns' / 'optuna.db'}"
    (name,) = [n for n in optuna.get_all_study_names(storage) if n.startswith(f"{experiment}-")]
    return optuna.load_study(study_name=name, storage=storage)


def parent_and_jobs(client, experiment):
    runs = runs_of(client, experiment)
    return ([r for r in runs if r.data.tags.get("fashioncnn.role") == "parent"],
            [r for r in runs if r.data.tags.get("fashioncnn.role") == "job"])


@pytest.mark.slow
@needs_data
def test_a_sampled_search_runs_its_trials_as_nested_runs_and_a_rerun_trains_nothing(tmp_path):
    args = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "optim.lr=tag(log, interval(1e-4,1e-2))", "conv=1,2",
            "epochs=2", *SMALL, "experiment=search"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 jobs: 3 finished" in result.stdout
    client = local_store(tmp_path)
    (parent,), jobs = parent_and_jobs(client, "search")
    assert len(jobs) == 3 and parent.info.status == "FINISHED"
    assert parent.data.params == {"optim.lr": "tag(log, interval(1e-4,1e-2))", "conv": "1,2"}
    study = study_of(tmp_path, "search")
    assert parent.data.tags["optuna.study"] == study.study_name
    trials = {str(t.number): t for t in study.trials}
    assert [t.state for t in trials.values()] == [TrialState.COMPLETE] * 3
    for job in jobs:
        assert job.info.status == "FINISHED" and job.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert job.data.tags["sweep_id"] == parent.data.tags["sweep_id"] and job.data.tags["fingerprint"]
        trial = trials[job.data.tags["optuna.trial"]]
        assert trial.value == pytest.approx(job.data.metrics["best_val_acc"])  # the trial's value is the run's ranking metric
        assert float(job.data.params["optim.lr"]) == pytest.approx(trial.params["optim.lr"])
        assert job.data.params["model.conv"] == trial.params["conv"] and job.data.tags["group.conv"] == trial.params["conv"]
        val_acc = {m.step: m.value for m in client.get_metric_history(job.info.run_id, "val_acc")}
        assert trial.intermediate_values == pytest.approx(val_acc)  # reported per epoch, step = epoch
    assert parent.data.metrics["best_val_acc"] == pytest.approx(study.best_value)
    assert f"best trial #{study.best_trial.number}: {study.best_value:.4f}" in result.stdout

    dry = run_cli([*args, "--dry-run"], cwd=tmp_path)
    assert dry.returncode == 0 and "3 of 3 trials already done (3 complete, 0 pruned), 0 to run" in dry.stdout

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 of 3 trials already done (re-attached to its parent run)" in again.stdout
    assert "3 jobs: 3 skipped" in again.stdout
    parents, jobs_after = parent_and_jobs(client, "search")
    assert [p.info.run_id for p in parents] == [parent.info.run_id] and len(jobs_after) == 3


@pytest.mark.slow
@needs_data
def test_optunas_median_pruner_stops_a_hopeless_trial(tmp_path):
    # The grid sampler with this seed tries lr 0.003 first: the 1e-6 trial then trails it at epoch 1.
    args = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler=grid", "hydra.sweeper.seed=1", "prune=median",
            "prune.min_siblings=1", "optim.lr=0.003,0.000001", "epochs=3", *SMALL, "experiment=pruning"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = study_of(tmp_path, "pruning")
    states = {t.params["optim.lr"]: t.state for t in study.trials}
    assert states == {0.003: TrialState.COMPLETE, 1e-6: TrialState.PRUNED}
    _, jobs = parent_and_jobs(local_store(tmp_path), "pruning")
    pruned = next(r for r in jobs if r.data.params["optim.lr"] == "1e-06")
    assert pruned.info.status == "FINISHED" and pruned.data.tags["pruned"] == "true"
    assert pruned.data.tags["pruned_reason"].startswith("optuna median pruner at epoch 1: val_acc ")
    assert pruned.data.metrics["best_epoch"] == 1


@pytest.mark.slow
@needs_data
def test_kill_9_mid_search_then_rerun_resumes_the_study_without_repeating_finished_trials(tmp_path):
    args = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "optim.lr=tag(log, interval(1e-4,1e-2))", "epochs=8",
            *SMALL, "subset=512", "experiment=killed", "lease.seconds=600"]
    # A long lease: the killed trial's holder was a process of this machine, so its run is taken over at once.
    # 8 epochs: the second trial is seconds from its end when the kill lands, even on a fast machine.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    process = subprocess.Popen([sys.executable, "-m", "fashioncnn", *args], cwd=tmp_path, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = local_store(tmp_path)
    checkpoints = tmp_path / "mlruns" / "checkpoints"

    def first_trial_finished_and_second_under_way():
        if not (tmp_path / "mlruns" / "mlflow.db").exists() or client.get_experiment_by_name("killed") is None:
            return False
        jobs = parent_and_jobs(client, "killed")[1]
        return sum(r.info.status == "FINISHED" for r in jobs) == 1 and any(checkpoints.glob("*.pt"))

    deadline = time.monotonic() + 300
    while not first_trial_finished_and_second_under_way():
        assert time.monotonic() < deadline and process.poll() is None, "the search never got to its second trial"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert [t.state for t in study_of(tmp_path, "killed").trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    finished_before = {r.info.run_id for r in parent_and_jobs(client, "killed")[1] if r.info.status == "FINISHED"}

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "1 of 3 trials already done, 1 interrupted trial(s) queued again (re-attached to its parent run)" in again.stdout
    assert "resumed from" in again.stdout  # the interrupted trial's run went on from its checkpoint
    study = study_of(tmp_path, "killed")
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1  # the interrupted one, re-queued
    (parent,), jobs = parent_and_jobs(client, "killed")
    assert parent.info.status == "FINISHED"
    assert len(jobs) == 3 and all(r.info.status == "FINISHED" for r in jobs)  # the killed run finished; nothing trained twice
    assert len({r.data.tags["fingerprint"] for r in jobs}) == 3
    assert finished_before <= {r.info.run_id for r in jobs}
    for trial in study.trials:  # the resumed trial too: its epochs before the kill, from its run
        if trial.state == TrialState.COMPLETE:
            assert sorted(trial.intermediate_values) == list(range(1, 9)), (trial.number, trial.intermediate_values)
    assert not any(checkpoints.glob("*.pt"))


@pytest.mark.slow
@needs_data
def test_trials_whose_config_already_finished_in_a_grid_are_told_from_the_store(tmp_path):
    fixed = ["epochs=1", *SMALL, "experiment=told"]
    grid = run_cli(["-m", "optim.lr=0.003,0.001", *fixed], cwd=tmp_path)
    assert grid.returncode == 0, grid.stderr[-3000:]
    client = local_store(tmp_path)
    trained = {r.data.params["optim.lr"]: r for r in parent_and_jobs(client, "told")[1]}
    # Without warm start (tested on its own), so that the search asks for these configs itself.
    result = run_cli(["-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler=grid", "hydra.sweeper.warm_start=false",
                      "optim.lr=choice(0.003,0.001)", *fixed], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 jobs: 2 skipped" in result.stdout and "Traceback" not in result.stderr
    assert len(parent_and_jobs(client, "told")[1]) == 2  # nothing trained again
    study = study_of(tmp_path, "told")
    for trial in study.trials:
        run = trained[str(trial.params["optim.lr"])]
        assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(run.data.metrics["best_val_acc"])
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id and trial.user_attrs["told_from_store"]
        # its epochs, as a job reports them: Optuna's median pruner counts a COMPLETE trial only where it has values
        assert trial.intermediate_values == {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
        assert list(trial.intermediate_values) == [1]


@pytest.mark.slow
@needs_data
def test_a_failing_trial_is_told_as_failed_and_the_search_goes_on(tmp_path):
    args = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler=grid", "debug.fail_at_epoch=1,null", "epochs=1", *SMALL,
            "experiment=failing"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # as a grid with a failed job
    assert "2 jobs: 1 failed, 1 finished" in result.stdout
    states = {t.params["debug.fail_at_epoch"]: t.state for t in study_of(tmp_path, "failing").trials}
    assert states == {1: TrialState.FAIL, None: TrialState.COMPLETE}
    failed = next(r for r in parent_and_jobs(local_store(tmp_path), "failing")[1] if r.info.status == "FAILED")
    assert failed.data.tags["error"] == "RuntimeError: injected failure at epoch 1 (debug.fail_at_epoch=1)"
    dry = run_cli([*args, "--dry-run"], cwd=tmp_path)
    assert "1 of 2 trials already done (1 complete, 0 pruned; 1 failed, not counted), 1 to run" in dry.stdout


@pytest.mark.slow
def test_preflight_refuses_bad_intervals_with_one_line_and_creates_nothing(tmp_path):
    cases = {
        ("-m", "hydra/sweeper=optuna", "optim.lr=interval(0.1,0.01)"):
            "error: optim.lr=interval(0.1,0.01): an interval's low end must be below its high end (got 0.1 and 0.01); "
            "e.g. interval(0.01,0.1)",
        ("-m", "optim.lr=interval(0.001,0.01)"):
            "error: optim.lr=interval(0.001,0.01): interval(...) samples a range, which a grid cannot list; search it with "
            "hydra/sweeper=optuna (python -m fashioncnn -m hydra/sweeper=optuna ...), or give values: choice(...) or range(...)",
    }
    for args, message in cases.items():
        result = run_cli(list(args), cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [message], result.stderr
    dry = run_cli(["-m", "hydra/sweeper=optuna", "lr=interval(0.001,0.01)", "conv=1,2", "--dry-run"], cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "  lr: options 0.001, 0.005, 0.01  (lr=interval(0.001,0.01))" in dry.stdout
    assert "sampler tpe (seed 0), n_trials 20, 1 per batch, maximize best_val_acc, pruner none" in dry.stdout and "0 of 20 trials already done" in dry.stdout
    assert not (tmp_path / "mlruns").exists()
