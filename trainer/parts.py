"""What a training steps with: the model, its optimiser and schedule, the gradient scaler, the
EMA, the warmup and the loss, built from the config in one place (runs and benchmarks).

The engine's loops take a `TrainingParts`; `trainer.train` builds it, and it never depends on
either of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trainer import dist
from trainer.checkpoint import load_weights
from trainer.config import TrainConfig
from trainer.dist import DistContext
from trainer.ema import ModelEMA
from trainer.errors import UserError
from trainer.graphs import GraphedModel
from trainer.loss import DetectionLoss
from trainer.model import DetectionModel
from trainer.optim import Warmup, build_optimizer, lr_lambda, scaled_weight_decay, scheduler_lambda

LOGGER = logging.getLogger("trainer")
# Predictions and targets to (total loss, detached box/obj/cls losses); DetectionLoss is one.
LossFunction = Callable[[list[torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepCounter:
    """Counters that outlive an epoch and are checkpointed: iterations seen, last optimiser step."""

    iteration: int = 0
    last_step: int = -1


@dataclass
class TrainingParts:
    """What a training steps with; its `state_dict` is the training state a checkpoint keeps."""

    model: DetectionModel
    train_model: torch.nn.Module  # the model, wrapped for DDP or CUDA graphs (`training_model`)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lr_factor: Callable[[int], float]  # epoch -> lr0 multiple the warmup heads for; see scheduler_lambda
    scaler: torch.amp.GradScaler
    ema: ModelEMA
    warmup: Warmup
    loss_fn: LossFunction
    amp_dtype: torch.dtype | None
    counter: StepCounter

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "counter": {"iteration": self.counter.iteration, "last_step": self.counter.last_step}}

    def restore(self, state: dict[str, Any]) -> None:
        """Load a training state written by `state_dict` (every rank loads the same file)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.ema.load_state_dict(state["ema"])
        self.counter = StepCounter(**state["counter"])


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None  # fp32 on CPU: autocast there is slow and changes the numbers
    # bf16 needs no gradient scaler, and it trained no worse than YOLOv5's fp16 (bench/README.md).
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def build_model(cfg: TrainConfig, nc: int, device: torch.device) -> DetectionModel:
    anchors = round(cfg.hyp.anchors) if cfg.hyp.anchors else None
    model = DetectionModel(cfg.cfg, nc=nc, anchors=anchors)
    if cfg.weights:
        weights = load_weights(cfg.weights).state
        own = model.state_dict()
        matching = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        kernels = {name for name, parameter in model.named_parameters() if parameter.ndim > 1}
        if not kernels & set(matching):  # not one convolution fits: the weights are another model's
            raise UserError(f"no convolution in {cfg.weights} fits the {cfg.cfg} model: "
                            "pass the --cfg it was trained with")
        model.load_state_dict(matching, strict=False)
        LOGGER.info("Transferred %d/%d items from %s", len(matching), len(own), cfg.weights)
    if cfg.freeze:
        freeze_layers(model, cfg.freeze)
    # channels_last (NHWC): convolutions skip layout reorders on the CPU and use tensor cores
    # without transposes on GPUs; about 12% faster per step on a CPU.
    return model.to(device, memory_format=torch.channels_last)


def freeze_layers(model: DetectionModel, layers: tuple[int, ...]) -> None:
    """Stop the parameters of these layers from training, as YOLOv5's --freeze does. Their
    BatchNorm statistics still follow the data, as in YOLOv5."""
    count = len(model.model)
    if max(layers) >= count:
        raise UserError(f"--freeze: layer {max(layers)} does not exist; the model has layers 0 to {count - 1}")
    prefixes = tuple(f"model.{layer}." for layer in layers)
    frozen = [name for name, parameter in model.named_parameters() if name.startswith(prefixes)]
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    LOGGER.info("Freezing %d layers (%d parameter tensors)", len(layers), len(frozen))


def training_model(model: DetectionModel, ctx: DistContext, sync_bn: bool) -> torch.nn.Module:
    """What the training loop calls: DDP across processes, CUDA graphs on one GPU (see
    `trainer.train.capture_graphs`), else the model itself."""
    if ctx.distributed:
        return dist.wrap_model(model, ctx, sync_bn)
    if ctx.device.type == "cuda":
        return GraphedModel(model)
    return model


def build_training_parts(cfg: TrainConfig, ctx: DistContext, model: DetectionModel,
                         batches_per_epoch: int) -> TrainingParts:
    """Optimiser, schedule, scaler, EMA, warmup and loss for `model`; call after AutoAnchor.

    The EMA copies the model's buffers, anchors included, so anchors must be final first.
    """
    weight_decay = scaled_weight_decay(cfg.hyp.weight_decay, cfg.batch_size)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.hyp.lr0, cfg.hyp.momentum, weight_decay)
    lr_factor = lr_lambda(cfg.epochs, cfg.hyp.lrf, cfg.cos_lr, cfg.sgdr, cfg.sgdr_mult)
    amp_dtype = amp_dtype_for(ctx.device)
    return TrainingParts(
        model=model,
        train_model=training_model(model, ctx, cfg.sync_bn),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=scheduler_lambda(lr_factor)),
        lr_factor=lr_factor,
        scaler=torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16),
        ema=ModelEMA(model),  # on every rank: distributed validation evaluates the same EMA weights everywhere
        warmup=Warmup.for_run(cfg.hyp.warmup_epochs, batches_per_epoch, cfg.batch_size,
                              cfg.hyp.warmup_bias_lr, cfg.hyp.warmup_momentum, cfg.hyp.momentum),
        loss_fn=DetectionLoss.from_model(model, cfg.hyp, cfg.label_smoothing, cfg.imgsz),
        amp_dtype=amp_dtype,
        counter=StepCounter(),
    )
