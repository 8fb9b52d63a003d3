"""The study in a few commands: the presets' job lists, then one real small preset sweep that the report
and retrain-the-best are checked against, in a real MLflow store."""

import csv
import math
import re
import statistics
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, local_store, run_cli, runs_of
from mlflow.tracking import MlflowClient

from fashioncnn.core.config import ConfigError, register_schema
from fashioncnn.core.data import DEBIAN_DIR
from fashioncnn.core.model import ModelSpec, build_model, count_parameters
from fashioncnn.results import report, retrain
from fashioncnn.sweep.preflight import jobs_of
from fashioncnn.tracking import queries

register_schema()
needs_data = pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")

BEST4 = ["M2.2.16.32", "M2.2.32.32", "M2.2.32.64", "M3.2.32.32"]
# preset -> (models with their lr, epochs): what each step of ../shared/seed-study.md trains.
STUDY = {
    "step1-conv": ([(m, 0.01) for m in ("M1.3.32.32", "M2.3.32.32", "M3.3.32.32")], 5),
    "step2-lin": ([(m, 0.01) for m in ("M2.2.32.32", "M2.4.32.32", "M3.2.32.32", "M3.4.32.32")], 5),
    "step3-channels": ([(f"M{c}.{l}.{ch}", 0.01) for c in (2, 3) for l in (2, 3, 4) for ch in ("16.32", "32.64", "64.128")], 5),
    "step3-retrain30": ([(m, 0.01) for m in BEST4], 30),
    "step4-lr": ([(m, 0.001) for m in BEST4], 5),
    "step4-retrain50": ([("M2.2.32.32", 0.001), ("M2.2.32.64", 0.001)], 50),
    "step4-lr-variations": ([(m, lr) for m in ("M2.2.32.32", "M2.2.32.64") for lr in (0.005, 0.0005)], 5),
}


def expand(*args: str) -> list[list[str]]:
    return [overrides for overrides, _ in jobs_of(list(args))]


def compose_all(*args: str) -> list:
    return [cfg for _, cfg in jobs_of(list(args))]


def name(cfg) -> str:
    return f"M{cfg.model.conv}.{cfg.model.lin}.{cfg.model.filter_in}.{cfg.model.filter_out}"


# ---------------------------------------------------------------------------------------------- presets


