"""A team's load on one tracking server: several sweep commands at once against `python -m fashioncnn.server`.

Starts the team server on loopback (PostgreSQL by default, --backend sqlite for the other) in a fresh
folder, then --commands sweep commands at the same time, each `conv=2,3` (2 jobs) on --subset images for
--epochs epochs with `speed.threads=1`; the first runs its jobs through `hydra/launcher=joblib`. The
commands talk to the server through a recording proxy on loopback, so every request's server-side time is
measured where the jobs make it: `log_batch` requests per second while the sweeps ran, their p50/p95/max
latency, and the other endpoints' counts. Every 0.5 s the resident memory of the server's processes
(`mlflow server` and its workers, PostgreSQL) is read. At the end every job run must be FINISHED with each
epoch's metrics exactly once; the most job runs open at one time ("jobs held at once") comes from their
start and end times. Then what the server holds (the burst): --clients processes each send `log_batch`
of --batch metrics back to back for --burst-seconds, to runs of their own; requests per second, p50/p95/max
latency as the clients saw it, and every batch must be stored. Clients and server share this machine's
cores. Written to benchmarks/results-server-load.json with the machine.

    python benchmarks/server_load.py [--backend postgres|sqlite] [--commands 4] [--subset 256] [--epochs 3] [--clients 8]

Bounded: the server listens on 127.0.0.1 only, and the whole run stops after --timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp  # a dependency of MLflow
import psutil  # a dependency of MLflow's system metrics
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from first_contact import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results-server-load.json"
LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
EPOCH_METRICS = ("train_loss", "val_acc", "test_acc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RecordingProxy:
    """Forwards every request to the server and records (path, status, seconds the server took, when)."""

    def __init__(self, target: str) -> None:
        self.target, self.records, self.port = target, [], free_port()
        self.ready = threading.Event()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length", "transfer-encoding")}
        started = time.perf_counter()
        async with self.session.request(request.method, self.target + request.path_qs, headers=headers, data=body) as answer:
            payload = await answer.read()
            self.records.append((request.path, answer.status, time.perf_counter() - started, time.time()))
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")}
            return web.Response(body=payload, status=answer.status, headers=kept)

    async def _serve(self) -> None:
        self.session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=300))
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.ready.set()
        await asyncio.Event().wait()

    def start(self) -> str:
        threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True).start()
        self.ready.wait(30)
        return f"http://127.0.0.1:{self.port}"


class MemoryWatch:
    """The resident memory of the server's processes, every half second: its `mlflow server` tree and PostgreSQL."""

    def __init__(self, server: subprocess.Popen, folder: Path) -> None:
        self.server, self.folder, self.samples, self.zombies = psutil.Process(server.pid), str(folder), [], 0
        self.stop = threading.Event()

    def processes(self) -> list[psutil.Process]:
        tree = [self.server, *self.server.children(recursive=True)]
        known = {p.pid for p in tree}
        for process in psutil.process_iter(["cmdline"]):  # PostgreSQL, started by pg_ctl, leaves the tree
            if process.pid not in known and self.folder in " ".join(process.info["cmdline"] or []):
                tree.append(process)
        return tree

    def sample(self) -> tuple[float, int]:
        total, zombies = 0, 0
        for process in self.processes():
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    zombies += 1
                else:
                    total += process.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20, zombies

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            megabytes, zombies = self.sample()
            self.samples.append((time.time(), megabytes))
            self.zombies = max(self.zombies, zombies)

    def start(self) -> None:
        threading.Thread(target=self._watch, daemon=True).start()


