"""What a sweep will cost before it runs: the training time of each job to train, for `--dry-run`.

Two sources, the better one first:
1. FINISHED runs of the same model (the run name: model and training options such as +flip) in the
   same tracking store, any experiment: the last epoch's `epoch_seconds` of each, preferring runs with
   the same batch size, subset and validation split, then the same batch size, then any; scaled by the
   images an epoch touches.
2. Otherwise a FLOP model of this machine: two reference models (small and large convolutions) are
   trained for two epochs on random images once, and the second epoch's time per image is fitted
   against the model's training FLOPs (a + b * FLOPs). The fit is cached in
   $XDG_CACHE_HOME/fashioncnn/speed.json (default ~/.cache/fashioncnn/speed.json), one entry per
   device, torch version, thread count and batch size, so it is measured once per machine. A
   measurement during which other processes took more than BUSY_SHARE of the CPU is used for that
   estimate only: it is too slow, and kept it would mislead every estimate after it.

An epoch touches its training images (forward and backward) and its validation and test images
(forward only, in large batches): an evaluated image is counted as EVAL_SHARE of a trained one.
The estimate is of the work, one job after another; a parallel launcher divides the wall time.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from mlflow.entities import Run, ViewType
from omegaconf import DictConfig

from fashioncnn.core.config import TRAIN_SET_SIZE
from fashioncnn.core.model import IMAGE_SIZE, ModelSpec, run_name
from fashioncnn.tracking import stores
from fashioncnn.tracking.names import DIVERGED_TAG

if TYPE_CHECKING:
    from fashioncnn.sweep.plan import Plan, PlannedJob

TEST_SET_SIZE = 10_000
EVAL_SHARE = 1 / 3  # forward only, batches of 1000: about a third of a training image's cost
REFERENCE_MODELS = ("M2.2.16.32", "M2.2.64.128")
_MEASURE_TRAIN, _MEASURE_TEST = 640, 1000  # images per epoch of the reference measurement
BUSY_SHARE = 0.25  # of the machine's CPU time, used by other processes while measuring


def epoch_images(subset: int | None, val_size: int) -> float:
    """The work of one epoch, in training-image equivalents."""
    train = subset if subset is not None else TRAIN_SET_SIZE - val_size
    return train + (val_size + TEST_SET_SIZE) * EVAL_SHARE


def training_flops(spec: ModelSpec) -> float:
    """Multiply-adds x 2 of one image's forward pass, x 3 for forward and backward."""
    flops, side, channels = 0.0, IMAGE_SIZE, 1
    for block in range(spec.conv):
        out_channels = spec.filter_in if block == 0 else spec.filter_out
        padding = spec.kernel_size // 2 if block == 0 else 0
        side = side + 2 * padding - spec.kernel_size + 1
        flops += 2 * spec.kernel_size ** 2 * channels * out_channels * side * side
        side, channels = side // 2, out_channels
    widths = spec.linear_widths()
    flops += sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
    return 3 * flops


@dataclass
class JobEstimate:
    job: PlannedJob
    epochs: int  # still to train
    seconds_per_epoch: float
    source: str  # where the figure comes from, for the user

    @property
    def seconds(self) -> float:
        return self.epochs * self.seconds_per_epoch


def _param(run: Run, key: str) -> str:
    return run.data.params.get(key, "")


def _run_subset(run: Run) -> int | None:
    value = _param(run, "subset")
    return int(value) if value.isdigit() else None


def _run_val_size(run: Run) -> int:
    value = _param(run, "val_size")
    return int(value) if value.isdigit() else 0


def from_runs(cfg: DictConfig, runs: Sequence[Run]) -> tuple[float, str] | None:
    """Seconds per epoch for `cfg` from finished runs of its model, and which runs said so."""
    timed = [r for r in runs if "epoch_seconds" in r.data.metrics]
    if not timed:
        return None
    same_data = [r for r in timed if _param(r, "batch_size") == str(cfg.batch_size)
                 and _run_subset(r) == cfg.subset and _run_val_size(r) == cfg.val_size]
    same_batch = [r for r in timed if _param(r, "batch_size") == str(cfg.batch_size)]
    chosen, how = ((same_data, "same batch size and data") if same_data else
                   (same_batch, "same batch size, scaled by images") if same_batch else (timed, "scaled by images"))
    per_image = statistics.median(r.data.metrics["epoch_seconds"] / epoch_images(_run_subset(r), _run_val_size(r))
                                  for r in chosen)
    return per_image * epoch_images(cfg.subset, cfg.val_size), f"{len(chosen)} finished run(s) of {run_name(cfg)}, {how}"


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fashioncnn" / "speed.json"


def _machine_key(cfg: DictConfig) -> str:
    import torch

    from fashioncnn.core.machine import resolve_device

    device = resolve_device(cfg.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    cores = os.cpu_count()
    return f"{device.type}:{name}|cores={cores}|torch={torch.__version__}|threads={cfg.speed.threads}|batch={cfg.batch_size}"


def measure_reference(cfg: DictConfig, model_name: str) -> float:
    """Seconds per training-image equivalent of `model_name` under `cfg`'s options, its second epoch on random images."""
    import torch

    from fashioncnn.core.data import FashionMNIST
    from fashioncnn.core.loop import train
    from fashioncnn.core.machine import resolve_device
    from fashioncnn.core.model import build_model

    spec = ModelSpec.from_name(model_name)
    trial = copy.deepcopy(cfg)
    trial.model.conv, trial.model.lin, trial.model.filter_in, trial.model.filter_out = spec.conv, spec.lin, spec.filter_in, spec.filter_out
    trial.epochs, trial.select_metric, trial.divergence.enabled = 2, "test_acc", False
    generator = torch.Generator().manual_seed(0)
    data = FashionMNIST(torch.randn(_MEASURE_TRAIN, 1, 28, 28, generator=generator), torch.randint(0, 10, (_MEASURE_TRAIN,), generator=generator),
                        torch.randn(_MEASURE_TEST, 1, 28, 28, generator=generator), torch.randint(0, 10, (_MEASURE_TEST,), generator=generator), None)
    torch.manual_seed(0)
    result = train(trial, build_model(spec), data, resolve_device(cfg.device))
    return result.history[-1].epoch_seconds / (_MEASURE_TRAIN + _MEASURE_TEST * EVAL_SHARE)


def _machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy since boot (Linux's /proc/stat; None elsewhere)."""
    try:
        ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _others_share(work: Callable[[], float]) -> tuple[float, float | None]:
    """`work()`, and the share of the machine's CPU that other processes used meanwhile (None where unknown).

    Measured over the work itself, unlike the load average, which still remembers the last minute's jobs.
    """
    machine_before, own_before, wall_before = _machine_busy_seconds(), sum(os.times()[:2]), time.perf_counter()
    result = work()
    machine_after, own_after, wall = _machine_busy_seconds(), sum(os.times()[:2]), time.perf_counter() - wall_before
    if machine_before is None or machine_after is None or wall <= 0:
        return result, None
    others = (machine_after - machine_before) - (own_after - own_before)
    return result, max(0.0, others) / (wall * (os.cpu_count() or 1))


def machine_model(cfg: DictConfig, measure: Callable[[DictConfig, str], float] = measure_reference) -> tuple[float, float, str]:
    """(a, b) of seconds per image = a + b * training FLOPs on this machine, measured once and cached; and where."""
    path, key = cache_file(), _machine_key(cfg)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]["intercept"], cached[key]["slope"], f"measured {cached[key]['measured']}, cached in {path}"
    (s1, s2), others = _others_share(lambda: tuple(measure(cfg, name) for name in REFERENCE_MODELS))
    f1, f2 = (training_flops(ModelSpec.from_name(name)) for name in REFERENCE_MODELS)
    slope = (s2 - s1) / (f2 - f1)
    intercept = s1 - slope * f1
    if slope <= 0 or intercept < 0:  # noise on a busy machine: proportional to FLOPs through the larger one
        slope, intercept = s2 / f2, 0.0
    if others is not None and others > BUSY_SHARE:
        return intercept, slope, (f"measured now while other processes used {others:.0%} of the CPU, so too slow "
                                  "and not cached: the next estimate measures again")
    cached[key] = {"intercept": intercept, "slope": slope, "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   **({"cpu_share_of_other_processes": round(others, 3)} if others is not None else {}),
                   "references": dict(zip(REFERENCE_MODELS, (s1, s2)))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached, indent=1))
    return intercept, slope, f"measured now on this machine, cached in {path}"


def _finished_runs_by_model(uri: str, names: set[str]) -> dict[str, list[Run]]:
    """FINISHED, not diverged runs of these models in the store, all experiments (one search per model)."""
    store = stores.store(uri)
    if not store.exists():
        return {}
    experiments = [e.experiment_id for e in store.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    found: dict[str, list[Run]] = {}
    for name in sorted(names):
        quoted = name.replace("'", "\\'")
        runs = store.client.search_runs(experiments, f"tags.model_name = '{quoted}' and attributes.status = 'FINISHED'",
                                        ViewType.ACTIVE_ONLY, max_results=200, order_by=["attributes.start_time DESC"])
        found[name] = [r for r in runs if r.data.tags.get(DIVERGED_TAG) != "true"]
    return found


def _epochs_left(job: PlannedJob) -> int:
    if job.resume is None:
        return job.cfg.epochs
    history = stores.store(job.tracking_uri).client.get_metric_history(job.resume.info.run_id, "epoch_seconds")
    return max(0, job.cfg.epochs - len({m.step for m in history}))


def estimate(plan: Plan, measure: Callable[[DictConfig, str], float] = measure_reference,
             notes: list[str] | None = None) -> list[JobEstimate]:
    """An estimate for each job the plan trains or resumes; `notes` gets what the user should know about them."""
    notes = [] if notes is None else notes
    to_run = plan.to_run
    by_store: dict[str, set[str]] = {}
    for job in to_run:
        by_store.setdefault(job.tracking_uri, set()).add(job.model_name)
    known = {uri: _finished_runs_by_model(uri, names) for uri, names in by_store.items()}
    estimates: list[JobEstimate] = []
    machine = None
    for job in to_run:
        found = from_runs(job.cfg, known[job.tracking_uri].get(job.model_name, []))
        if found is None:
            if machine is None:
                machine = machine_model(job.cfg, measure)
            intercept, slope, where = machine
            flops = training_flops(ModelSpec.from_config(job.cfg.model))
            found = ((intercept + slope * flops) * epoch_images(job.cfg.subset, job.cfg.val_size),
                     f"FLOP model of this machine, {flops / 1e6:.1f} MFLOP per training image")
        estimates.append(JobEstimate(job, _epochs_left(job), *found))
    if machine is not None:
        intercept, slope, where = machine
        notes.append(f"FLOP model of this machine: seconds per training image = {intercept:.3g} + {slope:.3g} x FLOPs "
                     f"(from {' and '.join(REFERENCE_MODELS)}; {where}); rough for models unlike those two, "
                     "until runs of the model are in the store")
    return estimates


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(estimates: list[JobEstimate], notes: Sequence[str] = ()) -> str:
    if not estimates:
        return "estimated training time: nothing to train"
    lines = [*notes, *(f"#{e.job.index} {e.job.model_name:<12} {e.epochs} epochs x {e.seconds_per_epoch:.1f} s = {duration(e.seconds)}"
             f"  ({e.source})" for e in estimates)]
    total = sum(e.seconds for e in estimates)
    lines.append(f"estimated training time: {duration(total)} for {len(estimates)} jobs, one after another "
                 "(a parallel launcher shortens the wall time, not the work; pruning stops some runs early)")
    return "\n".join(lines)
