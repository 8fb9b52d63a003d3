"""A command's plan: every job composed, validated and decided once, before anything trains.

`plan()` composes and validates each job (preflight.py) and decides what it will do from one read of the
tracking store: skip (a FINISHED run with the same effective config exists), leave alone (another live
process holds its lease), resume (an unfinished run left a checkpoint) or train. Planning only reads;
`--dry-run` prints the plan and stops there.

A job's identity is the fingerprint of its effective config: the resolved config minus the keys the
schema marks as not changing what a run learns (config.not_learned_keys: where it logs, on which
device, how fast).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from fashioncnn.core.config import IMPLIED_BY_NAME, ConfigError, fingerprint_neutral, nested_not_learned_keys, not_learned_keys
from fashioncnn.core.model import run_name
from fashioncnn.job import lease
from fashioncnn.sweep import overrides as ov
from fashioncnn.sweep import preflight
from fashioncnn.tracking import stores
from fashioncnn.tracking.secrets import mask_secrets

if TYPE_CHECKING:
    from mlflow.entities import Run


class StoreError(ConfigError):
    """The tracking store cannot be read or written; one line naming it and why."""


def fingerprint(cfg: DictConfig) -> str:
    content = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(content, dict)
    for key in not_learned_keys():
        content.pop(key, None)
    for node in content.values():  # a component's name says what it builds
        if isinstance(node, dict):
            node.pop("_target_", None)
    for (group, name), implied in IMPLIED_BY_NAME.items():
        node = content.get(group, {})
        if node.get("name") == name:
            for key, value in implied.items():
                if node.get(key) == value:
                    del node[key]
    for key in nested_not_learned_keys():
        parent, leaf = key.split(".")
        content.get(parent, {}).pop(leaf, None)
    for key, neutral in fingerprint_neutral().items():
        *parents, leaf = key.split(".")
        node = content
        for parent in parents:
            node = node.get(parent, {})
        if leaf in node and node[leaf] == neutral:
            del node[leaf]
            if parents and not node:  # a whole node at its defaults: as if it did not exist
                del content[parents[0]]
    from fashioncnn.core.machine import precision_used, resolve_device  # torch: only once a job is fingerprinted

    content["precision"] = precision_used(cfg.precision, resolve_device(cfg.device) if cfg.device == "auto" else None)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PlannedJob:
    index: int
    overrides: list[str]  # as Hydra launches it
    cfg: DictConfig
    fingerprint: str
    model_name: str
    tracking_uri: str
    done: Run | None  # a FINISHED run: the job is not launched
    resume: Run | None  # an unfinished run with a checkpoint: the job resumes it
    elsewhere: Run | None = None  # a RUNNING run whose lease another process holds: the job is not launched

    @property
    def command(self) -> str:
        # Launcher settings (hydra/...) say how a job ran, not what it trained.
        chosen = [o for o in self.overrides if not o.lstrip("+~").startswith("hydra")]
        return mask_secrets(ov.display_all(chosen)) or "(defaults)"

    @property
    def action(self) -> str:
        if self.done is not None:
            return f"skip: already FINISHED as run {self.done.info.run_id}"
        if self.elsewhere is not None:
            age = lease.heartbeat_age(self.elsewhere) or 0.0
            return (f"running elsewhere: run {self.elsewhere.info.run_id} on {lease.where(self.elsewhere)} "
                    f"(heartbeat {age:.0f} s ago); left alone")
        if self.resume is not None:
            return f"resume run {self.resume.info.run_id} from its checkpoint"
        return "train"


@dataclass
class Plan:
    args: list[str]  # the command line as Hydra gets it (group options quoted, team directories on the search path)
    typed: list[str]  # the command line as the user typed it
    multirun: bool
    jobs: list[PlannedJob]

    @property
    def to_run(self) -> list[PlannedJob]:
        return [job for job in self.jobs if job.done is None and job.elsewhere is None]

    def describe(self) -> str:
        lines = [f"#{job.index} {job.model_name:<12} {job.command}: {job.action}" for job in self.jobs]
        skipped = sum(job.done is not None for job in self.jobs)
        resumed = sum(job.resume is not None for job in self.jobs)
        elsewhere = sum(job.elsewhere is not None for job in self.jobs)
        lines.append(f"{len(self.jobs)} jobs: {len(self.jobs) - skipped - resumed - elsewhere} to train, {resumed} to resume, "
                     f"{skipped} already finished" + (f", {elsewhere} running elsewhere" if elsewhere else ""))
        return "\n".join(lines)


def store_error(uri: str, experiment: str, error: Exception) -> StoreError:
    reason = mask_secrets(str(error).splitlines()[0] if str(error) else type(error).__name__)
    return StoreError(f"tracking store {mask_secrets(uri)} (experiment {experiment!r}) cannot be used: {reason}")


def decide(cfg: DictConfig, runs: Sequence[Run]) -> tuple[Run | None, Run | None, Run | None]:
    """What a job does, from its config's runs in the store (newest first): (done, resume, elsewhere).

    done: a FINISHED run (not with force=true): skipped. elsewhere: a RUNNING run whose lease a live
    process holds: left to it. resume: an unfinished run that left a checkpoint. All None: train afresh.
    Grid jobs and search trials are decided here alike.
    """
    from fashioncnn.job import checkpoints

    done = None if cfg.force else next((r for r in runs if r.info.status == "FINISHED"), None)
    # A run whose process still renews its heartbeat is left to it; one listing per other unfinished run.
    elsewhere = None if done else next((r for r in runs if lease.held_elsewhere(r, cfg.lease.seconds)), None)
    resume = None if done or elsewhere else next(
        (r for r in runs if r.info.status != "FINISHED" and checkpoints.exists(cfg, r.info.run_id)), None)
    return done, resume, elsewhere


def plan(args: Sequence[str], typed: Sequence[str], options: Mapping[str, Sequence[str]]) -> Plan:
    """Compose, validate and decide every job; reads the store, writes nothing. ConfigError (one line) if any job is bad."""
    jobs = preflight.compose_jobs(args, options)
    preflight.check_machine([cfg for _, cfg in jobs], runs_here=not any(
        arg.startswith("hydra/launcher=") and "slurm" in arg for arg in args))
    known: dict[tuple[str, str], dict[str, list[Run]]] = {}
    planned = []
    for index, (overrides, cfg) in enumerate(jobs):
        uri = stores.resolve_tracking_uri(cfg)
        if (uri, cfg.experiment) not in known:
            try:
                store = stores.store(uri)
                store.check_reachable()
                experiment_id = store.experiment_id(cfg.experiment)
                known[uri, cfg.experiment] = store.runs_by_fingerprint(experiment_id) if experiment_id else {}
            except Exception as error:
                raise store_error(uri, cfg.experiment, error) from error
        fp = fingerprint(cfg)
        done, resume, elsewhere = decide(cfg, known[uri, cfg.experiment].get(fp, []))
        planned.append(PlannedJob(index, overrides, cfg, fp, run_name(cfg), uri, done, resume, elsewhere))
    _, multirun = ov.split_flags(args)
    return Plan(list(args), list(typed), multirun, planned)
