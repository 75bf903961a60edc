"""`run()`: one training, read top to bottom like the recipe it is."""

from __future__ import annotations

import itertools
import logging
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from trainer import dist
from trainer.autoanchor import check_anchors
from trainer.checkpoint import load_weights, save_checkpoint
from trainer.coco import write_predictions_json
from trainer.config import TrainConfig
from trainer.data import DataConfig, build_dataloader, build_datasets, load_data_config
from trainer.data.augment import MultiScale
from trainer.dist import DistContext
from trainer.ema import ModelEMA
from trainer.engine import StepCounter, autocast, evaluate, to_model_input, train_one_epoch
from trainer.errors import UserError
from trainer.graphs import GraphedModel
from trainer.loss import DetectionLoss
from trainer.metrics import fitness
from trainer.model import DetectionModel
from trainer.optim import Warmup, build_optimizer, lr_lambda, scaled_weight_decay, scheduler_lambda
from trainer.plots import ValidationPlots, plot_labels, plot_results, plot_training_batches, plot_validation
from trainer.progress import EpochProgress, append_results, class_table

LOGGER = logging.getLogger("trainer")
MIN_GRAPHED_STEPS = 50
RESULT_KEYS = ("precision", "recall", "map50", "map", "box_loss", "obj_loss", "cls_loss")


@dataclass
class PreparedData:
    """Datasets and loaders built once and reused by every training in this process (evolution)."""

    data: DataConfig
    train_set: Any
    val_set: Any
    train_loader: Any  # endless: take len(train_loader) batches per epoch from one iterator per run
    train_batches: Any  # its EndlessBatches: start_at(epoch) before making that iterator
    val_loader: Any


@dataclass
class TrainResult:
    """The run's final validation and where it was saved. A run with a folder ends as YOLOv5's
    does, on best.pt's EMA weights; an evolution generation on its last epoch's."""

    metrics: dict[str, float]
    best_fitness: float
    epochs_run: int
    save_dir: Path | None

    def values(self) -> tuple[float, ...]:
        """The seven numbers of an evolve.csv row, in its column order."""
        return tuple(float(self.metrics[key]) for key in RESULT_KEYS)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN to expose reads of
        # uninitialised memory; no kernel we run reads it, and the fills took 11% of a CPU step.
        torch.utils.deterministic.fill_uninitialized_memory = False


def next_run_dir(project: str | Path, name: str, exist_ok: bool) -> Path:
    """`runs/train/exp`, then `exp2`, `exp3`… unless `exist_ok` reuses the first."""
    base = Path(project) / name
    if exist_ok or not base.exists():
        return base
    index = 2
    while (candidate := Path(project) / f"{name}{index}").exists():
        index += 1
    return candidate


def prepare_data(cfg: TrainConfig, ctx: DistContext, stride: int = 32) -> PreparedData:
    """Verify labels, fill caches and start loader workers: once per process, not per generation."""
    data = load_data_config(cfg.data)
    if cfg.batch_size % ctx.world_size:
        raise UserError(
            f"--batch-size {cfg.batch_size} is the total over {ctx.world_size} processes and must divide "
            f"evenly: use a multiple of {ctx.world_size}, "
            f"e.g. {ctx.world_size * max(1, cfg.batch_size // ctx.world_size)}"
        )
    per_rank = cfg.batch_size // ctx.world_size
    train_set, val_set = build_datasets(data, cfg.imgsz, cfg.hyp, cfg.cache, cfg.single_cls, cfg.seed, stride)
    pin = ctx.device.type == "cuda"
    train_loader, train_batches = build_dataloader(train_set, per_rank, cfg.workers, True, cfg.seed,
                                                   ctx.rank, ctx.world_size, pin, rect=cfg.rect)
    val_loader = build_dataloader(val_set, per_rank * 2, cfg.workers, False, cfg.seed,
                                  ctx.rank, ctx.world_size, pin, shard=True)[0]
    return PreparedData(data, train_set, val_set, train_loader, train_batches, val_loader)


