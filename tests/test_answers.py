"""Answers beyond the leaderboard: the Pareto front, what mattered, and where they show (report, parent run)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
from conftest import local_store, run_cli, runs_of

from fashioncnn.analysis import importance, pareto
from fashioncnn.analysis.points import points_of
from fashioncnn.core.data import DEBIAN_DIR

needs_data = pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")


def made_up_sweep(tmp_path, configs, extra_runs=()):
    """FINISHED job runs in a real store. configs: (model, {param: value}, {group: option}, params, seconds, [acc per seed])."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'store.db'}")
    experiment = client.create_experiment("answers", artifact_location=(tmp_path / "artifacts").as_uri())
    for model, params, groups, count, seconds, values in configs:
        for seed, value in enumerate(values):
            tags = {"fashioncnn.role": "job", "model_name": model, **{f"group.{g}": o for g, o in groups.items()}}
            run = client.create_run(experiment, run_name=model, tags=tags)
            for key, param in {**params, "seed": seed, "select_metric": "val_acc", "device": "cpu"}.items():
                client.log_param(run.info.run_id, key, param)
            for key, number in (("best_val_acc", value), ("param_count", count), ("train_seconds", seconds)):
                client.log_metric(run.info.run_id, key, number)
            client.set_terminated(run.info.run_id, "FINISHED")
    for model, tags, status in extra_runs:  # diverged, pruned, failed: never points
        run = client.create_run(experiment, run_name=model, tags={"fashioncnn.role": "job", "model_name": model, **tags})
        client.log_param(run.info.run_id, "optim.lr", "9.0")
        client.log_metric(run.info.run_id, "best_val_acc", 0.99)
        client.set_terminated(run.info.run_id, status)
    return [client.get_run(r.info.run_id) for r in client.search_runs([experiment])]


STUDY_LIKE = [
    # The study's question: the big model is best, the small one almost as good for 1/20 of the weights.
    ("M2.2.32.32", {"model.conv": 2, "model.lin": 2}, {"conv": "2", "lin": "2"}, 679_466, 100.0, [0.900, 0.902]),
    ("M3.3.32.32", {"model.conv": 3, "model.lin": 3}, {"conv": "3", "lin": "3"}, 29_482, 60.0, [0.897]),
    ("M2.3.32.32", {"model.conv": 2, "model.lin": 3}, {"conv": "2", "lin": "3"}, 700_000, 120.0, [0.880]),
    ("M3.2.32.32", {"model.conv": 3, "model.lin": 2}, {"conv": "3", "lin": "2"}, 20_000, 200.0, [0.850]),
]


def test_the_front_holds_the_configurations_nothing_beats_and_names_the_cheapest_near_the_best(tmp_path):
    runs = made_up_sweep(tmp_path, STUDY_LIKE, extra_runs=[("M1.2.32.32", {"diverged": "true"}, "FINISHED"),
                                                          ("M1.3.32.32", {"pruned": "true"}, "FINISHED"),
                                                          ("M1.4.32.32", {}, "FAILED")])
    points = points_of(runs, "best_val_acc")
    assert [p.label for p in points] == ["M2.2.32.32", "M3.3.32.32", "M2.3.32.32", "M3.2.32.32"]  # seeds folded, best first
    assert points[0].n == 2 and points[0].mean == pytest.approx(0.901) and points[0].std == pytest.approx(0.0014142, rel=1e-3)
    assert points[0].swept == {"conv": "2", "lin": "2"}  # the groups by their options, not the params they set
    answer = pareto.answer(points, "best_val_acc", within=0.5)
    assert [p.label for p in answer.fronts["param_count"]] == ["M3.2.32.32", "M3.3.32.32", "M2.2.32.32"]
    assert [p.label for p in answer.fronts["train_seconds"]] == ["M3.3.32.32", "M2.2.32.32"]
    assert answer.cheapest["param_count"].label == answer.cheapest["train_seconds"].label == "M3.3.32.32"
    lines = answer.lines()
    assert lines[0] == "Best: M2.2.32.32, `best_val_acc` 90.10% ± 0.14% (n=2), 679,466 parameters, 100 s of training."
    assert lines[1] == ("Smallest within 0.5 points of the best: M3.3.32.32, 89.70%, 29,482 parameters, 60 s of training.")
    # Closer than 0.5 points no cheaper configuration is: the best itself.
    assert pareto.answer(points, "best_val_acc", within=0.1).cheapest["param_count"].label == "M2.2.32.32"
    pareto.draw(answer, tmp_path / "pareto.png", "made up")
    check_png(tmp_path / "pareto.png")


