"""Pruning and sampled search against the full grid: what they find, and in how much training time.

1. The study's step-3 grid (`+study=step3-channels`: 18 models at lr 0.01, 5 epochs, full data) four
   times, each into a store of its own: prune=none, prune=median, prune=asha, and prune=asha with its
   first rung at epoch 2 (prune.min_epoch=2, "asha-min2"). For each: the wall time
   of the command, the training time of its runs (the sum of their train_seconds), the best run by the
   sweep's ranking metric (pruned runs never count) and its value, the number of pruned runs and the
   training time the pruner says it saved. Then, against prune=none: the best's difference in points
   and the training time as a fraction.
2. A 20-trial Optuna search (`hydra/sweeper=optuna`) over conv, lin, channels and
   `optim.lr=tag(log,interval(1e-4,1e-2))` at 5 epochs with pruning (`--optuna-prune`, default median: the
   prune group's rule, which a search applies through Optuna's pruner; median with prune.min_siblings=2,
   Optuna's n_startup_trials of the first measurements), then the same
   command again: how many runs the second command trained (none, when the study resumes) and
   whether it reports the same best.

Every command runs as a user runs it (`python -m fashioncnn -m ...` in a subprocess, in a working
directory of its own, so each gets its own ./mlruns); a command that fails is recorded (exit code, the
end of its output) and the benchmark goes on. Results: benchmarks/results-search.json, rewritten after
every step.

At full size this is hours of CPU, so it can be stopped and continued, the way a user's sweep is: stop
it with Ctrl-C or SIGTERM (passed on to the running command, whose runs end KILLED with their
checkpoints), and run the same command with the same --workdir again. Steps that ended are not run
again; the interrupted one is re-run, and the package resumes its runs from their last epoch. A step's
wall time is then the sum over its invocations (their count is recorded); its training time, the sum
of its runs' train_seconds, counts each finished epoch once.

    python benchmarks/search.py --workdir ~/search-bench          # full size: hours on a 2-core CPU
    python benchmarks/search.py --subset 1000 --epochs 2 --trials 3 --out /tmp/search.json   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results-search.json"
GRID_PRUNERS = ("none", "median", "asha")
# Each grid's name and its overrides; "none" first: the others are set against it.
GRIDS = {"none": ["prune=none"], "median": ["prune=median"], "asha": ["prune=asha"],
         "asha-min2": ["prune=asha", "prune.min_epoch=2"]}  # ASHA judging from epoch 2: slow starters survive rung 0
STORES = (*(f"grid-{name}" for name in GRIDS), "optuna")  # one working directory (and ./mlruns) each
# The step-3 grid's space, with the learning rate sampled too, so that the search's best can be set
# against the grid's. (conv=1 and channels 32.32 would add models of 30-100 M parameters, hours on a CPU.)
OPTUNA_SPACE = ["conv=2,3", "lin=2,3,4", "channels=16.32,32.64,64.128", "optim.lr=tag(log,interval(1e-4,1e-2))"]


class Stopped(Exception):
    """The benchmark was interrupted; the command it ran was stopped the way a user stops a sweep."""


def fashioncnn(args: list[str], cwd: Path, progress: Progress, step: str) -> dict[str, Any]:
    """Run `python -m fashioncnn ARGS` in `cwd` until it ends by itself, over as many invocations of
    the benchmark as that takes; its wall time (summed), exit code and the end of its output."""
    if progress.ended(step):
        print(f"{step}: ended in an earlier invocation, not run again", flush=True)
        return progress.outcome(step)
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["PYTHONUNBUFFERED"] = "1"
    cwd.mkdir(parents=True, exist_ok=True)
    log = cwd / f"output-{step}-{int(time.time())}.log"
    print(f"$ (cd {cwd} && python -m fashioncnn {' '.join(args)})   # output: {log}", flush=True)
    started = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen([sys.executable, "-m", "fashioncnn", *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        stop = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        # Ctrl-C reaches the child through the terminal; SIGTERM to this script alone is passed on
        signal.signal(signal.SIGINT, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: child.terminate())
        try:
            code = child.wait()
        finally:
            signal.signal(signal.SIGINT, stop[0])
            signal.signal(signal.SIGTERM, stop[1])
    wall = time.perf_counter() - started
    output = log.read_text()
    progress.record(step, args, code, wall, output[-3000:] if code not in (0, 1) else None)
    summary = [line for line in output.splitlines() if line.startswith(("pruning:", "sweep "))]
    print(f"  exit {code} after {wall:.0f} s" + "".join(f"\n  {line}" for line in summary), flush=True)
    if code in INTERRUPTED:
        raise Stopped(f"{step} interrupted (exit {code}); run the same command again to continue")
    return progress.outcome(step)


INTERRUPTED = (130, 143, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL)


class Progress:
    """What each step's invocations did, kept in the workdir so that a stopped benchmark continues."""

    def __init__(self, workdir: Path, settings: dict[str, Any]) -> None:
        self.path = workdir / "progress.json"
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        if saved and saved.get("settings") != settings:
            raise SystemExit(f"error: {workdir} holds a benchmark with other settings ({saved.get('settings')}); "
                             "give another --workdir, or --fresh to start again")
        self.steps: dict[str, list[dict[str, Any]]] = saved.get("steps", {})
        self.settings = settings

    def record(self, step: str, args: list[str], code: int, wall: float, tail: str | None) -> None:
        entry = {"exit_code": code, "wall_seconds": round(wall, 1), "ended": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "load_average_at_end": round(os.getloadavg()[0], 1), **({"output_tail": tail} if tail else {})}
        self.steps.setdefault(step, []).append({"command": "python -m fashioncnn " + " ".join(args), **entry})
        self.path.write_text(json.dumps({"settings": self.settings, "steps": self.steps}, indent=1) + "\n")

    def forget(self, step: str) -> None:
        self.steps.pop(step, None)
        self.path.write_text(json.dumps({"settings": self.settings, "steps": self.steps}, indent=1) + "\n")

    def ended(self, step: str) -> bool:
        return bool(self.steps.get(step)) and self.steps[step][-1]["exit_code"] not in INTERRUPTED

    def outcome(self, step: str) -> dict[str, Any]:
        invocations = self.steps[step]
        last = invocations[-1]
        return {"command": last["command"], "exit_code": last["exit_code"],
                "wall_seconds": round(sum(i["wall_seconds"] for i in invocations), 1), "invocations": len(invocations),
                **{key: last[key] for key in ("output_tail", "note") if key in last}}


