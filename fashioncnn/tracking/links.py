"""Links into the MLflow UI that open in its model-training view: every link fashioncnn prints or writes.

MLflow 3.17's UI has two modes, GenAI and model training. A browser starts in GenAI mode and keeps
that until someone clicks "Model training" in the sidebar, and the experiment tag
`mlflow.experimentKind` does not change it. A plain experiment link therefore opens the GenAI overview
(traces, tokens, "No data") instead of the runs table. The query `workflowType=machine_learning`
overrides the saved mode for that page and does not change the saved setting. MLflow's own in-app
links leave it out, so a click inside the UI can fall back to the browser's saved mode.

    python -m fashioncnn.links [--tracking-uri URI] [--base URL]   # the latest sweep's runs table
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from urllib.parse import quote, urlsplit

from fashioncnn.tracking.secrets import mask_secrets, without_credentials

UI_URL_ENV = "FASHIONCNN_UI_URL"
DEFAULT_UI_URL = "http://127.0.0.1:5000"
MODEL_TRAINING = "workflowType=machine_learning"


def ui_base() -> str:
    """Where the MLflow UI is browsed: $FASHIONCNN_UI_URL, else `make ui`'s default address."""
    return (os.environ.get(UI_URL_ENV) or DEFAULT_UI_URL).rstrip("/")


def ui_base_for(tracking_uri: str | None) -> str:
    """The UI for runs logged to `tracking_uri`. An http(s) tracking server serves its own UI, so its
    address is used, without user:password. $FASHIONCNN_UI_URL still wins, e.g. behind a proxy."""
    parts = urlsplit(tracking_uri or "")
    if os.environ.get(UI_URL_ENV) or parts.scheme not in ("http", "https"):
        return ui_base()
    return without_credentials(tracking_uri or "")


def ui_hint(tracking_uri: str) -> str:
    """How to open the UI on the store in use: `make ui` serves ./mlruns, any other local store needs its URI; a
    tracking server is its own UI (its links say where)."""
    from fashioncnn.tracking.stores import default_tracking_uri

    if urlsplit(tracking_uri).scheme in ("http", "https"):
        return ""
    if tracking_uri == default_tracking_uri():
        return "start the UI with: make ui"
    return f"start the UI with: mlflow ui --backend-store-uri {mask_secrets(tracking_uri)}"


def experiments_url(base: str) -> str:
    """The list of experiments."""
    return f"{base}/#/experiments?{MODEL_TRAINING}"


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table. The /runs tab is named because the bare experiment route redirects
    to a tab chosen from the experiment's kind, and that redirect keeps only a few query parameters."""
    return f"{base}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}"


def sweep_url(base: str, experiment_id: str, sweep_id: str, metric: str = "best_val_acc") -> str:
    """The runs of one sweep, best `metric` first. The runs table nests child runs, collapsed, under
    their parent whenever it is sorted by creation time, and the expanded rows are browser state that a
    URL cannot set. Any other sort order lists the runs flat, so the jobs are visible."""
    search = quote(f"tags.sweep_id = '{sweep_id}' and tags.`fashioncnn.role` = 'job'")  # the parent carries the best too
    order = quote(f"metrics.`{metric}`")
    return f"{experiment_url(base, experiment_id)}&searchFilter={search}&orderByKey={order}&orderByAsc=false"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """A run's page."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING}"


def _store_missing(tracking_uri: str) -> bool:
    """True for a local store that does not exist yet: reading it with MLflow would create it."""
    if tracking_uri.startswith("sqlite:///"):
        return not Path(tracking_uri.removeprefix("sqlite:///")).is_file()
    if "://" not in tracking_uri or tracking_uri.startswith("file:"):
        return not Path(tracking_uri.removeprefix("file://")).exists()
    return False


def latest_sweep_url(tracking_uri: str, base: str) -> str:
    """The runs table of the experiment with the newest sweep (parent run); else of the newest run of
    any experiment; else the list of experiments, which is also the answer when the store is missing."""
    if _store_missing(tracking_uri):
        return experiments_url(base)
    # Imported here: loading MLflow and Hydra takes seconds, and the URL builders need neither.
    from mlflow.tracking import MlflowClient

    from fashioncnn.tracking.names import ROLE_TAG

    client = MlflowClient(tracking_uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    for filter_string in (f"tags.`{ROLE_TAG}` = 'parent'", ""):
        runs = client.search_runs(experiment_ids, filter_string, order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return experiment_url(base, runs[0].info.experiment_id)
    return experiments_url(base)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fashioncnn.links", description="Print the MLflow UI link to the latest sweep's runs.",
                                     epilog="example: python -m fashioncnn.links --tracking-uri http://127.0.0.1:5000")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the local store in ./mlruns")
    parser.add_argument("--base", help="the UI's address; default: the tracking server for an http(s) URI, "
                                       f"else ${UI_URL_ENV}, else {DEFAULT_UI_URL}")
    args = parser.parse_args(argv)
    from fashioncnn.tracking.stores import Store, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(requested=args.tracking_uri)
    store = Store(tracking_uri)
    try:
        store.check_reachable()  # MLflow's client would retry for minutes
    except OSError as error:
        parser.exit(2, f"error: {store.unanswered(error)}\n")
    print(latest_sweep_url(tracking_uri, (args.base or ui_base_for(tracking_uri)).rstrip("/")))


if __name__ == "__main__":
    main()
