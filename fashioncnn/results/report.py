"""`python -m fashioncnn.report SOURCE...`: the study's tables and figures, straight from MLflow.

SOURCE is an experiment name, a sweep id or a sweep's parent run id (several are combined into one
report). Writes into the output directory (default reports/<source>):
- report.md: the table of runs (model, parameters, lr, epochs, train time, max and mean test accuracy,
  final train and test loss, status), best first by --metric, the best marked; with
  "Mean and standard deviation over seeds" when configs repeat with several seeds; figures linked;
- runs.csv (and by_config.csv for the seeds table): the same numbers, unformatted;
- test_acc.png (test accuracy per epoch per run) and loss.png (train and test loss per epoch per run);
- pareto.png and importance.png, under "Pareto front" (the metric against parameters and training
  seconds; the smallest and fastest configuration within --within of the best) and "What mattered" (the
  swept keys' importance, by Optuna's PED-ANOVA and fANOVA evaluators over the configurations).
With --group-by KEY each value of KEY gets its own table and figures. When the runs come from one sweep
that has a parent run (fashioncnn.role=parent), the files are also logged to it as artifacts under
report/. Examples (docs/study.md has one per table of the study):

    python -m fashioncnn.report study-step3-channels
    python -m fashioncnn.report study-step1-conv study-step2-lin --filter model.conv=2,3 -o reports/step2
    python -m fashioncnn.report study-step4-lr --group-by optim.lr --status FINISHED
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from fashioncnn.analysis import importance, pareto
from fashioncnn.analysis.points import points_of
from fashioncnn.core.config import lower_is_better
from fashioncnn.tracking import links
from fashioncnn.tracking.names import PARENT_TAG, SWEEP_TAG
from fashioncnn.tracking.queries import (
    DEFAULT_METRIC,
    ResultsError,
    check_metric,
    is_diverged,
    is_pruned,
    mask,
    metric,
    not_config,
    param_value,
    rank,
    resolve_metric,
    select,
    tracking_uri,
)

CURVES = ("test_acc", "train_loss", "test_loss")


# The order in which params are named to tell runs of the same model apart.
DISTINGUISHING = ("optim.lr", "epochs", "seed", "subset", "batch_size", "optim.name")
CSV_FIELDS = [
    "group", "rank", "best", "model", "param_count", "lr", "epochs", "seed", "batch_size", "train_seconds",
    "max_test_acc", "mean_test_acc", "test_acc_at_best", "seconds_to_90", "final_train_loss", "final_test_loss",
    "final_test_acc", "epochs_logged", "status", "diverged", "pruned", "experiment", "sweep_id", "parent_run_id", "retrained_from", "run_id",
]
SUMMARY_FIELDS = ("max_test_acc", "mean_test_acc", "train_seconds", "final_train_loss", "final_test_loss", "test_acc_at_best")


@dataclass
class Row:
    run: Any  # mlflow.entities.Run
    experiment: str
    history: dict[str, list[tuple[int, float]]]
    label: str = ""
    rank: int = 0
    best: bool = False
    group: str = ""

    @property
    def params(self) -> dict[str, str]:
        return self.run.data.params

    @property
    def tags(self) -> dict[str, str]:
        return self.run.data.tags

    @property
    def model(self) -> str:
        return self.tags.get("model_name") or self.run.info.run_name or self.run.info.run_id[:8]

    def final(self, curve: str) -> float:
        points = self.history.get(curve) or []
        return points[-1][1] if points else metric(self.run, curve)

    @property
    def status(self) -> str:
        if is_pruned(self.run):  # FINISHED in MLflow, stopped early by the sweep's pruner
            return "PRUNED"
        return self.run.info.status + (", diverged" if is_diverged(self.run) else "")

    def value(self, name: str) -> Any:
        """A table column, a metric, a param or a tag, by name."""
        if name in ("final_train_loss", "final_test_loss", "final_test_acc"):
            return self.final(name[len("final_"):])
        if name == "param_count":
            count = metric(self.run, "param_count")
            return int(count) if not math.isnan(count) else param_value(self.params.get("param_count"))
        simple = {
            "model": self.model, "lr": param_value(self.params.get("optim.lr")), "epochs": param_value(self.params.get("epochs")),
            "seed": param_value(self.params.get("seed")), "batch_size": param_value(self.params.get("batch_size")),
            "status": self.run.info.status, "diverged": is_diverged(self.run), "pruned": is_pruned(self.run), "experiment": self.experiment,
            "sweep_id": self.tags.get(SWEEP_TAG, ""), "parent_run_id": self.tags.get(PARENT_TAG, ""),
            "retrained_from": self.tags.get("retrained_from", ""), "run_id": self.run.info.run_id,
            "epochs_logged": len(self.history.get("test_acc") or []), "group": self.group, "rank": self.rank, "best": self.best,
        }
        if name in simple:
            return simple[name]
        return metric(self.run, name)

    def lookup(self, key: str) -> str | None:
        """KEY for --filter and --group-by: params.X, tags.X, metrics.X, experiment, status, or a bare param or tag name."""
        if key == "experiment":
            return self.experiment
        if key == "status":
            return self.run.info.status
        for prefix, source in (("params.", self.params), ("tags.", self.tags), ("metrics.", self.run.data.metrics)):
            if key.startswith(prefix):
                found = source.get(key[len(prefix):])
                return None if found is None else str(found)
        if key in self.params:
            return self.params[key]
        return self.tags.get(key)


def _same(actual: str | None, wanted: str) -> bool:
    if actual is None:
        return False
    try:
        return float(actual) == float(wanted)
    except ValueError:
        return actual == wanted


def parse_filter(text: str) -> tuple[str, bool, list[str]]:
    match = re.match(r"^([^=!]+)(!?=)(.*)$", text)
    if not match:
        raise ResultsError(f"--filter {text}: expected KEY=VALUE[,VALUE...] or KEY!=VALUE, e.g. optim.lr=0.01")
    return match[1].strip(), match[2] == "=", [v.strip() for v in match[3].split(",")]


def keep(row: Row, filters: list[tuple[str, bool, list[str]]], statuses: set[str]) -> bool:
    if statuses and row.run.info.status not in statuses and not ("DIVERGED" in statuses and is_diverged(row.run)) \
            and not ("PRUNED" in statuses and is_pruned(row.run)):
        return False
    for key, equal, values in filters:
        if any(_same(row.lookup(key), v) for v in values) != equal:
            return False
    return True


def label_runs(rows: list[Row], skip: set[str] = frozenset()) -> list[str]:
    """Model names, with the params that tell runs of the same model apart (lr, epochs, seed, ...)."""
    labels = []
    for row in rows:
        twins = [r for r in rows if r.model == row.model]
        keys = sorted({k for r in twins for k in r.params if (k == "seed" or not not_config(k)) and k not in skip
                       and len({t.params.get(k) for t in twins}) > 1},
                      key=lambda k: (DISTINGUISHING.index(k) if k in DISTINGUISHING else len(DISTINGUISHING), k))
        labels.append(" ".join([row.model, *(f"{k.rsplit('.', 1)[-1]}={row.params.get(k)}" for k in keys)]))
    counts = {label: labels.count(label) for label in labels}
    return [f"{label} ({row.run.info.run_id[:6]})" if counts[label] > 1 else label for label, row in zip(labels, rows)]


# ---------------------------------------------------------------------------------------------- formatting


def fmt_acc(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def fmt_loss(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def fmt_seconds(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes}m {seconds:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def fmt_metric(name: str, value: float) -> str:
    if name.endswith("acc") or "_acc_" in name:  # max_test_acc, test_acc_at_best
        return fmt_acc(value)
    if name.endswith("seconds"):
        return fmt_seconds(value)
    return fmt_loss(value)


def fmt_count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "n/a"


def markdown_table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def runs_table(rows: list[Row], metric_name: str, ui_base: str) -> str:
    several_experiments = len({r.experiment for r in rows}) > 1
    several_seeds = len({r.params.get("seed") for r in rows}) > 1
    extra_metric = metric_name not in ("max_test_acc", "mean_test_acc", "train_seconds")
    header = ["rank", "model"] + (["experiment"] if several_experiments else []) + (["seed"] if several_seeds else []) + [
        "params", "lr", "epochs", "train time", "max test acc", "mean test acc", "final train loss", "final test loss"]
    header += [metric_name] if extra_metric else []
    at_best = any(not math.isnan(metric(r.run, "test_acc_at_best")) for r in rows) and metric_name != "test_acc_at_best"
    header += ["test acc at best"] if at_best else []
    header += ["status", "run"]
    body = []
    for row in rows:
        bold = (lambda text: f"**{text}**") if row.best else (lambda text: text)
        cells = [f"{row.rank} (best)" if row.best else str(row.rank), bold(row.model)]
        cells += [row.experiment] if several_experiments else []
        cells += [str(row.params.get("seed", ""))] if several_seeds else []
        cells += [fmt_count(row.value("param_count")), str(row.params.get("optim.lr", "n/a")), str(row.params.get("epochs", "n/a")),
                  fmt_seconds(row.value("train_seconds"))]
        accs = [fmt_acc(row.value("max_test_acc")), fmt_acc(row.value("mean_test_acc"))]
        if row.best and metric_name in ("max_test_acc", "mean_test_acc"):
            index = 0 if metric_name == "max_test_acc" else 1
            accs[index] = bold(accs[index])
        cells += accs + [fmt_loss(row.value("final_train_loss")), fmt_loss(row.value("final_test_loss"))]
        cells += [bold(fmt_metric(metric_name, row.value(metric_name)))] if extra_metric else []
        cells += [fmt_acc(metric(row.run, "test_acc_at_best"))] if at_best else []
        cells += [row.status, f"[{row.run.info.run_id[:8]}]({links.run_url(ui_base, row.run.info.experiment_id, row.run.info.run_id)})"]
        body.append(cells)
    right = {i for i, name in enumerate(header) if name not in ("model", "experiment", "status", "run")}
    return markdown_table(header, body, right)


@dataclass
class ConfigSummary:
    label: str
    rows: list[Row]
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def seeds(self) -> str:
        return ",".join(sorted((str(r.params.get("seed", "?")) for r in self.rows), key=lambda s: (len(s), s)))


def by_config(rows: list[Row], metric_name: str) -> list[ConfigSummary]:
    """Finished runs that differ only in their seed, as one config: mean and sample standard deviation."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        if row.run.info.status == "FINISHED" and not is_pruned(row.run):  # a pruned seed would drag its mean down
            key = tuple(sorted((k, v) for k, v in row.params.items() if not not_config(k)))
            groups.setdefault(key, []).append(row)
    if not any(len(members) > 1 for members in groups.values()):
        return []
    representatives = [members[0] for members in groups.values()]
    labels = label_runs(representatives, skip={"seed"})
    summaries = []
    for label, members in zip(labels, groups.values()):
        summary = ConfigSummary(label, members)
        for name in dict.fromkeys((*SUMMARY_FIELDS, metric_name)):
            values = [v for v in (m.value(name) for m in members) if isinstance(v, (int, float)) and not math.isnan(v)]
            mean = statistics.fmean(values) if values else math.nan
            std = statistics.stdev(values) if len(values) > 1 else math.nan
            summary.stats[name] = (mean, std)
        summaries.append(summary)
    low = lower_is_better(metric_name)
    return sorted(summaries, key=lambda s: (math.isnan(s.stats[metric_name][0]), s.stats[metric_name][0] * (1 if low else -1)))


