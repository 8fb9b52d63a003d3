"""Cost of `flavor.log_model` at the end of a run: seconds per call and megabytes it stores.

For each model (untrained weights: size and time do not depend on their values, and the network is left
channels_last, as train() leaves it): `--calls` runs in a temporary sqlite store, each logging the model
once. The first call of the process also imports torch.export and traces for the first time, so it is
reported apart from the median of the others. The size is the logged model's whole artifact folder
(pt2 archive, MLmodel, environment files, input example). Writes benchmarks/results-log-model.json.

    .venv/bin/python benchmarks/log_model_cost.py [--calls 4] [--out benchmarks/results-log-model.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import torch

from fashioncnn.core.model import ModelSpec, build_model, count_parameters
from fashioncnn.serving import flavor

MODELS = ("M2.2.32.32", "M1.3.32.32")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def measure(name: str, calls: int, experiment_id: str) -> dict:
    network = build_model(ModelSpec.from_name(name)).to(memory_format=torch.channels_last)
    seconds, sizes, pt2 = [], [], []
    for _ in range(calls):
        with mlflow.start_run(experiment_id=experiment_id, run_name=name):
            started = time.perf_counter()
            info = flavor.log_model(network)
            seconds.append(time.perf_counter() - started)
        folder = Path(urlparse(mlflow.MlflowClient().get_logged_model(info.model_id).artifact_location).path)
        sizes.append(folder_mb(folder))
        pt2.append(sum(f.stat().st_size for f in folder.rglob("*.pt2")) / 1e6)
    return {
        "model": name,
        "parameters": count_parameters(network),
        "fp32_weights_mb": count_parameters(network) * 4 / 1e6,
        "seconds_per_call": seconds,
        "first_call_seconds": seconds[0],
        "median_seconds_after_first": statistics.median(seconds[1:]) if calls > 1 else None,
        "artifact_mb": statistics.median(sizes),
        "pt2_mb": statistics.median(pt2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results-log-model.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="log-model-cost-") as scratch:
        mlflow.set_tracking_uri(f"sqlite:///{scratch}/mlflow.db")
        experiment_id = mlflow.MlflowClient().create_experiment("log-model-cost", artifact_location=Path(scratch, "artifacts").as_uri())
        load_before = os.getloadavg()[0]
        for name in MODELS:
            results.append(measure(name, args.calls, experiment_id))
        load_after = os.getloadavg()[0]
    record = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "load_average_1min": [load_before, load_after],  # a shared machine: other processes slow every figure
        "torch": torch.__version__,
        "mlflow": mlflow.__version__,
        "threads": torch.get_num_threads(),
        "calls_per_model": args.calls,
        "models": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'model':<12} {'params':>10} {'artifact MB':>12} {'pt2 MB':>8} {'first call s':>13} {'later calls s':>14}")
    for r in results:
        later = f"{r['median_seconds_after_first']:.2f}" if r["median_seconds_after_first"] is not None else "-"
        print(f"{r['model']:<12} {r['parameters']:>10,} {r['artifact_mb']:>12.2f} {r['pt2_mb']:>8.2f} "
              f"{r['first_call_seconds']:>13.2f} {later:>14}")
    print(f"load average {load_before:.1f} -> {load_after:.1f}; written to {args.out}")


if __name__ == "__main__":
    main()
