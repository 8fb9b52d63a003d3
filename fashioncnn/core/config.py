"""The config schema: what a run can be told, with types (checked by OmegaConf) and ranges (checked here).

The dataclasses are registered in Hydra's ConfigStore as "base"; conf/config.yaml builds on it and the
config groups in conf/ fill in `model` and `optim`. Every bad value must be caught by `validate` (or by
OmegaConf's type check) before any training starts, with one line naming the key, the value and what
is allowed.

Keys that say where or how fast a run goes, not what it learns, are marked `learns=False` here (the
whole `speed` node, `device`, `experiment`, ...). Everything that must leave them out derives its list
from the schema (`not_learned_keys`): the run's fingerprint, the report's notion of "the same config",
retrain's replayed configs, the benchmark's option list.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Dict, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

TRAIN_SET_SIZE = 60_000


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line meant for the user."""


class OptimizerImpl(Enum):
    fused = "fused"
    foreach = "foreach"
    loop = "loop"


class Precision(Enum):
    auto = "auto"  # bf16 where it is native (CPU avx512_bf16/amx_bf16, CUDA with bf16), else fp32
    fp32 = "fp32"
    bf16 = "bf16"


class Norm(Enum):
    none = "none"
    batch = "batch"  # BatchNorm after each conv


def _added(default: Any) -> Any:
    """A key added after runs existed: at its default it stays out of the fingerprint (those runs trained so)."""
    return field(default=default, metadata={"fingerprint_neutral": default})


@dataclass
class ModelConfig:
    conv: int = 2  # convolutional blocks
    lin: int = 2  # linear layers, the last one maps to the 10 classes
    filter_in: int = 32  # output channels of the first conv
    filter_out: int = 32  # output channels of every later conv
    kernel_size: int = 3
    norm: Norm = _added(Norm.none)
    dropout: float = _added(0.0)  # rate of a Dropout before each hidden linear layer


# The options of conf/optim, conf/schedule and conf/prune that ship with fashioncnn: name -> what it builds.
# A team adds options of its own as files with a `_target_` and a new name (docs/team.md, "Components of your own").
BUILT_IN_TARGETS: dict[str, dict[str, str]] = {
    "optim": {"adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD"},
    "schedule": {name: f"fashioncnn.core.optimization.{name}" for name in ("constant", "onecycle", "cosine")},
    "prune": {name: f"fashioncnn.job.pruning.{name.capitalize()}Rule" for name in ("none", "median", "asha")},
}

# Constructor arguments an option always had before they were keys (sgd trained with momentum 0.9): at
# these values they stay out of the fingerprint, so the runs from before are still found.
IMPLIED_BY_NAME: dict[tuple[str, str], dict[str, Any]] = {("optim", "sgd"): {"momentum": 0.9}}


@dataclass
class OptimConfig:
    """The optimizer (conf/optim/: adam, adamw, sgd), built by `hydra.utils.instantiate` from `_target_`.

    `name` is the option's name (what runs are compared and reported by); the constructor gets `lr`,
    whichever of momentum and weight_decay are set (null: the optimizer's own default) and `options`.
    """

    _target_: str = "torch.optim.Adam"
    name: str = "adam"
    lr: float = 0.001
    momentum: Optional[float] = _added(None)
    weight_decay: Optional[float] = _added(None)
    options: Dict[str, Any] = field(default_factory=dict, metadata={"fingerprint_neutral": {}})  # more arguments of the target


@dataclass
class AugmentConfig:
    """Training images only, on the training device, seeded (conf/augment/: none, flip, flip_crop)."""

    flip: bool = _added(False)  # random horizontal flip, half of the images
    shift: int = _added(0)  # random translation by up to this many pixels in x and y