def test_runs_on_every_image_and_on_a_subset_are_told_apart(tmp_path):
    """subset=None (every image) is a value like any other: two sweeps in one experiment, on all the data and on
    a subset, are not the same configurations on the front."""
    configs = [("M2.2.32.32", {"model.conv": 2, "subset": subset}, {"conv": "2"}, 679_466, seconds, [value])
               for subset, seconds, value in ((None, 100.0, 0.90), (1000, 1.0, 0.60))]
    configs.append(("M3.2.32.32", {"model.conv": 3, "subset": None}, {"conv": "3"}, 20_000, 80.0, [0.85]))
    points = points_of(made_up_sweep(tmp_path, configs), "best_val_acc")
    assert [p.label for p in points] == ["M2.2.32.32 subset=None", "M3.2.32.32 subset=None", "M2.2.32.32 subset=1000"]
    assert [p.swept["subset"] for p in points] == [None, None, 1000]


def test_a_loss_is_better_lower_on_the_front_too(tmp_path):
    configs = [(m, p, g, c, s, [1 - v[0]]) for m, p, g, c, s, v in STUDY_LIKE]
    runs = made_up_sweep(tmp_path, configs)
    for run in runs:  # the same figures, as a loss
        run.data.metrics["best_val_loss"] = run.data.metrics.pop("best_val_acc")
    points = points_of(runs, "best_val_loss")
    assert points[0].label == "M2.2.32.32"  # the lowest loss first
    front = pareto.front(points, "best_val_loss", "param_count")
    assert [p.label for p in front] == ["M3.2.32.32", "M3.3.32.32", "M2.2.32.32"]


def test_what_mattered_finds_the_key_that_moves_the_metric(tmp_path):
    # lr decides; lin barely moves the metric; conv a little.
    configs = []
    for lr, base in (("0.0005", 0.80), ("0.001", 0.90), ("0.01", 0.70)):
        for conv in (1, 2, 3):
            for lin in (2, 3):
                configs.append((f"M{conv}.{lin}.32.32", {"model.conv": conv, "model.lin": lin, "optim.lr": float(lr)},
                                {"conv": str(conv), "lin": str(lin), "lr": lr}, 1000 * conv, 10.0 * conv,
                                [base + 0.01 * conv + 0.001 * lin]))
    points = points_of(made_up_sweep(tmp_path, configs), "best_val_acc")
    result = importance.importance(points, "best_val_acc")
    assert sorted(result.keys) == ["conv", "lin", "lr"] and (result.configurations, result.runs) == (18, 18)
    assert result.keys[0] == "lr" and max(result.scores["fANOVA"], key=result.scores["fANOVA"].get) == "lr"
    for scores in result.scores.values():
        assert sum(scores.values()) == pytest.approx(1.0) and scores["lin"] < scores["lr"]
    assert result.warning == ""
    assert "| `lr` |" in result.table() and result.line().startswith("Importance for `best_val_acc` (PED-ANOVA; fANOVA in the table), "
                                                                    "over 18 configurations (18 runs): lr ")
    few = importance.importance(points[:4], "best_val_acc")
    assert few.warning.startswith("Only 4 configurations: below 10")
    assert importance.importance(points[:2], "best_val_acc") is None  # nothing to weigh with two
    for point in points:  # every configuration at chance: nothing to weigh either (fANOVA finds no variance)
        point.mean = 0.1
    assert importance.importance(points, "best_val_acc") is None
    importance.draw(result, tmp_path / "importance.png", "made up")
    check_png(tmp_path / "importance.png")


def check_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 500 and height >= 250 and matplotlib.image.imread(path).std() > 0.05


