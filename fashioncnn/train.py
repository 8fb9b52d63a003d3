"""The training loop: one model, one config, one epoch at a time.

Plain PyTorch. Data is already in memory as tensors (see data.py); each epoch draws a seeded random
permutation and slices batches from it. Loss and accuracy are summed on the device and read once per
epoch, so the loop never waits on a host sync per step. `on_epoch` receives each epoch's metrics as
soon as they exist (tracking.py logs them to MLflow).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from fashioncnn.config import Optimizer, Precision
from fashioncnn.data import FashionMNIST

log = logging.getLogger(__name__)


@dataclass
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    epoch_seconds: float


@dataclass
class TrainResult:
    history: list[EpochMetrics] = field(default_factory=list)

    @property
    def max_test_acc(self) -> float:
        return max(m.test_acc for m in self.history)

    @property
    def mean_test_acc(self) -> float:
        return sum(m.test_acc for m in self.history) / len(self.history)

    @property
    def train_seconds(self) -> float:
        return sum(m.epoch_seconds for m in self.history)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda: no CUDA device is available here; use device=auto or device=cpu")
    return torch.device(requested)


def make_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    name, lr = Optimizer(cfg.optim.name), cfg.optim.lr
    # foreach=True updates all parameters with a few multi-tensor kernels instead of one per tensor.
    if name is Optimizer.adam:
        return torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    if name is Optimizer.adamw:
        return torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, foreach=True)


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


def train(
    cfg: DictConfig,
    model: nn.Module,
    data: FashionMNIST,
    device: torch.device,
    on_epoch: Callable[[EpochMetrics], None] = lambda metrics: None,
) -> TrainResult:
    torch.manual_seed(cfg.seed)
    order = torch.Generator().manual_seed(cfg.seed)  # its own generator: data order never depends on model init
    model.to(device)
    autocast = Precision(cfg.precision) is Precision.bf16
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    data = data.to(device)
    train_images = data.train_images.contiguous(memory_format=memory_format)
    test_images = data.test_images.contiguous(memory_format=memory_format)
    step = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(cfg, model)
    n_train, batch_size = len(train_images), cfg.batch_size
    n_batches = (n_train + batch_size - 1) // batch_size
    result = TrainResult()

    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        model.train()
        permutation = torch.randperm(n_train, generator=order).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        progress = tqdm(
            range(n_batches), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
            disable=not sys.stderr.isatty(), file=sys.stderr,
        )
        for batch in progress:
            index = permutation[batch * batch_size : (batch + 1) * batch_size]
            x, y = train_images[index], data.train_labels[index]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = step(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
        train_loss, train_acc = loss_sum.item() / n_train, correct.item() / n_train
        test_loss, test_acc = evaluate(step, test_images, data.test_labels, cfg.eval_batch_size, autocast)
        metrics = EpochMetrics(epoch, train_loss, train_acc, test_loss, test_acc, time.perf_counter() - started)
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f  %.1fs",
            epoch, cfg.epochs, train_loss, train_acc, test_loss, test_acc, metrics.epoch_seconds,
        )
        result.history.append(metrics)
        on_epoch(metrics)
    return result
