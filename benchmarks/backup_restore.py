"""What backup and restore of a team server cost, for a store of a few hundred runs.

Starts the team server (`python -m fashioncnn.server`, PostgreSQL by default) in a fresh folder on loopback
and fills it through MLflow's API as sweeps would: --runs runs over a few experiments, each with its params,
--epochs epochs of per-epoch metrics and a weights file of --model-kb KB as an artifact, and one logged model
registered. Then, while the server runs, times `python -m fashioncnn.server backup FILE`, the file's size,
`python -m fashioncnn.server restore FILE --dir NEWDIR`, and the restored server's start; the restored server
must hold the same runs, metric histories and registered model. Written to benchmarks/results-backup.json
with the machine.

    python benchmarks/backup_restore.py [--backend postgres|sqlite] [--runs 300] [--epochs 10] [--model-kb 360]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from first_contact import machine  # noqa: E402
from server_load import free_port, start_server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results-backup.json"
EXPERIMENTS = ("step1-conv", "step2-lin", "step3-channels", "step4-lr")


def fill(uri: str, runs: int, epochs: int, model_kb: int, scratch: Path) -> None:
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    weights = scratch / "weights.pt"
    weights.write_bytes(os.urandom(model_kb * 1024))
    experiment_ids = [client.create_experiment(name) for name in EXPERIMENTS]
    for index in range(runs):
        run = client.create_run(experiment_ids[index % len(EXPERIMENTS)], run_name=f"M{2 + index % 3}.{2 + index % 4}.32.64",
                                tags={"fashioncnn.role": "job"})
        now = int(time.time() * 1000)
        metrics = [Metric(key, 0.5 + epoch / (2 * epochs), now, epoch) for epoch in range(1, epochs + 1)
                   for key in ("train_loss", "val_acc", "test_acc")]
        params = [Param("model.conv", str(2 + index % 3)), Param("model.lin", str(2 + index % 4)), Param("optim.lr", "0.001"),
                  Param("seed", str(index))]
        client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=[RunTag("sweep_id", f"sweep-{index // 20}")])
        client.log_artifact(run.info.run_id, str(weights), "weights")
        client.set_terminated(run.info.run_id)

    class Doubler(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [2 * x for x in model_input]

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(EXPERIMENTS[0])
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Doubler())
    mlflow.register_model(info.model_uri, "champion")


def contents(uri: str) -> tuple[int, int, int]:
    """(runs, metric values of every history, registered model versions)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = [run for experiment in client.search_experiments() for run in
            client.search_runs([experiment.experiment_id], max_results=5000)]
    values = sum(len(client.get_metric_history(run.info.run_id, "val_acc")) for run in runs)
    return len(runs), values, len(client.search_model_versions())


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fashioncnn.server", *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:1])} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, object]:
    parent = Path(tempfile.mkdtemp(prefix="fashioncnn-backup-", dir="/tmp"))
    parent.chmod(0o755)  # PostgreSQL runs as its own user when this runs as root
    folder, restored, archive = parent / "server", parent / "restored", parent / "team.tar.gz"
    server, uri = start_server(args.backend, folder)
    try:
        started = time.perf_counter()
        fill(uri, args.runs, args.epochs, args.model_kb, parent)
        fill_seconds = time.perf_counter() - started
        before = contents(uri)
        backup_seconds = timed(["backup", str(archive), "--dir", str(folder)])
    finally:
        stop(server)
    extra = ["--postgres-port", str(free_port())] if args.backend == "postgres" else []
    restore_seconds = timed(["restore", str(archive), "--dir", str(restored), *extra])
    started = time.perf_counter()
    server, restored_uri = start_server(args.backend, restored)
    try:
        start_seconds = time.perf_counter() - started
        after = contents(restored_uri)
    finally:
        stop(server)
    size = archive.stat().st_size
    shutil.rmtree(parent, ignore_errors=True)
    return {"backend": args.backend, "runs": before[0], "metric_values_per_key": before[1], "registered_versions": before[2],
            "artifacts_per_run_kb": args.model_kb, "fill_seconds": round(fill_seconds, 1), "backup_seconds": round(backup_seconds, 1),
            "backup_mb": round(size / 2**20, 1), "restore_seconds": round(restore_seconds, 1),
            "restored_server_start_seconds": round(start_seconds, 1), "restored_the_same": after == before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model-kb", type=int, default=360, help="a weights file per run (default: %(default)s KB, an M3.2.32.64)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = {"machine": machine(), **run(args)}
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous[args.backend] = result
    args.out.write_text(json.dumps(previous, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["restored_the_same"] else 1


if __name__ == "__main__":
    sys.exit(main())
