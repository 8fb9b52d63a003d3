"""Pruning and sampled search against the full grid (issue 12): what they find, and in how much training time.

1. The study's step-3 grid (`+study=step3-channels`: 18 models at lr 0.01, 5 epochs, full data) three
   times, each into a store of its own: prune=none, prune=median, prune=asha. For each: the wall time
   of the command, the training time of its runs (the sum of their train_seconds), the best run by the
   sweep's ranking metric (pruned runs never count) and its value, the number of pruned runs and the
   training time the pruner says it saved. Then, against prune=none: the best's difference in points
   and the training time as a fraction.
2. A 20-trial Optuna search (`hydra/sweeper=optuna`) over conv, lin, channels and
   `optim.lr=tag(log,interval(1e-4,1e-2))` at 5 epochs with pruning (Optuna's own,
   `hydra.sweeper.pruner=median`; `--optuna-prune` adds the store's `prune=`), then the same
   command again: how many runs the second command trained (none, when the study resumes) and
   whether it reports the same best.

Every command runs as a user runs it (`python -m fashioncnn -m ...` in a subprocess, in a working
directory of its own, so each gets its own ./mlruns); a command that fails is recorded (exit code, the
end of its output) and the benchmark goes on. Results: benchmarks/results-search.json.

    python benchmarks/search.py                                   # full size: hours on a 2-core CPU
    python benchmarks/search.py --subset 1000 --epochs 2 --trials 3 --out /tmp/search.json   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results-search.json"
GRID_PRUNERS = ("none", "median", "asha")
OPTUNA_SPACE = ["conv=1,2,3", "lin=2,3,4", "channels=glob(*)", "optim.lr=tag(log,interval(1e-4,1e-2))"]


def fashioncnn(args: list[str], cwd: Path) -> dict[str, Any]:
    """Run `python -m fashioncnn ARGS` in `cwd`; its wall time, exit code and the end of its output."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["PYTHONUNBUFFERED"] = "1"
    cwd.mkdir(parents=True, exist_ok=True)
    print(f"$ (cd {cwd} && python -m fashioncnn {' '.join(args)})", flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fashioncnn", *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (cwd / f"output-{int(time.time())}.log").write_text(done.stdout + done.stderr)
    summary = [line for line in done.stdout.splitlines() if line.startswith(("pruning:", "sweep "))]
    print(f"  exit {done.returncode} after {wall:.0f} s" + "".join(f"\n  {line}" for line in summary), flush=True)
    return {"command": "python -m fashioncnn " + " ".join(args), "exit_code": done.returncode, "wall_seconds": round(wall, 1),
            **({"output_tail": (done.stdout + done.stderr)[-3000:]} if done.returncode not in (0, 1) else {})}


def store_figures(cwd: Path, experiment: str) -> dict[str, Any]:
    """What the store says about the experiment's job runs: training time, pruned, the best."""
    from fashioncnn.config import ranking_metric
    from fashioncnn.results import is_pruned, lower_is_better

    database = cwd / "mlruns" / "mlflow.db"
    if not database.exists():
        return {"runs": 0}
    client = MlflowClient(f"sqlite:///{database}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {"runs": 0}
    runs = [r for r in client.search_runs([found.experiment_id], max_results=5000)
            if r.data.tags.get("fashioncnn.role") == "job"]
    parents = [r for r in client.search_runs([found.experiment_id], "tags.`fashioncnn.role` = 'parent'", max_results=100)]
    select = next((r.data.params.get("select_metric") for r in runs if r.data.params.get("select_metric")), "val_acc")
    metric = ranking_metric(select)
    ranked = [r for r in runs if r.info.status == "FINISHED" and not is_pruned(r) and metric in r.data.metrics]
    ranked.sort(key=lambda r: r.data.metrics[metric], reverse=not lower_is_better(metric))
    figures: dict[str, Any] = {
        "runs": len(runs),
        "finished": sum(r.info.status == "FINISHED" for r in runs),
        "pruned": sum(is_pruned(r) for r in runs),
        "train_seconds": round(sum(r.data.metrics.get("train_seconds", 0.0) for r in runs), 1),
        "saved_seconds_by_pruner": round(sum(p.data.metrics.get("prune_saved_seconds", 0.0) for p in parents), 1),
        "ranking_metric": metric,
    }
    if ranked:
        best = ranked[0]
        figures["best"] = {"model": best.data.tags.get("model_name"), "overrides": best.data.tags.get("hydra.overrides"),
                           "run_id": best.info.run_id, "fingerprint": best.data.tags.get("fingerprint"), metric: round(best.data.metrics[metric], 4),
                           "test_acc_at_best": round(best.data.metrics.get("test_acc_at_best", float("nan")), 4)}
    return figures


def grid(workdir: Path, subset: int | None, epochs: int | None) -> dict[str, Any]:
    shrink = ([f"subset={subset}"] if subset else []) + ([f"epochs={epochs}"] if epochs else [])
    results: dict[str, Any] = {}
    for rule in GRID_PRUNERS:
        cwd = workdir / f"grid-{rule}"
        run = fashioncnn(["-m", "+study=step3-channels", f"prune={rule}", *shrink], cwd)
        results[rule] = run | store_figures(cwd, "study-step3-channels")
    full = results["none"]
    for rule in GRID_PRUNERS[1:]:
        pruned = results[rule]
        if full.get("best") and pruned.get("best") and full.get("train_seconds"):
            metric = full["ranking_metric"]
            pruned["against_none"] = {
                # the same config (pruning is not in the fingerprint)
                "same_best_model": pruned["best"]["fingerprint"] == full["best"]["fingerprint"],
                "best_difference_points": round(100 * (pruned["best"][metric] - full["best"][metric]), 2),
                "train_time_fraction": round(pruned["train_seconds"] / full["train_seconds"], 3),
                "wall_time_fraction": round(pruned["wall_seconds"] / full["wall_seconds"], 3),
            }
    return results


def optuna(workdir: Path, subset: int | None, epochs: int, trials: int, pruner: str, prune: str) -> dict[str, Any]:
    cwd = workdir / "optuna"
    args = ["-m", "hydra/sweeper=optuna", f"hydra.sweeper.n_trials={trials}", "hydra.sweeper.sampler=tpe",
            "hydra.sweeper.seed=0", f"hydra.sweeper.pruner={pruner}", *OPTUNA_SPACE, f"prune={prune}", f"epochs={epochs}", "experiment=search-optuna",
            *([f"subset={subset}"] if subset else [])]
    first = fashioncnn(args, cwd) | store_figures(cwd, "search-optuna")
    again = fashioncnn(args, cwd) | store_figures(cwd, "search-optuna")
    return {
        "first": first,
        "again": again,
        "again_trained_runs": again.get("runs", 0) - first.get("runs", 0),
        "same_best": bool(first.get("best")) and first.get("best") == again.get("best"),
    }


def machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_at_start": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", type=int, help="training images per run (default: all, as the issue asks)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: 5, the study's step 3)")
    parser.add_argument("--trials", type=int, default=20, help="Optuna trials (default: %(default)s)")
    parser.add_argument("--optuna-pruner", default="median", choices=GRID_PRUNERS,
                        help="the search's hydra.sweeper.pruner, Optuna's own (default: %(default)s)")
    parser.add_argument("--optuna-prune", default="none", choices=GRID_PRUNERS,
                        help="the search's prune=, the store's pruner (default: %(default)s)")
    parser.add_argument("--only", choices=("grid", "optuna"), help="run one of the two parts")
    parser.add_argument("--workdir", type=Path, help="where the stores go (default: a new temporary directory, kept)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (default: %(default)s)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fashioncnn-search-"))
    for part in ("grid-none", "grid-median", "grid-asha", "optuna"):  # fresh stores: nothing skipped from a last time
        shutil.rmtree(workdir / part, ignore_errors=True)
    print(f"stores under {workdir}", flush=True)
    results: dict[str, Any] = {"machine": machine(), "settings": {"subset": args.subset, "epochs": args.epochs or 5,
                                                                   "trials": args.trials, "workdir": str(workdir)}}
    if args.only in (None, "grid"):
        results["step3_grid"] = grid(workdir, args.subset, args.epochs)
    if args.only in (None, "optuna"):
        results["optuna_search"] = optuna(workdir, args.subset, args.epochs or 5, args.trials, args.optuna_pruner, args.optuna_prune)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