def summary_table(summaries: list[ConfigSummary], metric_name: str) -> str:
    def pm(summary: ConfigSummary, name: str) -> str:
        mean, std = summary.stats[name]
        return fmt_metric(name, mean) if math.isnan(std) else f"{fmt_metric(name, mean)} ± {fmt_metric(name, std)}"

    names = ["max_test_acc", "mean_test_acc", "train_seconds", "final_train_loss", "final_test_loss", "test_acc_at_best"]
    names += [metric_name] if metric_name not in names else []
    header = ["config", "params", "lr", "epochs", "seeds", "n", "max test acc", "mean test acc", "train time",
              "final train loss", "final test loss", "test acc at best"] + names[6:]
    body = []
    for summary in summaries:
        first = summary.rows[0]
        body.append([summary.label, fmt_count(first.value("param_count")), str(first.params.get("optim.lr", "n/a")),
                     str(first.params.get("epochs", "n/a")), summary.seeds, str(len(summary.rows)),
                     *(pm(summary, name) for name in names)])
    return markdown_table(header, body, set(range(1, len(header))))


def noise_line(summaries: list[ConfigSummary], metric_name: str) -> str:
    """Whether the best two configurations differ by more than seed noise: their means against the larger
    standard deviation (the test named in the line, so a reader can judge it)."""
    if len(summaries) < 2:
        return f"Only one configuration: nothing to compare by `{metric_name}`."
    (mean_a, std_a), (mean_b, std_b) = summaries[0].stats[metric_name], summaries[1].stats[metric_name]
    spreads = [std for std in (std_a, std_b) if not math.isnan(std)]
    if not spreads or math.isnan(mean_a) or math.isnan(mean_b):
        return "The top two configurations have no standard deviation to compare with: run more seeds."
    gap, spread = abs(mean_a - mean_b), max(spreads)
    verdict = "**within seed noise**" if gap < spread else "**more than seed noise**"
    return (f"Top two by mean `{metric_name}`: {summaries[0].label} and {summaries[1].label} differ by "
            f"{fmt_metric(metric_name, gap)}, against a larger standard deviation of {fmt_metric(metric_name, spread)}: "
            f"{verdict} (test: the difference of the means against the larger of the two sample standard deviations).")


