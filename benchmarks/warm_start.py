"""A search that starts from what is known against one that starts cold, on the study's step-3 space.

1. The step-3 grid (`+study=step3-channels`: 18 models at lr 0.01) at a reduced size (--subset, --epochs)
   into store A; its Pareto front and what mattered, as its parent run's description gives them.
2. A --trials search over the same space (`hydra/sweeper=optuna +study=step3-channels`, the preset's
   hydra.sweeper.params as the space, TPE seed 0) in store A: warm, told the grid's 18 runs first.
3. The same search in an empty store B: cold.
For each search: the best ranking metric (max_test_acc: the preset selects by the test set, as the study
did) among the runs it knows (the grid's too, when warm), the best
among the trials it asked for, how many runs it trained and their training seconds. Written to
benchmarks/results-warm-start.json with the machine.

    python benchmarks/warm_start.py [--subset 10000 --epochs 2 --trials 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from first_contact import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results-warm-start.json"
# The study's step 3 ranks by the test set (select_metric=test_acc): the runs' ranking metric is max_test_acc.
METRIC = "max_test_acc"


def fashioncnn(args: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fashioncnn", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"python -m fashioncnn {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, result.stdout


def jobs(cwd: Path, experiment: str, sweep_id: str | None = None) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    found = client.search_runs([experiment_id], "tags.`fashioncnn.role` = 'job'", max_results=5000)
    return [r for r in found if sweep_id is None or r.data.tags.get("sweep_id") == sweep_id]


def answers_of(cwd: Path, experiment: str) -> list[str]:
    """The grid's Pareto front and what mattered, as its parent run's description gives them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.`fashioncnn.role` = 'parent'")
    note = parent.data.tags.get("mlflow.note.content", "")
    lines = note[note.find("### Pareto front"):].splitlines() if "### Pareto front" in note else []
    from fashioncnn.analysis.importance import importance
    from fashioncnn.analysis.points import points_of

    mattered = importance(points_of(jobs(cwd, experiment), METRIC), METRIC)
    return lines + ([""] + mattered.table().splitlines() if mattered is not None else [])


def search_figures(cwd: Path, experiment: str, wall: float, stdout: str) -> dict[str, object]:
    import optuna

    storage = f"sqlite:///{cwd / 'mlruns' / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    asked = [t for t in trials if not t.user_attrs.get("warm_start")]
    known = [t.value for t in trials if t.value is not None]
    sweep_id = next(line.split()[1].rstrip(":") for line in stdout.splitlines() if line.startswith("search "))
    trained = jobs(cwd, experiment, sweep_id)
    return {"wall_seconds": round(wall, 1), "warm_trials": len(trials) - len(asked), "asked_trials": len(asked),
            "best_known": max(known) if known else None,
            "best_of_asked": max((t.value for t in asked if t.value is not None), default=None),
            "runs_trained": len(trained), "train_seconds": round(sum(r.data.metrics.get("train_seconds", 0.0) for r in trained), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    size = [f"subset={args.subset}", f"epochs={args.epochs}", "log_model=false", "system_metrics=false"]
    search = ["hydra/sweeper=optuna", f"hydra.sweeper.n_trials={args.trials}"]
    results: dict[str, object] = {"machine": machine(), "size": size, "trials": args.trials}
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        warm_dir, cold_dir = Path(a), Path(b)
        grid = ["-m", "+study=step3-channels", *size]
        wall, stdout = fashioncnn(grid, warm_dir)
        runs = jobs(warm_dir, "study-step3-channels")
        results["grid"] = {"command": "python -m fashioncnn " + " ".join(grid), "wall_seconds": round(wall, 1), "runs": len(runs),
                           "best": max(r.data.metrics.get(METRIC, 0.0) for r in runs),
                           "train_seconds": round(sum(r.data.metrics.get("train_seconds", 0.0) for r in runs), 1),
                           "answers": answers_of(warm_dir, "study-step3-channels")}
        command = ["-m", *search, "+study=step3-channels", *size]
        results["search_command"] = "python -m fashioncnn " + " ".join(command)
        results["warm"] = search_figures(warm_dir, "study-step3-channels", *fashioncnn(command, warm_dir))
        results["cold"] = search_figures(cold_dir, "study-step3-channels", *fashioncnn(command, cold_dir))
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
