"""Run under `torch.distributed.run` (or alone) by tests/test_ddp.py; rank 0 writes the outputs.

train: a few real training steps (engine.train_one_epoch) on a dataset whose images all share one
box layout, with BatchNorm removed, so that DDP on per-rank batch b must equal one process on 2b.
validate: engine.evaluate of a fixed model, distributed or not.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch
from torch import nn

from trainer import dist
from trainer.config import Hyp
from trainer.data import build_dataloader, build_datasets, load_data_config
from trainer.ema import ModelEMA
from trainer.engine import evaluate, train_one_epoch
from trainer.loss import DetectionLoss
from trainer.model import DetectionModel
from trainer.optim import Warmup, build_optimizer
from trainer.parts import StepCounter, TrainingParts
from trainer.progress import EpochProgress

NO_AUGMENTATION = Hyp(hsv_h=0, hsv_s=0, hsv_v=0, translate=0, scale=0, fliplr=0, mosaic=0)


def without_batchnorm(model: nn.Module) -> nn.Module:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.Identity())
    return model


class WithNearHits(nn.Module):
    """The model's detections plus, for each box of the layout every image shares, a confident
    detection near it: so the metrics compared have true positives, at IoUs that vary from image to
    image (jittered by a generator seeded from the image's pixels, the same on any rank)."""

    def __init__(self, model: nn.Module, layout: torch.Tensor, imgsz: int) -> None:
        super().__init__()
        self.model, self.layout, self.imgsz = model, layout, imgsz

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        decoded, raw = self.model(images)
        height, width = images.shape[2:]
        boxes = self.layout[:, 1:] * self.imgsz
        boxes[:, :2] += torch.tensor([(width - self.imgsz) // 2, (height - self.imgsz) // 2])  # letterbox
        hits = []
        for image in images:
            centre = image[:, height // 2 - 4 : height // 2 + 4, width // 2 - 4 : width // 2 + 4]
            seed = int((centre * 255).round().sum())  # the images' noise: differs from image to image
            jitter = torch.rand(len(boxes), 5, generator=torch.Generator().manual_seed(seed))
            scores = torch.nn.functional.one_hot(self.layout[:, 0].long(), decoded.shape[-1] - 5).float()
            hit = torch.cat([boxes[:, :2] + (jitter[:, :2] - 0.5) * 8, boxes[:, 2:] * (0.8 + 0.4 * jitter[:, 2:4]),
                             0.5 + jitter[:, 4:] / 2, scores], dim=1)
            hits.append(hit)
        return torch.cat([torch.stack(hits).to(decoded), decoded], dim=1), raw


def main(mode: str, data: str, total_batch: int, out: Path) -> None:
    ctx = dist.init_distributed("cpu")
    torch.manual_seed(0)
    config = load_data_config(data)
    train_set, val_set = build_datasets(config, 64, NO_AUGMENTATION, "", False, seed=0)
    model = DetectionModel("yolov5n", nc=config.nc)
    per_rank = total_batch // ctx.world_size
    loss_fn = DetectionLoss.from_model(model, NO_AUGMENTATION, 0.0, 64)
    if mode == "train":
        model = without_batchnorm(model)
        loader, _ = build_dataloader(train_set, per_rank, 0, True, 0, ctx.rank, ctx.world_size)
        optimizer = build_optimizer(model, "SGD", 0.01, 0.937, 5e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)  # sets the warmup's initial_lr
        ema = ModelEMA(model)
        initial = {name: value.clone() for name, value in model.state_dict().items()}
        parts = TrainingParts(model=model, train_model=dist.wrap_model(model, ctx, sync_bn=False), optimizer=optimizer,
                              scheduler=scheduler, lr_factor=lambda epoch: 1.0,
                              scaler=torch.amp.GradScaler("cpu", enabled=False), ema=ema,
                              warmup=Warmup.for_run(3.0, len(loader), total_batch, 0.1, 0.8, 0.937), loss_fn=loss_fn,
                              amp_dtype=None, counter=StepCounter())
        batches = iter(loader)
        for epoch in range(2):
            progress = EpochProgress(False, epoch, 2, len(loader), ctx.device)
            train_one_epoch(parts, itertools.islice(batches, len(loader)), epoch, ctx, progress)
        if ctx.is_main:
            torch.save({"model": model.state_dict(), "ema": parts.ema.module.state_dict(), "initial": initial,
                        "steps": parts.counter.iteration}, out)
    else:
        loader, _ = build_dataloader(val_set, per_rank, 0, False, 0, ctx.rank, ctx.world_size, shard=True)
        # Keep every box: an untrained model scores below the usual 0.001.
        model = WithNearHits(model, torch.from_numpy(val_set.labels[0]), val_set.imgsz)
        validation = evaluate(model.eval(), loader, loss_fn, config.nc, ctx, conf_thres=0.0)
        if ctx.is_main:
            out.write_text(json.dumps(dataclasses.asdict(validation.result)))
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
