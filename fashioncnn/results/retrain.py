"""`python -m fashioncnn.retrain SOURCE [OVERRIDES...]`: retrain the best runs of a sweep with new settings.

    python -m fashioncnn.retrain study-step3-channels --top 4 epochs=30 experiment=study-step3-retrain30
    python -m fashioncnn.retrain <sweep id | parent run id> --metric mean_test_acc --top 2 lr=0.005,0.0005

SOURCE is an experiment name, a sweep id or a sweep's parent run id (see fashioncnn.tracking.queries). The top --top
FINISHED runs by --metric (not those tagged diverged=true) are retrained as ONE sweep,
`python -m fashioncnn -m ...`, with each run's exact config and the OVERRIDES on top (a sweep in
the overrides multiplies: every pick with every value).

How a config is replayed: each picked run becomes an option of a config group `retrained_from`,
written to a temporary directory on Hydra's search path (`hydra.searchpath`), and the sweep is
`+retrained_from='<run id>','<run id>',...`. An option holds the run's config group choices (conv,
lin, channels, lr, from its group.* tags) as defaults-list overrides, and every value of its
config.yaml artifact that changes what a run learns (config.not_learned_keys: where it logged, on which
device, how fast, stay this machine's; the experiment defaults to `<experiment>-retrain`). Values the group choices set are left to the groups, so `lr=0.001` on the
command line changes the learning rate as it does anywhere else. Each new run is tagged
`retrained_from=<run id>` (and `group.retrained_from`), and `hydra.overrides` shows the pick.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from fashioncnn.core import sources
from fashioncnn.core.config import LEGACY_SPEED_KEYS, lower_is_better, not_learned_keys
from fashioncnn.sweep import overrides as ov
from fashioncnn.tracking.queries import (
    DEFAULT_METRIC,
    ResultsError,
    check_metric,
    configuration,
    mask,
    metric,
    param_value,
    rank_configurations,
    resolve_metric,
    select,
    selectable,
    tracking_uri,
)
from fashioncnn.tracking.record import flatten

GROUP = "retrained_from"
# Where and how fast the run went is this machine's business (runs before 0.2 had the speed keys at the top);
# how it was judged (select_metric, with val_size) and what it kept are part of the run's protocol.
NOT_CARRIED = {*not_learned_keys(), *LEGACY_SPEED_KEYS} - {"select_metric", "log_model", "system_metrics"}


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def pick(runs: list[Any], metric_name: str, top: int, lowest_first: bool | None, where: str) -> tuple[list[Any], list[Any]]:
    """The best run of each of the best `top` configurations (by the mean of their seeds) among the finished,
    non-diverged, non-pruned runs; (picked, candidates)."""
    if top < 1:
        raise ResultsError(f"--top {top}: must be at least 1")
    if not runs:
        raise ResultsError(f"{where}: no runs (an empty sweep)")
    candidates = selectable(runs, where)
    check_metric(candidates, metric_name, where)
    configs = rank_configurations(candidates, metric_name, lowest_first)
    # A configuration that ran with several seeds is judged by their mean; its best seed's run is replayed.
    return [config.runs[0] for config in configs[:top]], candidates


def run_config(client: Any, run: Any, scratch: Path) -> dict[str, Any]:
    """The run's resolved config: its config.yaml artifact, else its params."""
    import yaml

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        path = client.download_artifacts(run.info.run_id, "config.yaml", str(scratch))
        with open(path) as handle:
            return dict(flatten(yaml.safe_load(handle)))
    except Exception:  # no artifact (a run from elsewhere): the params hold the same flattened config
        return {key: param_value(value) for key, value in run.data.params.items() if key != "param_count"}


