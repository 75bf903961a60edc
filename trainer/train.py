"""`run()`: one training, read top to bottom like the recipe it is."""

from __future__ import annotations

import itertools
import logging
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from trainer import dist
from trainer.autoanchor import check_anchors
from trainer.checkpoint import Checkpoint, export_weights, load_weights
from trainer.coco import write_predictions_json
from trainer.config import Hyp, TrainConfig
from trainer.data import DataConfig, build_dataloader, build_datasets, load_data_config
from trainer.data.augment import MultiScale
from trainer.dist import DistContext
from trainer.engine import (
    Validation,
    autocast,
    evaluate,
    to_model_input,
    train_one_epoch,
)
from trainer.errors import UserError
from trainer.graphs import GraphedModel
from trainer.model import DetectionModel, model_stride
from trainer.parts import TrainingParts, build_model, build_training_parts
from trainer.plots import (
    ValidationPlots,
    plot_labels,
    plot_results,
    plot_training_batches,
    plot_validation,
)
from trainer.progress import RESULTS_COLUMNS, EpochProgress, append_results, class_table
from trainer.results import ValidationResult
from trainer.tensorboard import Scalars

LOGGER = logging.getLogger("trainer")
MIN_GRAPHED_STEPS = 50


@dataclass
class PreparedData:
    """Datasets and loaders built once and reused by every training in this process (evolution)."""

    data: DataConfig
    train_set: Any
    val_set: Any
    train_loader: Any  # endless: take len(train_loader) batches per epoch from one iterator per run
    train_batches: Any  # its EndlessBatches: start_at(epoch) before making that iterator
    val_loader: Any

    def start_run(self, hyp: Hyp, seed: int) -> None:
        """Augment with this run's hyp, and draw its samples and their order from its seed: a
        generation trained again to measure noise gets other batches than the run's first one."""
        self.train_set.set_hyp(hyp)
        self.train_set.reseed(seed)
        self.train_batches.reseed(seed)


@dataclass
class TrainResult:
    """The run's final validation and where it was saved. A run with a folder ends as YOLOv5's
    does, on best.pt's EMA weights; an evolution generation on its last epoch's."""

    result: ValidationResult | None  # None when a stop signal ended the run before its first validation
    best_fitness: float
    epochs_run: int
    save_dir: Path | None


@dataclass(frozen=True)
class RunFolder:
    """Where a run writes: `path` on every rank (None for an evolution generation, which keeps
    nothing), written by rank 0 only; with pictures unless --noplots."""

    path: Path | None
    writes: bool
    plots: bool

    @classmethod
    def for_rank(cls, path: Path | None, ctx: DistContext, noplots: bool) -> RunFolder:
        writes = path is not None and ctx.is_main
        return cls(path, writes, writes and not noplots)

    def validation_plots(self, names: list[str], drawn: bool = True) -> ValidationPlots | None:
        """The callback that draws a validation's first batches, where this one is to draw them."""
        return ValidationPlots(self.path, names) if drawn and self.plots and self.path is not None else None


@dataclass
class RunState:
    """What a run carries from epoch to epoch; checkpoints keep the best fitness and epoch."""

    start_epoch: int = 0
    best_fitness: float = -1.0  # -1: no validated epoch yet
    best_epoch: int = 0
    epoch: int = -1  # the last epoch trained
    validation: Validation | None = None  # the latest

    @classmethod
    def resumed(cls, checkpoint: Checkpoint) -> RunState:
        return cls(start_epoch=checkpoint.epoch + 1, best_fitness=checkpoint.best_fitness,
                   best_epoch=checkpoint.best_epoch, epoch=checkpoint.epoch)

    def validated(self, validation: Validation) -> None:
        """The current epoch's validation; it becomes the best epoch when its fitness is higher."""
        self.validation = validation
        fitness = validation.result.fitness
        if fitness > self.best_fitness:
            self.best_fitness, self.best_epoch = fitness, self.epoch

    def latest_result(self) -> ValidationResult:
        """The latest validation's numbers; zeros before the first, as in YOLOv5's rows under --noval."""
        return self.validation.result if self.validation is not None else ValidationResult()

    def checkpoint(self, parts: TrainingParts, cfg: TrainConfig, names: list[str]) -> Checkpoint:
        return Checkpoint(epoch=self.epoch, best_fitness=self.best_fitness, best_epoch=self.best_epoch,
                          config=cfg.as_dict(), model_yaml=parts.model.yaml, names=names,
                          training=parts.state_dict())


