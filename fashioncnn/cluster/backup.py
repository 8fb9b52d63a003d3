"""Backup and restore of a team server's folder: one file, taken while the server runs.

    python -m fashioncnn.server backup FILE [--dir DIR]
    python -m fashioncnn.server restore FILE --dir NEWDIR [--postgres-port PORT]

The backup is a gzipped tar (mode 600: it holds the users' password hashes and the admin password) of
manifest.json, the tracking database (PostgreSQL: `pg_dump` in its custom format, consistent while the
server writes; sqlite: SQLite's online backup), the users' database and settings of `--auth`, and every
artifact (logged models, checkpoints, reports). The database is dumped before the artifacts are copied,
so every run it names has its files. Restore makes a new server folder from it (a fresh PostgreSQL
cluster with a password of its own, `pg_restore` into it), and refuses a folder that exists and is not
empty; then `python -m fashioncnn.server --dir NEWDIR` serves the same runs, metrics and models.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from fashioncnn.cluster.postgres import PASSWORD_FILE, SERVER_FILE, close_folder, postgres_bin, secret, start_postgres

FORMAT = 1


class BackupError(Exception):
    """What stops a backup or restore, in one line; `code` 2 for a request that cannot work, 1 for a failure."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


AUTH_FILES = ("basic_auth.ini", "flask_secret_key")


def backup(folder: Path, target: Path) -> dict[str, object]:
    """Write the backup of the server in `folder` to `target`; returns the manifest."""
    settings = _settings(folder)
    started = time.monotonic()
    os.umask(0o077)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        database = _dump(folder, settings, work)
        manifest = {"format": FORMAT, "backend": settings["backend"], "database": database.name,
                    "made": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        partial = target.with_name(target.name + ".partial")
        with tarfile.open(partial, "w:gz") as archive:
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            archive.add(database, database.name)
            if (folder / "basic_auth.db").exists():
                archive.add(_sqlite_copy(folder / "basic_auth.db", work / "basic_auth.db"), "basic_auth.db")
            for name in AUTH_FILES:
                if (folder / name).exists():
                    archive.add(folder / name, name)
            if (folder / "artifacts").exists():
                archive.add(folder / "artifacts", "artifacts")
        partial.replace(target)  # a backup cut short never looks like a whole one
    manifest["seconds"] = round(time.monotonic() - started, 2)
    return manifest


def _settings(folder: Path) -> dict[str, object]:
    path = folder / SERVER_FILE
    if not path.exists():
        raise BackupError(f"{folder}: no {SERVER_FILE}; backup needs the folder of a server started by "
                         "python -m fashioncnn.server (--dir)")
    settings = json.loads(path.read_text())
    if settings["backend"] == "uri":
        raise BackupError("this server uses a database of its own (--backend-uri): back that database up with its own tools")
    return settings


def _dump(folder: Path, settings: dict[str, object], work: Path) -> Path:
    if settings["backend"] == "sqlite":
        return _sqlite_copy(folder / "mlflow.db", work / "mlflow.db")
    dump = work / "mlflow.pgdump"
    password = (folder / PASSWORD_FILE).read_text().strip()
    done = subprocess.run([postgres_bin("pg_dump"), "-h", "127.0.0.1", "-p", str(settings["postgres_port"]), "-U", "postgres",
                           "-Fc", "-f", str(dump), "mlflow"], capture_output=True, text=True, env={**os.environ, "PGPASSWORD": password})
    if done.returncode != 0:
        raise BackupError(f"pg_dump of the server's database failed (is the server in {folder} running?): "
                         f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}", code=1)
    return dump


def _sqlite_copy(source: Path, target: Path) -> Path:
    """A consistent copy of a sqlite database that another process may be writing (SQLite's online backup)."""
    with sqlite3.connect(source) as original, sqlite3.connect(target) as copy:
        original.backup(copy)
    return target


def restore(source: Path, folder: Path, postgres_port: int) -> dict[str, object]:
    """A new server folder from a backup; refuses a folder that exists and is not empty."""
    if folder.exists() and any(folder.iterdir()):
        raise BackupError(f"{folder} exists and is not empty: restore makes a new server folder; give --dir a new one")
    started = time.monotonic()
    os.umask(0o077)
    with tarfile.open(source, "r:gz") as archive:
        manifest = json.loads(archive.extractfile("manifest.json").read())  # type: ignore[union-attr]
        if manifest.get("format") != FORMAT:
            raise BackupError(f"{source}: not a fashioncnn server backup (format {manifest.get('format')})")
        folder.mkdir(parents=True, exist_ok=True)
        archive.extractall(folder, filter="data")
    close_folder(folder, postgres=manifest["backend"] == "postgres")
    (folder / "manifest.json").unlink()
    if (folder / "basic_auth.ini").exists():  # the users' database, where it now lives
        ini = folder / "basic_auth.ini"
        ini.write_text("\n".join(f"database_uri = sqlite:///{folder / 'basic_auth.db'}" if line.startswith("database_uri") else line
                                 for line in ini.read_text().splitlines()) + "\n")
    if manifest["backend"] == "postgres":
        _restore_postgres(folder, folder / manifest["database"], postgres_port)
    (folder / SERVER_FILE).write_text(json.dumps({"backend": manifest["backend"], "postgres_port": postgres_port, "port": 5000}) + "\n")
    manifest["seconds"] = round(time.monotonic() - started, 2)
    return manifest


def _restore_postgres(folder: Path, dump: Path, port: int) -> None:
    """A fresh cluster (its own password) with the dump restored into its `mlflow` database, then stopped."""
    process, _ = start_postgres(folder, port)
    try:
        done = subprocess.run([postgres_bin("pg_restore"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "mlflow",
                               "--no-owner", str(dump)], capture_output=True, text=True,
                              env={**os.environ, "PGPASSWORD": secret(folder / PASSWORD_FILE)})
        if done.returncode != 0:
            raise BackupError(f"pg_restore failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}",
                              code=1)
    finally:
        process.terminate()
        process.wait(timeout=60)
        dump.unlink()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m fashioncnn.server {argv[0]}", description=__doc__.split("\n\n")[0],
                                     epilog="examples: python -m fashioncnn.server backup team.tar.gz --dir server; "
                                            "python -m fashioncnn.server restore team.tar.gz --dir server-restored")
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.add_argument("--dir", type=Path, default=None if argv[0] == "restore" else Path("server"), required=argv[0] == "restore",
                        help="the server's folder (backup: default ./server; restore: a new folder)")
    parser.add_argument("--postgres-port", type=int, default=5433, help="restore: the port the new cluster is started on while restoring")
    args = parser.parse_args(argv[1:])
    try:
        return _run(argv[0], args, parser)
    except BackupError as error:
        parser.exit(error.code, f"error: {error}\n")


def _run(command: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if command == "backup":
        if args.file.exists():
            parser.exit(2, f"error: {args.file} exists: backup writes a new file; remove it or name another\n")
        manifest = backup(args.dir.resolve(), args.file.resolve())
        print(f"backup of {args.dir} ({manifest['backend']}) written to {args.file} in {manifest['seconds']} s "
              "(readable by you only: it holds the users' passwords)")
        return 0
    if not args.file.exists():
        parser.exit(2, f"error: {args.file}: no such backup\n")
    manifest = restore(args.file.resolve(), args.dir.resolve(), args.postgres_port)
    print(f"restored {args.file} (made {manifest['made']}) into {args.dir} in {manifest['seconds']} s; serve it with "
          f"python -m fashioncnn.server --backend {manifest['backend']} --dir {args.dir}")
    return 0