def store_figures(cwd: Path, experiment: str) -> dict[str, Any]:
    """What the store says about the experiment's job runs: training time, pruned, the best."""
    from fashioncnn.core.config import lower_is_better, ranking_metric
    from fashioncnn.tracking.queries import is_pruned

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
    # Each configuration's seconds per epoch trained (its newest run): the grids' work compared at one speed.
    figures["epoch_seconds"] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch_seconds"))
        figures["epoch_seconds"][run.data.tags.get("fingerprint", run.info.run_id)] = {
            "model": run.data.tags.get("model_name"), "seconds": [round(value, 2) for _, value in history]}
    figures["epochs_trained"] = sum(len(c["seconds"]) for c in figures["epoch_seconds"].values())
    if ranked:
        best = ranked[0]
        figures["best"] = {"model": best.data.tags.get("model_name"), "overrides": best.data.tags.get("hydra.overrides"),
                           "run_id": best.info.run_id, "fingerprint": best.data.tags.get("fingerprint"), metric: round(best.data.metrics[metric], 4),
                           "test_acc_at_best": round(best.data.metrics.get("test_acc_at_best", float("nan")), 4)}
    return figures


def at_speed_of(reference: dict[str, Any], grid: dict[str, Any]) -> float:
    """The seconds `grid`'s epochs took in `reference`: each configuration's first k epochs there, k as trained here."""
    timed = reference["epoch_seconds"]
    return sum(sum(timed[config]["seconds"][:len(trained["seconds"])]) for config, trained in grid["epoch_seconds"].items())


