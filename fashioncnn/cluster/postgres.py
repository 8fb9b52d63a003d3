"""The server folder's PostgreSQL cluster and files: made, started and kept closed to the host's other users.

Used by the server (fashioncnn.cluster.server) and its backup and restore (fashioncnn.cluster.backup).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DATABASE = "mlflow"
PASSWORD_FILE = "postgres_password"
SERVER_FILE = "server.json"  # how the server in this folder was started (its backend and ports), for backup


def postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        sys.exit(f"error: PostgreSQL's {name} not found; install it (Debian/Ubuntu: apt-get install postgresql)")
    return found


def as_postgres_user() -> list[str]:
    # PostgreSQL refuses to run as root; root runs it as the `postgres` user Debian's package creates.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def wait_for_port(host: str, port: int, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
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


def secret(path: Path) -> str:
    """A password kept in `path` (mode 600), made on first use."""
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24))
    return path.read_text().strip()


def _psql(port: int, password: str, sql: str) -> subprocess.CompletedProcess:
    return subprocess.run([postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres", "-tAc", sql],
                          capture_output=True, text=True, env={**os.environ, "PGPASSWORD": password})


def start_postgres(folder: Path, port: int) -> tuple[subprocess.Popen, str]:
    """Start PostgreSQL on 127.0.0.1:port with its data in `folder`, logins by password only; return the process and
    the database URI (with the password: print it through mask_secrets)."""
    data, runner = folder / "postgres", as_postgres_user()
    password = secret(folder / PASSWORD_FILE)
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        pwfile = data.parent / ".initdb_password"
        pwfile.write_text(password)
        if runner:
            shutil.chown(data, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            subprocess.run([*runner, postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                            f"--pwfile={pwfile}", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL)
        finally:
            pwfile.unlink()
    process = subprocess.Popen(
        [*runner, postgres_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(data)],
        stdout=subprocess.DEVNULL, stderr=open(folder / "postgres.log", "a"),
    )
    wait_for_port("127.0.0.1", port, process, "PostgreSQL")
    for _ in range(50):  # accepting TCP connections comes a moment before accepting logins
        exists = _psql(port, password, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
        if exists.returncode == 0:
            break
        time.sleep(0.2)
    _require_password(data, port, password)
    if exists.stdout.strip() != "1":
        _psql(port, password, f"CREATE DATABASE {DATABASE}").check_returncode()
    return process, f"postgresql://postgres:{password}@127.0.0.1:{port}/{DATABASE}"


def _require_password(data: Path, port: int, password: str) -> None:
    """A cluster made when logins needed no password (trust) gets one, and pg_hba.conf asks for it from now on."""
    hba = data / "pg_hba.conf"
    rules = hba.read_text()
    if not any(line.split()[-1:] == ["trust"] for line in rules.splitlines() if line.strip() and not line.startswith("#")):
        return
    _psql(port, password, f"ALTER USER postgres PASSWORD '{password}'").check_returncode()
    hba.write_text("\n".join(" ".join(line.split()[:-1] + ["scram-sha-256"]) if line.split()[-1:] == ["trust"]
                             and not line.startswith("#") else line for line in rules.splitlines()) + "\n")
    _psql(port, password, "SELECT pg_reload_conf()").check_returncode()
    print(f"tightened {data}: the database took logins without a password; it now needs the one in "
          f"{data.parent / PASSWORD_FILE}", flush=True)


def close_folder(folder: Path, postgres: bool) -> None:
    """The server's folder and everything in it readable by its user alone; with PostgreSQL run as its own user
    (by root), DIR lets that user through to DIR/postgres (mode 710, group postgres) and no one else."""
    loose = [path for path in [folder, *folder.rglob("*")] if not path.is_symlink() and path.stat().st_mode & 0o077]
    for path in loose:
        path.chmod(path.stat().st_mode & 0o700)
    if postgres and as_postgres_user():
        shutil.chown(folder, group="postgres")
        folder.chmod(0o710)
    if loose and any(path != folder for path in loose):
        print(f"tightened {folder}: {len(loose)} files and folders were open to other users of this machine; "
              "they are now its owner's alone", flush=True)