def label_sizes(dataset: Any, imgsz: int) -> torch.Tensor:
    """Label widths/heights in pixels after the long side is resized to `imgsz` (AutoAnchor's input)."""
    shapes = imgsz * dataset.shapes / dataset.shapes.max(1, keepdims=True)
    sizes = [labels[:, 3:5] * shape for shape, labels in zip(shapes, dataset.labels) if len(labels)]
    return torch.from_numpy(np.concatenate(sizes) if sizes else np.zeros((0, 2))).float()


def save_labels_plot(path: Path, dataset: Any, model: DetectionModel, imgsz: int, names: list[str]) -> None:
    """labels.jpg: the training labels, and their sizes against the anchors the model trains with."""
    detect = model.detect
    anchors_px = (detect.anchors.cpu() * detect.stride.cpu().view(-1, 1, 1)).view(-1, 2).numpy()
    labels = [labels for labels in dataset.labels if len(labels)]
    plot_labels(path, np.concatenate(labels) if labels else np.zeros((0, 5)), label_sizes(dataset, imgsz).numpy(),
                anchors_px, names)


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None  # fp32 on CPU: autocast there is slow and changes the numbers
    # bf16 needs no gradient scaler, and it trained no worse than YOLOv5's fp16 (bench/README.md).
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def best_weights(path: Path, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The EMA weights in best.pt, read by rank 0 and sent to every rank; None where the run kept
    no best.pt (--nosave keeps only the epoch it ends on)."""
    weights = load_weights(path).state if ctx.is_main and path.is_file() else None
    return dist.broadcast_object(weights, ctx)


def report_validation(save_dir: Path, metrics: dict[str, Any], names: list[str], plots: bool) -> None:
    """What a final validation leaves, as YOLOv5's train.py and val.py end: the class table in the
    log, predictions.json where they were collected (--save-json), and the curves."""
    records = metrics.pop("records", None)
    if records is not None:
        write_predictions_json(records, save_dir / "predictions.json")
    for line in class_table(metrics, names):
        LOGGER.info("%s", line)
    if plots:
        plot_validation(save_dir, metrics, names)


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
    `capture_graphs`), else the model itself."""
    if ctx.distributed:
        return dist.wrap_model(model, ctx, sync_bn)
    if ctx.device.type == "cuda":
        return GraphedModel(model)
    return model


def capture_graphs(parts: TrainingParts, batch_size: int, imgsz: int, device: torch.device, steps: int) -> None:
    """Record the CUDA graphs of a GraphedModel for full training batches; a no-op otherwise.

    Call before the training loader's iterator is made (see GraphedModel). The example batch
    only gives shapes: BatchNorm statistics are restored after capture. A run of fewer than
    MIN_GRAPHED_STEPS `steps` (a short evolution generation) stays eager: capture costs about
    what ten small steps save.
    """
    if isinstance(parts.train_model, GraphedModel) and steps >= MIN_GRAPHED_STEPS:
        example = to_model_input(torch.zeros(batch_size, 3, imgsz, imgsz, dtype=torch.uint8), device)
        with autocast(device, parts.amp_dtype):
            parts.train_model.capture(example)


@dataclass
class TrainingParts:
    """What a training steps with, built from the config in one place (runs and benchmarks)."""

    model: DetectionModel
    train_model: torch.nn.Module  # the model, wrapped for DDP or CUDA graphs (`training_model`)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lr_factor: Callable[[int], float]  # epoch -> lr0 multiple the warmup heads for; see scheduler_lambda
    scaler: torch.amp.GradScaler
    ema: ModelEMA
    warmup: Warmup
    loss_fn: DetectionLoss
    amp_dtype: torch.dtype | None
    counter: StepCounter

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "counter": {"iteration": self.counter.iteration, "last_step": self.counter.last_step}}

    def restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint written by `state_dict` (every rank loads the same file)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.ema.load_state_dict(state["ema"])
        self.counter = StepCounter(**state["counter"])


def build_training_parts(cfg: TrainConfig, ctx: DistContext, model: DetectionModel,
                         batches_per_epoch: int) -> TrainingParts:
    """Optimiser, schedule, scaler, EMA, warmup and loss for `model`; call after AutoAnchor.

    The EMA copies the model's buffers, anchors included, so anchors must be final first.
    """
    weight_decay = scaled_weight_decay(cfg.hyp.weight_decay, cfg.batch_size)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.hyp.lr0, cfg.hyp.momentum, weight_decay)
    lr_factor = lr_lambda(cfg.epochs, cfg.hyp.lrf, cfg.cos_lr)
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