@dataclass
class ScheduleConfig:
    """The learning rate over the run, stepped per batch (conf/schedule/: constant, onecycle, cosine).

    Built by `instantiate` from `_target_` (fashioncnn.core.optimization) with the options its target takes.
    """

    _target_: str = "fashioncnn.core.optimization.constant"
    name: str = _added("constant")
    warmup_epochs: float = _added(1.0)  # cosine: linear warm-up from 0
    pct_start: float = _added(0.3)  # onecycle: the share of the steps spent rising to optim.lr
    # more arguments of a team's own target (torch.optim.lr_scheduler.StepLR: {step_size: 1000, gamma: 0.5}; steps are batches)
    options: Dict[str, Any] = field(default_factory=dict, metadata={"fingerprint_neutral": {}})


@dataclass
class DivergenceConfig:
    enabled: bool = True
    chance_acc: float = 0.15  # training accuracy at or below this counts as chance (10 classes: 0.10)
    patience: int = 3  # consecutive checks at chance before the run stops
    check_every: int = 50  # training steps between checks
    warmup_images: int = 10_000  # no chance-level verdict before the model has seen this many images
    # Mean training loss over a check's window above this: diverged (chance: ln 10 = 2.3); null: off. At the
    # default the key stays out of the fingerprint: it only ever stops runs that are diverging anyway.
    max_loss: Optional[float] = field(default=100.0, metadata={"fingerprint_neutral": 100.0})


@dataclass
class SpeedConfig:
    """How fast a run goes on this machine; none of these changes what it computes beyond float rounding."""

    channels_last: bool = True
    compile: bool = False
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (all cores)
    eval_batch_size: int = 1000
    optimizer_impl: OptimizerImpl = OptimizerImpl.fused  # fused | foreach | loop (one kernel per tensor)
    reuse_memory: bool = True  # CPU: glibc keeps freed memory for the next step (no page faults)
    pool_before_relu: bool = True  # run each block's ReLU after its max-pool: same results, 1/4 of the ReLU work
    weight_first_linear: Optional[int] = 1_000_000  # CPU: linear layers with at least this many weights run as W·xᵀ; null: none


@dataclass
class PruneConfig:
    """Stopping hopeless runs of a sweep early (conf/prune/: none, median, asha; fashioncnn.job.pruning).

    One rule, one set of keys, for both kinds of sweep: a grid's jobs judge themselves against their
    siblings' per-epoch metrics in the store, a search's trials through Optuna's pruner of the same rule.
    Not part of a run's fingerprint: pruning decides how far a run goes, not what it learns, so a pruned
    run is found (and skipped) on a re-run, and a run trained fully under prune=none is the same run.
    """

    _target_: str = "fashioncnn.job.pruning.NoneRule"
    name: str = "none"
    warmup_epochs: int = 0  # median: epochs every run completes before it can be stopped
    # median: fewer siblings than this at an epoch (grid) or finished trials (search): go on; asha (grid): at a rung
    min_siblings: int = 3
    reduction_factor: int = 3  # asha: the top 1/reduction_factor of a rung is promoted
    min_epoch: int = 1  # asha: the first rung; rungs at min_epoch * reduction_factor**k below `epochs`


class SelectMetric(Enum):
    """What picks a run's best epoch, and ranks runs (report, retrain, registry)."""

    val_acc = "val_acc"
    val_loss = "val_loss"
    test_acc = "test_acc"  # the study's habit: the test set chooses the model
    test_loss = "test_loss"


def _not_learned(default: Any = None, factory: Any = None) -> Any:
    """A schema field that does not change what a run learns (kept out of its fingerprint)."""
    metadata = {"learns": False}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class LeaseConfig:
    """A training job's claim on its run: a `heartbeat` tag renewed while it trains (docs/sweeps.md, "Leases")."""

    heartbeat_seconds: float = 30.0  # how often the heartbeat tag is renewed
    seconds: float = 300.0  # a RUNNING run whose heartbeat is older than this is taken over (resumed or retrained)


@dataclass
class TrackingConfig:
    """How a job's metrics, params and tags reach the store (docs/sweeps.md, "Training outlives the tracking server")."""

    max_queued: int = 10_000  # batches waiting for the store; training waits only when this many are queued
    retry_seconds: float = 5.0  # pause between delivery attempts while the store does not answer
    outage_wait_seconds: float = 300.0  # at the job's end, how long to wait for the store before failing the job


