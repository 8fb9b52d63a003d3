"""What MLflow's system metrics (system_metrics=true, the default) cost a training run.

Two measurements, written to benchmarks/results-system-metrics.json:
1. The monitor's own CPU time: a run that only sleeps for --idle-seconds, with and without
   log_system_metrics, in fresh processes; the difference in process CPU time is the monitor's (it
   samples psutil every 10 s and logs every 10 samples). CPU time, unlike wall time, is not disturbed
   by other processes on a shared machine.
2. Training time: the package's train() on M2.2.32.32 for one epoch of --images images, alternating
   with and without the monitor, --rounds times each; the medians and their ratio.

    python benchmarks/system_metrics_overhead.py [--idle-seconds 60] [--images 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results-system-metrics.json"

IDLE = textwrap.dedent("""
    import os, sys, time, mlflow
    mlflow.set_tracking_uri(sys.argv[1])
    on = sys.argv[2] == "on"
    with mlflow.start_run(log_system_metrics=on):
        start = time.process_time()  # after the run (and the database) exist: only the idle minute counts
        time.sleep(float(sys.argv[3]))
        used = time.process_time() - start
    print(used)
""")

TRAIN = textwrap.dedent("""
    import sys, time, mlflow, torch
    from fashioncnn.sweep.preflight import jobs_of
    from fashioncnn.core.data import load
    from fashioncnn.core.model import ModelSpec, build_model
    from fashioncnn.core.loop import train
    mlflow.set_tracking_uri(sys.argv[1])
    on = sys.argv[2] == "on"
    cfg = jobs_of(["epochs=1", f"subset={sys.argv[3]}", "device=cpu"])[0][1]
    data = load(cfg.data_dir, subset=cfg.subset, val_size=cfg.val_size)
    torch.manual_seed(0)
    model = build_model(ModelSpec.from_config(cfg.model))
    with mlflow.start_run(log_system_metrics=on):
        result = train(cfg, model, data, torch.device("cpu"))
    print(result.train_seconds)
""")


def run(script: str, *args: str) -> float:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        uri = f"sqlite:///{scratch}/mlflow.db"
        idle = {mode: run(IDLE, uri, mode, str(args.idle_seconds)) for mode in ("off", "on")}
        monitor_cpu_per_minute = (idle["on"] - idle["off"]) * 60 / args.idle_seconds
        seconds: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                seconds[mode].append(run(TRAIN, uri, mode, str(args.images)))
    off, on = statistics.median(seconds["off"]), statistics.median(seconds["on"])
    results = {
        "idle_seconds": args.idle_seconds,
        "process_cpu_seconds_idle": idle,
        "monitor_cpu_seconds_per_minute": round(monitor_cpu_per_minute, 3),
        "monitor_share_of_one_core": round(monitor_cpu_per_minute / 60, 5),
        "train_images": args.images,
        "train_seconds": seconds,
        "train_seconds_median": {"off": off, "on": on},
        "train_time_ratio_on_over_off": round(on / off, 4),
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
