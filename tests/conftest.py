from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (gzipped when the name ends in .gz), as the original Fashion-MNIST files are."""
    dtype_code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, dtype_code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped data set of 60 training and 20 test images in IDX .gz files."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "tiny"
    folder.mkdir()
    for split, count in (("train", 60), ("t10k", 20)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", (np.arange(count) % 10).astype(np.uint8))
    return folder


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, module: str = "fashioncnn", timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python -m fashioncnn ARGS` as a user would, in its own working directory."""
    full_env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def local_store(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def runs_of(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment!r} not in the store"
    return client.search_runs([found.experiment_id], max_results=1000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, folder):
    """`python -m fashioncnn.server ARGS`; returns the process once it has announced its URL."""
    # Two workers: the tests' requests are few, and each worker loads MLflow on the suite's two cores.
    server = subprocess.Popen([sys.executable, "-m", "fashioncnn.server", "--dir", str(folder), "--workers", "2", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    while not output or not output[-1].startswith("MLflow tracking server:"):
        line = server.stdout.readline()
        assert line, "server exited:\n" + "".join(output)
        output.append(line)
    # Keep reading: the server logs every request, and a pipe nobody reads fills and stops its workers mid-write.
    threading.Thread(target=lambda: output.extend(server.stdout), daemon=True).start()
    return server, output


def stop_server(server):
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


have_postgres = shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


@pytest.fixture(scope="session")
def postgres_server():
    """The team server (`python -m fashioncnn.server`, PostgreSQL backend) on loopback, for the whole session: its URL."""
    if not have_postgres:
        pytest.skip("needs PostgreSQL (make test installs it: apt-get install postgresql)")
    # PostgreSQL runs as its own user, which cannot enter pytest's private tmp folders.
    folder = Path(tempfile.mkdtemp(prefix="fashioncnn-server-", dir="/tmp"))
    folder.chmod(0o755)
    port = free_port()
    server, _ = start_server(["--port", str(port), "--postgres-port", str(free_port())], folder)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(server)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node SLURM cluster on 127.0.0.1 (fashioncnn.cluster.slurm), stopped after the session.

    Debian's slurmctld, slurmd and munge are installed when missing; the tests skip only where that
    cannot be done (no apt-get, neither root nor sudo).
    """
    from fashioncnn.cluster.slurm import Cluster, ClusterError, install_packages

    try:
        install_packages()
    except ClusterError as error:
        pytest.skip(f"no SLURM cluster: {error}")
    # Outside pytest's base folder, which a concurrent pytest session may prune while this one runs.
    folder = Path(tempfile.mkdtemp(prefix="fashioncnn-slurm-"))
    cluster = Cluster(folder)
    started = time.monotonic()
    cluster.start()
    print(f"\nSLURM cluster started in {time.monotonic() - started:.1f} s")
    try:
        yield cluster
    finally:
        stopping = time.monotonic()
        cluster.stop()
        print(f"\nSLURM cluster stopped in {time.monotonic() - stopping:.1f} s")
        shutil.rmtree(folder, ignore_errors=True)
