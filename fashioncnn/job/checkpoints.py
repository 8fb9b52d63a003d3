"""Where a run's per-epoch checkpoint lives until the run finishes, so that a job resumes it on any machine.

- A local store (sqlite, or any non-HTTP URI), or an explicit `checkpoint_dir` (a shared file system):
  one file, `<checkpoint_dir>/<run id>.pt`, rewritten atomically after every epoch.
- A tracking server (`http(s)://`) with the default `checkpoint_dir`: the run's artifact store (the server
  proxies it), under `checkpoint/epoch-NNNN.SIZE.pt`, so a job requeued on another machine downloads it.
  A configured, non-default `checkpoint_dir` wins over the artifact store: it is there to be shared.

An artifact upload is not atomic for a reader (the server writes the file as it arrives), so each epoch
is a new name carrying its size in bytes: a reader takes the newest epoch whose listed size matches its
name, and the previous epoch's file is deleted only after the new one is complete. Uploads run in a
background thread, newest first, so a slow or absent server never holds training up; the local copy in
`<checkpoint_dir>/<run id>/` stays until the run finishes.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Protocol

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from fashioncnn.core import loop
from fashioncnn.core.config import Config
from fashioncnn.tracking import secrets, stores

log = logging.getLogger(__name__)

ARTIFACT_DIR = "checkpoint"
_NAME = re.compile(r"epoch-(\d+)\.(\d+)\.pt")
DEFAULT_DIR = next(f.default for f in fields(Config) if f.name == "checkpoint_dir")


def in_artifacts(cfg: DictConfig) -> bool:
    """Whether this config's checkpoints go to the run's artifact store (see the module's docstring)."""
    return stores.resolve_tracking_uri(cfg).startswith(("http://", "https://")) and cfg.checkpoint_dir == DEFAULT_DIR


def save_atomically(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint, never a torn one."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


class Checkpoints(loop.Checkpoints, Protocol):
    def finish(self, keep: bool, timeout: float) -> None:
        """The run finished: delete its checkpoint, or keep the final one as an artifact (`keep_checkpoint`;
        its upload gets up to `timeout` seconds)."""
        ...


class LocalCheckpoints:
    """One file in a folder of this machine or a shared file system."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def latest(self) -> Path | None:
        return self.path if self.path.exists() else None

    def save(self, epoch: int, state: dict) -> None:
        save_atomically(self.path, state)

    def flush(self, timeout: float) -> bool:
        return True

    def finish(self, keep: bool, timeout: float) -> None:
        if keep and self.path.exists():
            mlflow.log_artifact(str(self.path))
        self.path.unlink(missing_ok=True)


def _complete(entries: list) -> list[tuple[int, str]]:
    """(epoch, name) of the listed checkpoint files whose size matches their name, newest first."""
    found = []
    for entry in entries:
        match = _NAME.fullmatch(Path(entry.path).name)
        if match and not entry.is_dir and entry.file_size == int(match.group(2)):
            found.append((int(match.group(1)), Path(entry.path).name))
    return sorted(found, reverse=True)


def _local_files(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in folder.glob("epoch-*.pt") if (m := _NAME.fullmatch(p.name))
             and p.stat().st_size == int(m.group(2))]
    return sorted(found, reverse=True)


def stored_checkpoint(client: MlflowClient, run_id: str) -> str | None:
    """The name of the run's newest complete checkpoint in its artifacts (one listing), or None."""
    return next((name for _, name in _complete(client.list_artifacts(run_id, ARTIFACT_DIR))), None)


class ArtifactCheckpoints:
    """The run's artifact store, with a local copy; uploads in a background thread, newest first."""

    def __init__(self, client: MlflowClient, run_id: str, cache: Path, retry_seconds: float) -> None:
        self.client, self.run_id, self.cache, self.retry_seconds = client, run_id, cache, retry_seconds
        self._pending: Path | None = None
        self._uploaded: list[str] = []  # names in the artifact store, oldest first
        self._saved = self._stored = 0  # newest epoch saved here, newest epoch complete in the artifact store
        self._changed = threading.Condition()
        self._closing = False
        self._uploading: Path | None = None
        self._failing = False  # warn once per outage
        self._thread: threading.Thread | None = None

    def latest(self) -> Path | None:
        local = _local_files(self.cache)
        listed = _complete(self.client.list_artifacts(self.run_id, ARTIFACT_DIR))
        self._uploaded = [name for _, name in reversed(listed)]
        if listed and (not local or listed[0][0] > local[0][0]):
            epoch, name = listed[0]
            self.cache.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            path = Path(self.client.download_artifacts(self.run_id, f"{ARTIFACT_DIR}/{name}", str(self.cache)))
            log.info("fetched the checkpoint of epoch %d from the run's artifacts (%.1f MB, %.1f s)",
                     epoch, path.stat().st_size / 1e6, time.perf_counter() - started)
            path.replace(self.cache / name)
            self._stored = epoch
            return self.cache / name
        return local[0][1] if local else None

    def save(self, epoch: int, state: dict) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        partial = self.cache / f"epoch-{epoch:04d}.partial"
        save_atomically(partial, state)
        path = self.cache / f"epoch-{epoch:04d}.{partial.stat().st_size}.pt"
        os.replace(partial, path)
        with self._changed:
            stale, self._pending, self._saved = self._pending, path, epoch
            self._changed.notify_all()
        if stale is not None:  # never uploaded: a newer one replaces it
            stale.unlink(missing_ok=True)
        for _, older in _local_files(self.cache)[1:]:
            if older != stale and older != self._uploading:
                older.unlink(missing_ok=True)
        if self._thread is None:
            self._thread = threading.Thread(target=self._upload_loop, name="checkpoint-upload", daemon=True)
            self._thread.start()

    def _upload_loop(self) -> None:
        while True:
            with self._changed:
                while self._pending is None and not self._closing:
                    self._changed.wait()
                if self._pending is None:
                    return
                path, self._pending = self._pending, None
                self._uploading = path
            epoch = int(_NAME.fullmatch(path.name).group(1))
            try:
                started = time.perf_counter()
                self.client.log_artifact(self.run_id, str(path), ARTIFACT_DIR)
                log.debug("checkpoint of epoch %d uploaded in %.2f s", epoch, time.perf_counter() - started)
                for old in self._uploaded:
                    self._delete(old)
                self._uploaded = [path.name]
                self._failing = False
                with self._changed:
                    self._stored = max(self._stored, epoch)
                    self._uploading = None
                    self._changed.notify_all()
            except Exception as error:  # the server is away: keep the file, try again (or a newer one) later
                (log.debug if self._failing else log.warning)(
                    "checkpoint of epoch %d not uploaded yet (%s); retrying every %g s, training goes on", epoch,
                    secrets.mask_secrets(str(error).splitlines()[0] if str(error) else type(error).__name__),
                    self.retry_seconds)
                self._failing = True
                with self._changed:
                    self._uploading = None
                    if self._pending is None:
                        self._pending = path
                    elif path.exists():
                        path.unlink()
                    self._changed.wait(self.retry_seconds)

    def _delete(self, name: str) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            repository = get_artifact_repository(self.client.get_run(self.run_id).info.artifact_uri)
            repository.delete_artifacts(f"{ARTIFACT_DIR}/{name}".rstrip("/"))
        except Exception as error:  # a leftover older checkpoint misleads nobody (readers take the newest)
            log.debug("could not delete the older checkpoint %s: %s", name, error)

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._stored < self._saved:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 1.0))
        return True

    def finish(self, keep: bool, timeout: float) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if keep:
            if not self.flush(timeout):
                log.warning("the final checkpoint was not uploaded within %g s; kept in %s", timeout, self.cache)
                return
        else:
            with self._changed:
                self._pending = None
            if self._thread is not None:
                self._thread.join()
            self._delete("")  # the whole checkpoint folder of the run
        for path in self.cache.glob("epoch-*"):
            path.unlink(missing_ok=True)
        try:
            self.cache.rmdir()
        except OSError:
            pass


def for_run(cfg: DictConfig, run_id: str) -> Checkpoints:
    """The checkpoints of run `run_id`, where this config keeps them."""
    if in_artifacts(cfg):
        return ArtifactCheckpoints(stores.store(stores.resolve_tracking_uri(cfg)).client, run_id,
                                   Path(cfg.checkpoint_dir) / run_id, cfg.tracking.retry_seconds)
    return LocalCheckpoints(Path(cfg.checkpoint_dir) / f"{run_id}.pt")


def exists(cfg: DictConfig, run_id: str) -> bool:
    """Whether run `run_id` left a checkpoint to resume from (the plan asks once per unfinished run)."""
    if not in_artifacts(cfg):
        return (Path(cfg.checkpoint_dir) / f"{run_id}.pt").exists()
    if _local_files(Path(cfg.checkpoint_dir) / run_id):
        return True
    return stored_checkpoint(stores.store(stores.resolve_tracking_uri(cfg)).client, run_id) is not None
