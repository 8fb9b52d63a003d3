"""Cost of sending the per-epoch checkpoint to a tracking server's artifact store.

Starts `python -m fashioncnn.server --backend sqlite` on a free loopback port, then for each model
saves one checkpoint as the training loop does (model + Adam state after a step, best weights) and
uploads it `--uploads` times with `MlflowClient.log_artifact`, as fashioncnn.job.checkpoints' background
thread does, deleting the previous one each time. Prints the size, the median seconds per upload and
per delete, and writes benchmarks/results-checkpoint-upload.json.
Run: .venv/bin/python benchmarks/checkpoint_upload.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from fashioncnn.core.model import ModelSpec, build_model
from fashioncnn.job.checkpoints import save_atomically


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_file(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelSpec.from_name(name))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    optimizer.zero_grad()
    F.cross_entropy(model(torch.randn(64, 1, 28, 28)), torch.randint(0, 10, (64,))).backward()
    optimizer.step()
    path = folder / f"{name}.pt"
    save_atomically(path, dict(model=model.state_dict(), optimizer=optimizer.state_dict(), order_rng=torch.Generator().get_state(),
                               torch_rng=torch.get_rng_state(), history=[], images_seen=0, best_epoch=1,
                               best_model={k: v.clone() for k, v in model.state_dict().items()}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uploads", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["M2.2.32.32", "M3.3.32.32", "M1.3.32.32"])
    parser.add_argument("--out", default=str(Path(__file__).with_name("results-checkpoint-upload.json")))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "fashioncnn.server", "--backend", "sqlite", "--port", str(port),
                                   "--dir", f"{folder}/server"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        try:
            while not server.stdout.readline().startswith("MLflow tracking server:"):
                assert server.poll() is None, "server exited"
            client = MlflowClient(f"http://127.0.0.1:{port}")
            run = client.create_run(client.create_experiment("upload-bench"))
            repository = get_artifact_repository(run.info.artifact_uri.replace("mlflow-artifacts:", f"http://127.0.0.1:{port}/api/2.0/mlflow-artifacts/artifacts", 1))
            results = []
            for name in args.models:
                path = checkpoint_file(name, Path(folder))
                uploads, deletes = [], []
                for i in range(args.uploads):
                    staged = path.with_name(f"epoch-{i:04d}.{path.stat().st_size}.pt")
                    os.link(path, staged)
                    started = time.perf_counter()
                    client.log_artifact(run.info.run_id, str(staged), "checkpoint")
                    uploads.append(time.perf_counter() - started)
                    if i:
                        started = time.perf_counter()
                        repository.delete_artifacts(f"checkpoint/epoch-{i - 1:04d}.{path.stat().st_size}.pt")
                        deletes.append(time.perf_counter() - started)
                    staged.unlink()
                row = {"model": name, "size_mb": round(path.stat().st_size / 1e6, 2), "upload_s_median": round(statistics.median(uploads), 3),
                       "upload_s_max": round(max(uploads), 3), "delete_s_median": round(statistics.median(deletes), 3)}
                print(row, flush=True)
                results.append(row)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                          "load_average_1m": round(os.getloadavg()[0], 1), "uploads_per_model": args.uploads,
                                          "server": "fashioncnn.cluster.server --backend sqlite on 127.0.0.1, proxied artifacts",
                                          "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
