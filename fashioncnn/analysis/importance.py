"""What mattered: the importance of each swept key for the ranking metric, by Optuna's evaluators.

Grid runs are not Optuna trials, so each configuration becomes one: its swept keys as params (numbers on
a number line, options and words as categories) and the mean of its seeds as the value, in an in-memory
study with the metric's direction. Two evaluators answer: PED-ANOVA (Optuna 5's default: how differently
the key is spread among the top configurations than among all) and fANOVA (the share of the metric's
variance a random forest puts on the key). Where they agree, the answer is firm.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from fashioncnn.analysis.points import Point
from fashioncnn.core.config import lower_is_better

MIN_CONFIGURATIONS = 10  # below this the evaluators have too few points to separate keys: said with the table
EVALUATORS = ("PED-ANOVA", "fANOVA")


@dataclass
class Importance:
    metric_name: str
    keys: list[str]  # most important first (by PED-ANOVA)
    scores: dict[str, dict[str, float]]  # evaluator -> key -> importance (each evaluator's sum is 1)
    configurations: int
    runs: int

    @property
    def warning(self) -> str:
        if self.configurations >= MIN_CONFIGURATIONS:
            return ""
        return (f"Only {self.configurations} configurations: below {MIN_CONFIGURATIONS} the evaluators cannot tell keys apart "
                "reliably; read this as a hint, and sweep more before acting on it.")

    def table(self) -> str:
        lines = ["| key | " + " | ".join(EVALUATORS) + " |", "| --- | " + " | ".join("---:" for _ in EVALUATORS) + " |"]
        lines += [f"| `{key}` | " + " | ".join(f"{self.scores[e].get(key, math.nan):.2f}" for e in EVALUATORS) + " |"
                  for key in self.keys]
        return "\n".join(lines)

    def line(self) -> str:
        ranked = ", ".join(f"{key} {self.scores['PED-ANOVA'].get(key, math.nan):.2f}" for key in self.keys)
        return (f"Importance for `{self.metric_name}` (PED-ANOVA; fANOVA in the table), over {self.configurations} "
                f"configurations ({self.runs} runs): {ranked}.")


def importance(points: list[Point], metric_name: str) -> Importance | None:
    """The swept keys' importance over the points; None with fewer than 3 points or nothing swept."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator, get_param_importances

    keys = sorted(points[0].swept) if points else []
    if len(points) < 3 or not keys or len({p.mean for p in points}) == 1:
        return None  # nothing to weigh: too few configurations, nothing swept, or every one scored the same
    distributions = {key: _distribution([p.swept[key] for p in points]) for key in keys}
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="minimize" if lower_is_better(metric_name) else "maximize")
    study.add_trials([optuna.trial.create_trial(params={key: _as(distributions[key], p.swept[key]) for key in keys},
                                                distributions=distributions, value=p.mean) for p in points])
    scores = {}
    with warnings.catch_warnings():  # Optuna flags its evaluators as experimental on every call
        warnings.simplefilter("ignore")
        for name, evaluator in (("PED-ANOVA", PedAnovaImportanceEvaluator()), ("fANOVA", FanovaImportanceEvaluator(seed=0))):
            try:
                scores[name] = dict(get_param_importances(study, evaluator=evaluator))
            except (RuntimeError, ValueError):  # e.g. fANOVA's forest finds no variance to share out
                scores[name] = {}
    order = sorted(keys, key=lambda key: (-scores["PED-ANOVA"].get(key, 0.0), -scores["fANOVA"].get(key, 0.0), key))
    return Importance(metric_name, order, scores, len(points), sum(p.n for p in points))


def _distribution(values: list[object]):  # -> optuna.distributions.BaseDistribution
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    numbers = [_number(v) for v in values]
    if any(n is None for n in numbers):
        return CategoricalDistribution(sorted({str(v) for v in values}))
    low, high = min(numbers), max(numbers)  # type: ignore[type-var]
    if all(float(n).is_integer() and not isinstance(v, float) for n, v in zip(numbers, values)):
        return IntDistribution(int(low), int(high))
    # A learning rate swept over decades is judged on its logarithm.
    return FloatDistribution(float(low), float(high), log=low > 0 and high / low >= 10)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def _as(distribution, value: object) -> object:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return str(value)
    number = _number(value)
    return int(number) if isinstance(distribution, IntDistribution) else float(number)


def draw(result: Importance, path: Path, title: str) -> None:
    """Horizontal bars: each key's importance by each evaluator, the most important on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(reversed(result.keys))
    figure, axis = plt.subplots(figsize=(8, max(2.5, 0.6 * len(keys) + 1.5)))
    height = 0.8 / len(EVALUATORS)
    for index, (evaluator, colour) in enumerate(zip(EVALUATORS, ("tab:blue", "tab:orange"))):
        axis.barh([k + (index - 0.5) * height for k in range(len(keys))], [result.scores[evaluator].get(key, 0.0) for key in keys],
                  height=height, color=colour, label=evaluator)
    axis.set_yticks(range(len(keys)), keys)
    axis.set(xlabel=f"importance for {result.metric_name} (each evaluator sums to 1)", xlim=(0, 1),
             title=f"What mattered: {title}\n{result.configurations} configurations, {result.runs} runs"
             + (" (too few to be sure)" if result.warning else ""))
    axis.grid(alpha=0.3, axis="x")
    axis.legend(fontsize="small", loc="lower right")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