def run(cfg: TrainConfig, ctx: DistContext, save_dir: Path | None, prepared: PreparedData | None = None,
        resume_state: Checkpoint | dict[str, Any] | None = None, stop: threading.Event | None = None,
        rungs: Sequence[int] = (), on_rung: Callable[[int, ValidationResult], None] | None = None) -> TrainResult:
    """Train `cfg.epochs` epochs; write the run folder on rank 0 unless `save_dir` is None.

    `resume_state` is the checkpoint to go on from: a Checkpoint or the dict `load_checkpoint`
    reads. When `stop` is set (SIGTERM), the run ends after the current epoch's checkpoint,
    ready for --resume. After each epoch in `rungs` (counted from 1) the EMA weights are
    validated even under --noval and `on_rung` gets the result; an exception it raises ends the
    run there (an evolution's pruning).
    """
    # The same seed on every rank: each builds the same model and EMA before DDP syncs them.
    # Per-sample augmentation has its own generators, seeded by (seed, epoch, index).
    seed_everything(cfg.seed, cfg.deterministic)
    resume = Checkpoint.from_dict(resume_state) if isinstance(resume_state, dict) else resume_state
    folder = RunFolder.for_rank(save_dir, ctx, cfg.noplots)
    if folder.writes:
        write_settings(save_dir, cfg)
    prepared = prepared or prepare_data(cfg, ctx)
    prepared.start_run(cfg.hyp, cfg.seed)
    names = prepared.data.class_names(cfg.single_cls)
    model = build_model(cfg, len(names), ctx.device)
    if resume is None and not cfg.noautoanchor:
        fit_anchors(model, prepared.train_set, cfg, ctx)
    if resume is None and folder.plots:
        save_labels_plot(save_dir / "labels.jpg", prepared.train_set, model, cfg.imgsz, names)
    parts = build_training_parts(cfg, ctx, model, len(prepared.train_loader))
    state = RunState() if resume is None else resume_training(parts, resume, cfg.epochs)
    rescale = ready_loop(parts, cfg, ctx, prepared, state.start_epoch)
    batches = EpochBatches(prepared, state.start_epoch)
    stopped = False
    scalars = Scalars(save_dir if folder.writes else None, RESULTS_COLUMNS)  # TensorBoard, as YOLOv5 logs
    try:
        for epoch in range(state.start_epoch, cfg.epochs):
            state.epoch, final_epoch = epoch, epoch + 1 == cfg.epochs
            train_losses, learning_rates = train_epoch(parts, batches, epoch, cfg, ctx, folder, names, rescale)
            validated = not cfg.noval or final_epoch or epoch + 1 in rungs
            if validated:
                state.validated(validate(parts, prepared.val_loader, len(names), ctx, cfg.save_json and final_epoch,
                                         folder.validation_plots(names, drawn=final_epoch)))
            if on_rung is not None and epoch + 1 in rungs:
                on_rung(epoch + 1, state.latest_result())
            # Decided on every rank alike before anything is saved: the epoch a run ends on is saved even with --nosave.
            no_progress = dist.broadcast_object(validated and 0 < cfg.patience <= epoch - state.best_epoch, ctx)
            stopped = dist.broadcast_object(stop is not None and stop.is_set() and not final_epoch, ctx)
            if folder.writes:
                row = [epoch, *train_losses.values(), *state.latest_result().values(), *learning_rates]
                append_results(save_dir / "results.csv", row)
                scalars.epoch(row)
                if not cfg.nosave or final_epoch or no_progress or stopped:
                    save_checkpoints(save_dir / "weights", state.checkpoint(parts, cfg, prepared.data.names),
                                     cfg.save_period)
            if no_progress or stopped:
                log_early_end(state, cfg, save_dir, patience=no_progress)
                break
    finally:
        scalars.close()
    if save_dir is not None and not stopped and state.best_epoch != state.epoch:
        revalidate_best(parts, prepared.val_loader, names, ctx, folder, state, cfg)
    if folder.writes and state.validation is not None:  # none when a signal ended the run before any
        report_validation(save_dir, state.validation, names, folder.plots)
    if folder.plots and state.epoch >= state.start_epoch:
        plot_results(save_dir / "results.csv", save_dir / "results.png")
    if folder.writes and not stopped:
        strip_best(save_dir / "weights" / "best.pt")
    return TrainResult(result=state.validation.result if state.validation else None, best_fitness=state.best_fitness,
                       epochs_run=state.epoch + 1 - state.start_epoch, save_dir=save_dir)


