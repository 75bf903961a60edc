"""The loops: one training epoch and one validation pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import box_convert

from trainer import dist
from trainer.coco import coco_records, image_id_from_path
from trainer.dist import DistContext
from trainer.errors import TrainingDiverged
from trainer.metrics import ConfusionMatrix, DetectionMetrics, DetectionScores
from trainer.parts import LossFunction, TrainingParts
from trainer.postprocess import non_max_suppression, scale_boxes
from trainer.progress import EpochProgress
from trainer.results import ValidationResult

# Called with each validation batch: its index, the uint8 images, then per image its labels
# `[class, x1, y1, x2, y2]` and detections `[x1, y1, x2, y2, confidence, class]` in input pixels.
BatchCallback = Callable[[int, torch.Tensor, list[torch.Tensor], list[torch.Tensor]], None]


@dataclass(frozen=True)
class Validation:
    """What one validation pass gives: the seven numbers of a results row, and what the final
    report prints, draws and writes."""

    result: ValidationResult
    scores: DetectionScores  # the per-class numbers and curves behind `result`'s means
    confusion_matrix: np.ndarray  # (nc + 1, nc + 1), see ConfusionMatrix
    records: list[dict[str, Any]] | None  # COCO-format predictions, when collected


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> Any:
    if amp_dtype is None:
        return nullcontext()
    # No cast cache: each weight is used once per forward, and CUDA graph capture refuses it.
    return torch.autocast(device_type=device.type, dtype=amp_dtype, cache_enabled=False)


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NCHW batch to float in [0, 1], in the model's channels_last layout."""
    images = images.to(device, non_blocking=True).float() / 255
    return images.contiguous(memory_format=torch.channels_last)


class DivergenceCheck:
    """Stops training on a non-finite loss without making the host wait for the GPU.

    A step's losses start copying to the host as soon as they are queued and are read one
    step later, when they have long arrived, so the check never drains the GPU's queue of
    work. The error names the iteration whose loss was not finite; the run ends before its
    epoch's checkpoint, so the saved weights stay those of the last good epoch.
    """

    def __init__(self) -> None:
        self._pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None

    def push(self, iteration: int, items: torch.Tensor) -> None:
        """Check the previous step's losses, then start bringing these to the host."""
        self.check()
        ready = None
        if items.is_cuda:
            items = items.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self._pending = (iteration, items, ready)

    def check(self) -> None:
        """Raise TrainingDiverged if the losses waiting to be checked are not finite."""
        if self._pending is None:
            return
        iteration, items, ready = self._pending
        self._pending = None
        if ready is not None:
            ready.synchronize()
        if not torch.isfinite(items).all():
            raise TrainingDiverged(
                f"loss is not finite at iteration {iteration} (box, obj, cls = {items.tolist()}): "
                "lower lr0 or check the labels"
            )