def grid(workdir: Path, subset: int | None, epochs: int | None, progress: Progress, results: dict[str, Any], save: Callable[[], None]) -> None:
    shrink = ([f"subset={subset}"] if subset else []) + ([f"epochs={epochs}"] if epochs else [])
    for name, overrides in GRIDS.items():
        cwd = workdir / f"grid-{name}"
        run = fashioncnn(["-m", "+study=step3-channels", *overrides, *shrink], cwd, progress, f"grid-{name}")
        results[name] = run | store_figures(cwd, "study-step3-channels")
        save()
    full = results["none"]
    for name in list(GRIDS)[1:]:
        pruned = results[name]
        if full.get("best") and pruned.get("best") and full.get("train_seconds"):
            metric = full["ranking_metric"]
            pruned["against_none"] = {
                # the same config (pruning is not in the fingerprint)
                "same_best_model": pruned["best"]["fingerprint"] == full["best"]["fingerprint"],
                "best_difference_points": round(100 * (pruned["best"][metric] - full["best"][metric]), 2),
                "train_time_fraction": round(pruned["train_seconds"] / full["train_seconds"], 3),
                "wall_time_fraction": round(pruned["wall_seconds"] / full["wall_seconds"], 3),
                # The same epochs timed at prune=none's speed: one machine's speed drifts between runs of
                # identical work (10-25% between these grids, run minutes apart), pruning does not.
                "train_time_fraction_at_none_speed": round(at_speed_of(full, pruned) / at_speed_of(full, full), 3),
                "epochs_trained_fraction": round(pruned["epochs_trained"] / full["epochs_trained"], 3),
            }
    save()


def optuna(workdir: Path, subset: int | None, epochs: int, trials: int, prune: str, progress: Progress,
           results: dict[str, Any], save: Callable[[], None]) -> None:
    cwd = workdir / "optuna"
    args = ["-m", "hydra/sweeper=optuna", f"hydra.sweeper.n_trials={trials}", "hydra.sweeper.sampler=tpe",
            "hydra.sweeper.seed=0", *OPTUNA_SPACE, f"prune={prune}", *(["prune.min_siblings=2"] if prune == "median" else []),
            f"epochs={epochs}", "experiment=search-optuna",
            *([f"subset={subset}"] if subset else [])]
    results["first"] = fashioncnn(args, cwd, progress, "optuna-first") | store_figures(cwd, "search-optuna")
    save()
    results["again"] = again = fashioncnn(args, cwd, progress, "optuna-again") | store_figures(cwd, "search-optuna")
    first = results["first"]
    results["again_trained_runs"] = again.get("runs", 0) - first.get("runs", 0)
    results["same_best"] = bool(first.get("best")) and first.get("best") == again.get("best")
    save()


def machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_at_start": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", type=int, help="training images per run (default: all)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: 5, the study's step 3)")
    parser.add_argument("--trials", type=int, default=20, help="Optuna trials (default: %(default)s)")
    parser.add_argument("--optuna-prune", default="median", choices=GRID_PRUNERS,
                        help="the search's prune=, applied through Optuna's pruner (default: %(default)s)")
    parser.add_argument("--only", choices=("grid", "optuna"), help="run one of the two parts")
    parser.add_argument("--workdir", type=Path, help="where the stores go; the same one again continues a stopped benchmark "
                                                     "(default: a new temporary directory, kept)")
    parser.add_argument("--fresh", action="store_true", help="delete what --workdir holds from an earlier benchmark first")
    parser.add_argument("--redo", action="append", default=[], choices=STORES,
                        help="run this part again from scratch, its store deleted (e.g. its timing was disturbed); repeatable")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (default: %(default)s)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fashioncnn-search-"))
    if args.fresh:
        for part in (*STORES, "progress.json"):
            shutil.rmtree(workdir / part, ignore_errors=True) if part != "progress.json" else (workdir / part).unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = {"subset": args.subset, "epochs": args.epochs or 5, "trials": args.trials, "optuna_prune": args.optuna_prune, "optuna_space": OPTUNA_SPACE}
    progress = Progress(workdir, settings)
    for part in args.redo:
        shutil.rmtree(workdir / part, ignore_errors=True)
        for step in ("optuna-first", "optuna-again") if part == "optuna" else (part,):
            progress.forget(step)
    print(f"stores under {workdir}" + (" (continuing: " + ", ".join(progress.steps) + ")" if progress.steps else ""), flush=True)
    results: dict[str, Any] = {"machine": machine(), "settings": settings | {"workdir": str(workdir)}}

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    try:
        if args.only in (None, "grid"):
            grid(workdir, args.subset, args.epochs, progress, results.setdefault("step3_grid", {}), save)
        if args.only in (None, "optuna"):
            optuna(workdir, args.subset, args.epochs or 5, args.trials, args.optuna_prune, progress,
                   results.setdefault("optuna_search", {}), save)
    except Stopped as stopped:
        save()
        print(f"{stopped}; what ended so far is in {args.out}", flush=True)
        return 130
    save()
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