def run(cfg: TrainConfig, ctx: DistContext, save_dir: Path | None, prepared: PreparedData | None = None,
        resume_state: dict[str, Any] | None = None, stop: threading.Event | None = None) -> TrainResult:
    """Train `cfg.epochs` epochs; write the run folder on rank 0 unless `save_dir` is None.

    When `stop` is set (SIGTERM), the run ends after the current epoch's checkpoint, ready for --resume.
    """
    # The same seed on every rank: each builds the same model and EMA before DDP syncs them.
    # Per-sample augmentation has its own generators, seeded by (seed, epoch, index).
    seed_everything(cfg.seed, cfg.deterministic)
    writes = save_dir is not None and ctx.is_main
    plots = writes and not cfg.noplots
    if writes:
        (save_dir / "weights").mkdir(parents=True, exist_ok=True)
        (save_dir / "hyp.yaml").write_text(yaml.safe_dump(cfg.hyp.as_dict(), sort_keys=False))
        (save_dir / "opt.yaml").write_text(yaml.safe_dump(cfg.as_dict(), sort_keys=False))

    prepared = prepared or prepare_data(cfg, ctx)
    prepared.train_set.set_hyp(cfg.hyp)
    names = prepared.data.class_names(cfg.single_cls)
    nc = len(names)
    model = build_model(cfg, nc, ctx.device)

    if not cfg.noautoanchor and resume_state is None:
        anchors = None
        if ctx.is_main:
            report = check_anchors(model, label_sizes(prepared.train_set, cfg.imgsz), cfg.hyp.anchor_t,
                                   cfg.imgsz, generator=torch.Generator().manual_seed(cfg.seed))
            LOGGER.info("AutoAnchor: best possible recall %.4f%s", report.bpr_before,
                        f" → {report.bpr_after:.4f}, anchors replaced" if report.replaced else "")
            anchors = model.detect.anchors.cpu()
        model.detect.anchors.copy_(dist.broadcast_object(anchors, ctx).to(ctx.device))
    if plots and resume_state is None:
        save_labels_plot(save_dir / "labels.jpg", prepared.train_set, model, cfg.imgsz, names)

    batches_per_epoch = len(prepared.train_loader)
    parts = build_training_parts(cfg, ctx, model, batches_per_epoch)
    start_epoch, best_fitness, best_epoch = 0, -1.0, 0  # -1: no validated epoch yet
    if resume_state is not None:
        parts.restore(resume_state)
        start_epoch = resume_state["epoch"] + 1
        best_fitness, best_epoch = resume_state["best_fitness"], resume_state["best_epoch"]
        if start_epoch >= cfg.epochs:
            raise UserError(f"run already finished {cfg.epochs} epochs: nothing to resume")
        LOGGER.info("Resuming from epoch %d of %d", start_epoch + 1, cfg.epochs)
    optimizer, ema, loss_fn = parts.optimizer, parts.ema, parts.loss_fn
    LOGGER.info("Training %s for %d epochs: %d images, batch %d (%d per process × %d), %s",
                cfg.cfg, cfg.epochs, len(prepared.train_set), cfg.batch_size, cfg.batch_size // ctx.world_size,
                ctx.world_size, ctx.device)

    rescale = MultiScale(cfg.imgsz, int(model.stride.max()), cfg.seed) if cfg.multi_scale else None
    if not (cfg.multi_scale or cfg.rect):  # graphs replay one input shape
        capture_graphs(parts, cfg.batch_size // ctx.world_size, cfg.imgsz, ctx.device,
                       steps=(cfg.epochs - start_epoch) * batches_per_epoch)
    metrics: dict[str, Any] = {}
    epoch, final_epoch, interrupted = start_epoch - 1, False, False
    # One iterator for the whole run: the loader's workers prefetch across epoch boundaries
    # (and through validation) instead of starting every epoch from empty.
    prepared.train_batches.start_at(start_epoch)
    batches = iter(prepared.train_loader)
    for epoch in range(start_epoch, cfg.epochs):
        progress = EpochProgress(ctx.is_main, epoch, cfg.epochs, batches_per_epoch, ctx.device)
        epoch_batches = itertools.islice(batches, batches_per_epoch)
        if plots and epoch == 0:
            epoch_batches = plot_training_batches(epoch_batches, save_dir, names)
        train_losses = train_one_epoch(parts.train_model, loss_fn, epoch_batches, optimizer, parts.scaler,
                                       ema, parts.warmup, parts.lr_factor(epoch), parts.counter, ctx,
                                       parts.amp_dtype, progress, rescale=rescale)
        learning_rates = [group["lr"] for group in optimizer.param_groups]
        parts.scheduler.step()
        final_epoch = epoch + 1 == cfg.epochs
        validated = not cfg.noval or final_epoch
        if validated:
            metrics = evaluate(ema.module, prepared.val_loader, loss_fn, nc, ctx, parts.amp_dtype,
                               collect_json=cfg.save_json and final_epoch,
                               on_batch=ValidationPlots(save_dir, names) if plots and final_epoch else None)
            current = fitness(metrics["precision"], metrics["recall"], metrics["map50"], metrics["map"])
            if current > best_fitness:
                best_fitness, best_epoch = current, epoch
        if ctx.is_main and validated:
            LOGGER.info("%20s P %.3f  R %.3f  mAP50 %.3f  mAP50-95 %.3f", "all", metrics.get("precision", 0.0),
                        metrics.get("recall", 0.0), metrics.get("map50", 0.0), metrics.get("map", 0.0))
        # Decided on every rank alike before anything is saved: the epoch a run ends on is saved even with --nosave.
        no_progress = dist.broadcast_object(validated and 0 < cfg.patience <= epoch - best_epoch, ctx)
        interrupted = dist.broadcast_object(stop is not None and stop.is_set() and not final_epoch, ctx)
        if writes:
            append_results(save_dir / "results.csv", [epoch, *train_losses.values(),
                                                      *(float(metrics.get(k, 0.0)) for k in RESULT_KEYS),
                                                      *learning_rates])
            if not cfg.nosave or final_epoch or no_progress or interrupted:
                state = {**parts.state_dict(), "epoch": epoch, "best_fitness": best_fitness, "best_epoch": best_epoch,
                         "config": cfg.as_dict(), "model_yaml": model.yaml, "names": prepared.data.names}
                save_checkpoint(state, save_dir / "weights" / "last.pt")
                if best_epoch == epoch:
                    save_checkpoint(state, save_dir / "weights" / "best.pt")
                if cfg.save_period > 0 and epoch % cfg.save_period == 0:  # YOLOv5's: epoch0.pt, epochN.pt, ...
                    save_checkpoint(state, save_dir / "weights" / f"epoch{epoch}.pt")
        if no_progress:
            LOGGER.info("Stopping early: no improvement in %d epochs (best epoch %d)", cfg.patience, best_epoch + 1)
            break
        if interrupted:
            LOGGER.info("Stopped after epoch %d of %d; continue with --resume %s", epoch + 1, cfg.epochs,
                        save_dir / "weights" / "last.pt" if save_dir else "")
            break
    if save_dir is not None and not interrupted and best_epoch != epoch:
        # A later epoch did worse, or --patience stopped the run: the report is best.pt's, as YOLOv5
        # ends. Under --nosave there may be no best.pt; a run stopped early then reports its last epoch.
        best = save_dir / "weights" / "best.pt"
        weights = best_weights(best, ctx)
        if weights is not None:
            LOGGER.info("Validating %s (epoch %d)", best, best_epoch + 1)
            ema.module.load_state_dict(weights)
        if weights is not None or not final_epoch:  # the final epoch's own validation drew and collected
            metrics = evaluate(ema.module, prepared.val_loader, loss_fn, nc, ctx, parts.amp_dtype,
                               collect_json=cfg.save_json, on_batch=ValidationPlots(save_dir, names) if plots else None)
    if writes and metrics:  # none when a signal ended the run before its first validation
        report_validation(save_dir, metrics, names, plots)
    metrics.pop("records", None)
    if plots and epoch >= start_epoch:
        plot_results(save_dir / "results.csv", save_dir / "results.png")
    return TrainResult(metrics=metrics, best_fitness=best_fitness, epochs_run=epoch + 1 - start_epoch,
                       save_dir=save_dir)