# ---------------------------------------------------------------------------------------------- figures


def _colours(count: int) -> list[Any]:
    """tab10; up to 20 the dark tab20 shades first, then the light ones (drawn dashed); beyond, a sampled turbo."""
    import matplotlib.pyplot as plt
    import numpy as np

    if count <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(count)]
    if count <= 20:
        return [plt.get_cmap("tab20")(i) for i in [*range(0, 20, 2), *range(1, 20, 2)][:count]]
    return list(plt.get_cmap("turbo")(np.linspace(0.03, 0.97, count)))


def _style(index: int, count: int) -> dict[str, Any]:
    # Beyond 10 curves colours alone get hard to tell apart: the dash tells neighbours apart.
    if count <= 10:
        dash = "-"
    elif count <= 20:
        dash = "-" if index < 10 else "--"
    else:
        dash = ("-", "--", "-.", ":")[index % 4]
    return {"linestyle": dash, "linewidth": 1.6}


def learned_to_the_end(row: Row) -> bool:
    """A run whose curves are worth drawing as lines: FINISHED, neither pruned nor diverged."""
    return row.run.info.status == "FINISHED" and not is_pruned(row.run) and not is_diverged(row.run)


def _draw_curve(axis: Any, rows: list[Row], curve: str, scale: float, colours: list[Any], labels: list[str], markers: bool,
                scale_to: Sequence[str] = ()) -> None:
    """Each run that learned as a line; any other (diverged, pruned, failed) as one marker at its last value,
    its status in the legend, kept inside the range of the lines (at the edge, pointing out, when beyond).
    The range is that of the lines of `curve` and of `scale_to` (the other panel of a shared axis)."""
    lines = [r for r in rows if learned_to_the_end(r)] or rows
    values = [scale * v for r in lines for name in (curve, *scale_to) for _, v in r.history.get(name) or []
              if math.isfinite(v) and (axis.get_yscale() != "log" or v > 0)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if axis.get_yscale() == "log":
        low, high, margin = low / 1.15, high * 1.15, 0.0
    else:
        margin = 0.05 * (high - low or abs(high) or 1.0)
    for index, row in enumerate(rows):
        points = row.history.get(curve) or []
        if row in lines:
            points = [(s, v) for s, v in points if math.isfinite(v)]
            axis.plot([s for s, _ in points], [scale * v for _, v in points], color=colours[index], label=labels[index],
                      marker="o" if markers else None, markersize=3, **_style(index, len(rows)))
        elif points:
            step, value = points[-1][0], scale * points[-1][1]
            value = value if not math.isnan(value) else math.inf  # a loss that became NaN: off the top
            shown = min(max(value, low - margin), high + margin)
            symbol = "X" if shown == value else ("v" if value < shown else "^")
            axis.plot([step], [shown], linestyle="none", marker=symbol, markersize=9, color=colours[index], label=labels[index],
                      clip_on=False)
    if values and any(not learned_to_the_end(r) for r in rows):
        axis.set_ylim(low - 1.5 * margin, high + 1.5 * margin)


def _legend_label(row: Row, metric_name: str) -> str:
    label = f"{row.label}  {fmt_metric(metric_name, row.value(metric_name))}"
    if learned_to_the_end(row):
        return label
    last = (row.history.get("test_acc") or [(0, math.nan)])[-1][1]
    return f"{label}  {row.status.lower()}" + ("" if math.isnan(last) else f" (last test acc {fmt_acc(last)})")


def plot_curves(rows: list[Row], metric_name: str, title: str, acc_path: Path, loss_path: Path) -> None:
    """Test accuracy per epoch, and train and test loss per epoch, one line per run that learned, legend outside."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in rows if r.history.get("test_acc") or r.history.get("train_loss")]
    count = max(len(rows), 1)
    colours = _colours(count)
    columns = 1 if count <= 22 else 2
    height = max(4.0, 0.24 * math.ceil(count / columns) + 1.2)
    legend = dict(loc="upper left", fontsize="small", ncol=columns, frameon=False, title=f"best first by {metric_name}")
    labels = [_legend_label(r, metric_name) for r in rows]
    markers = max((len(r.history.get("test_acc") or []) for r in rows), default=0) <= 30

    figure, axis = plt.subplots(figsize=(8, height))
    _draw_curve(axis, rows, "test_acc", 100, colours, labels, markers)
    axis.set(title=f"Test accuracy per epoch: {title}", xlabel="epoch", ylabel="test accuracy (%)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend(bbox_to_anchor=(1.02, 1.0), borderaxespad=0, **legend)
    figure.savefig(acc_path, dpi=110, bbox_inches="tight")
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    drawn = [r for r in rows if learned_to_the_end(r)] or rows
    all_losses = [v for r in drawn for curve in ("train_loss", "test_loss") for _, v in r.history.get(curve) or [] if v > 0]
    for axis, curve, name in zip(axes, ("train_loss", "test_loss"), ("Train loss", "Test loss")):
        if all_losses and max(all_losses) / min(all_losses) > 20:  # losses over decades: each still readable
            axis.set_yscale("log")
        _draw_curve(axis, rows, curve, 1, colours, labels, markers, scale_to=("train_loss", "test_loss"))
        axis.set(title=f"{name} per epoch", xlabel="epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy loss")
    handles, names = axes[0].get_legend_handles_labels()
    figure.suptitle(title)
    figure.legend(handles, names, bbox_to_anchor=(0.91, 0.88), **legend)
    figure.subplots_adjust(right=0.9)
    figure.savefig(loss_path, dpi=110, bbox_inches="tight")
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- the report


def _slug(text: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", text).strip("_")[:80] or "report"


def load_rows(client: Any, runs: list[Any]) -> list[Row]:
    names: dict[str, str] = {}
    rows = []
    for run in runs:
        experiment_id = run.info.experiment_id
        if experiment_id not in names:
            names[experiment_id] = client.get_experiment(experiment_id).name
        history = {}
        for curve in CURVES:
            points = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, curve))
            by_step = {step: value for step, _, value in points}  # the last value logged for each epoch
            history[curve] = sorted(by_step.items())
        rows.append(Row(run, names[experiment_id], history))
    return rows


def rank_rows(rows: list[Row], metric_name: str, lowest_first: bool | None) -> list[Row]:
    ordered = rank(rows, metric_name, lowest_first, score=lambda r: _num(r.value(metric_name)))
    # The best is the first run that trained to the end: a pruned run is never the one to pick.
    best = next((r for r in ordered if not is_pruned(r.run) and not math.isnan(_num(r.value(metric_name)))), None)
    for index, row in enumerate(ordered, 1):
        row.rank, row.best = index, row is best
    for row, label in zip(ordered, label_runs(ordered)):
        row.label = label
    return ordered


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


@dataclass
class Report:
    output_dir: Path
    files: list[Path]
    sections: list[tuple[str, list[Row]]]
    markdown: str
    parent_run_id: str | None


def build(sources: Sequence[str], output_dir: Path | None = None, metric_name: str = DEFAULT_METRIC,
          group_by: str | None = None, filters: Sequence[str] = (), statuses: Sequence[str] = (),
          uri: str | None = None, lowest_first: bool | None = None, attach: bool = True, title: str | None = None,
          within: float = pareto.DEFAULT_WITHIN) -> Report:
    """Write the report files; ResultsError (one line) for an unknown source, metric or an empty selection."""
    import matplotlib
    from mlflow.tracking import MlflowClient

    matplotlib.use("Agg")
    uri = tracking_uri(uri)
    client = MlflowClient(uri)
    selections = [select(client, source) for source in sources]
    where = ", ".join(s.description for s in selections)
    rows = _selected_rows(client, selections, where, filters, statuses)
    metric_name = resolve_metric([r.run for r in rows if r.run.info.status == "FINISHED"] or [r.run for r in rows], metric_name)
    check_metric([r.run for r in rows], metric_name, where)

    title = title or " + ".join(sources)
    output_dir = Path(output_dir or Path("reports") / _slug("+".join(sources)))
    output_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Row]] = {}
    for row in rows:
        row.group = "" if group_by is None else f"{group_by}={row.lookup(group_by)}"
        groups.setdefault(row.group, []).append(row)
    order = "lowest" if (lower_is_better(metric_name) if lowest_first is None else lowest_first) else "highest"
    lines = [f"# Report: {title}", "",
             f"{len(rows)} runs of {where} (MLflow store {mask(uri)}), best first by `{metric_name}` ({order} first); "
             f"generated {datetime.now():%Y-%m-%d %H:%M}."]
    if filters or statuses:
        lines += ["", "Filters: " + ", ".join([*(f"`{f}`" for f in filters), *(f"status in {s}" for s in statuses)]) + "."]
    sections, files, summary_rows = [], [output_dir / "report.md", output_dir / "runs.csv"], []
    for group, members in sorted(groups.items(), key=lambda item: _group_order(item[0])):
        ranked = rank_rows(members, metric_name, lowest_first)
        sections.append((group, ranked))
        files += _group_section(lines, summary_rows, group, ranked, metric_name, output_dir, title, group_by, uri)
    files += answer_sections(lines, [r.run for r in rows], metric_name, output_dir, title, within)
    markdown = "\n".join(lines) + "\n"
    (output_dir / "report.md").write_text(markdown)
    _write_runs_csv(output_dir / "runs.csv", sections, metric_name)
    if summary_rows:
        files.append(output_dir / "by_config.csv")
        _write_summary_csv(output_dir / "by_config.csv", summary_rows, metric_name)
    parent_id = _attach(client, selections, rows, output_dir, bool(filters or statuses or group_by)) if attach else None
    return Report(output_dir, files, sections, markdown, parent_id)


def _selected_rows(client: Any, selections: list[Any], where: str, filters: Sequence[str], statuses: Sequence[str]) -> list[Row]:
    """The rows of the selected runs that pass the filters (ResultsError when none do)."""
    runs = list({r.info.run_id: r for s in selections for r in s.runs}.values())
    if not runs:
        raise ResultsError(f"{where}: no runs (an empty sweep)")
    parsed = [parse_filter(f) for f in filters]
    wanted = {s.strip().upper() for text in statuses for s in text.split(",") if s.strip()}
    rows = [r for r in load_rows(client, runs) if keep(r, parsed, wanted)]
    if not rows:
        raise ResultsError(f"{where}: none of its {len(runs)} runs match the filters "
                           f"{' '.join([*filters, *(f'--status {s}' for s in statuses)])}")
    return rows


def _group_section(lines: list[str], summary_rows: list[tuple[str, ConfigSummary]], group: str, ranked: list[Row],
                   metric_name: str, output_dir: Path, title: str, group_by: str | None, uri: str) -> list[Path]:
    """One group's table, curves and seed summary, added to `lines` and `summary_rows`; returns the figures' files."""
    suffix = f"-{_slug(group)}" if group_by else ""
    acc_png, loss_png = output_dir / f"test_acc{suffix}.png", output_dir / f"loss{suffix}.png"
    plot_curves(ranked, metric_name, f"{title}, {group}" if group else title, acc_png, loss_png)
    lines += ["", f"## {group}" if group else "## Runs", "", runs_table(ranked, metric_name, links.ui_base_for(uri)), "",
              f"![Test accuracy per epoch]({acc_png.name})", "", f"![Train and test loss per epoch]({loss_png.name})"]
    summaries = by_config(ranked, metric_name)
    if summaries:
        lines += ["", f"### Mean and standard deviation over seeds{f' ({group})' if group else ''}", "",
                  "Finished runs that differ only in `seed`; ± is the sample standard deviation.", "",
                  summary_table(summaries, metric_name), "", noise_line(summaries, metric_name)]
        summary_rows += [(group, s) for s in summaries]
    return [acc_png, loss_png]


def answer_sections(lines: list[str], runs: list[Any], metric_name: str, output_dir: Path, title: str, within: float) -> list[Path]:
    """"Pareto front" and "What mattered" over the selection's configurations (seeds folded); their pictures."""
    points = points_of(runs, metric_name)
    if not points:
        lines += ["", "## Pareto front", "", "No configuration finished: no front to draw.", "", "## What mattered", "",
                  "No configuration finished: nothing to weigh."]
        return []
    front = pareto.answer(points, metric_name, within)
    pareto.draw(front, output_dir / "pareto.png", title)
    lines += ["", "## Pareto front", "",
              f"Configurations that finished ({len(points)}, from {sum(p.n for p in points)} runs; seeds as mean ± std), "
              f"by `{metric_name}` against their parameters and their training seconds. A configuration is on the front "
              "when no other is at least as good on both and better on one.", "",
              *(f"- {line}" for line in front.lines()), "", "![Pareto front](pareto.png)"]
    files = [output_dir / "pareto.png"]
    mattered = importance.importance(points, metric_name)
    lines += ["", "## What mattered", ""]
    if mattered is None:
        lines.append("Fewer than 3 configurations, no key that differs between them, or the same value for all: nothing to weigh.")
        return files
    importance.draw(mattered, output_dir / "importance.png", title)
    lines += [mattered.line(), "", mattered.table(), ""] + ([f"**{mattered.warning}**", ""] if mattered.warning else [])
    lines.append("![What mattered](importance.png)")
    return [*files, output_dir / "importance.png"]


def _attach(client: Any, selections: list[Any], rows: list[Row], output_dir: Path, narrowed: bool) -> str | None:
    """The report as artifacts of the sweep's parent run, when the rows are of one sweep that has one; its id."""
    parents = {pid: p for s in selections for pid, p in s.parents.items()}
    sweeps_of_rows = {r.tags.get(SWEEP_TAG) or r.tags.get(PARENT_TAG) for r in rows}
    if len(parents) != 1 or len(sweeps_of_rows) != 1:
        return None
    parent_id = next(iter(parents))
    client.log_artifacts(parent_id, str(output_dir), f"report/{output_dir.name}" if narrowed else "report")
    return parent_id


def _group_order(group: str) -> tuple:
    value = group.split("=", 1)[-1]
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def _write_runs_csv(path: Path, sections: list[tuple[str, list[Row]]], metric_name: str) -> None:
    fields = CSV_FIELDS + ([metric_name] if metric_name not in CSV_FIELDS else [])
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for _, rows in sections:
            for row in rows:
                writer.writerow({name: _plain(row.value(name)) for name in fields})


def _write_summary_csv(path: Path, summaries: list[tuple[str, ConfigSummary]], metric_name: str) -> None:
    names = list(dict.fromkeys((*SUMMARY_FIELDS, metric_name)))
    fields = ["group", "config", "model", "param_count", "lr", "epochs", "n", "seeds"]
    fields += [f"{name}_{stat}" for name in names for stat in ("mean", "std")]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for group, summary in summaries:
            first = summary.rows[0]
            record = {"group": group, "config": summary.label, "model": first.model, "param_count": first.value("param_count"),
                      "lr": first.value("lr"), "epochs": first.value("epochs"), "n": len(summary.rows), "seeds": summary.seeds}
            for name in names:
                record[f"{name}_mean"], record[f"{name}_std"] = (_plain(v) for v in summary.stats[name])
            writer.writerow(record)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fashioncnn.report",
        description="Tables (markdown, CSV) and figures (PNG) of sweeps, read from MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m fashioncnn.report fashioncnn --group-by model.conv   (writes reports/fashioncnn/)\n\n"
               "KEY for --filter and --group-by: a param (optim.lr, model.conv, epochs, seed), a tag\n"
               "(group.lr, model_name, diverged), experiment or status; prefix params./tags./metrics. when a name is both.")
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="experiment name, sweep id or parent run id")
    parser.add_argument("-o", "--output-dir", type=Path, help="where to write (default: reports/<source>)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="what ranks the runs (default: %(default)s)")
    parser.add_argument("--order", choices=("auto", "max", "min"), default="auto",
                        help="best is the highest (max) or lowest (min) value; auto: lowest for *loss and *seconds")
    parser.add_argument("--group-by", metavar="KEY", help="one table and figure per value of KEY, e.g. optim.lr or experiment")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE[,VALUE]",
                        help="keep runs whose KEY is one of the values (KEY!=VALUE: is not); repeatable")
    parser.add_argument("--status", action="append", default=[], metavar="STATUS[,STATUS]",
                        help="keep runs with these statuses: FINISHED, FAILED, KILLED, RUNNING, DIVERGED, PRUNED")
    parser.add_argument("--within", type=float, default=pareto.DEFAULT_WITHIN, metavar="D",
                        help="Pareto front: name the smallest and the fastest configuration within D of the best "
                             "(percentage points for an accuracy; default: %(default)s)")
    parser.add_argument("--title", help="the report's title (default: the sources)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)")
    parser.add_argument("--no-artifacts", action="store_true", help="do not log the files to the sweep's parent run")
    args = parser.parse_args(argv)
    if not (args.within >= 0):
        parser.error(f"--within {args.within}: must be a distance >= 0 (percentage points for an accuracy)")
    try:
        report = build(args.sources, args.output_dir, args.metric, args.group_by, args.filter, args.status,
                       args.tracking_uri, {"auto": None, "max": False, "min": True}[args.order], not args.no_artifacts, args.title,
                       args.within)
    except ResultsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.markdown)
    print(f"Wrote {', '.join(f.name for f in report.files)} to {report.output_dir}"
          + (f"; logged to parent run {report.parent_run_id} under report/" if report.parent_run_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