def ready_loop(parts: TrainingParts, cfg: TrainConfig, ctx: DistContext, prepared: PreparedData,
               start_epoch: int) -> MultiScale | None:
    """Say what will train, record CUDA graphs where they apply; returns --multi-scale's resizer."""
    LOGGER.info("Training %s for %d epochs: %d images, batch %d (%d per process × %d), %s, %d loader workers "
                "per process", cfg.cfg, cfg.epochs, len(prepared.train_set), cfg.batch_size,
                cfg.batch_size // ctx.world_size, ctx.world_size, ctx.device, cfg.workers)
    if not (cfg.multi_scale or cfg.rect):  # graphs replay one input shape
        capture_graphs(parts, cfg.batch_size // ctx.world_size, cfg.imgsz, ctx.device,
                       steps=(cfg.epochs - start_epoch) * len(prepared.train_loader))
    return MultiScale(cfg.imgsz, int(parts.model.stride.max()), cfg.seed) if cfg.multi_scale else None


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


def prepare_data(cfg: TrainConfig, ctx: DistContext) -> PreparedData:
    """Verify labels, fill caches and start loader workers: once per process, not per generation.
    Canvases are multiples of the model's largest stride (64 for a P6 model)."""
    data = load_data_config(cfg.data)
    stride = model_stride(cfg.cfg)
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


def write_settings(save_dir: Path, cfg: TrainConfig) -> None:
    """The run folder with its weights/ folder, hyp.yaml and opt.yaml, as YOLOv5 starts a run."""
    (save_dir / "weights").mkdir(parents=True, exist_ok=True)
    (save_dir / "hyp.yaml").write_text(yaml.safe_dump(cfg.hyp.as_dict(), sort_keys=False))
    (save_dir / "opt.yaml").write_text(yaml.safe_dump(cfg.as_dict(), sort_keys=False))


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


def fit_anchors(model: DetectionModel, dataset: Any, cfg: TrainConfig, ctx: DistContext) -> None:
    """AutoAnchor on rank 0: replace the model's anchors where they fit the labels badly; every
    rank then takes rank 0's anchors."""
    anchors = None
    if ctx.is_main:
        report = check_anchors(model, label_sizes(dataset, cfg.imgsz), cfg.hyp.anchor_t,
                               cfg.imgsz, generator=torch.Generator().manual_seed(cfg.seed))
        LOGGER.info("AutoAnchor: best possible recall %.4f%s", report.bpr_before,
                    f" → {report.bpr_after:.4f}, anchors replaced" if report.replaced else "")
        anchors = model.detect.anchors.cpu()
    model.detect.anchors.copy_(dist.broadcast_object(anchors, ctx).to(ctx.device))


def resume_training(parts: TrainingParts, checkpoint: Checkpoint, epochs: int) -> RunState:
    """Load the checkpoint's training state into `parts`; the run goes on after its epoch."""
    parts.restore(checkpoint.training)
    state = RunState.resumed(checkpoint)
    if state.start_epoch >= epochs:
        raise UserError(f"run already finished {epochs} epochs: nothing to resume")
    LOGGER.info("Resuming from epoch %d of %d", state.start_epoch + 1, epochs)
    return state


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


class EpochBatches:
    """Each epoch's training batches, all drawn from one iterator for the whole run: the loader's
    workers prefetch across epoch boundaries (and through validation) instead of starting every
    epoch from empty."""

    def __init__(self, prepared: PreparedData, start_epoch: int) -> None:
        prepared.train_batches.start_at(start_epoch)
        self.per_epoch = len(prepared.train_loader)
        self._batches = iter(prepared.train_loader)

    def next_epoch(self) -> Iterator[Any]:
        return itertools.islice(self._batches, self.per_epoch)


def train_epoch(parts: TrainingParts, batches: EpochBatches, epoch: int, cfg: TrainConfig, ctx: DistContext,
                folder: RunFolder, names: list[str],
                rescale: MultiScale | None) -> tuple[dict[str, float], list[float]]:
    """One epoch's training and its scheduler step; its mean losses and the learning rates it
    ended with. The first epoch's first batches are drawn as train_batch*.jpg."""
    epoch_batches = batches.next_epoch()
    if folder.plots and epoch == 0:
        epoch_batches = plot_training_batches(epoch_batches, folder.path, names)
    progress = EpochProgress(ctx.is_main, epoch, cfg.epochs, batches.per_epoch, ctx.device)
    losses = train_one_epoch(parts, epoch_batches, epoch, ctx, progress, rescale=rescale)
    learning_rates = [group["lr"] for group in parts.optimizer.param_groups]
    parts.scheduler.step()
    return losses, learning_rates


def validate(parts: TrainingParts, loader: Any, nc: int, ctx: DistContext, collect_json: bool,
             on_batch: ValidationPlots | None) -> Validation:
    """An epoch's validation of the EMA weights, logged in one line."""
    validation = evaluate(parts.ema.module, loader, parts.loss_fn, nc, ctx, parts.amp_dtype,
                          collect_json=collect_json, on_batch=on_batch)
    result = validation.result
    if ctx.is_main:
        LOGGER.info("%20s P %.3f  R %.3f  mAP50 %.3f  mAP50-95 %.3f", "all", result.precision, result.recall,
                    result.map50, result.map)
    return validation


def save_checkpoints(weights: Path, checkpoint: Checkpoint, save_period: int) -> None:
    """last.pt; best.pt when this epoch is the best; epochN.pt every `save_period` epochs."""
    checkpoint.save(weights / "last.pt")
    if checkpoint.best_epoch == checkpoint.epoch:
        checkpoint.save(weights / "best.pt")
    if save_period > 0 and checkpoint.epoch % save_period == 0:  # YOLOv5's: epoch0.pt, epochN.pt, ...
        checkpoint.save(weights / f"epoch{checkpoint.epoch}.pt")


def log_early_end(state: RunState, cfg: TrainConfig, save_dir: Path | None, patience: bool) -> None:
    """Why the run ends before its last epoch: --patience, or a stop signal."""
    if patience:
        LOGGER.info("Stopping early: no improvement in %d epochs (best epoch %d)", cfg.patience, state.best_epoch + 1)
    else:
        LOGGER.info("Stopped after epoch %d of %d; continue with --resume %s", state.epoch + 1, cfg.epochs,
                    save_dir / "weights" / "last.pt" if save_dir else "")


def strip_best(path: Path) -> None:
    """At the end of a run, best.pt keeps only what `--weights` and val read, as YOLOv5 strips
    it (yolov5n: 3.7 MB instead of 29). last.pt stays whole for --resume. --nosave may leave
    no best.pt."""
    if path.is_file():
        export_weights(path, path)
        LOGGER.info("Optimiser state stripped from %s: %.1f MB", path, path.stat().st_size / 1e6)


def best_weights(path: Path, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The EMA weights in best.pt, read by rank 0 and sent to every rank; None where the run kept
    no best.pt (--nosave keeps only the epoch it ends on)."""
    weights = load_weights(path).state if ctx.is_main and path.is_file() else None
    return dist.broadcast_object(weights, ctx)


def revalidate_best(parts: TrainingParts, loader: Any, names: list[str], ctx: DistContext, folder: RunFolder,
                    state: RunState, cfg: TrainConfig) -> None:
    """A later epoch did worse, or --patience stopped the run: the report is best.pt's, as
    YOLOv5 ends. Under --nosave there may be no best.pt; a run stopped early then reports its
    last epoch."""
    best = folder.path / "weights" / "best.pt"
    weights = best_weights(best, ctx)
    if weights is not None:
        LOGGER.info("Validating %s (epoch %d)", best, state.best_epoch + 1)
        parts.ema.module.load_state_dict(weights)
    if weights is not None or state.epoch + 1 < cfg.epochs:  # the final epoch's own validation drew and collected
        state.validation = evaluate(parts.ema.module, loader, parts.loss_fn, len(names), ctx, parts.amp_dtype,
                                    collect_json=cfg.save_json, on_batch=folder.validation_plots(names))


def report_validation(save_dir: Path, validation: Validation, names: list[str], plots: bool) -> None:
    """What a final validation leaves, as YOLOv5's train.py and val.py end: the class table in the
    log, predictions.json where they were collected (--save-json), and the curves."""
    if validation.records is not None:
        write_predictions_json(validation.records, save_dir / "predictions.json")
    for line in class_table(validation.scores, names):
        LOGGER.info("%s", line)
    if plots:
        plot_validation(save_dir, validation.scores, validation.confusion_matrix, names)