def train_one_epoch(parts: TrainingParts, loader: Iterable, epoch: int, ctx: DistContext,
                    progress: EpochProgress, max_norm: float = 10.0,
                    rescale: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> dict[str, float]:
    """Train one epoch with gradient accumulation to the nominal batch; returns mean train losses.

    `rescale(images, iteration)` resizes each model input batch (--multi-scale).

    Nothing in a step waits for the GPU: targets are assigned on the host, the loss check reads
    the previous step's losses and the progress display reads the running mean only when shown.
    """
    parts.train_model.train()
    counter = parts.counter
    lr_factor = parts.lr_factor(epoch)
    mean_items = torch.zeros(3, device=ctx.device)
    divergence = DivergenceCheck()
    for batch_index, (images, targets, _, _) in enumerate(progress.track(loader)):
        images = to_model_input(images, ctx.device)
        if rescale is not None:
            images = rescale(images, counter.iteration)
        parts.warmup.apply(parts.optimizer, counter.iteration, lr_factor)
        step_now = counter.iteration - counter.last_step >= parts.warmup.accumulate(counter.iteration)
        items = accumulate_gradients(parts, images, targets, ctx, step_now, divergence)
        if step_now:
            optimizer_step(parts, max_norm)
            counter.last_step = counter.iteration
        mean_items = (mean_items * batch_index + items) / (batch_index + 1)
        counter.iteration += 1
        progress.describe(mean_items, int(targets.shape[0]), int(images.shape[-1]))
    divergence.check()
    box, obj, cls = mean_items.tolist()
    return {"box_loss": box, "obj_loss": obj, "cls_loss": cls}


def accumulate_gradients(parts: TrainingParts, images: torch.Tensor, targets: torch.Tensor, ctx: DistContext,
                         synchronise: bool, divergence: DivergenceCheck) -> torch.Tensor:
    """Forward and backward one batch; returns its box/obj/cls losses, averaged over the ranks.

    Gradients are all-reduced over the ranks only when `synchronise` (the batch ends a step).
    """
    model = parts.train_model
    # Skip the gradient all-reduce on batches that only accumulate.
    sync = model.no_sync() if ctx.distributed and not synchronise else nullcontext()
    with sync:
        with autocast(ctx.device, parts.amp_dtype):
            predictions = model(images)
        loss, items = parts.loss_fn([p.float() for p in predictions], targets)
        items = dist.all_reduce_mean(items, ctx)
        # Every rank sees the same reduced items, so all ranks stop together on divergence.
        divergence.push(parts.counter.iteration, items)
        # DDP averages gradients over ranks; undo that so the step matches one process on the total batch.
        parts.scaler.scale(loss * ctx.world_size).backward()
    return items


def optimizer_step(parts: TrainingParts, max_norm: float) -> None:
    """Unscale, clip, step and update the scaler, then move the EMA towards the new weights."""
    parts.scaler.unscale_(parts.optimizer)
    nn.utils.clip_grad_norm_(parts.train_model.parameters(), max_norm=max_norm)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    # Zeroed in place, never None: see trainer.graphs.GraphedModel.
    parts.optimizer.zero_grad(set_to_none=False)
    parts.ema.update(dist.unwrap_model(parts.train_model))


def image_labels(targets: torch.Tensor, index: int, height: int, width: int) -> torch.Tensor:
    """Labels of one image as (m, 5) `[cls, x1, y1, x2, y2]` in input pixels."""
    labels = targets[targets[:, 0] == index, 1:]
    boxes = box_convert(labels[:, 1:5], "cxcywh", "xyxy") * labels.new_tensor([width, height, width, height])
    return torch.cat([labels[:, :1], boxes], dim=1)


class _ShardScores:
    """What one rank accumulates over its validation batches, merged over the ranks by `gather`."""

    def __init__(self, nc: int, device: torch.device, collect_json: bool) -> None:
        self.metrics = DetectionMetrics()
        self.confusion = ConfusionMatrix(nc)
        self.loss_sum = torch.zeros(3, device=device)
        self.batches = 0
        self.records: list[dict[str, Any]] | None = [] if collect_json else None

    def add_image(self, detections: torch.Tensor, labels: torch.Tensor, shape: Any, order: int, path: str) -> None:
        """One image's detections and labels in input pixels, scored in its original pixels."""
        detections = detections.to("cpu", copy=True)
        detections[:, :4] = scale_boxes(detections[:, :4], shape)
        labels[:, 1:] = scale_boxes(labels[:, 1:], shape)
        self.metrics.update(detections, labels, order=order)
        self.confusion.update(detections, labels)
        if self.records is not None:
            self.records.extend(coco_records(detections, image_id_from_path(path)))

    def gather(self, ctx: DistContext) -> Validation:
        """Every rank's scores merged, on every rank."""
        scores = DetectionMetrics.merged(dist.gather_objects(self.metrics.parts(), ctx)).compute()
        losses = dist.gather_objects((self.loss_sum.cpu(), self.batches), ctx)
        total_batches = max(sum(count for _, count in losses), 1)
        box, obj, cls = (sum(loss for loss, _ in losses) / total_batches).tolist()
        result = ValidationResult(scores.precision, scores.recall, scores.map50, scores.map, box, obj, cls)
        confusion_matrix = sum(dist.gather_objects(self.confusion.matrix, ctx))
        records = None
        if self.records is not None:
            records = [record for part in dist.gather_objects(self.records, ctx) for record in part]
        return Validation(result, scores, confusion_matrix, records)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: LossFunction, nc: int, ctx: DistContext,
             amp_dtype: torch.dtype | None = None, conf_thres: float = 0.001, iou_thres: float = 0.6,
             collect_json: bool = False, on_batch: BatchCallback | None = None) -> Validation:
    """Validate on this rank's shard; rank results are merged so every rank returns the full validation.

    Boxes are compared in original-image pixels, as COCO-format predictions are written.
    `on_batch` sees this rank's batches as they are scored (see BatchCallback).
    """
    model.eval()
    shard = _ShardScores(nc, ctx.device, collect_json)
    # The batch sampler's keys name each image's data set index: it orders the merged metrics
    # exactly as one process would see them.
    image_indices = (key.index for batch in loader.batch_sampler for key in batch)
    for raw_images, targets, paths, shapes in loader:  # targets stay on the host, like the metrics
        images = to_model_input(raw_images, ctx.device)
        with autocast(ctx.device, amp_dtype):
            decoded, raw = model(images)
        shard.loss_sum += loss_fn([r.float() for r in raw], targets)[1]
        detections = non_max_suppression(decoded.float(), conf_thres, iou_thres, multi_label=nc > 1)
        height, width = images.shape[2:]
        all_labels = [image_labels(targets, index, height, width) for index in range(len(detections))]
        if on_batch is not None:
            on_batch(shard.batches, raw_images, all_labels, detections)
        shard.batches += 1
        for index, (predicted, labels) in enumerate(zip(detections, all_labels)):
            shard.add_image(predicted, labels, shapes[index], next(image_indices), paths[index])
    return shard.gather(ctx)
