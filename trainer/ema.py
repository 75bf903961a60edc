"""Exponential moving average of model weights, with YOLOv5's warm-up of the decay."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """Keeps `ema = d·ema + (1 - d)·model` for every float tensor of the state dict.

    The decay ramps up as `decay·(1 - exp(-updates / tau))` so early, noisy weights are
    forgotten quickly. The EMA owns its `updates` counter, which is checkpointed with it.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = updates

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        model_state = model.state_dict()
        ema_values, model_values = [], []
        for name, ema_value in self.module.state_dict().items():
            if ema_value.dtype.is_floating_point:
                ema_values.append(ema_value)
                model_values.append(model_state[name].detach())
        # One multi-tensor kernel per operation instead of two launches per tensor (hundreds).
        torch._foreach_mul_(ema_values, decay)
        torch._foreach_add_(ema_values, model_values, alpha=1 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
