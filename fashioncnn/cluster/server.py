"""A shared MLflow tracking server: PostgreSQL for a team, sqlite for one person.

    python -m fashioncnn.server --backend postgres --dir server --port 5000

starts (first creating, when missing) a PostgreSQL cluster of its own in DIR/postgres, listening on
127.0.0.1 only, with a database `mlflow`; then `mlflow server` on HOST:PORT with that database and
artifacts in DIR/artifacts served through the server (--artifacts-destination), so clients need no
access to the server's disk. Both stop together on Ctrl-C or SIGTERM. Sweeps log to it with
MLFLOW_TRACKING_URI=http://HOST:PORT. `--auth` turns on MLflow's basic authentication (an admin
password is generated into DIR/basic_auth.ini; clients set MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD).

Closed to the other users of the host (a login node has many): everything the server writes is its
user's alone (umask 077; DIR itself lets only PostgreSQL's user through when root runs it), the database
takes a password (scram-sha-256, generated into DIR/postgres_password, mode 600, never printed), and a
folder made before these rules is tightened when the server starts, with a line saying so. It binds to
127.0.0.1 unless --host says otherwise, and refuses any other address without --auth (or the explicit
--insecure-no-auth), before anything listens.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from fashioncnn.cluster.postgres import SERVER_FILE, close_folder, secret, start_postgres
from fashioncnn.tracking.secrets import mask_secrets
from fashioncnn.tracking.stores import Store


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


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def _web_security(host: str, port: int) -> list[str]:
    """MLflow's own guards against DNS rebinding and cross-site requests, fitted to the address served: the Host
    headers a browser may send, and the origins its pages may call from. For 0.0.0.0 (every interface) MLflow's
    defaults stay: localhost and the private networks' addresses."""
    if host in ("0.0.0.0", "::"):
        return []
    names = ["localhost", "127.0.0.1", *([] if _loopback(host) else [host])]
    hosts = ",".join(f"{name}{suffix}" for name in names for suffix in ("", f":{port}"))
    origins = ",".join(f"http://{name}:{port}" for name in names)
    return ["--allowed-hosts", hosts, "--cors-allowed-origins", origins]


