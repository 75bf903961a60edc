"""CUDA graphs for the model's training forward and backward on one GPU.

A small model at a small batch spends its step launching kernels, not running them: yolov5n
at batch 16 and 320 px took about 55 ms of host time per step on an H100 whose kernels ran
for 8 ms. `torch.cuda.make_graphed_callables` records the forward and the backward once and
then launches each as one graph, so a step costs what its kernels cost.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

LOGGER = logging.getLogger("trainer")
# Capture only forbids unsafe CUDA calls on the capturing thread: the DataLoader's pin-memory
# thread keeps allocating pinned memory meanwhile, which the default ("global") mode turns into
# an error in that thread. Older torch has no such argument (and captures globally).
CAPTURE_OPTIONS = (
    {"capture_error_mode": "thread_local"}
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters
    else {}
)


class _Forward(nn.Module):
    """What gets graphed: the model's forward, held so that the model itself is not modified
    (make_graphed_callables replaces the `forward` of the module it is given)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model(images)


class GraphedModel(nn.Module):
    """Replays `module`'s training forward and backward as CUDA graphs once `capture` has
    recorded them for one input shape; other shapes (an epoch's short last batch), eval mode
    and a model never captured run eagerly.

    Rules for the caller, which `trainer.train` and `trainer.engine` follow:
    - capture before the training loader's iterator exists: in torch versions that capture
      "globally", the loader's pin-memory thread must not touch CUDA meanwhile;
    - call backward on a forward's outputs before the next forward: both replay into the same
      memory;
    - never set gradients to None (`zero_grad(set_to_none=False)`): a None gradient would adopt
      the graph's own gradient buffer, which the next replay overwrites. Capture gives every
      trainable parameter a zero gradient to start from;
    - autocast, if any, with `cache_enabled=False`, as graph capture requires.

    Capture runs the model a few times on a side stream to warm up. Those runs would move
    BatchNorm's running statistics, so the buffers are put back afterwards: the first replay
    then leaves the model exactly as an eager step would. If capture fails, training goes on
    eagerly with a warning.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self._graphed: nn.Module | None = None
        self._shape: torch.Size | None = None

    @property
    def captured(self) -> bool:
        return self._graphed is not None

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.training and self._graphed is not None and images.shape == self._shape:
            return list(self._graphed(images))
        return self.module(images)

    def capture(self, example: torch.Tensor) -> None:
        """Record the training forward and backward for inputs shaped like `example`."""
        self.train()
        buffers = [buffer.detach().clone() for buffer in self.module.buffers()]
        for parameter in self.module.parameters():
            # Frozen parameters (--freeze) keep no gradient: with one, even a zero one, the
            # optimiser would apply weight decay and momentum to them.
            if parameter.requires_grad and parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        # Parameters' gradient accumulators are made during capture, on its side stream, and the
        # graphs keep them; autograd then orders that stream after ours on every backward, which
        # is correct. Newer torch warns about such a mismatch; here it is by design.
        quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
        if quiet is not None:
            quiet(False)
        try:
            self._graphed = torch.cuda.make_graphed_callables(_Forward(self.module).train(), (example,),
                                                              **CAPTURE_OPTIONS)
            self._shape = example.shape
        except RuntimeError as error:
            LOGGER.warning("CUDA graph capture failed, training without graphs: %s", error)
        finally:
            with torch.no_grad():
                for buffer, saved in zip(self.module.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
