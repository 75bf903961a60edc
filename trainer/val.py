"""`python -m trainer.val`: score weights on a data set's validation images, as YOLOv5's val.py does.

The same validation as the end of every training epoch (`trainer.engine.evaluate`): rectangular
batches, the same thresholds, YOLOv5's per-class table. The weights may be ours or YOLOv5's.
The folder `runs/val/exp` gets the first batches drawn with labels and with detections, the
PR, F1, P and R curves, the confusion matrix, and with --save-json the COCO-format predictions.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import click
import torch

from trainer import __version__, dist
from trainer.checkpoint import load_weights
from trainer.config import Hyp, flag
from trainer.data.data_config import load_data_config
from trainer.data.dataset import YoloDataset
from trainer.data.labels import load_samples
from trainer.data.loader import build_dataloader
from trainer.engine import Validation, evaluate
from trainer.errors import UserError
from trainer.flags import CONTEXT_SETTINGS, config_options, field_values
from trainer.loss import DetectionLoss
from trainer.model.yolo import DetectionModel, stride_multiple
from trainer.parts import amp_dtype_for
from trainer.plots import ValidationPlots
from trainer.train import next_run_dir, report_validation

LOGGER = logging.getLogger("trainer")


@dataclass(frozen=True, kw_only=True)
class ValConfig:
    """What `python -m trainer.val` was asked to score, and how; each field is its flag."""

    data: str = field(default="synthetic",
                      metadata=flag("data.yaml path or a bundled name (synthetic = built-in data)"))
    weights: str = field(metadata=flag("a last.pt or best.pt of evolvectl or YOLOv5"))
    cfg: str | None = field(default=None,
                            metadata=flag("model YAML path or bundled name; default: the weights' model"))
    task: str = field(default="val", metadata=flag("which split of the data to score", choices=("val", "test")))
    batch_size: int = field(default=32, metadata=flag(aliases=("--batch",), low=1))
    imgsz: int = field(default=640, metadata=flag("image size (pixels)", aliases=("--img", "--img-size"), low=32))
    device: str = field(default="", metadata=flag("cuda device, i.e. 0, or cpu"))
    workers: int = field(default=8, metadata=flag("dataloader workers", low=0))
    conf_thres: float = field(default=0.001, metadata=flag("confidence threshold", low=0.0, high=1.0))
    iou_thres: float = field(default=0.6, metadata=flag("NMS IoU threshold", low=0.0, high=1.0))
    single_cls: bool = field(default=False, metadata=flag("score as a single class"))
    save_json: bool = field(default=False, metadata=flag("also write COCO-format predictions.json"))
    project: str = field(default="runs/val", metadata=flag("save to project/name"))
    name: str = field(default="exp", metadata=flag("save to project/name"))
    exist_ok: bool = field(default=False, metadata=flag("existing project/name ok, do not increment"))


def validate(config: ValConfig) -> Validation:
    """Score `config.weights` on the data's validation (or test) images."""
    if len(dist.parse_devices(config.device)) > 1:
        raise UserError(f"--device {config.device}: validation runs on one device; pick one, e.g. 0")
    ctx = dist.init_distributed(config.device)
    weights = load_weights(config.weights)
    data = load_data_config(config.data)
    names = data.class_names(config.single_cls)
    nc = len(names)
    model_name = config.cfg or weights.model_name()
    model = DetectionModel(model_name, nc=nc)
    own = model.state_dict()
    misfits = [name for name, tensor in weights.state.items() if name in own and own[name].shape != tensor.shape]
    if misfits or set(own) - set(weights.state):
        raise UserError(f"{config.weights} does not fit a {nc}-class {model_name} model for this data: "
                        "check --data, --cfg and --single-cls")
    model.load_state_dict(weights.state, strict=False)
    model = model.to(ctx.device, memory_format=torch.channels_last).eval()
    hyp = Hyp()  # validation losses with the default gains
    task = config.task
    if task == "test" and not data.test:
        raise UserError(f"--task test: {config.data} has no `test` split; add one to it, or use --task val")
    samples = load_samples(data.test if task == "test" else data.val, data.nc, task)
    stride = int(model.stride.max())
    imgsz = stride_multiple(config.imgsz, stride)  # rounded up with a warning, as YOLOv5's val.py does
    dataset = YoloDataset(samples, imgsz, augment=False, hyp=hyp, single_cls=config.single_cls, stride=stride)
    loader = build_dataloader(dataset, config.batch_size, config.workers, False, 0, shard=True)[0]
    loss_fn = DetectionLoss.from_model(model, hyp, imgsz=imgsz)
    save_dir = next_run_dir(config.project, config.name, config.exist_ok)
    save_dir.mkdir(parents=True, exist_ok=True)
    validation = evaluate(model, loader, loss_fn, nc, ctx, amp_dtype_for(ctx.device), config.conf_thres,
                          config.iou_thres, collect_json=config.save_json,
                          on_batch=ValidationPlots(save_dir, names))
    report_validation(save_dir, validation, names, plots=True)
    LOGGER.info("Results saved to %s", save_dir)
    return validation


@click.command(context_settings=CONTEXT_SETTINGS)
@config_options(ValConfig)
@click.version_option(__version__, prog_name="trainer.val")
def main(**options: Any) -> None:
    """Score a detector's weights on a data set's validation images (YOLOv5's val.py)."""
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stderr)
    validate(ValConfig(**field_values(ValConfig, options)))


if __name__ == "__main__":
    main()
