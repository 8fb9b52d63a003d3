"""The Pareto front: the configurations no other beats on both the ranking metric and a cost (parameters,
training seconds), and the cheapest configuration within a given distance of the best.

The study's question: M3.3.32.32 has 29,482 parameters and M2.2.32.32 679,466; is the small one almost as
good? The front answers for every selection, with seeds folded into their configuration (mean ± std).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fashioncnn.analysis.points import Point, is_fraction
from fashioncnn.core.config import lower_is_better

COSTS = {"param_count": "parameters", "train_seconds": "training seconds"}
DEFAULT_WITHIN = 0.5  # points of accuracy (percentage points); in the metric's own units for a loss


def front(points: list[Point], metric_name: str, cost: str) -> list[Point]:
    """The non-dominated points on (metric, cost), cheapest first; a point without the cost is left out."""
    sign = -1 if lower_is_better(metric_name) else 1
    usable = [p for p in points if not math.isnan(getattr(p, cost))]

    def dominates(a: Point, b: Point) -> bool:
        better_or_equal = sign * a.mean >= sign * b.mean and getattr(a, cost) <= getattr(b, cost)
        return better_or_equal and (sign * a.mean > sign * b.mean or getattr(a, cost) < getattr(b, cost))

    kept = [p for p in usable if not any(dominates(q, p) for q in usable if q is not p)]
    return sorted(kept, key=lambda p: getattr(p, cost))


def distance(metric_name: str, within: float) -> float:
    """`within` in the metric's units: percentage points for an accuracy."""
    return within / 100 if is_fraction(metric_name) else within


def cheapest_within(points: list[Point], metric_name: str, cost: str, within: float) -> Point | None:
    """The cheapest point whose mean is within `within` of the best point's mean; None without points."""
    if not points:
        return None
    sign, gap = (-1 if lower_is_better(metric_name) else 1), distance(metric_name, within)
    best = points[0].mean  # points are best first
    close = [p for p in points if sign * (best - p.mean) <= gap + 1e-12 and not math.isnan(getattr(p, cost))]
    return min(close, key=lambda p: (getattr(p, cost), -sign * p.mean), default=None)


@dataclass
class Answer:
    """The front on each cost and the cheapest configuration near the best."""

    metric_name: str
    within: float
    points: list[Point]
    fronts: dict[str, list[Point]]
    cheapest: dict[str, Point | None]

    def lines(self) -> list[str]:
        """A few lines: the best, the smallest and the fastest within `within`, and the fronts."""
        if not self.points:
            return ["No configuration finished: no front to draw."]
        best = self.points[0]
        lines = [f"Best: {best.label}, `{self.metric_name}` {best.value_text(self.metric_name)}, "
                 f"{_count(best.param_count)} parameters, {_seconds(best.train_seconds)} of training."]
        for cost, what in (("param_count", "Smallest"), ("train_seconds", "Fastest")):
            pick = self.cheapest[cost]
            if pick is not None:
                lines.append(f"{what} within {_points(self.within, is_fraction(self.metric_name))} of the best: {pick.label}, {pick.value_text(self.metric_name)}, "
                             f"{_count(pick.param_count)} parameters, {_seconds(pick.train_seconds)} of training.")
        for cost, points in self.fronts.items():
            lines.append(f"Front on {COSTS[cost]} ({len(points)} of {len(self.points)}): "
                         + "; ".join(f"{p.label} ({_cost_text(cost, p)}, {p.value_text(self.metric_name)})" for p in points) + ".")
        return lines


def answer(points: list[Point], metric_name: str, within: float = DEFAULT_WITHIN) -> Answer:
    return Answer(metric_name, within, points, {cost: front(points, metric_name, cost) for cost in COSTS},
                  {cost: cheapest_within(points, metric_name, cost, within) for cost in COSTS})


def _count(value: float) -> str:
    return "?" if math.isnan(value) else f"{int(value):,}"


def _seconds(value: float) -> str:
    if math.isnan(value):
        return "?"
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s" if value < 600 else f"{value / 60:.1f} min"


def _points(within: float, fraction: bool) -> str:
    return f"{within:g} point{'' if within == 1 else 's'}" if fraction else f"{within:g}"


def _cost_text(cost: str, point: Point) -> str:
    return f"{_count(point.param_count)} params" if cost == "param_count" else _seconds(point.train_seconds)


def draw(result: Answer, path: Path, title: str) -> None:
    """Two panels, the metric against parameters (log scale) and against training seconds: every
    configuration a dot with its seeds' standard deviation as an error bar, the front joined and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    scale = 100 if is_fraction(result.metric_name) else 1
    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for axis, cost in zip(axes, COSTS):
        points = [p for p in result.points if not math.isnan(getattr(p, cost))]
        on_front = result.fronts[cost]
        others = [p for p in points if p not in on_front]
        axis.errorbar([getattr(p, cost) for p in others], [scale * p.mean for p in others],
                      yerr=[0 if math.isnan(p.std) else scale * p.std for p in others], fmt="o", color="0.65",
                      markersize=5, capsize=2, label="dominated")
        axis.errorbar([getattr(p, cost) for p in on_front], [scale * p.mean for p in on_front],
                      yerr=[0 if math.isnan(p.std) else scale * p.std for p in on_front], fmt="o-", color="tab:blue",
                      markersize=6, capsize=2, label="Pareto front")
        for p in on_front:
            axis.annotate(p.label, (getattr(p, cost), scale * p.mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
        pick = result.cheapest[cost]
        if pick is not None:
            axis.plot([getattr(pick, cost)], [scale * pick.mean], marker="*", markersize=16, color="tab:orange", linestyle="none",
                      label=f"cheapest within {_points(result.within, scale == 100)} of the best")
        if cost == "param_count" and points and max(p.param_count for p in points) / max(min(p.param_count for p in points), 1) > 20:
            axis.set_xscale("log")
            axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.xaxis.set_minor_formatter(NullFormatter())
        if cost == "param_count":
            axis.xaxis.set_major_formatter(FuncFormatter(_compact))  # 500k, 1M: full counts overlap on a log axis
        axis.set(xlabel=COSTS[cost], title=f"{result.metric_name} against {COSTS[cost]}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", loc="best")
    axes[0].set_ylabel(f"{result.metric_name}{' (%)' if scale == 100 else ''}, mean over seeds")
    figure.suptitle(f"Pareto front: {title}")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def _compact(value: float, _: object = None) -> str:
    """A parameter count as a tick label: 900, 20k, 1.2M."""
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    return f"{value / 1e3:g}k" if value >= 1e3 else f"{value:g}"
