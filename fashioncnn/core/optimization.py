"""The optimizer and the learning-rate schedule, built from their config groups (conf/optim, conf/schedule).

Each option is a node with a `_target_`, built by `hydra.utils.instantiate` as lightning-hydra-template
builds its parts: a team's own optimizer or schedule is a file in its config directory, not a change
here (fashioncnn.core.components.build).
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from fashioncnn.core.components import build
from fashioncnn.core.config import OptimizerImpl


def make_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """cfg.optim's optimizer over the model's parameters, in the implementation `speed.optimizer_impl` asks for."""
    # fused: one kernel updates every parameter in a single pass, with no temporaries (foreach allocates
    # full-size intermediates each step; on M1.3's 24.6M parameters that is most of the step on CPU).
    impl = OptimizerImpl(cfg.speed.optimizer_impl)
    kind = {"fused": True} if impl is OptimizerImpl.fused else {"foreach": impl is OptimizerImpl.foreach}
    return build("optim", cfg.optim, params=model.parameters(), **kind)


def make_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """cfg.schedule's learning-rate schedule over `steps` training steps (stepped once per batch); None: constant."""
    return build("schedule", cfg.schedule, optimizer=optimizer, steps=steps, epochs=cfg.epochs, lr=cfg.optim.lr)


def constant(optimizer: torch.optim.Optimizer) -> None:
    """optim.lr throughout (the study)."""
    return None


def onecycle(optimizer: torch.optim.Optimizer, steps: int, lr: float, pct_start: float) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's OneCycleLR: from lr/25 up to lr over the first `pct_start` of the steps, then down to about 0."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=pct_start)


def cosine(optimizer: torch.optim.Optimizer, steps: int, epochs: int, warmup_epochs: float) -> torch.optim.lr_scheduler.LRScheduler:
    """A linear warm-up from 0 to optim.lr over `warmup_epochs`, then a cosine down to 0 at the last step."""
    warmup = min(steps - 1, round(warmup_epochs * steps / epochs))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