class GroupChoices:
    """The primary config's groups (conv, lin, channels, lr) and which keys each one sets."""

    def __init__(self) -> None:
        from hydra import compose, initialize_config_module
        from hydra.core.global_hydra import GlobalHydra
        from omegaconf import OmegaConf

        from fashioncnn.core.config import register_schema
        from fashioncnn.sweep.preflight import CONFIG_MODULE, CONFIG_NAME

        register_schema()
        self._compose = lambda overrides: dict(flatten(OmegaConf.to_container(
            compose(CONFIG_NAME, overrides=overrides), resolve=True, enum_to_str=True)))
        self._context = initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3")
        self._context.__enter__()
        base = compose(CONFIG_NAME, return_hydra_config=True)
        # conv first; a group of keys that are not carried (prune: how far a run went) is not replayed either
        self.groups = [g for g in reversed(list(base.hydra.runtime.choices)) if not g.startswith("hydra") and g not in NOT_CARRIED]
        loader = GlobalHydra.instance().config_loader()
        self.owned: set[str] = set()
        self.options = {group: loader.get_group_options(group) for group in self.groups}
        for group in self.groups:
            flats = [self._compose([ov.group_override(group, [option])]) for option in self.options[group]]
            self.owned |= {key for key in flats[0] if len({repr(f.get(key)) for f in flats}) > 1}

    def close(self) -> None:
        self._context.__exit__(None, None, None)

    def option_file(self, run: Any, config: dict[str, Any], note: str) -> str:
        """The `retrained_from` option that replays this run's config."""
        from omegaconf import OmegaConf

        choices = {g: run.data.tags[f"group.{g}"] for g in self.groups if f"group.{g}" in run.data.tags}
        for group in set(ov.COMPONENT_GROUPS) & set(self.groups) - set(choices):  # a run from before the group existed
            if str(config.get(f"{group}.name")) in self.options[group]:
                choices[group] = str(config[f"{group}.name"])
        try:
            from_groups = self._compose([ov.group_override(g, [o]) for g, o in choices.items()])
        except Exception as error:
            raise ResultsError(f"run {run.info.run_id}: its config group choices {choices} no longer compose: "
                               f"{str(error).splitlines()[0]}") from error
        body = {key: value for key, value in config.items()
                if key.split(".", 1)[0] not in NOT_CARRIED and not (key in self.owned and from_groups.get(key) == value)}
        lines = ["# @package _global_", f"# Written by fashioncnn.results.retrain: {note}", "defaults:"]
        lines += [f'  - override /{group}: "{option}"' for group, option in choices.items()]
        return "\n".join(lines if choices else lines[:-1]) + "\n" + OmegaConf.to_yaml(OmegaConf.create(_nest(body)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fashioncnn.retrain",
        description="Retrain the top-k finished runs of a sweep, each with its exact config plus new overrides, as one sweep.",
        epilog="example: python -m fashioncnn.retrain fashioncnn --top 3 epochs=30 seed=0,1,2 experiment=fashioncnn-30ep")
    parser.add_argument("source", metavar="SOURCE", help="experiment name, sweep id or parent run id")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="e.g. epochs=30 lr=0.001 experiment=NAME")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="what ranks the runs (default: %(default)s)")
    parser.add_argument("--top", type=int, default=4, help="how many runs to retrain (default: %(default)s)")
    parser.add_argument("--order", choices=("auto", "max", "min"), default="auto",
                        help="best is the highest (max) or lowest (min) value; auto: lowest for *loss and *seconds")
    parser.add_argument("--tracking-uri", help="MLflow store to read and write (default: $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)")
    parser.add_argument("--dry-run", action="store_true", help="show the picks, their configs and the command; train nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    lowest_first = {"auto": None, "max": False, "min": True}[args.order]
    try:
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(args.tracking_uri)
        client = MlflowClient(uri)
        selection = select(client, args.source)
        args.metric = resolve_metric([r for r in selection.runs if r.info.status == "FINISHED"], args.metric)
        picked, candidates = pick(selection.runs, args.metric, args.top, lowest_first, selection.description)
        with tempfile.TemporaryDirectory(prefix="fashioncnn-retrain-") as scratch:
            folder = Path(scratch) / GROUP
            folder.mkdir()
            choices = GroupChoices()
            try:
                for run in picked:
                    note = (f"the config of MLflow run {run.info.run_id} ({run.data.tags.get('model_name', run.info.run_name)}, "
                            f"{selection.description}, {args.metric}={metric(run, args.metric):.4f})")
                    text = choices.option_file(run, run_config(client, run, Path(scratch)), note)
                    (folder / f"{run.info.run_id}.yaml").write_text(text)
            finally:
                choices.close()
            experiment = client.get_experiment(picked[0].info.experiment_id).name
            command = [sys.executable, "-m", "fashioncnn", "-m",
                       *sources.with_search_path([ov.group_override(f"+{GROUP}", [run.info.run_id for run in picked])],
                                                 [Path(scratch).resolve()])]
            if not any(o.lstrip("+~").split("=", 1)[0] == "experiment" for o in args.overrides):
                command.append(f"experiment={experiment}-retrain")
            command += args.overrides
            _say_picks(args, picked, candidates, selection.description, uri, lowest_first)
            print("$ python " + " ".join(command[1:]).replace(str(Path(scratch).resolve()), "<the picked configs>"))
            if args.dry_run:
                for run in picked:
                    print(f"--- {GROUP}/{run.info.run_id}.yaml\n{(folder / f'{run.info.run_id}.yaml').read_text()}", end="")
                return 0
            sys.stdout.flush()
            return subprocess.run(command, env={**os.environ, "MLFLOW_TRACKING_URI": uri}).returncode
    except ResultsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _say_picks(args: argparse.Namespace, picked: list[Any], candidates: list[Any], where: str, uri: str,
               lowest_first: bool | None) -> None:
    """Which runs are retrained, ranked, with their metric (a configuration's mean over its seeds)."""
    order = "lowest" if (lower_is_better(args.metric) if lowest_first is None else lowest_first) else "highest"
    more = f" (only {len(candidates)} finished)" if args.top > len(candidates) else ""
    print(f"Retraining the top {len(picked)}{more} of {len(candidates)} finished runs of {where} "
          f"by {args.metric} ({order} first), store {mask(uri)}:")
    scores = {configuration(c.runs[0]): c for c in rank_configurations(candidates, args.metric, lowest_first)}
    for index, run in enumerate(picked, 1):
        score = scores[configuration(run)]
        value = f"mean {score.text()}" if score.n > 1 else f"{metric(run, args.metric):.4f}"
        print(f"  {index}. {run.data.tags.get('model_name', run.info.run_name):<14} {args.metric}={value}  "
              f"run {run.info.run_id}  {run.data.tags.get('hydra.overrides', '')}")


if __name__ == "__main__":
    sys.exit(main())
