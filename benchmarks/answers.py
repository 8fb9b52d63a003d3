"""What the answers cost a sweep: the Pareto front and what mattered, drawn and logged to the parent run.

Runs the README's grid (`conv=2,3 lin=2,3,4`, 6 jobs; small here: --subset images, --epochs, so the
training is short and only the closing matters) into a fresh store, then times the parent run's answers
(fashioncnn.sweep.parent.answers: reading the sweep's runs, the front, PED-ANOVA and fANOVA, both
pictures and their upload) in a fresh process, --rounds times: what it adds to a sweep's close (MLflow and
Optuna already loaded, as there; matplotlib and scikit-learn's import included) and the whole process.
Optionally --study also runs the study's step-3 grid (`+study=step3-channels`, 18 jobs) at the given size
and records its Pareto front and importance table. Written to benchmarks/results-answers.json with the machine.

    python benchmarks/answers.py [--rounds 3] [--subset 2000 --epochs 1] [--study]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from first_contact import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results-answers.json"
TIMED = """
import json, sys, time
started = time.perf_counter()
import mlflow, optuna  # a sweep's process has these loaded by the time it closes
loaded = time.perf_counter()
from fashioncnn.sweep.parent import answers
from fashioncnn.tracking import stores
store = stores.store(sys.argv[1])
run_ids = [r.info.run_id for r in store.find_runs(sys.argv[2], f"tags.sweep_id = '{sys.argv[3]}'") if r.info.run_id != sys.argv[4]]
text = answers(store, sys.argv[2], run_ids, sys.argv[4], "best_val_acc", sys.argv[3])
done = time.perf_counter()
print(json.dumps({"seconds": done - loaded, "fresh_process_seconds": done - started, "text": text}))
"""


def sweep(args: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fashioncnn", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the sweep failed: {result.stderr[-2000:]}")
    return time.perf_counter() - started


def parent_of(cwd: Path, experiment: str) -> tuple[str, str, str, str]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.`fashioncnn.role` = 'parent'")
    return uri, experiment_id, parent.data.tags["sweep_id"], parent.info.run_id


def timed(cwd: Path, experiment: str, rounds: int) -> dict[str, object]:
    where = parent_of(cwd, experiment)
    seconds, fresh, text = [], [], ""
    for _ in range(rounds):
        result = subprocess.run([sys.executable, "-c", TIMED, *where], cwd=cwd, capture_output=True, text=True, check=True)
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        seconds.append(answer["seconds"])
        fresh.append(answer["fresh_process_seconds"])
        text = answer["text"]
    # in the sweep: what closing the sweep adds (mlflow and optuna already loaded); fresh: a process importing them too
    return {"answers_seconds_in_sweep_min": round(min(seconds), 2), "answers_seconds_in_sweep_median": round(statistics.median(seconds), 2),
            "answers_seconds_fresh_process_median": round(statistics.median(fresh), 2), "rounds": rounds, "description": text}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subset", type=int, default=2000, help="training images per run (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--study", action="store_true", help="also the study's step-3 grid at this size")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    size = [f"subset={args.subset}", f"epochs={args.epochs}", "log_model=false", "system_metrics=false"]
    results: dict[str, object] = {"machine": machine(), "size": size}
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        env_note = os.environ.get("MLFLOW_TRACKING_URI")
        if env_note:
            raise SystemExit("unset MLFLOW_TRACKING_URI: the benchmark makes its own local store")
        readme = ["-m", "conv=2,3", "lin=2,3,4", *size, "experiment=readme-grid"]
        results["readme_grid"] = {"command": "python -m fashioncnn " + " ".join(readme),
                                  "sweep_wall_seconds": round(sweep(readme, cwd), 1), **timed(cwd, "readme-grid", args.rounds)}
        if args.study:
            study = ["-m", "+study=step3-channels", *size, "experiment=step3"]
            results["step3_grid"] = {"command": "python -m fashioncnn " + " ".join(study),
                                     "sweep_wall_seconds": round(sweep(study, cwd), 1), **timed(cwd, "step3", 1)}
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
