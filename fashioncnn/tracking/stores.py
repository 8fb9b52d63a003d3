"""Where runs go: the tracking store a config or command names, opened once per process and never raced.

Default store: sqlite at ./mlruns/mlflow.db with artifacts in ./mlruns/artifacts. MLflow 3 refuses a
plain file store without MLFLOW_ALLOW_FILE_STORE, and sqlite is what the MLflow UI and server read
fastest. Each process talks to a store through one `Store` object (`store(uri)`), which looks each
experiment up once. Only the launching process creates the store and its experiments, before any job
starts, and a new sqlite store is built aside and linked into place (`open_sqlite_store`: two processes
creating one at the same moment break it); planning and `--dry-run` only read, and never create a
store that does not exist yet.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from fashioncnn.tracking.names import FINGERPRINT_TAG
from fashioncnn.tracking.secrets import mask_secrets, without_credentials

if TYPE_CHECKING:  # MLflow loads when a store is first used: planning a bad command never waits for it
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


DEFAULT_STORE_DIR = Path("mlruns")


def default_tracking_uri() -> str:
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cfg: DictConfig | None = None, requested: str | None = None) -> str:
    """The config key (or `requested`) wins, then $MLFLOW_TRACKING_URI, then the local store in ./mlruns."""
    chosen = requested or (cfg.tracking_uri if cfg is not None else None)
    return chosen or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


class Store:
    """One tracking store as this process sees it: one client, and each experiment looked up once."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client: MlflowClient | None = None
        self._experiment_ids: dict[str, str] = {}

    @property
    def client(self) -> MlflowClient:
        # Made on first use: a client of a sqlite URI creates the database file and its tables.
        if self._client is None:
            path = sqlite_path(self.uri)
            from mlflow.tracking import MlflowClient

            self._client = open_sqlite_store(path) if path is not None else MlflowClient(self.uri)
        return self._client

    def exists(self) -> bool:
        """False for a local sqlite store not created yet: reading it would create it."""
        path = sqlite_path(self.uri)
        return path is None or path.exists()

    def check_reachable(self, timeout: float = 5.0) -> None:
        """For a tracking server: one request with a short timeout, so a wrong address fails in seconds
        (MLflow's own client retries for minutes). Raises OSError with the reason."""
        if not self.uri.startswith(("http://", "https://")):
            return
        import urllib.error
        import urllib.request


        address = without_credentials(self.uri)  # urllib would take user:password@ for the host
        try:
            urllib.request.urlopen(f"{address}/health", timeout=timeout)
        except urllib.error.HTTPError:
            return  # it answered (a proxy or an auth layer may refuse /health): reachable
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise OSError(f"no answer within {timeout:g} s ({reason})") from error

    def unanswered(self, error: OSError) -> str:
        """What a companion command says when check_reachable failed."""
        return (f"tracking server {mask_secrets(self.uri)}: {error}; start it (make server), or name another store "
                "with --tracking-uri or MLFLOW_TRACKING_URI")

    def experiment_id(self, name: str, create: bool = False) -> str | None:
        """The experiment's id; with `create`, the store and experiment are made when missing."""
        from mlflow.exceptions import MlflowException

        if name in self._experiment_ids:
            return self._experiment_ids[name]
        if not create and not self.exists():
            return None
        path = sqlite_path(self.uri)
        if create and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        found = self.client.get_experiment_by_name(name)
        if found is None and not create:
            return None
        if found is None:
            # Beside a local store's database (./mlruns/artifacts for the default one): MLflow's own default
            # is ./mlruns under whatever folder the command runs in, shared by every store used from there.
            artifact_location = None if path is None else (path.parent / "artifacts").resolve().as_uri()
            try:
                self._experiment_ids[name] = self.client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:
                # Another process created it between our look-up and create; use theirs.
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found is not None:
            self._experiment_ids[name] = found.experiment_id
        return self._experiment_ids[name]

    def find_runs(self, experiment_id: str, filter_string: str = "") -> list[Run]:
        """Every active run that matches, newest first, all pages."""
        return search_all(self.client, [experiment_id], filter_string, order_by=["attributes.start_time DESC"])

    def runs_by_fingerprint(self, experiment_id: str) -> dict[str, list[Run]]:
        """The experiment's job runs grouped by the fingerprint of their effective config, newest first."""
        grouped: dict[str, list[Run]] = {}
        for run in self.find_runs(experiment_id, f"tags.{FINGERPRINT_TAG} LIKE '%'"):
            if FINGERPRINT_TAG in run.data.tags:
                grouped.setdefault(run.data.tags[FINGERPRINT_TAG], []).append(run)
        return grouped


def open_sqlite_store(path: Path, attempts: int = 40, pause: float = 0.5) -> MlflowClient:
    """A client of the sqlite store at `path`, never racing another process that creates it.

    Two processes that create the same new database at once run MLflow's schema migrations over each other
    ("table ... already exists", or a database left with no schema version: broken for good). So a new
    store is built under a private name and linked into place only if no file is there yet; a file that
    another process is still writing is given time to settle, and opening it is retried."""
    from mlflow.tracking import MlflowClient

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        private = path.with_name(f".{path.name}.creating-{os.getpid()}")
        private.unlink(missing_ok=True)
        builder = MlflowClient(f"sqlite:///{private}")
        builder._tracking_client.store.engine.dispose()  # noqa: SLF001  (MLflow makes the tables on first access)
        try:
            os.link(private, path)  # atomic, and refuses when another process's file is already there
        except FileExistsError:
            pass
        finally:
            private.unlink(missing_ok=True)
    for attempt in range(attempts):
        if not _schema_complete(path) and attempt < attempts - 1:  # another process is still making its tables
            time.sleep(pause)
            continue
        try:
            return MlflowClient(f"sqlite:///{path}")  # opens the store (and makes its tables when there are none)
        except Exception as error:  # sqlalchemy's OperationalError or MLflow's schema check, depending on the moment
            if attempt == attempts - 1:
                raise
            log.debug("sqlite store %s being created by another process (%s); retrying", path, str(error).splitlines()[0])
            time.sleep(pause)
    raise AssertionError("unreachable")


def _schema_complete(path: Path) -> bool:
    """Whether the sqlite database at `path` has MLflow's schema at its latest version (read-only look)."""
    import sqlite3

    from mlflow.store.db.utils import _get_latest_schema_revision

    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5) as connection:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return False
    return row is not None and row[0] == _get_latest_schema_revision()


def wait_for_store(uri: str, seconds: float, pause: float) -> None:
    """For a tracking server: wait up to `seconds` for it to answer (a job starting during an outage);
    raises OSError with the reason when it does not."""
    deadline = time.monotonic() + seconds
    for attempt in itertools.count():
        try:
            store(uri).check_reachable()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            if attempt == 0:
                log.warning("tracking server %s not answering; waiting for it (up to %g s)", mask_secrets(uri), seconds)
            time.sleep(pause)

_stores: dict[str, Store] = {}


def store(uri: str) -> Store:
    """This process's Store for `uri`, created on first use."""
    if uri not in _stores:
        _stores[uri] = Store(uri)
    return _stores[uri]


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str = "",
               order_by: list[str] | None = None) -> list[Run]:
    """Every active run of the experiments that matches, all pages."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, ViewType.ACTIVE_ONLY, max_results=1000, order_by=order_by,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs
