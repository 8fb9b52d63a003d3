"""The training loop: one model, one config, one epoch at a time.

Plain PyTorch. Data is already in memory as tensors (see data.py); each epoch draws a seeded random
permutation and slices batches from it. Loss and accuracy are summed on the device and read once per
epoch, so the loop never waits on a host sync per step. `on_epoch` receives each epoch's metrics as
soon as they exist (the job logs them to MLflow and asks its pruner).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from fashioncnn.core.config import lower_is_better
from fashioncnn.core.data import MEAN, STD, FashionMNIST
from fashioncnn.core.machine import reuse_freed_memory, training_network, use_bf16
from fashioncnn.core.optimization import make_optimizer, make_scheduler

log = logging.getLogger(__name__)


class Checkpoints(Protocol):
    """Where a run's checkpoints go (fashioncnn.job.checkpoints: a file, or the run's artifacts)."""

    def latest(self) -> Path | None:
        """A local file holding the newest checkpoint of the run; None: start afresh."""
        ...

    def save(self, epoch: int, state: dict) -> None:
        """Store the state after `epoch` (training goes on while it travels)."""
        ...

    def flush(self, timeout: float) -> bool:
        """Wait until the newest saved checkpoint is stored where a resuming job looks; False on timeout."""
        ...


@dataclass
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    epoch_seconds: float
    val_loss: float | None = None  # None without a validation split
    val_acc: float | None = None
    lr: float | None = None  # the learning rate at the end of the epoch
    cut_short: bool = False  # the divergence guard stopped the run during this epoch: its train_* are of part of it


@dataclass
class TrainResult:
    history: list[EpochMetrics] = field(default_factory=list)
    diverged: str | None = None  # why the divergence guard stopped the run, if it did
    pruned: str | None = None  # why a pruner stopped the run after an epoch, if one did (fashioncnn.job.pruning)
    resumed_after_epoch: int = 0  # epochs restored from a checkpoint
    select_metric: str = "val_acc"
    best_epoch: int = 0  # the epoch `select_metric` picks (1-based)
    best_state: dict[str, torch.Tensor] | None = None  # the model's weights at best_epoch, on the CPU
    precision: str = "fp32"  # what actually ran (bf16 only where native)

    @property
    def best(self) -> EpochMetrics:
        return self.history[self.best_epoch - 1]

    @property
    def max_test_acc(self) -> float:
        return max(m.test_acc for m in self.history)

    @property
    def mean_test_acc(self) -> float:
        return sum(m.test_acc for m in self.history) / len(self.history)

    @property
    def train_seconds(self) -> float:
        return sum(m.epoch_seconds for m in self.history)

    @property
    def seconds_to_90(self) -> float | None:
        """Training seconds until the validation accuracy (the test accuracy without a split) first reached 0.90."""
        elapsed = 0.0
        for m in self.history:
            elapsed += m.epoch_seconds
            if (m.val_acc if m.val_acc is not None else m.test_acc) >= 0.90:
                return elapsed
        return None


class DivergenceGuard:
    """Stops a run early when its training loss is no longer finite or above a bound, or its accuracy stays at chance.

    The study's diverged models sat at ~10% accuracy and still trained for their full time. Checked
    every `check_every` steps (one host sync each), on the training batches seen since the last check.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.images_seen = 0
        self.windows_at_chance = 0
        self.last = (0.0, 0, 0)  # loss_sum, correct, seen at the previous check, within the epoch

    def new_epoch(self) -> None:
        self.last = (0.0, 0, 0)

    def check(self, loss_sum: float, correct: int, seen: int) -> str | None:
        if not self.cfg.enabled:
            return None
        if not math.isfinite(loss_sum):
            return f"training loss became {loss_sum} after {self.images_seen + seen - self.last[2]:,} images"
        window = seen - self.last[2]
        accuracy = (correct - self.last[1]) / window
        mean_loss = (loss_sum - self.last[0]) / window
        if self.cfg.max_loss is not None and mean_loss > self.cfg.max_loss:
            # A finite but huge loss (lr=1e6 reached 4.9e30) can still sit above chance accuracy.
            return (f"training loss {mean_loss:.3g} over the last {window:,} images, above divergence.max_loss="
                    f"{self.cfg.max_loss:g}, after {self.images_seen + window:,} images")
        self.images_seen += window
        self.last = (loss_sum, correct, seen)
        if self.images_seen < self.cfg.warmup_images or accuracy > self.cfg.chance_acc:
            self.windows_at_chance = 0
            return None
        self.windows_at_chance += 1
        if self.windows_at_chance >= self.cfg.patience:
            return (f"training accuracy at chance level ({accuracy:.3f} <= {self.cfg.chance_acc}) for "
                    f"{self.windows_at_chance} checks in a row, after {self.images_seen:,} images")
        return None


def augment(images: torch.Tensor, flip: bool, shift: int, generator: torch.Generator) -> torch.Tensor:
    """A batch of training images, each flipped left-right with probability 1/2 and moved by up to `shift`
    pixels in x and y (the border filled with the background), drawn from `generator` on the images' device."""
    n, device = len(images), images.device
    if flip:
        flipped = torch.rand(n, generator=generator, device=device) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    if shift:
        background = (0.0 - MEAN) / STD  # a black pixel, normalised
        padded = F.pad(images, (shift, shift, shift, shift), value=background)
        size = images.shape[-1]
        dy, dx = (torch.randint(0, 2 * shift + 1, (n,), generator=generator, device=device) for _ in range(2))
        rows = dy[:, None] + torch.arange(size, device=device)
        columns = dx[:, None] + torch.arange(size, device=device)
        images = padded[torch.arange(n, device=device)[:, None, None], 0, rows[:, :, None], columns[:, None, :]].unsqueeze(1)
    return images


def improves(select_metric: str, candidate: EpochMetrics, best: EpochMetrics | None) -> bool:
    """Whether `candidate` beats `best` on the selection metric (accuracies up, losses down; ties keep the earlier)."""
    if best is None:
        return True
    new, old = getattr(candidate, select_metric), getattr(best, select_metric)
    return new < old if lower_is_better(select_metric) else new > old


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, autocast: bool) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split, in large batches."""
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(images), correct.item() / len(images)


class Training:
    """One run's training, set up once: the network as it runs here, its optimizer, schedule, random streams,
    divergence guard and result. `state()` and `restore()` are one pair over one list of state keys."""

    def __init__(self, cfg: DictConfig, model: nn.Module, data: FashionMNIST, device: torch.device) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg, self.model, self.device = cfg, model, device
        self.order = torch.Generator().manual_seed(cfg.seed)  # its own generator: data order never depends on model init
        if cfg.speed.reuse_memory and device.type == "cpu":
            reuse_freed_memory()
        model.to(device)
        self.autocast = use_bf16(cfg, device)
        self.memory_format = torch.channels_last if cfg.speed.channels_last else torch.contiguous_format
        model.to(memory_format=self.memory_format)
        self.data = data = data.to(device)
        self.train_images = data.train_images.contiguous(memory_format=self.memory_format)
        self.test_images = data.test_images.contiguous(memory_format=self.memory_format)
        self.val_images = data.val_images.contiguous(memory_format=self.memory_format)
        network = training_network(cfg, model, device)
        self.step = torch.compile(network) if cfg.speed.compile else network
        self.optimizer = make_optimizer(cfg, model)
        self.n_batches = (len(self.train_images) + cfg.batch_size - 1) // cfg.batch_size
        self.scheduler = make_scheduler(cfg, self.optimizer, cfg.epochs * self.n_batches)
        self.augmenting = bool(cfg.augment.flip or cfg.augment.shift)
        self.augment_rng = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # augmentation never shifts data order
        self.result = TrainResult(select_metric=getattr(cfg.select_metric, "value", cfg.select_metric),
                                  precision="bf16" if self.autocast else "fp32")
        if self.result.select_metric.startswith("val_") and not len(self.val_images):
            raise ValueError(f"select_metric={self.result.select_metric} needs validation images; the data has none (val_size=0?)")
        self.guard = DivergenceGuard(cfg.divergence)

    def _state_keys(self) -> dict[str, tuple[Callable[[], object], Callable[[Any], object]]]:
        """Everything the next epoch depends on, so that a resumed run ends exactly as an uninterrupted one."""
        result, scheduler = self.result, self.scheduler
        return {
            "model": (self.model.state_dict, self.model.load_state_dict),
            "optimizer": (self.optimizer.state_dict, self.optimizer.load_state_dict),
            "order_rng": (self.order.get_state, self.order.set_state),
            "torch_rng": (torch.get_rng_state, torch.set_rng_state),
            "augment_rng": (self.augment_rng.get_state, self.augment_rng.set_state),
            "scheduler": (lambda: scheduler.state_dict() if scheduler else None,
                          lambda state: scheduler.load_state_dict(state) if scheduler else None),
            "history": (lambda: [vars(m) for m in result.history],
                        lambda history: setattr(result, "history", [EpochMetrics(**m) for m in history])),
            "images_seen": (lambda: self.guard.images_seen, lambda seen: setattr(self.guard, "images_seen", seen)),
            "best_epoch": (lambda: result.best_epoch, lambda epoch: setattr(result, "best_epoch", epoch)),
            "best_model": (lambda: result.best_state, lambda weights: setattr(result, "best_state", weights)),
        }

    def state(self) -> dict[str, object]:
        return {key: get() for key, (get, _) in self._state_keys().items()}

    def restore(self, state: dict[str, Any]) -> None:
        for key, (_, put) in self._state_keys().items():
            put(state[key])
        self.result.resumed_after_epoch = len(self.result.history)

    def train_epoch(self, epoch: int) -> tuple[float, float, int]:
        """One pass over the training images; (mean loss, accuracy, images seen: fewer when the guard stopped it)."""
        cfg, data, batch_size, n_train = self.cfg, self.data, self.cfg.batch_size, len(self.train_images)
        self.model.train()
        self.guard.new_epoch()
        permutation = torch.randperm(n_train, generator=self.order).to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        progress = tqdm(range(self.n_batches), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                        disable=not sys.stderr.isatty(), file=sys.stderr)
        for batch in progress:
            index = permutation[batch * batch_size : (batch + 1) * batch_size]
            x, y = self.train_images[index], data.train_labels[index]
            if self.augmenting:
                x = augment(x, cfg.augment.flip, cfg.augment.shift, self.augment_rng).contiguous(memory_format=self.memory_format)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.step(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            if (batch + 1) % cfg.divergence.check_every == 0 or batch + 1 == self.n_batches:
                self.result.diverged = self.guard.check(loss_sum.item(), int(correct.item()), min((batch + 1) * batch_size, n_train))
                if self.result.diverged:
                    break
        seen = min((batch + 1) * batch_size, n_train)
        return loss_sum.item() / seen, correct.item() / seen, seen

    def measure(self, epoch: int, train_loss: float, train_acc: float, seen: int, started: float) -> EpochMetrics:
        """The epoch's metrics: training figures, validation and test loss and accuracy, the time since `started`."""
        batch_size, data = self.cfg.speed.eval_batch_size, self.data
        val_loss = val_acc = None
        if len(self.val_images):
            val_loss, val_acc = evaluate(self.step, self.val_images, data.val_labels, batch_size, self.autocast)
        test_loss, test_acc = evaluate(self.step, self.test_images, data.test_labels, batch_size, self.autocast)
        metrics = EpochMetrics(epoch, train_loss, train_acc, test_loss, test_acc, time.perf_counter() - started, val_loss,
                               val_acc, self.optimizer.param_groups[0]["lr"], cut_short=seen < len(self.train_images))
        log.info("epoch %d/%d  train loss %.4f acc %.4f  %stest loss %.4f acc %.4f  %.1fs", epoch, self.cfg.epochs, train_loss,
                 train_acc, "" if val_acc is None else f"val loss {val_loss:.4f} acc {val_acc:.4f}  ", test_loss, test_acc,
                 metrics.epoch_seconds)
        return metrics

    def keep_if_best(self, metrics: EpochMetrics) -> None:
        """The best epoch by the selection metric keeps a copy of the model's weights (on the CPU)."""
        if improves(self.result.select_metric, metrics, self.result.best if self.result.best_epoch else None):
            self.result.best_epoch = metrics.epoch
            self.result.best_state = {key: value.detach().to("cpu", copy=True) for key, value in self.model.state_dict().items()}


class DebugHooks:
    """Failures injected on purpose (`debug.*`), for the tests of failure handling and resume."""

    def __init__(self, debug: DictConfig) -> None:
        self.debug = debug

    def before_epoch(self, epoch: int) -> None:
        if epoch == self.debug.fail_at_epoch:
            raise RuntimeError(f"injected failure at epoch {epoch} (debug.fail_at_epoch={epoch})")

    def after_checkpoint(self, epoch: int, checkpoints: Checkpoints) -> None:
        """Exit at once, as `kill -9` would, once this epoch's checkpoint is stored and before its metrics go on."""
        if epoch == self.debug.exit_after_checkpoint:
            checkpoints.flush(timeout=600)
            log.warning("debug.exit_after_checkpoint=%d: exiting as if killed", epoch)
            logging.shutdown()
            os._exit(137)


def train(cfg: DictConfig, model: nn.Module, data: FashionMNIST, device: torch.device,
          on_epoch: Callable[[EpochMetrics], str | None] = lambda metrics: None, checkpoints: Checkpoints | None = None,
          on_resume: Callable[[list[EpochMetrics]], None] = lambda history: None) -> TrainResult:
    """Train for cfg.epochs; with `checkpoints`, resume from the latest one and store one after every epoch.

    `on_epoch` gets each epoch's metrics; a string it returns stops the run there (a pruner's reason).
    `on_resume` gets the epochs a checkpoint restored, before training goes on.
    """
    run, debug = Training(cfg, model, data, device), DebugHooks(cfg.debug)
    result = run.result
    latest = checkpoints.latest() if checkpoints is not None else None
    if latest is not None:
        run.restore(torch.load(latest, map_location="cpu", weights_only=False))
        log.info("resumed from %s after epoch %d", latest, result.resumed_after_epoch)
        on_resume(list(result.history))
    for epoch in range(result.resumed_after_epoch + 1, cfg.epochs + 1):
        debug.before_epoch(epoch)
        started = time.perf_counter()
        train_loss, train_acc, seen = run.train_epoch(epoch)
        metrics = run.measure(epoch, train_loss, train_acc, seen, started)
        run.keep_if_best(metrics)
        result.history.append(metrics)
        # The checkpoint before the epoch's metrics: a kill in between re-logs nothing on resume (the job
        # logs the restored epochs its run lacks), where the other order would log the epoch twice.
        if checkpoints is not None and not result.diverged:
            checkpoints.save(epoch, run.state())
            debug.after_checkpoint(epoch, checkpoints)
        result.pruned = on_epoch(metrics)
        if result.diverged:
            log.warning("stopped early in epoch %d: %s", epoch, result.diverged)
            break
        if result.pruned:
            log.info("pruned after epoch %d: %s", epoch, result.pruned)
            break
    return result
