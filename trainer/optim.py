"""Optimiser with YOLOv5's three parameter groups, the LR schedule and the warmup."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

NOMINAL_BATCH = 64


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """Groups: `bias` (no decay), `weights` (decay), `norm` (BatchNorm weights, no decay).

    Decaying BatchNorm scales or biases only hurts, so only conv/linear weights decay.
    """
    groups: dict[str, list[nn.Parameter]] = {"bias": [], "weights": [], "norm": []}
    for module in model.modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if parameter_name == "bias":
                groups["bias"].append(parameter)
            elif isinstance(module, nn.modules.batchnorm._NormBase):
                groups["norm"].append(parameter)
            else:
                groups["weights"].append(parameter)
    param_groups = [
        {"params": groups["bias"], "name": "bias", "weight_decay": 0.0},
        {"params": groups["weights"], "name": "weights", "weight_decay": weight_decay},
        {"params": groups["norm"], "name": "norm", "weight_decay": 0.0},
    ]
    if name == "SGD":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=True)
    if name == "Adam":
        return torch.optim.Adam(param_groups, lr=lr, betas=(momentum, 0.999))
    if name == "AdamW":
        return torch.optim.AdamW(param_groups, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"unknown optimizer {name!r}")


def scaled_weight_decay(weight_decay: float, batch_size: int) -> float:
    """Weight decay is tuned for the nominal batch of 64; scale it to the batch we really step with."""
    accumulate = max(round(NOMINAL_BATCH / batch_size), 1)
    return weight_decay * batch_size * accumulate / NOMINAL_BATCH


def lr_lambda(epochs: int, lrf: float, cosine: bool, restart: int = 0, restart_mult: int = 1
              ) -> Callable[[int], float]:
    """Multiplier of lr0 at each epoch: linear `(1 - x/epochs)(1 - lrf) + lrf`, one-cycle cosine to
    lrf, or with `restart` > 0 cosine annealing with warm restarts (SGDR, Loshchilov and Hutter):
    cycles of `restart`, `restart·restart_mult`, ... epochs, each from 1 down to lrf."""
    if restart > 0:
        return lambda epoch: _sgdr_factor(epoch, lrf, restart, restart_mult)
    if cosine:
        return lambda epoch: ((1 - math.cos(epoch * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda epoch: (1 - epoch / epochs) * (1.0 - lrf) + lrf


def _sgdr_factor(epoch: int, lrf: float, first: int, mult: int) -> float:
    """The SGDR multiplier at `epoch` (from 0): where the epoch falls in its cycle."""
    start, length = 0, first
    while epoch >= start + length:
        start, length = start + length, length * mult
    return lrf + (1 - lrf) * (1 + math.cos(math.pi * (epoch - start) / length)) / 2


def scheduler_lambda(lr_factor: Callable[[int], float]) -> Callable[[int], float]:
    """What the per-epoch LR scheduler applies in epoch e: `lr_factor(e - 1)`, from epoch 1 on.

    YOLOv5 steps its scheduler at the end of each epoch from one step behind, so after the
    warmup epoch e trains at lr0 · lf(e - 1), and the epoch in which the warmup ends keeps the
    warmup's final lr, lr0 · lf(e), into the next. Following it gives a run YOLOv5's lr in every
    epoch, and results.csv the same lr columns.
    """
    return lambda epoch: lr_factor(max(epoch - 1, 0))


@dataclass(frozen=True)
class Warmup:
    """Linear warmup of lr, momentum and gradient accumulation over the first `iterations` steps."""

    iterations: int
    batch_size: int
    warmup_bias_lr: float
    warmup_momentum: float
    momentum: float

    @classmethod
    def for_run(cls, warmup_epochs: float, batches_per_epoch: int, batch_size: int,
                warmup_bias_lr: float, warmup_momentum: float, momentum: float) -> Warmup:
        iterations = max(round(warmup_epochs * batches_per_epoch), 100) if warmup_epochs > 0 else 0
        return cls(iterations, batch_size, warmup_bias_lr, warmup_momentum, momentum)

    def accumulate(self, iteration: int) -> int:
        """Batches per optimiser step: ramps from 1 to 64/batch during warmup."""
        target = max(round(NOMINAL_BATCH / self.batch_size), 1)
        if iteration >= self.iterations:
            return target
        return max(1, int(np.interp(iteration, [0, self.iterations], [1, NOMINAL_BATCH / self.batch_size]).round()))

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int, scheduled_lr_factor: float) -> None:
        """Set each group's lr/momentum for this iteration. The last warmup iteration,
        `iterations` itself, sets them to the scheduled lr and the final momentum; later ones,
        and every iteration of a run without warmup, change nothing."""
        if not self.iterations or iteration > self.iterations:
            return
        span = [0, self.iterations]
        for group in optimizer.param_groups:
            start_lr = self.warmup_bias_lr if group.get("name") == "bias" else 0.0
            group["lr"] = float(np.interp(iteration, span, [start_lr, group["initial_lr"] * scheduled_lr_factor]))
            if "momentum" in group:
                group["momentum"] = float(np.interp(iteration, span, [self.warmup_momentum, self.momentum]))
            elif "betas" in group:
                beta = float(np.interp(iteration, span, [self.warmup_momentum, self.momentum]))
                group["betas"] = (beta, group["betas"][1])