def add_user(argv: list[str]) -> int:
    """`python -m fashioncnn.server user add NAME`: a teammate's account on a running --auth server, through MLflow's
    REST API as its admin; the password is generated and shown once."""
    import configparser

    parser = argparse.ArgumentParser(prog="python -m fashioncnn.server user add",
                                     description="Create a user of a running server started with --auth; prints the password once.",
                                     epilog="example: python -m fashioncnn.server user add alice --dir server --port 5000")
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--dir", type=Path, default=Path("server"), help="the server's folder (its admin password is there)")
    parser.add_argument("--port", type=int, default=5000, help="the server's port on this machine (default 5000)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", args.name):
        parser.exit(2, f"error: user name {args.name!r}: letters, digits and _ . @ - only (at most 64, starting with a letter or digit)\n")
    ini = args.dir / "basic_auth.ini"
    if not ini.exists():
        parser.exit(2, f"error: {ini} not found: user add needs the folder of a server started with --auth (--dir)\n")
    config = configparser.ConfigParser()
    config.read(ini)
    admin = config["mlflow"]
    password = secrets.token_urlsafe(12)
    request = urllib.request.Request(
        f"http://127.0.0.1:{args.port}/api/2.0/mlflow/users/create", method="POST",
        data=json.dumps({"username": args.name, "password": password}).encode(), headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(f"{admin['admin_username']}:{admin['admin_password']}".encode()).decode()})
    try:
        urllib.request.urlopen(request, timeout=30).read()
    except urllib.error.HTTPError as error:
        detail = json.loads(error.read() or b"{}").get("message", error.reason)
        parser.exit(1, f"error: user {args.name}: the server refused ({error.code}: {detail})\n")
    except OSError as error:
        parser.exit(1, f"error: no server answers on 127.0.0.1:{args.port} ({error}); start it with python -m fashioncnn.server --auth\n")
    print(f"user {args.name} created; password: {password}\n(shown once: hand it to {args.name}, who sets "
          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; teammates can read their runs, not change or delete them)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fashioncnn.server", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python -m fashioncnn.server --backend postgres --dir server --auth\n"
                                            "         (then: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000)\n\n"
                                            "users (with --auth): python -m fashioncnn.server user add NAME --dir DIR\n"
                                            "backup:  python -m fashioncnn.server backup FILE --dir DIR   (while it runs)\n"
                                            "restore: python -m fashioncnn.server restore FILE --dir NEWDIR")
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--backend-uri", help="an existing database instead (e.g. postgresql://user:pass@db/mlflow)")
    parser.add_argument("--dir", type=Path, default=Path("server"), help="database and artifacts live here (default ./server)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--postgres-port", type=int, default=5433)
    parser.add_argument("--workers", type=int, default=4,
                        help="server processes answering requests (default 4, MLflow's; each holds about 250 MB)")
    parser.add_argument("--auth", action="store_true", help="MLflow's basic authentication (admin user and password: docs/team.md)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="serve an address other than loopback without --auth: anyone who reaches it can read, write and delete")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["user", "add"]:
        return add_user(argv[2:])
    if argv[:1] in (["backup"], ["restore"]):
        from fashioncnn.cluster import backup

        return backup.main(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if not _loopback(args.host) and not args.auth and not args.insecure_no_auth:
        parser.exit(2, f"error: --host {args.host}: other machines could reach the server, and without --auth anyone could read, "
                       "change and delete every run; add --auth (or --insecure-no-auth to do it anyway)\n")
    os.umask(0o077)  # the database, the users' passwords and every logged model: this user's alone
    folder = args.dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    close_folder(folder, postgres=args.backend == "postgres" and not args.backend_uri)
    children: list[subprocess.Popen] = []
    if args.backend_uri:
        backend = args.backend_uri
    elif args.backend == "postgres":
        database, backend = start_postgres(folder, args.postgres_port)
        children.append(database)
    else:
        backend = f"sqlite:///{folder / 'mlflow.db'}"
    # What backup needs to find the running server's database.
    (folder / SERVER_FILE).write_text(json.dumps({"backend": "uri" if args.backend_uri else args.backend,
                                                  "postgres_port": args.postgres_port, "port": args.port}) + "\n")
    server = subprocess.Popen(_mlflow_command(args, backend, folder), env=_environment(args, folder))
    children.append(server)
    return _serve(args, server, children, backend, folder)


def _mlflow_command(args: argparse.Namespace, backend: str, folder: Path) -> list[str]:
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
               str(folder / "artifacts"), "--host", args.host, "--port", str(args.port), "--workers", str(args.workers),
               *_web_security(args.host, args.port)]
    return command + (["--app-name", "basic-auth"] if args.auth else [])


def _environment(args: argparse.Namespace, folder: Path) -> dict[str, str]:
    environment = dict(os.environ)
    # MLflow's job runner (GenAI scorers, prompt optimisation) starts seven worker processes that import
    # MLflow: 1.5 GB and 15 s of CPU at start that a team's sweeps never use. A team that wants them sets it.
    environment.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if args.auth:
        # The auth app's CSRF protection needs a key that survives restarts: made once, kept private in DIR.
        if "MLFLOW_FLASK_SERVER_SECRET_KEY" not in environment:
            environment["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secret(folder / "flask_secret_key")
        environment.setdefault("MLFLOW_AUTH_CONFIG_PATH", str(_auth_config(folder)))
    return environment


def _wait_for_answer(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    """The port opens before MLflow's workers have loaded: the URL is announced once a worker answers, as a
    client would ask (tracking.stores: /health, and a refusal such as 401 under --auth is an answer too)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            Store(url).check_reachable()
            return
        except OSError:
            pass
        if server.poll() is not None:
            sys.exit(f"error: mlflow server exited with code {server.returncode}")
        if time.monotonic() > deadline:
            sys.exit(f"error: mlflow server did not answer {url} within {timeout:.0f} s")
        time.sleep(0.3)


def _serve(args: argparse.Namespace, server: subprocess.Popen, children: list[subprocess.Popen], backend: str, folder: Path) -> int:
    """Wait for the server to listen and say where; stop every child together on Ctrl-C or SIGTERM."""
    def stop(*_: object) -> None:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()

    # SIGTERM unwinds to the `finally` below: stopping from inside the handler would wait on children while the
    # interrupted server.wait() holds their lock, and sit out the whole 30 s timeout.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        reachable = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        _wait_for_answer(f"http://{reachable}:{args.port}", server)
        print(f"MLflow tracking server: http://{args.host}:{args.port}  (backend {mask_secrets(backend)}, "
              f"artifacts {folder / 'artifacts'}); log to it with MLFLOW_TRACKING_URI=http://{args.host}:{args.port}", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
