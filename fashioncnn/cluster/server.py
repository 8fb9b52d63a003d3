"""A shared MLflow tracking server: PostgreSQL for a team, sqlite for one person.

    python -m fashioncnn.server --backend postgres --dir server --port 5000

starts (first creating, when missing) a PostgreSQL cluster of its own in DIR/postgres, listening on
127.0.0.1 only, with a database `mlflow`; then `mlflow server` on HOST:PORT with that database and
artifacts in DIR/artifacts served through the server (--artifacts-destination), so clients need no
access to the server's disk. Both stop together on Ctrl-C or SIGTERM. Sweeps log to it with
MLFLOW_TRACKING_URI=http://HOST:PORT. `--auth` turns on MLflow's basic authentication (an admin
password is generated into DIR/basic_auth.ini; clients set MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD). It binds to 127.0.0.1 unless --host says
otherwise: opening it to a network is a decision to take with --auth on.
"""

from __future__ import annotations

import argparse
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fashioncnn.tracking.secrets import mask_secrets

DATABASE = "mlflow"


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        sys.exit(f"error: PostgreSQL's {name} not found; install it (Debian/Ubuntu: apt-get install postgresql)")
    return found


def _as_postgres_user() -> list[str]:
    # PostgreSQL refuses to run as root; root runs it as the `postgres` user Debian's package creates.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _wait_for_port(host: str, port: int, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            sys.exit(f"error: {what} exited with code {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                return
        if time.monotonic() > deadline:
            sys.exit(f"error: {what} did not listen on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.3)


def start_postgres(folder: Path, port: int) -> tuple[subprocess.Popen, str]:
    """Start PostgreSQL on 127.0.0.1:port with its data in `folder`; return the process and the database URI."""
    data = folder / "postgres"
    runner = _as_postgres_user()
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        if runner:
            shutil.chown(data, "postgres", "postgres")
        subprocess.run([*runner, _postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, stdout=subprocess.DEVNULL)
    process = subprocess.Popen(
        [*runner, _postgres_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(data)],
        stdout=subprocess.DEVNULL, stderr=open(folder / "postgres.log", "a"),
    )
    _wait_for_port("127.0.0.1", port, process, "PostgreSQL")
    for _ in range(50):  # accepting TCP connections comes a moment before accepting logins
        exists = subprocess.run([*runner, _postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-tAc",
                                 f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"], capture_output=True, text=True)
        if exists.returncode == 0:
            break
        time.sleep(0.2)
    if exists.stdout.strip() != "1":
        subprocess.run([*runner, _postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", DATABASE], check=True)
    return process, f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"


def _auth_config(folder: Path) -> Path:
    """MLflow's basic_auth.ini with the users database in DIR (MLflow's default puts it in the working directory)."""
    config = folder / "basic_auth.ini"
    if not config.exists():
        config.touch(mode=0o600)  # it holds the admin password
        config.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
            f"admin_username = admin\nadmin_password = {secrets.token_urlsafe(18)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        print(f"basic auth: user admin, password in {config} (readable by you only); "
              "create users for your team with the MLflow UI or REST API", flush=True)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fashioncnn.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--backend-uri", help="an existing database instead (e.g. postgresql://user:pass@db/mlflow)")
    parser.add_argument("--dir", type=Path, default=Path("server"), help="database and artifacts live here (default ./server)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--postgres-port", type=int, default=5433)
    parser.add_argument("--auth", action="store_true", help="MLflow's basic authentication (admin user: see README)")
    args = parser.parse_args(argv)

    folder = args.dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen] = []
    if args.backend_uri:
        backend = args.backend_uri
    elif args.backend == "postgres":
        database, backend = start_postgres(folder, args.postgres_port)
        children.append(database)
    else:
        backend = f"sqlite:///{folder / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
        "--artifacts-destination", str(folder / "artifacts"), "--host", args.host, "--port", str(args.port),
    ]
    environment = dict(os.environ)
    if args.auth:
        command += ["--app-name", "basic-auth"]
        # The auth app's CSRF protection needs a key that survives restarts: made once, kept private in DIR.
        key_file = folder / "flask_secret_key"
        if "MLFLOW_FLASK_SERVER_SECRET_KEY" not in environment:
            if not key_file.exists():
                key_file.touch(mode=0o600)
                key_file.write_text(secrets.token_hex(32))
            environment["MLFLOW_FLASK_SERVER_SECRET_KEY"] = key_file.read_text().strip()
        environment.setdefault("MLFLOW_AUTH_CONFIG_PATH", str(_auth_config(folder)))
    server = subprocess.Popen(command, env=environment)
    children.append(server)

    def stop(*_: object) -> None:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
    try:
        _wait_for_port("127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host, args.port, server, "mlflow server")
        print(f"MLflow tracking server: http://{args.host}:{args.port}  (backend {mask_secrets(backend)}, "
              f"artifacts {folder / 'artifacts'}); log to it with MLFLOW_TRACKING_URI=http://{args.host}:{args.port}", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
