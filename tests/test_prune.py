"""Pruning (prune=median, prune=asha) and the cost estimate of --dry-run.

Quick: the rules on hand-made sibling histories, the config group, the fingerprint, the estimate's
arithmetic. Slow: real sweeps on 500 images in a subprocess, where hopeless jobs (lr 1e-7) are pruned.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from conftest import local_store, run_cli, runs_of
from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag

from fashioncnn.core.config import ConfigError, register_schema
from fashioncnn.core.data import DEBIAN_DIR
from fashioncnn.core.loop import EpochMetrics
from fashioncnn.core.model import ModelSpec
from fashioncnn.job.decision import Decision
from fashioncnn.job.pruning import (
    AshaPruner,
    AshaRule,
    MedianPruner,
    MedianRule,
    NeverPrune,
    NoneRule,
    Siblings,
    asha_rungs,
    asha_verdict,
    best_so_far,
    make_pruner,
    median_verdict,
    pruning_rule,
    saved_seconds,
)
from fashioncnn.results import report
from fashioncnn.sweep import estimate
from fashioncnn.sweep.plan import fingerprint
from fashioncnn.sweep.preflight import jobs_of
from fashioncnn.tracking.queries import selectable

register_schema()


def compose(*args):
    jobs = jobs_of(list(args))
    assert len(jobs) == 1
    return jobs[0][1]


# ------------------------------------------------------------------------------------------- the rules


def test_best_so_far_needs_the_epoch_and_looks_back():
    history = {1: 0.5, 2: 0.7, 3: 0.6}
    assert best_so_far(history, 3, lower=False) == 0.7
    assert best_so_far(history, 1, lower=False) == 0.5
    assert best_so_far(history, 4, lower=False) is None  # never reached epoch 4
    assert best_so_far({1: 2.0, 2: 1.5}, 2, lower=True) == 1.5


def test_median_rule():
    assert median_verdict(0.5, [0.6, 0.7, 0.8], lower=False, min_siblings=3) == 0.7
    assert median_verdict(0.75, [0.6, 0.7, 0.8], lower=False, min_siblings=3) is None
    assert median_verdict(0.7, [0.6, 0.7, 0.8], lower=False, min_siblings=3) is None  # at the median: go on
    assert median_verdict(0.5, [0.6, 0.7], lower=False, min_siblings=3) is None  # too few siblings
    assert median_verdict(0.9, [0.3, 0.4, 0.5], lower=True, min_siblings=3) == 0.4  # a loss: lower is better
    assert median_verdict(0.35, [0.3, 0.4, 0.5], lower=True, min_siblings=3) is None


def test_asha_rungs_and_promotion():
    assert asha_rungs(5, 1, 3) == [1, 3]
    assert asha_rungs(30, 1, 3) == [1, 3, 9, 27]
    assert asha_rungs(10, 2, 2) == [2, 4, 8]
    assert asha_rungs(1, 1, 3) == []
    # 6 runs at the rung, factor 3: the top 2 go on
    assert asha_verdict(0.8, [0.9, 0.7, 0.6, 0.5, 0.4], lower=False, reduction_factor=3, min_siblings=2) is None
    assert asha_verdict(0.7, [0.9, 0.8, 0.6, 0.5, 0.4], lower=False, reduction_factor=3, min_siblings=2) == 0.8
    # fewer runs than the factor: only the best goes on, once min_siblings others are there
    assert asha_verdict(0.5, [0.9, 0.8], lower=False, reduction_factor=3, min_siblings=2) == 0.9
    assert asha_verdict(0.5, [0.9], lower=False, reduction_factor=3, min_siblings=2) is None
    assert asha_verdict(1.0, [0.5, 0.6, 0.7], lower=True, reduction_factor=2, min_siblings=2) == 0.6


class FakeSiblings:
    """Sibling histories as the store would give them, and how often they were asked for."""

    def __init__(self, histories):
        self.histories, self.asked = histories, []

    def histories_at(self, epoch):
        self.asked.append(epoch)
        return [h for h in self.histories if epoch in h]


def epoch(n, val_acc, val_loss=1.0):
    return EpochMetrics(n, 1.0, 0.5, 1.0, 0.5, 2.0, val_loss, val_acc, 0.001)


SIBLINGS = [{1: 0.70, 2: 0.80, 3: 0.85, 4: 0.86}, {1: 0.72, 2: 0.79, 3: 0.84, 4: 0.85}, {1: 0.60, 2: 0.75},
            {1: 0.65, 2: 0.78, 3: 0.83, 4: 0.84}]


def test_siblings_from_the_store_a_diverged_run_did_not_reach_its_last_epoch(tmp_path):
    from fashioncnn.tracking import names, stores

    store = stores.Store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = store.client
    experiment_id = client.create_experiment("siblings")

    def run(fingerprint, test_acc, sweep="s1", **tags):
        made = client.create_run(experiment_id, tags={names.SWEEP_TAG: sweep, names.FINGERPRINT_TAG: fingerprint,
                                                       names.ROLE_TAG: "job", **tags})
        client.log_batch(made.info.run_id, [Metric("test_acc", value, 0, step) for step, value in test_acc.items()])
        client.set_terminated(made.info.run_id, "FINISHED")
        return made.info.run_id

    run("a", {1: 0.80, 2: 0.84})
    run("b", {1: 0.70, 2: 0.10}, diverged="true", cut_short_epoch="2")  # the guard stopped it during epoch 2
    run("c", {1: 0.10}, diverged="true", cut_short_epoch="1")  # ... during epoch 1, at chance level
    run("f", {1: 0.60, 2: 0.66}, diverged="true")  # ... right at the end of epoch 2, which it did reach
    run("d", {1: 0.90}, sweep="another sweep")
    own = run("e", {1: 0.75})
    siblings = Siblings(store, experiment_id, "s1", own, "e", "test_acc")
    assert sorted(h[1] for h in siblings.histories_at(1)) == [0.60, 0.70, 0.80]  # c did not finish epoch 1
    assert sorted(h[2] for h in siblings.histories_at(2)) == [0.66, 0.84]  # nor b epoch 2


def test_median_pruner_on_sibling_histories():
    siblings = FakeSiblings(SIBLINGS)
    pruner = MedianPruner("run", 4, "val_acc", siblings, warmup_epochs=1, min_siblings=3)
    assert pruner.after_epoch(epoch(1, 0.10)) is None  # warm-up: never asked
    assert siblings.asked == []
    reason = pruner.after_epoch(epoch(2, 0.12))
    assert reason == ("median rule at epoch 2: best val_acc so far 0.1200 is below the median 0.7850 "
                      "of 4 sibling runs at that epoch")
    good = MedianPruner("run", 4, "val_acc", FakeSiblings(SIBLINGS), warmup_epochs=1, min_siblings=3)
    assert [good.after_epoch(epoch(n, v)) for n, v in ((1, 0.7), (2, 0.8), (3, 0.85), (4, 0.10))] == [None] * 4  # never after the last epoch


def test_decisions_are_the_same_for_the_same_histories():
    def decisions():
        pruner = AshaPruner("run", 5, "val_acc", FakeSiblings(SIBLINGS), reduction_factor=3, min_epoch=1, min_siblings=2)
        return [pruner.after_epoch(epoch(n, v)) for n, v in ((1, 0.73), (2, 0.8), (3, 0.81))]

    first = decisions()
    assert first == decisions()
    assert first[0] is None and first[1] is None  # the best of 5 at rung 0 (epoch 1); epoch 2 is no rung
    assert first[2] == ("asha rung 1 (epoch 3): best val_acc so far 0.8100 is not in the top 1 of 4 runs at this "
                        "rung (needs >= 0.8500)")


def test_asha_pruner_stops_at_a_rung_only():
    pruner = AshaPruner("run", 5, "val_acc", FakeSiblings(SIBLINGS), reduction_factor=3, min_epoch=1, min_siblings=2)
    assert pruner.after_epoch(epoch(1, 0.5)).startswith("asha rung 0 (epoch 1): best val_acc so far 0.5000 is not in "
                                                        "the top 1 of 5 runs")
    later = AshaPruner("run", 5, "val_acc", FakeSiblings(SIBLINGS), reduction_factor=3, min_epoch=2, min_siblings=2)
    assert later.after_epoch(epoch(1, 0.1)) is None  # epoch 1 is no rung


def test_a_loss_prunes_the_higher_values():
    pruner = MedianPruner("run", 4, "val_loss", FakeSiblings([{1: 0.5}, {1: 0.6}, {1: 0.4}]), min_siblings=3)
    assert "is above the median 0.5000" in pruner.after_epoch(epoch(1, 0.1, val_loss=2.3))
    pruner = MedianPruner("run", 4, "val_loss", FakeSiblings([{1: 0.5}, {1: 0.6}, {1: 0.4}]), min_siblings=3)
    assert pruner.after_epoch(epoch(1, 0.1, val_loss=0.3)) is None


def test_a_resumed_run_counts_its_earlier_epochs():
    siblings = FakeSiblings([{1: 0.7, 2: 0.75, 3: 0.8}] * 3)
    pruner = MedianPruner("run", 5, "val_acc", siblings, min_siblings=3)
    pruner.restored([epoch(1, 0.9), epoch(2, 0.5)])  # from its checkpoint
    assert pruner.after_epoch(epoch(3, 0.6)) is None  # its best so far is epoch 1's 0.9
    fresh = MedianPruner("run", 5, "val_acc", FakeSiblings([{1: 0.7, 2: 0.75, 3: 0.8}] * 3), min_siblings=3)
    assert fresh.after_epoch(epoch(3, 0.6)) is not None  # without them, 0.6 is below the median 0.8


@pytest.mark.parametrize("rule", [MedianRule(warmup_epochs=1, min_siblings=3), AshaRule(reduction_factor=2, min_epoch=2)])
def test_one_rule_judges_alike_in_a_grid_and_in_a_search(rule):
    """The same prune.* keys: the store's pruner and Optuna's stop a trailing run at the same first epoch."""
    import optuna

    others = [{1: 0.70, 2: 0.79, 3: 0.84}, {1: 0.71, 2: 0.80, 3: 0.85}, {1: 0.72, 2: 0.81, 3: 0.86}]  # each better: none pruned
    trailing = [epoch(n, 0.30 + n / 100) for n in (1, 2, 3)]
    store = rule.store_pruner("run", 4, "val_acc", FakeSiblings(others), None)
    grid_stops = next(m.epoch for m in trailing if store.after_epoch(m) is not None)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=rule.optuna_pruner())
    for history in others:
        trial = study.ask()
        for step, value in history.items():
            trial.report(value, step)
            assert not trial.should_prune()  # as every trial's job asks after each epoch (asha records its rungs so)
        study.tell(trial, history[3])
    trial = study.ask()
    for metrics in trailing:
        trial.report(metrics.val_acc, metrics.epoch)
        if trial.should_prune():
            break
    assert grid_stops == metrics.epoch == {"median": 2, "asha": 2}[rule.name]
    assert NoneRule().store_pruner("run", 4, "val_acc", FakeSiblings(others), None) is None
    assert isinstance(NoneRule().optuna_pruner(), optuna.pruners.NopPruner)


def test_saved_seconds():
    assert saved_seconds(5, 1, 10.0) == 40.0
    assert saved_seconds(5, 5, 50.0) == 0.0


# ------------------------------------------------------------------------------------------- the config


def test_prune_group_composes_and_keeps_the_fingerprint():
    default = compose()
    assert default.prune.name == "none" and pruning_rule(default.prune) == NoneRule()
    median, asha = compose("prune=median"), compose("prune=asha", "prune.reduction_factor=2")
    assert pruning_rule(median.prune) == MedianRule(warmup_epochs=0, min_siblings=3)
    assert pruning_rule(asha.prune) == AshaRule(reduction_factor=2, min_epoch=1, min_siblings=2)
    assert fingerprint(median) == fingerprint(asha) == fingerprint(default)
    assert isinstance(make_pruner(median, "run"), NeverPrune)  # no decision: not a plan's job, never pruned
    alone = Decision("1", "fp")  # a plan's single run (no -m): no sweep, so no siblings
    assert isinstance(make_pruner(median, "run", alone), NeverPrune)


@pytest.mark.parametrize("args,message", [
    (["prune=asha", "prune.reduction_factor=1"], "prune.reduction_factor=1: not allowed, must be an integer >= 2"),
    (["prune.min_epoch=0"], "prune.min_epoch=0: not allowed, must be an integer >= 1"),
    (["prune.warmup_epochs=-1"], "prune.warmup_epochs=-1: not allowed, must be an integer >= 0"),
    (["prune=hyperband"], "prune=hyperband: no option 'hyperband' in config group 'prune'"),
])
def test_bad_prune_values_fail_with_one_line(args, message):
    with pytest.raises(ConfigError) as caught:
        jobs_of(args)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------- the estimate


def test_training_flops_grow_with_the_model():
    small, large = ModelSpec.from_name("M2.2.16.32"), ModelSpec.from_name("M2.2.64.128")
    # M2.2.16.32: conv 28x28x16 (k3, 1 in), pool to 14, conv 12x12x32 (k3, 16 in), pool to 6, linear
    # 1152 -> 576 -> 10; x2 per multiply-add, x3 for training
    expected = 3 * 2 * (9 * 1 * 16 * 28 * 28 + 9 * 16 * 32 * 12 * 12 + 1152 * 576 + 576 * 10)
    assert estimate.training_flops(small) == expected
    assert estimate.training_flops(large) > 10 * expected


def _run(model, epoch_seconds, subset="None", val_size="5000", batch_size="64"):
    info = RunInfo("r" * 32, "0", "u", "FINISHED", 0, 1, "active", run_name=model)
    data = RunData(metrics=[Metric("epoch_seconds", epoch_seconds, 0, 5)],
                   params=[Param("subset", subset), Param("val_size", val_size), Param("batch_size", batch_size)],
                   tags=[RunTag("model_name", model)])
    return Run(info, data)


def test_estimate_from_finished_runs_prefers_the_same_data_and_scales_by_images():
    cfg = compose("subset=1000", "val_size=500")
    same = [_run("M2.2.32.32", 3.0, subset="1000", val_size="500"), _run("M2.2.32.32", 99.0, subset="None")]
    seconds, source = estimate.from_runs(cfg, same)
    assert seconds == pytest.approx(3.0) and "1 finished run(s) of M2.2.32.32, same batch size and data" in source
    full = [_run("M2.2.32.32", 20.0, subset="None", val_size="5000")]
    seconds, source = estimate.from_runs(cfg, full)
    per_image = 20.0 / estimate.epoch_images(None, 5000)
    assert seconds == pytest.approx(per_image * estimate.epoch_images(1000, 500)) and "scaled by images" in source
    assert estimate.from_runs(cfg, []) is None


def test_machine_model_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(estimate, "_machine_busy_seconds", lambda: 100.0 + sum(os.times()[:2]))  # only this process works
    cfg = compose("device=cpu")
    calls = []

    def measure(cfg, name):
        calls.append(name)
        return {"M2.2.16.32": 1e-4, "M2.2.64.128": 1e-3}[name]

    intercept, slope, where = estimate.machine_model(cfg, measure)
    assert calls == list(estimate.REFERENCE_MODELS) and "measured now" in where
    small = estimate.training_flops(ModelSpec.from_name("M2.2.16.32"))
    assert intercept + slope * small == pytest.approx(1e-4)
    assert estimate.machine_model(cfg, measure)[:2] == (intercept, slope) and len(calls) == 2  # cached
    assert json.loads((tmp_path / "fashioncnn" / "speed.json").read_text())


def test_a_measurement_while_others_use_the_cpu_is_used_but_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(estimate.os, "cpu_count", lambda: 2)
    cfg = compose("device=cpu")
    others = {"cpu_seconds": 0.0, "per_measurement": 0.0}
    calls = []

    def measure(cfg, name):
        calls.append(name)
        time.sleep(0.05)
        others["cpu_seconds"] += others["per_measurement"]  # what other processes did meanwhile
        return {"M2.2.16.32": 1e-4, "M2.2.64.128": 1e-3}[name]

    monkeypatch.setattr(estimate, "_machine_busy_seconds", lambda: others["cpu_seconds"] + sum(os.times()[:2]))
    others["per_measurement"] = 0.09  # of 0.05 s x 2 cores: 90% of the machine
    *busy, where = estimate.machine_model(cfg, measure)
    used = re.search(r"while other processes used (\d+)% of the CPU", where)
    assert used and 60 <= int(used[1]) <= 90 and "not cached" in where, where  # 90% less the sleep's overshoot
    assert not (tmp_path / "fashioncnn" / "speed.json").exists()
    others["per_measurement"] = 0.0  # idle now: measured again, and kept
    assert estimate.machine_model(cfg, measure)[:2] == tuple(busy) and len(calls) == 4
    assert "cached in" in estimate.machine_model(cfg, measure)[2] and len(calls) == 4
    assert json.loads((tmp_path / "fashioncnn" / "speed.json").read_text()).popitem()[1]["cpu_share_of_other_processes"] == 0


def test_the_machine_busy_counter_reads_proc_stat():
    before = estimate._machine_busy_seconds()
    if before is None:
        pytest.skip("no /proc/stat")
    deadline = time.perf_counter() + 0.3
    while time.perf_counter() < deadline:  # keep one core busy
        pass
    assert estimate._machine_busy_seconds() - before >= 0.2


# ------------------------------------------------------------------------------------------- real sweeps

needs_data = pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")
SMALL = ["subset=500", "val_size=500", "epochs=3", "speed.threads=1", "log_model=false", "system_metrics=false"]
# Two learnable jobs, then two built to be hopeless: after one epoch on 500 images they are at chance.
GRID = ["-m", "optim.lr=0.003,0.002,0.0000001,0.0000002", *SMALL]


def _by_lr(client, experiment):
    return {float(r.data.params["optim.lr"]): r for r in runs_of(client, experiment) if r.data.tags.get("fashioncnn.role") == "job"}


@pytest.mark.slow
@needs_data
def test_median_prunes_the_hopeless_jobs_and_a_rerun_trains_nothing(tmp_path):
    result = run_cli([*GRID, "prune=median", "prune.min_siblings=2", "experiment=median"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = local_store(tmp_path)
    runs = _by_lr(client, "median")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs.values())
    for lr in (1e-7, 2e-7):
        tags = runs[lr].data.tags
        assert tags["pruned"] == "true" and tags["pruned_epoch"] == "1" and tags["pruned_rule"] == "median"
        assert tags["pruned_reason"].startswith("median rule at epoch 1: best val_acc so far")
    for lr in (0.003, 0.002):
        assert "pruned" not in runs[lr].data.tags
        assert len(client.get_metric_history(runs[lr].info.run_id, "val_acc")) == 3  # trained to the end
    lines = result.stdout.splitlines()
    assert sum(" PRUNED " in line for line in lines) == 2
    assert "4 jobs: 2 finished, 2 pruned" in result.stdout
    saving = next(line for line in lines if line.startswith("pruning: 2 of 4 runs stopped early"))
    assert "s saved" in saving
    parent = next(r for r in runs_of(client, "median") if r.data.tags.get("fashioncnn.role") == "parent")
    assert parent.data.metrics["jobs_pruned"] == 2 and parent.data.metrics["prune_saved_seconds"] > 0
    assert "| PRUNED |" in parent.data.tags["mlflow.note.content"]
    # Retrain and the registry never pick a pruned run; the report shows it as PRUNED, never as the best.
    picked = selectable(list(runs.values()), "median")
    assert {float(r.data.params["optim.lr"]) for r in picked} == {0.003, 0.002}
    built = report.build(["median"], tmp_path / "report", uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", attach=False)
    table = [line for line in built.markdown.splitlines() if "| PRUNED |" in line]
    assert len(table) == 2 and not any("(best)" in line for line in table)

    again = run_cli([*GRID, "prune=median", "prune.min_siblings=2", "experiment=median"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_by_lr(client, "median")) == 4  # nothing new trained
    assert "4 jobs, 4 already finished" in again.stdout and "2 pruned" in again.stdout
    # The same config without pruning is the same run: it is found, not trained again.
    plain = run_cli(["optim.lr=0.0000001", *SMALL, "experiment=median", "--dry-run"], cwd=tmp_path)
    assert "skip: already FINISHED" in plain.stdout, plain.stdout + plain.stderr

    # The estimate of a new job of the same model comes from the runs in the store.
    dry = run_cli(["-m", "optim.lr=0.004", *SMALL, "experiment=median", "--dry-run"], cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "finished run(s) of M2.2.32.32, same batch size and data" in dry.stdout
    assert "estimated training time:" in dry.stdout and "for 1 jobs" in dry.stdout


@pytest.mark.slow
@needs_data
def test_asha_prunes_the_hopeless_jobs_the_same_way_twice(tmp_path):
    decisions = []
    for experiment in ("asha-1", "asha-2"):
        result = run_cli([*GRID, "prune=asha", f"experiment={experiment}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs = _by_lr(local_store(tmp_path), experiment)
        decisions.append({lr: (r.data.tags.get("pruned"), r.data.tags.get("pruned_reason")) for lr, r in runs.items()})
        assert "2 pruned" in result.stdout
    assert decisions[0] == decisions[1]  # the basic launcher: the same grid order, the same decisions
    assert {lr for lr, (pruned, _) in decisions[0].items() if pruned} == {1e-7, 2e-7}
    assert decisions[0][1e-7][1].startswith("asha rung 0 (epoch 1): best val_acc so far")


@pytest.mark.slow
@needs_data
def test_dry_run_estimates_from_a_measured_machine_model(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = run_cli(["-m", "conv=2,3", "epochs=2", "--dry-run"], cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "FLOP model of this machine" in first.stdout
    assert "estimated training time:" in first.stdout and "for 2 jobs" in first.stdout
    cached = (tmp_path / "cache" / "fashioncnn" / "speed.json").exists()
    # a busy machine's measurement is not kept (and says so); this one may be busy with other tests' leftovers
    assert ("measured now on this machine" in first.stdout) == cached and (cached or "not cached" in first.stdout), first.stdout
    second = run_cli(["-m", "conv=2,3", "epochs=2", "--dry-run"], cwd=tmp_path, env=env)
    assert ("measured 20" in second.stdout and "cached in" in second.stdout) if cached else "measured now" in second.stdout
    assert not (tmp_path / "mlruns").exists()  # a dry run creates no store
