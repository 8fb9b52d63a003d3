"""`python -m fashioncnn.register SOURCE`: put the best run's model in the MLflow Model Registry as `champion`.

    python -m fashioncnn.register fashioncnn                      # the best run of the experiment
    python -m fashioncnn.register <sweep id | parent run id> --name fashion-classifier --metric mean_test_acc

SOURCE is an experiment name, a sweep id or a (parent) run id, as for fashioncnn.results.report (fashioncnn.tracking.queries).
Candidates are its FINISHED job runs that neither diverged (`diverged=true`) nor were pruned
(`pruned=true`) and have the metric; the best by --metric (highest first; losses and times lowest
first) has its logged model (fashioncnn.serving.flavor) registered as a new version of NAME (default: the run's
experiment), which gets the alias `champion` and the tags sweep_id, source_run_id, model_name,
metric and metric_value. Load it with `mlflow.pyfunc.load_model("models:/NAME@champion")` or
`python -m fashioncnn.predict models:/NAME@champion image.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from fashioncnn.tracking.queries import (
    DEFAULT_METRIC,
    SWEEP_TAG,
    ConfigScore,
    ResultsError,
    check_metric,
    mask,
    metric,
    rank_configurations,
    resolve_metric,
    select,
    selectable,
    tracking_uri,
)

ALIAS = "champion"


def best_configuration(runs: list[Run], metric_name: str, where: str) -> ConfigScore:
    """The best configuration (by the mean of its seeds' metric) among the FINISHED, not diverged, not pruned
    runs, its runs best first (ResultsError when there is none)."""
    candidates = selectable(runs, where)
    check_metric(candidates, metric_name, where)
    return rank_configurations(candidates, metric_name)[0]


def best_run(runs: list[Run], metric_name: str, where: str) -> Run:
    """The best run of the best configuration."""
    return best_configuration(runs, metric_name, where).runs[0]


def register(client: MlflowClient, source: str, name: str | None = None, metric_name: str = DEFAULT_METRIC) -> str:
    """Register the best run of SOURCE as a version of NAME with alias champion; return the summary line.

    A version of NAME that already holds the same model is reused (its tags updated), so running the
    command again does not pile up identical versions.
    """
    selection = select(client, source)
    metric_name = resolve_metric([r for r in selection.runs if r.info.status == "FINISHED"], metric_name)
    seeds = best_configuration(selection.runs, metric_name, selection.description)
    run = seeds.runs[0]
    from fashioncnn.serving.flavor import model_uri_of_run

    run_id = run.info.run_id
    model_uri = model_uri_of_run(client, run_id)
    name = name or client.get_experiment(run.info.experiment_id).name
    value = metric(run, metric_name)
    model_name = run.data.tags.get("model_name", run.info.run_name or "")
    tags = {"source_run_id": run_id, "model_name": model_name, "metric": metric_name, "metric_value": repr(value)}
    if seeds.n > 1:  # the configuration's standing over its seeds, as it was ranked
        tags |= {"config_mean": repr(seeds.mean), "config_std": repr(seeds.std), "config_n": str(seeds.n)}
    if SWEEP_TAG in run.data.tags:
        tags[SWEEP_TAG] = run.data.tags[SWEEP_TAG]
    if model_uri.startswith("models:/"):  # an MLflow 3 LoggedModel: the version points at it
        source_uri, model_id = model_uri, model_uri[len("models:/"):]
    else:  # runs:/<id>/model, a pre-MLflow 3 model: the registry wants where its files are
        source_uri, model_id = f"{run.info.artifact_uri}/{model_uri.split('/', 2)[2]}", None
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    same = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == name and v.source == source_uri]
    if same:
        version = max(same, key=lambda v: int(v.version))
        for key, text in tags.items():
            client.set_model_version_tag(name, version.version, key, text)
    else:
        # A local (sqlite) registry looks a models:/ source up in mlflow's global store, not the client's
        # (a TODO in MLflow's SqlAlchemyStore); without this it fails, or finds the model in another store.
        mlflow.set_tracking_uri(client.tracking_uri)
        version = client.create_model_version(name, source_uri, run_id=run_id, tags=tags, model_id=model_id)
        if model_id:  # as mlflow.register_model does: the logged model's page lists its registered versions
            linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
            if not any(v.get("name") == name and str(v.get("version")) == str(version.version) for v in linked):
                linked.append({"name": name, "version": version.version})  # a tracking server has done it already
                client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})
    client.set_registered_model_alias(name, ALIAS, version.version)
    over_seeds = f" (its configuration: mean {seeds.text()})" if seeds.n > 1 else ""
    return (f"registered {name} version {version.version} (alias {ALIAS}): {model_name} run {run_id}, "
            f"{metric_name}={value:.4f}{over_seeds}  models:/{name}@{ALIAS}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fashioncnn.register",
        description="Register the best finished run's logged model in the MLflow Model Registry, with alias champion.",
        epilog="example: python -m fashioncnn.register fashioncnn   (then: python -m fashioncnn.predict "
               "models:/fashioncnn@champion shirt.png)")
    parser.add_argument("source", metavar="SOURCE", help="experiment name, sweep id or (parent) run id")
    parser.add_argument("--name", help="registered model name (default: the best run's experiment)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="what ranks the runs (default: %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)")
    args = parser.parse_args(argv)
    # Against a tracking server, creating a version logs "Waiting up to 300 seconds..." (it is ready at once).
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)
    try:
        client = MlflowClient(tracking_uri(args.tracking_uri))
        print(register(client, args.source, args.name, args.metric))
    except (ResultsError, MlflowException) as error:
        message = mask(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