@dataclass
class DebugConfig:
    fail_at_epoch: Optional[int] = None  # raise an error at the start of this epoch (tests failure handling)
    # Exit at once (as `kill -9` would) after this epoch's checkpoint is stored and before its metrics are logged.
    exit_after_checkpoint: Optional[int] = field(default=None, metadata={"learns": False})


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 5
    batch_size: int = 64
    seed: int = 0
    device: str = _not_learned("auto")  # auto (CUDA when present; one GPU per job in a sweep), cpu, cuda, cuda:N
    subset: Optional[int] = None  # training images to use (after the validation hold-out); None means all of them
    # A seeded, class-stratified hold-out of the training set; 0: none (the study's protocol). At 0 the key
    # stays out of the fingerprint, so runs from before it existed are still found.
    val_size: int = field(default=5000, metadata={"fingerprint_neutral": 0})
    select_metric: SelectMetric = _not_learned(SelectMetric.val_acc)  # picks the best epoch and ranks runs
    log_model: bool = _not_learned(True)  # log the best epoch's weights as an MLflow model
    system_metrics: bool = _not_learned(True)  # MLflow's CPU, memory, disk and network metrics during the run
    data_dir: str = _not_learned("data")  # searched first; torchvision downloads here when the machine can
    experiment: str = _not_learned("fashioncnn")  # MLflow experiment name
    tracking_uri: Optional[str] = _not_learned(None)  # None: $MLFLOW_TRACKING_URI, else the local store in ./mlruns
    # Beyond the study (off by default, so the study's models stay exactly as they were).
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    label_smoothing: float = _added(0.0)
    # bf16 rounds differently enough to change results: a training choice, so outside `speed`. In the
    # fingerprint `auto` counts as what it means on the machine that plans the sweep.
    precision: Precision = Precision.auto
    speed: SpeedConfig = _not_learned(factory=SpeedConfig)  # docs/speed.md
    # Sweeps that never lose work (docs/sweeps.md).
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    prune: PruneConfig = _not_learned(factory=PruneConfig)  # docs/search.md, "Pruning"
    force: bool = _not_learned(False)  # train even when a FINISHED run with the same effective config exists
    checkpoint_dir: str = _not_learned("mlruns/checkpoints")  # per-epoch checkpoints of unfinished runs
    keep_checkpoint: bool = _not_learned(False)  # log the final checkpoint as an artifact of its run
    lease: LeaseConfig = _not_learned(factory=LeaseConfig)
    tracking: TrackingConfig = _not_learned(factory=TrackingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def not_learned_keys() -> list[str]:
    """Top-level keys that say where or how fast a run goes, not what it learns (`speed` is one of them)."""
    return [f.name for f in fields(Config) if f.metadata.get("learns", True) is False]


def nested_not_learned_keys() -> list[str]:
    """Dotted keys inside a learned node that still do not change what a run learns (debug.exit_after_checkpoint)."""
    found = []
    for f in fields(Config):
        if f.metadata.get("learns", True) and f.default_factory is not MISSING and is_dataclass(f.default_factory):
            found += [f"{f.name}.{inner.name}" for inner in fields(f.default_factory) if inner.metadata.get("learns", True) is False]
    return found


def fingerprint_neutral(node: Any = None, prefix: str = "") -> dict[str, Any]:
    """Keys added after runs existed (dotted), with the value at which they leave the fingerprint (old runs trained so)."""
    found = {}
    for f in fields(node or Config):
        if "fingerprint_neutral" in f.metadata:
            neutral = f.metadata["fingerprint_neutral"]
            found[prefix + f.name] = getattr(neutral, "value", neutral)  # as the resolved config spells it
        elif f.default_factory is not MISSING and is_dataclass(f.default_factory):
            found |= fingerprint_neutral(f.default_factory, f"{prefix}{f.name}.")
    return found


def learned_params(params: Mapping[str, str]) -> dict[str, str]:
    """A run's logged params as its fingerprint sees what it learned, of those `learns` keeps: no `_target_` (the
    name says it), no key at the value it had before it existed, no constructor argument its option implied."""
    neutral = {key: str(value) for key, value in fingerprint_neutral().items()}
    implied = {f"{group}.{key}": str(value) for (group, name), values in IMPLIED_BY_NAME.items()
               if params.get(f"{group}.name") == name for key, value in values.items()}
    return {key: value for key, value in params.items()
            if not key.endswith("._target_") and neutral.get(key) != value and implied.get(key) != value}


def validate_component(group: str, node: Any) -> None:
    """A component's `name` and `_target_` agree: a built-in name builds its own target, and a built-in target
    is only reached through its name (a team's option has a name of its own)."""
    targets, name, target = BUILT_IN_TARGETS[group], str(getattr(node.name, "value", node.name)), node._target_
    choose = f"choose an option with {group}=<option> ({', '.join(targets)}, or a file of your own in conf/{group}/)"
    if name in targets and target != targets[name]:
        raise ConfigError(f"{group}._target_={target}: {group}.name={name} is the built-in option that builds {targets[name]}; "
                          f"give your own option a name of its own, or {choose}")
    if name not in targets and target in targets.values():
        raise ConfigError(f"{group}.name={name}: names no option, only the one chosen; {choose}")
    if group == "optim" and name in ("adam", "adamw") and node.momentum is not None:
        raise ConfigError(f"optim.momentum={node.momentum}: not allowed with optim={name} ({target} has no momentum); "
                          "use optim=sgd, or leave optim.momentum at null")


def lower_is_better(metric: str) -> bool:
    """Which way a metric is better, the one rule of the package: losses, times and sizes down, everything else up."""
    return metric.endswith(("loss", "seconds")) or metric == "param_count"


def ranking_metric(select_metric: str) -> str:
    """The run-level metric that ranks runs selected by `select_metric` (test_acc: max_test_acc, the study's)."""
    return "max_test_acc" if select_metric == "test_acc" else f"best_{select_metric}"


def speed_keys() -> list[str]:
    """The speed options, as dotted keys (speed.channels_last, ...)."""
    return [f"speed.{f.name}" for f in fields(SpeedConfig)]


# Before 0.2 the speed options were top-level keys (threads=1); the command line still takes them, with a notice.
LEGACY_SPEED_KEYS = {f.name: f"speed.{f.name}" for f in fields(SpeedConfig)}


def register_schema() -> None:
    ConfigStore.instance().store(name="base", node=Config)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and value >= 1


# key -> (check, what is allowed). Types are already enforced by OmegaConf when the config is composed.
_RULES: dict[str, tuple[Any, str]] = {
    "epochs": (_positive_int, "an integer >= 1"),
    "batch_size": (_positive_int, "an integer >= 1"),
    "speed.eval_batch_size": (_positive_int, "an integer >= 1"),
    "seed": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "val_size": (lambda v: isinstance(v, int) and 0 <= v <= TRAIN_SET_SIZE - 10,
                 f"an integer from 0 (no validation split) to {TRAIN_SET_SIZE - 10}"),
    "subset": (
        lambda v: v is None or (isinstance(v, int) and 1 <= v <= TRAIN_SET_SIZE),
        f"null (all images) or an integer from 1 to {TRAIN_SET_SIZE}",
    ),
    "speed.threads": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0: torch's default)"),
    "speed.weight_first_linear": (lambda v: v is None or (isinstance(v, int) and v >= 0),
                            "null (off) or an integer >= 0 (the fewest weights a linear layer needs; 0: every layer)"),
    "device": (lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
               "one of auto, cpu, cuda, cuda:N"),
    "experiment": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty name"),
    "optim.lr": (lambda v: isinstance(v, float) and math.isfinite(v) and v > 0, "a number > 0"),
    "optim.momentum": (lambda v: v is None or (isinstance(v, float) and 0 <= v < 1), "null (the optimizer's default) or a number from 0 to 1 (exclusive)"),
    "optim.weight_decay": (lambda v: v is None or (isinstance(v, float) and v >= 0), "null (the optimizer's default) or a number >= 0"),
    "divergence.chance_acc": (lambda v: isinstance(v, float) and 0 <= v < 1, "a number from 0 to 1 (exclusive)"),
    "divergence.patience": (_positive_int, "an integer >= 1"),
    "divergence.check_every": (_positive_int, "an integer >= 1"),
    "divergence.warmup_images": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "divergence.max_loss": (lambda v: v is None or (isinstance(v, float) and v > math.log(10)),
                            "null (off) or a number above ln 10 = 2.3, the loss of a chance-level guess"),
    "lease.heartbeat_seconds": (lambda v: isinstance(v, float) and v > 0, "a number of seconds > 0"),
    "lease.seconds": (lambda v: isinstance(v, float) and v > 0, "a number of seconds > 0 (more than lease.heartbeat_seconds)"),
    "tracking.max_queued": (_positive_int, "an integer >= 1"),
    "tracking.retry_seconds": (lambda v: isinstance(v, float) and v > 0, "a number of seconds > 0"),
    "tracking.outage_wait_seconds": (lambda v: isinstance(v, float) and v >= 0, "a number of seconds >= 0"),
    "checkpoint_dir": (lambda v: isinstance(v, str) and v.strip() != "", "a directory path"),
    "model.conv": (_positive_int, "an integer >= 1 (the study uses 1, 2 or 3)"),
    "model.lin": (_positive_int, "an integer >= 1 (the study uses 2, 3 or 4)"),
    "model.filter_in": (_positive_int, "an integer >= 1"),
    "model.filter_out": (_positive_int, "an integer >= 1"),
    "model.kernel_size": (lambda v: isinstance(v, int) and v >= 1 and v % 2 == 1, "an odd integer >= 1"),
    "model.dropout": (lambda v: isinstance(v, float) and 0 <= v < 1, "a number from 0 (none) to 1 (exclusive)"),
    "label_smoothing": (lambda v: isinstance(v, float) and 0 <= v < 1, "a number from 0 (none) to 1 (exclusive)"),
    "augment.shift": (lambda v: isinstance(v, int) and 0 <= v <= 8, "an integer from 0 to 8 (pixels)"),
    "schedule.warmup_epochs": (lambda v: isinstance(v, float) and v >= 0, "a number of epochs >= 0"),
    "prune.warmup_epochs": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (epochs before any decision)"),
    "prune.min_siblings": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (siblings needed before a decision)"),
    "prune.reduction_factor": (lambda v: isinstance(v, int) and v >= 2, "an integer >= 2 (asha keeps the top 1/factor of a rung)"),
    "prune.min_epoch": (_positive_int, "an integer >= 1 (asha's first rung)"),
    "schedule.pct_start": (lambda v: isinstance(v, float) and 0 < v < 1, "a number between 0 and 1 (exclusive)"),
}


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first out-of-range value (the model's feasibility is model.py's to check)."""
    for key, (check, allowed) in _RULES.items():
        value = OmegaConf.select(cfg, key)
        if not check(value):
            raise ConfigError(f"{key}={value}: not allowed, must be {allowed}")
    for group in BUILT_IN_TARGETS:
        validate_component(group, cfg[group])
    if cfg.subset is not None and cfg.subset > TRAIN_SET_SIZE - cfg.val_size:
        raise ConfigError(f"subset={cfg.subset}: not allowed with val_size={cfg.val_size}, at most "
                          f"{TRAIN_SET_SIZE - cfg.val_size} training images remain; lower subset, or val_size (0: no validation split)")
    if cfg.lease.seconds <= cfg.lease.heartbeat_seconds:
        raise ConfigError(f"lease.seconds={cfg.lease.seconds}: not allowed, must be more than lease.heartbeat_seconds="
                          f"{cfg.lease.heartbeat_seconds} (a live job's heartbeat would look stale)")
    select = SelectMetric(cfg.select_metric).value
    if select.startswith("val_") and cfg.val_size == 0:
        raise ConfigError(f"select_metric={select}: needs a validation split, but val_size=0; set val_size "
                          "(default 5000) or select_metric=test_acc (the study's protocol: the test set picks the model)")