def test_one_preset_per_study_step_and_make_study_runs_them_in_order():
    presets = {p.stem for p in (REPO / "conf" / "study").glob("*.yaml")}
    assert set(STUDY) <= presets and presets - set(STUDY) == {"m2-bn-flip-onecycle-10ep"}  # the one beyond the study
    dry = subprocess.run(["make", "-n", "study"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loop = re.search(r"for step in ([\w .-]+); do", dry)[1].split()
    assert loop == list(STUDY)  # the study's order


@pytest.mark.parametrize("preset", STUDY)
def test_each_preset_is_the_sweep_its_step_describes(preset):
    models, epochs = STUDY[preset]
    configs = compose_all("-m", f"+study={preset}")
    assert sorted((name(c), c.optim.lr) for c in configs) == sorted(models)
    assert {(c.epochs, c.experiment) for c in configs} == {(epochs, f"study-{preset}")}
    assert {(c.batch_size, c.seed, c.subset, c.optim.name) for c in configs} == {(64, 0, None, "adam")}
    jobs = expand("-m", f"+study={preset}")
    assert len(jobs) == len(models) and all(f"+study='{preset}'" in job and f"epochs={epochs}" in job for job in jobs)


def test_the_preset_beyond_the_study_is_what_its_name_says():
    configs = compose_all("-m", "+study=m2-bn-flip-onecycle-10ep")
    assert sorted(c.seed for c in configs) == [0, 1, 2]
    for c in configs:
        assert (name(c), c.model.norm.value, c.model.dropout, c.augment.flip, c.augment.shift) == ("M2.2.32.32", "batch", 0.2, True, 0)
        assert (c.schedule.name, c.optim.lr, c.epochs, c.val_size, c.select_metric.value) == ("onecycle", 0.003, 10, 5000, "val_acc")
    count = count_parameters(build_model(ModelSpec.from_config(configs[0].model)))
    assert count == 679_594 <= 1_000_000


def test_preset_job_lists_are_hydras_and_the_command_line_wins():
    assert expand("-m", "+study=step1-conv") == [
        [f"conv='{c}'", "lin='3'", "channels='32.32'", "lr='0.01'", "epochs=5", "+study='step1-conv'"] for c in (1, 2, 3)]
    assert expand("-m", "+study=step3-retrain30")[0] == ["+arch='M2.2.16.32'", "lr='0.01'", "epochs=30", "+study='step3-retrain30'"]
    # Step 2 at lr 0.001, conv 2 only, two seeds, short: a key on the command line replaces the preset's entry.
    configs = compose_all("-m", "+study=step2-lin", "conv=2", "lr=0.001", "seed=0,1", "epochs=1")
    assert sorted((name(c), c.seed, c.optim.lr, c.epochs) for c in configs) == [
        (m, s, 0.001, 1) for m in ("M2.2.32.32", "M2.4.32.32") for s in (0, 1)]
    # A plain sweep is untouched by the preset support.
    assert expand("-m", "conv=2,3") == [["conv='2'"], ["conv='3'"]]


def test_preset_mistakes_are_one_line_errors(tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "mine.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n    params:\n      conv: interval(1,3)\n")
    cases = {
        ("-m", "+study=mine", f"hydra.searchpath=[file://{tmp_path}]"):
            "conv=interval(1,3): interval(...) samples a range, which a grid cannot list; sample it with hydra/sweeper=optuna",
        ("+study=step2-lin",): "+study=step2-lin: defines a sweep over conv, lin, channels, lr, epochs; run it with -m: "
                               "python -m fashioncnn -m +study=step2-lin",
        ("-m", "+study=step9"): "study=step9: no option 'step9' in config group 'study'; available: m2-bn-flip-onecycle-10ep, step1-conv,",
    }
    for args, message in cases.items():
        with pytest.raises(ConfigError) as caught:
            compose_all(*args)
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------- a real sweep

SWEEP_ARGS = ["-m", "+study=step2-lin", "conv=2", "seed=0,1", "epochs=2", "subset=128", "model.filter_in=4", "model.filter_out=4"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Study step 2 cut down to conv 2 (M2.2 and M2.4), tiny channels, 2 seeds, 2 epochs: 4 real runs."""
    cwd = tmp_path_factory.mktemp("study")
    result = run_cli(SWEEP_ARGS, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    client = local_store(cwd)
    runs = [r for r in runs_of(client, "study-step2-lin") if r.data.tags["fashioncnn.role"] == "job"]
    return cwd, client, runs, f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}"


def parent_of(client, runs):
    (parent_id,) = {r.data.tags["mlflow.parentRunId"] for r in runs}
    return client.get_run(parent_id)


@pytest.mark.slow
@needs_data
def test_a_preset_runs_as_hydra_sweeps_it(sweep):
    _, _, runs, _ = sweep
    assert sorted((r.data.tags["model_name"], r.data.params["seed"]) for r in runs) == [
        ("M2.2.4.4", "0"), ("M2.2.4.4", "1"), ("M2.4.4.4", "0"), ("M2.4.4.4", "1")]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["group.study"] == "step2-lin" and run.data.tags["group.lr"] == "0.01"
        assert run.data.params["optim.lr"] == "0.01" and run.data.params["epochs"] == "2"  # preset lr, command-line epochs
        assert "lr='0.01'" in run.data.tags["hydra.overrides"] and "+study='step2-lin'" in run.data.tags["hydra.overrides"]
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def _check_png(path: Path) -> None:
    import matplotlib.image

    width, height = _png_size(path)
    assert width >= 500 and height >= 300 and path.stat().st_size > 10_000, (path, width, height)
    assert matplotlib.image.imread(path).std() > 0.05  # something is drawn


@pytest.mark.slow
@needs_data
def test_report_table_csv_and_figures_match_mlflow(sweep, tmp_path):
    cwd, client, runs, uri = sweep
    out = tmp_path / "report"
    built = report.build(["study-step2-lin"], out, uri=uri)
    assert built.parent_run_id == parent_of(client, runs).info.run_id  # the sweep's parent run gets the files
    rows = list(csv.DictReader(open(out / "runs.csv")))
    by_id = {r.info.run_id: r for r in runs}
    assert sorted(row["run_id"] for row in rows) == sorted(by_id)
    accs = [float(row["max_test_acc"]) for row in rows]
    assert accs == sorted(accs, reverse=True) and [row["best"] for row in rows] == ["True", "False", "False", "False"]
    for rank, row in enumerate(rows, 1):
        run = by_id[row["run_id"]]
        test_loss = sorted(client.get_metric_history(run.info.run_id, "test_loss"), key=lambda m: m.step)
        train_loss = sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
        assert int(row["rank"]) == rank and row["model"] == run.data.tags["model_name"]
        assert int(row["param_count"]) == int(run.data.metrics["param_count"])
        assert float(row["lr"]) == 0.01 and int(row["epochs"]) == 2 and row["seed"] == run.data.params["seed"]
        for metric in ("max_test_acc", "mean_test_acc", "train_seconds"):
            assert float(row[metric]) == pytest.approx(run.data.metrics[metric])
        assert float(row["final_test_loss"]) == pytest.approx(test_loss[-1].value)
        assert float(row["final_train_loss"]) == pytest.approx(train_loss[-1].value)
        assert row["status"] == "FINISHED" and row["experiment"] == "study-step2-lin" and row["epochs_logged"] == "2"

    markdown = (out / "report.md").read_text()
    best = by_id[rows[0]["run_id"]]
    assert f"| 1 (best) | **{best.data.tags['model_name']}** |" in markdown
    assert f"**{100 * best.data.metrics['max_test_acc']:.2f}%**" in markdown
    for row in rows:
        assert row["run_id"][:8] in markdown
    assert "![Test accuracy per epoch](test_acc.png)" in markdown

    # Two configs, each over seeds 0 and 1: mean and sample standard deviation.
    summary = {row["model"]: row for row in csv.DictReader(open(out / "by_config.csv"))}
    assert sorted(summary) == ["M2.2.4.4", "M2.4.4.4"]
    for model, row in summary.items():
        values = [r.data.metrics["max_test_acc"] for r in runs if r.data.tags["model_name"] == model]
        assert row["n"] == "2" and row["seeds"] == "0,1"
        assert float(row["max_test_acc_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["max_test_acc_std"]) == pytest.approx(statistics.stdev(values))
    assert "### Mean and standard deviation over seeds" in markdown and " ± " in markdown
    for png in ("test_acc.png", "loss.png"):
        _check_png(out / png)

    # The same table by sweep id; a filter and a grouping.
    sweep_id = runs[0].data.tags["sweep_id"]
    by_sweep = report.build([sweep_id], tmp_path / "by-sweep", uri=uri)
    assert [r.run.info.run_id for _, rs in by_sweep.sections for r in rs] == [row["run_id"] for row in rows]
    filtered = report.build(["study-step2-lin"], tmp_path / "lin2", uri=uri, filters=["model.lin=2", "seed!=5"], statuses=["FINISHED"])
    assert sorted(r.model for _, rs in filtered.sections for r in rs) == ["M2.2.4.4", "M2.2.4.4"]
    grouped = report.build(["study-step2-lin"], tmp_path / "grouped", uri=uri, group_by="seed", metric_name="test_loss")
    assert [group for group, _ in grouped.sections] == ["seed=0", "seed=1"]
    for _, members in grouped.sections:
        losses = [r.run.data.metrics["test_loss"] for r in members]
        assert losses == sorted(losses)  # a loss ranks lowest first
    _check_png(tmp_path / "grouped" / "loss-seed=1.png")


@pytest.mark.slow
@needs_data
def test_report_errors_and_the_command_line(sweep, tmp_path, capsys):
    cwd, _, _, uri = sweep
    for argv, message in [
        (["nope"], "error: nope: no experiment, sweep id or run id of that name in sqlite:///"),
        (["study-step2-lin", "--metric", "nope"], "error: --metric nope: unknown metric in experiment study-step2-lin; its runs have: "),
        (["study-step2-lin", "--status", "FAILED"], "error: experiment study-step2-lin: none of its 4 runs match the filters"),
    ]:
        assert report.main([*argv, "--tracking-uri", uri, "-o", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert report.main(["study-step2-lin", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    # As a user runs it: the store from $MLFLOW_TRACKING_URI, the default output directory.
    result = run_cli(["study-step2-lin", "--group-by", "model.lin"], cwd=tmp_path, module="fashioncnn.report",
                     env={"MLFLOW_TRACKING_URI": uri}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "reports" / "study-step2-lin"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["report.md", "runs.csv", "by_config.csv", "test_acc-model.lin=2.png", "loss-model.lin=2.png",
         "test_acc-model.lin=4.png", "loss-model.lin=4.png", "pareto.png"])  # two configurations: nothing to weigh
    assert "## model.lin=2" in result.stdout and "## model.lin=4" in result.stdout


@pytest.mark.slow
@needs_data
def test_report_is_logged_to_the_sweeps_parent_run_when_there_is_one(sweep, tmp_path):
    _, client, runs, uri = sweep
    parent = parent_of(client, runs)
    assert parent.data.tags["fashioncnn.role"] == "parent" and parent.data.tags["sweep_id"] == runs[0].data.tags["sweep_id"]
    built = report.build([parent.info.run_id], tmp_path / "by-parent", uri=uri)
    assert built.parent_run_id == parent.info.run_id
    assert sorted(r.run.info.run_id for _, rs in built.sections for r in rs) == sorted(r.info.run_id for r in runs)
    logged = sorted(Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report") if not a.is_dir)
    assert logged == ["by_config.csv", "loss.png", "pareto.png", "report.md", "runs.csv", "test_acc.png"]
    # Found from the experiment name too (one sweep, one parent); a filtered report goes to its own folder.
    assert report.build(["study-step2-lin"], tmp_path / "lin4", uri=uri, filters=["model.lin=4"]).parent_run_id == parent.info.run_id
    assert "report.md" in {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report/lin4")}
    assert report.build(["study-step2-lin"], tmp_path / "none", uri=uri, attach=False).parent_run_id is None


@pytest.mark.slow
@needs_data
def test_retrain_the_best_replays_their_configs_with_new_overrides_and_tags_lineage(sweep):
    cwd, client, runs, _ = sweep
    sweep_id = runs[0].data.tags["sweep_id"]
    # Two configurations (M2.2, M2.4) with two seeds each: each configuration's best seed is replayed.
    by_model = {}
    for run in runs:
        by_model.setdefault(run.data.tags["model_name"], []).append(run)
    top = [max(seeds, key=lambda r: r.data.metrics["max_test_acc"]) for seeds in by_model.values()]
    result = run_cli([sweep_id, "--top", "2", "epochs=1", "experiment=retrained"], cwd=cwd,
                     module="fashioncnn.retrain")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Retraining the top 2 of 4 finished runs of sweep {sweep_id} by max_test_acc" in result.stdout
    new = [r for r in runs_of(client, "retrained") if r.data.tags["fashioncnn.role"] == "job"]
    assert sorted(r.data.tags["retrained_from"] for r in new) == sorted(r.info.run_id for r in top)
    assert len({r.data.tags["sweep_id"] for r in new}) == 1 and new[0].data.tags["sweep_id"] != sweep_id
    for run in new:
        source = client.get_run(run.data.tags["retrained_from"])
        assert run.info.status == "FINISHED" and run.data.tags["model_name"] == source.data.tags["model_name"]
        assert f"+retrained_from='{source.info.run_id}'" in run.data.tags["hydra.overrides"]
        differing = {k for k in source.data.params if source.data.params[k] != run.data.params.get(k)}
        assert differing == {"epochs", "experiment"} and run.data.params["epochs"] == "1"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")] == [1]


# ---------------------------------------------------------------------------------------------- picking runs


@pytest.fixture
def made_up_store(tmp_path):
    """Runs written by hand: what a sweep leaves when jobs fail, are killed or diverge, with a parent run."""
    uri = f"sqlite:///{tmp_path / 'made-up.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("made-up", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_experiment("empty", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="sweep", tags={"fashioncnn.role": "parent", "sweep_id": "s1"})
    client.log_metric(parent.info.run_id, "max_test_acc", 0.99)
    ids = {}
    for name, acc, status, extra in [("a", 0.80, "FINISHED", {}), ("b", 0.85, "FINISHED", {}), ("c", 0.90, "FAILED", {}),
                                     ("d", 0.95, "KILLED", {}), ("e", 0.97, "FINISHED", {"diverged": "true"}),
                                     ("f", 0.70, "FINISHED", {}), ("g", 0.75, "FINISHED", {})]:
        tags = {"model_name": name, "fashioncnn.role": "job", "mlflow.parentRunId": parent.info.run_id, **extra}
        if name != "g":  # job runs carry both; g, as a run made before sweep ids were tagged, only its parent
            tags["sweep_id"] = "s1"
        run = client.create_run(experiment, run_name=name, tags=tags)
        client.log_metric(run.info.run_id, "max_test_acc", acc)
        client.log_metric(run.info.run_id, "test_loss", 1 - acc)
        client.set_terminated(run.info.run_id, status)
        ids[name] = run.info.run_id
    return client, uri, parent.info.run_id, ids


def test_picks_are_the_best_finished_runs_never_failed_killed_diverged_or_parent(made_up_store):
    client, _, parent_id, ids = made_up_store
    for source, count in (("made-up", 7), ("s1", 6), (parent_id, 7)):
        selection = queries.select(client, source)
        assert len(selection.runs) == count and selection.parent.info.run_id == parent_id, source
    selection = queries.select(client, parent_id)
    picked, candidates = retrain.pick(selection.runs, "max_test_acc", 2, None, "x")
    assert [r.info.run_id for r in picked] == [ids["b"], ids["a"]] and len(candidates) == 4
    picked, _ = retrain.pick(selection.runs, "test_loss", 3, None, "x")  # a loss: lowest first
    assert [r.info.run_id for r in picked] == [ids["b"], ids["a"], ids["g"]]
    picked, _ = retrain.pick(selection.runs, "max_test_acc", 10, None, "x")
    assert len(picked) == 4


def test_retrain_errors_are_one_line(made_up_store, capsys, tmp_path):
    client, uri, _, ids = made_up_store
    for run_id in (ids["a"], ids["b"], ids["f"]):
        client.set_terminated(run_id, "FAILED")
    for argv, message in [
        (["nope"], "error: nope: no experiment, sweep id or run id of that name in sqlite:///"),
        (["empty"], "error: experiment empty: no runs (an empty sweep)"),
        (["made-up", "--metric", "max_acc"], "error: --metric max_acc: unknown metric in experiment made-up; its runs have: "
                                             "max_test_acc, test_loss"),
        (["made-up", "--top", "0"], "error: --top 0: must be at least 1"),
    ]:
        assert retrain.main([*argv, "--tracking-uri", uri, "epochs=30"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    client.set_terminated(ids["g"], "KILLED")
    assert retrain.main(["made-up", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == ("error: experiment made-up: none of its 7 runs finished without diverging "
                                       "(4 FAILED, 2 KILLED, 1 diverged)\n")
    assert math.isnan(queries.metric(client.get_run(ids["a"]), "nope"))