# ---------------------------------------------------------------------------------------------- a real grid


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A 4-job grid (conv 1, 2 x lin 2, 3), tiny and short: its parent run and the report."""
    cwd = tmp_path_factory.mktemp("answers")
    args = ["-m", "conv=1,2", "lin=2,3", "epochs=2", "subset=256", "val_size=500", "model.filter_in=4", "model.filter_out=4",
            "experiment=answers", "speed.threads=1"]
    result = run_cli(args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, local_store(cwd)


@pytest.mark.slow
@needs_data
def test_a_grids_parent_run_shows_its_front_and_what_mattered(grid):
    cwd, client = grid
    (parent,) = [r for r in runs_of(client, "answers") if r.data.tags["fashioncnn.role"] == "parent"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.png", "importance.png"} <= artifacts
    note = parent.data.tags["mlflow.note.content"]
    assert "### Pareto front" in note and "- Best: M" in note and "Smallest within 0.5 points of the best" in note
    assert "### What mattered" in note and "over 4 configurations (4 runs)" in note and "Only 4 configurations" in note


@pytest.mark.slow
@needs_data
def test_the_report_of_a_grid_has_its_front_and_what_mattered(grid, tmp_path):
    cwd, client = grid
    out = tmp_path / "report"
    result = run_cli(["answers", "-o", str(out), "--within", "1"], cwd=cwd, module="fashioncnn.report")
    assert result.returncode == 0, result.stderr[-3000:]
    markdown = (out / "report.md").read_text()
    assert "## Pareto front" in markdown and "![Pareto front](pareto.png)" in markdown
    assert "Smallest within 1 point of the best:" in markdown
    assert "## What mattered" in markdown and "| `conv` |" in markdown and "| `lin` |" in markdown
    assert "![What mattered](importance.png)" in markdown
    for picture in ("pareto.png", "importance.png"):
        check_png(out / picture)
    bad = run_cli(["answers", "--within", "-1"], cwd=cwd, module="fashioncnn.report")
    assert bad.returncode == 2 and "--within -1.0: must be a distance >= 0" in bad.stderr
    assert not math.isnan(points_of(runs_of(client, "answers"), "best_val_acc")[0].param_count)


def test_curves_are_scaled_to_the_runs_that_learned_and_the_others_are_markers():
    from types import SimpleNamespace

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fashioncnn.results.report import Row, _draw_curve, _legend_label

    def row(label, status, tags, accs):
        run = SimpleNamespace(info=SimpleNamespace(status=status, run_id=label * 8, run_name=label),
                              data=SimpleNamespace(tags={"model_name": label, **tags}, params={}, metrics={"max_test_acc": max(accs)}))
        return Row(run, "e", {"test_acc": list(enumerate(accs, 1))}, label=label)

    rows = [row("a", "FINISHED", {}, [0.84, 0.86, 0.87]), row("b", "FINISHED", {}, [0.82, 0.85, 0.86]),
            row("c", "FINISHED", {"diverged": "true"}, [0.10, 0.10]), row("d", "FINISHED", {"pruned": "true"}, [0.83]),
            row("e", "FAILED", {}, [0.85, 0.86])]
    labels = [_legend_label(r, "max_test_acc") for r in rows]
    figure, axis = plt.subplots()
    _draw_curve(axis, rows, "test_acc", 100, ["C0", "C1", "C2", "C3", "C4"], labels, True)
    low, high = axis.get_ylim()
    assert 80 < low < 82 and 87 < high < 89  # the 10% of the diverged run does not squash the others
    drawn = {line.get_label(): line for line in axis.get_lines()}
    assert [len(drawn[label].get_xdata()) for label in labels] == [3, 3, 1, 1, 1]  # lines, then one marker each
    assert drawn[labels[2]].get_marker() == "v" and low <= drawn[labels[2]].get_ydata()[0] <= high  # at the edge, pointing down
    assert drawn[labels[3]].get_marker() == "X" and drawn[labels[3]].get_ydata()[0] == pytest.approx(83)
    assert labels[2].endswith("finished, diverged (last test acc 10.00%)") and "pruned (last test acc 83.00%)" in labels[3]
    assert "failed (last test acc 86.00%)" in labels[4]
    plt.close(figure)


def test_a_long_leaderboard_gives_way_to_the_answers_within_mlflows_limit():
    from fashioncnn.sweep.parent import fit_description

    board = "**Leaderboard**\n\n| rank | model |\n|---|---|\n" + "".join(f"| {i} | M{i} |\n" for i in range(1, 2001))
    after = "\n\n### Pareto front\n\n- Best: M1"
    text = fit_description(board, after)
    assert len(text) <= 8000 and text.endswith(after) and "| 1 | M1 |" in text
    assert "more rows in summary.md |" in text and "| 2000 | M2000 |" not in text
    assert fit_description("short\n", after) == "short\n" + after