def start_server(backend: str, folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    extra = ["--postgres-port", str(free_port())] if backend == "postgres" else []
    server = subprocess.Popen([sys.executable, "-m", "fashioncnn.server", "--backend", backend, "--dir", str(folder),
                               "--port", str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    lines = []
    while not lines or not lines[-1].startswith("MLflow tracking server:"):
        line = server.stdout.readline()
        if not line:
            raise SystemExit("the server did not start:\n" + "".join(lines))
        lines.append(line)
    threading.Thread(target=server.stdout.read, daemon=True).start()  # keep its pipe drained
    return server, f"http://127.0.0.1:{port}"


def sweep_commands(count: int, uri: str, args: argparse.Namespace) -> list[list[str]]:
    commands = []
    for index in range(count):
        joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if index == 0 else []
        commands.append(["-m", "conv=2,3", f"seed={index}", "model.filter_in=4", "model.filter_out=8", f"subset={args.subset}",
                         "val_size=500", f"epochs={args.epochs}", "speed.threads=1", "system_metrics=false", "log_model=false",
                         f"experiment=load-{index}", f"tracking_uri={uri}", *joblib])
    return commands


def _burst_client(uri: str, run_id: str, start_at: float, seconds: float, size: int) -> list[float]:
    """One client: log_batch of `size` metrics back to back for `seconds`; the latency of each request."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, took, step = MlflowClient(uri), [], 0
    time.sleep(max(0.0, start_at - time.time()))
    while time.time() < start_at + seconds:
        step += 1
        now = int(time.time() * 1000)
        started = time.perf_counter()
        client.log_batch(run_id, metrics=[Metric(f"metric_{i}", step / (i + 1), now, step) for i in range(size)])
        took.append(time.perf_counter() - started)
    return took


def burst(uri: str, clients: int, seconds: float, size: int) -> dict[str, object]:
    """What the server holds: `clients` processes sending log_batch back to back, each to a run of its own."""
    from concurrent.futures import ProcessPoolExecutor

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.create_experiment("burst")
    runs = [client.create_run(experiment_id).info.run_id for _ in range(clients)]
    start_at = time.time() + 8  # every client process imports MLflow first
    with ProcessPoolExecutor(clients) as pool:
        took = sorted(t for part in pool.map(_burst_client, [uri] * clients, runs, [start_at] * clients, [seconds] * clients,
                                             [size] * clients) for t in part)
    stored = sum(len(client.get_metric_history(run, "metric_0")) for run in runs)
    return {"clients": clients, "seconds": seconds, "metrics_per_batch": size, "log_batch_requests": len(took),
            "log_batch_per_second": round(len(took) / seconds, 1), "log_batch_p50_ms": round(1000 * statistics.median(took), 1),
            "log_batch_p95_ms": round(1000 * took[int(0.95 * (len(took) - 1))], 1), "log_batch_max_ms": round(1000 * took[-1], 1),
            "every_batch_stored": stored == len(took)}


def check_runs(uri: str, count: int, epochs: int) -> dict[str, object]:
    """Every job run FINISHED with each epoch's metrics exactly once; the most job runs open at one time."""
    from mlflow.tracking import MlflowClient

    client, spans, problems = MlflowClient(uri), [], []
    for index in range(count):
        experiment = client.get_experiment_by_name(f"load-{index}")
        runs = client.search_runs([experiment.experiment_id], "tags.`fashioncnn.role` = 'job'")
        problems += [f"load-{index}: {len(runs)} job runs, not 2"] if len(runs) != 2 else []
        for run in runs:
            spans.append((run.info.start_time, run.info.end_time or run.info.start_time))
            problems += [f"{run.info.run_id}: {run.info.status}"] if run.info.status != "FINISHED" else []
            for key in EPOCH_METRICS:
                steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
                problems += [f"{run.info.run_id} {key}: steps {steps}"] if steps != list(range(1, epochs + 1)) else []
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    held, most = 0, 0
    for _, change in events:
        held += change
        most = max(most, held)
    return {"job_runs": len(spans), "jobs_held_at_once": most, "every_epoch_exactly_once": not problems, "problems": problems[:20]}


def latency(records: list[tuple[str, int, float, float]]) -> dict[str, object]:
    batches = [r for r in records if r[0] == LOG_BATCH]
    seconds = sorted(r[2] for r in batches)
    window = max(r[3] for r in batches) - min(r[3] - r[2] for r in batches) if batches else 0.0
    counts: dict[str, int] = {}
    for path, *_ in records:
        counts[path] = counts.get(path, 0) + 1
    return {"log_batch_requests": len(batches), "log_batch_per_second": round(len(batches) / window, 1) if window else None,
            "log_batch_p50_ms": round(1000 * statistics.median(seconds), 1) if seconds else None,
            "log_batch_p95_ms": round(1000 * seconds[int(0.95 * (len(seconds) - 1))], 1) if seconds else None,
            "log_batch_max_ms": round(1000 * seconds[-1], 1) if seconds else None,
            "errors": sum(1 for r in records if r[1] >= 500), "requests_by_path": dict(sorted(counts.items(), key=lambda kv: -kv[1])[:12])}


def run(args: argparse.Namespace) -> dict[str, object]:
    folder = Path(tempfile.mkdtemp(prefix="fashioncnn-load-", dir="/tmp"))
    folder.chmod(0o755)  # PostgreSQL runs as its own user when this runs as root
    server, uri = start_server(args.backend, folder / "server")
    try:
        watch = MemoryWatch(server, folder)
        idle_mb, _ = watch.sample()
        watch.start()
        proxy = RecordingProxy(uri)
        through = proxy.start()
        started = time.perf_counter()
        commands = []
        for index, command in enumerate(sweep_commands(args.commands, through, args)):
            cwd = folder / f"command-{index}"
            cwd.mkdir()
            commands.append(subprocess.Popen([sys.executable, "-m", "fashioncnn", *command], cwd=cwd, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + args.timeout
        for command in commands:
            output = command.communicate(timeout=max(1, deadline - time.monotonic()))[0]
            if command.returncode != 0:
                raise SystemExit(f"a sweep command failed (rc {command.returncode}):\n{output[-3000:]}")
        wall = time.perf_counter() - started
        peak = max(mb for _, mb in watch.samples)
        capacity = burst(uri, args.clients, args.burst_seconds, args.batch) if args.clients else {}
        watch.stop.set()
        burst_peak = max(mb for _, mb in watch.samples)
        after_mb, zombies = watch.sample()
        return {"backend": args.backend, "commands": args.commands, "jobs_per_command": 2, "launchers": "joblib (n_jobs=2) for one, basic for the others",
                "command_example": "python -m fashioncnn " + " ".join(sweep_commands(1, "URI", args)[0]), "wall_seconds": round(wall, 1),
                **check_runs(uri, args.commands, args.epochs), **latency(proxy.records),
                "server_memory_mb": {"idle": round(idle_mb), "peak_sweeps": round(peak), "peak_burst": round(burst_peak),
                                     "after": round(after_mb)},
                "burst": capacity,
                "server_processes_defunct": max(zombies, watch.zombies)}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--commands", type=int, default=4, help="sweep commands at once, 2 jobs each (default: %(default)s)")
    parser.add_argument("--subset", type=int, default=256, help="training images per job (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8, help="then, processes sending log_batch back to back (0: none)")
    parser.add_argument("--burst-seconds", type=float, default=15)
    parser.add_argument("--batch", type=int, default=30, help="metrics per log_batch in the burst (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before the load is stopped (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        raise SystemExit("unset MLFLOW_TRACKING_URI: the benchmark starts its own server")
    result = {"machine": machine(), **run(args)}
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous[args.backend] = result
    args.out.write_text(json.dumps(previous, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["every_epoch_exactly_once"] and result["burst"].get("every_batch_stored", True) else 1


if __name__ == "__main__":
    sys.exit(main())
