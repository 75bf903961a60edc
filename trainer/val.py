"""`python -m trainer.val`: score weights on a data set's validation images, as YOLOv5's val.py does.

The same validation as the end of every training epoch (`trainer.engine.evaluate`): rectangular
batches, the same thresholds, YOLOv5's per-class table. The weights may be ours or YOLOv5's.
The folder `runs/val/exp` gets the first batches drawn with labels and with detections, the
PR, F1, P and R curves, the confusion matrix, and with --save-json the COCO-format predictions.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click
import torch

from trainer import __version__, dist
from trainer.checkpoint import load_weights
from trainer.config import Hyp
from trainer.data.data_config import load_data_config
from trainer.data.dataset import YoloDataset
from trainer.data.labels import load_samples
from trainer.data.loader import build_dataloader
from trainer.engine import Validation, evaluate
from trainer.errors import UserError
from trainer.loss import DetectionLoss
from trainer.model.yolo import DetectionModel
from trainer.plots import ValidationPlots
from trainer.parts import amp_dtype_for
from trainer.train import next_run_dir, report_validation

LOGGER = logging.getLogger("trainer")


def validate(options: dict[str, Any]) -> Validation:
    """Score `options["weights"]` on the data's validation images."""
    if len(dist.parse_devices(options["device"])) > 1:
        raise UserError(f"--device {options['device']}: validation runs on one device; pick one, e.g. 0")
    ctx = dist.init_distributed(options["device"])
    weights = load_weights(options["weights"])
    data = load_data_config(options["data"])
    names = data.class_names(options["single_cls"])
    nc = len(names)
    model_name = options["cfg"] or weights.model_name()
    model = DetectionModel(model_name, nc=nc)
    own = model.state_dict()
    misfits = [name for name, tensor in weights.state.items() if name in own and own[name].shape != tensor.shape]
    if misfits or set(own) - set(weights.state):
        raise UserError(f"{options['weights']} does not fit a {nc}-class {model_name} model for this data: "
                        "check --data, --cfg and --single-cls")
    model.load_state_dict(weights.state, strict=False)
    model = model.to(ctx.device, memory_format=torch.channels_last).eval()
    hyp = Hyp()  # validation losses with the default gains
    task = options["task"]
    if task == "test" and not data.test:
        raise UserError(f"--task test: {options['data']} has no `test` split; add one to it, or use --task val")
    samples = load_samples(data.test if task == "test" else data.val, data.nc, task)
    dataset = YoloDataset(samples, options["imgsz"], augment=False, hyp=hyp, single_cls=options["single_cls"],
                          stride=int(model.stride.max()))
    loader = build_dataloader(dataset, options["batch_size"], options["workers"], False, 0, shard=True)[0]
    loss_fn = DetectionLoss.from_model(model, hyp, imgsz=options["imgsz"])
    save_dir = next_run_dir(options["project"], options["name"], options["exist_ok"])
    save_dir.mkdir(parents=True, exist_ok=True)
    validation = evaluate(model, loader, loss_fn, nc, ctx, amp_dtype_for(ctx.device), options["conf_thres"],
                          options["iou_thres"], collect_json=options["save_json"],
                          on_batch=ValidationPlots(save_dir, names))
    report_validation(save_dir, validation, names, plots=True)
    LOGGER.info("Results saved to %s", save_dir)
    return validation


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", default="synthetic", help="data.yaml path or a bundled name (synthetic = built-in data)")
@click.option("--weights", required=True, help="a last.pt or best.pt of evolvectl or YOLOv5")
@click.option("--cfg", default=None, help="model YAML path or bundled name; default: the weights' model")
@click.option("--task", default="val", type=click.Choice(["val", "test"]), help="which split of the data to score")
@click.option("--batch-size", "--batch", "batch_size", default=32, type=click.IntRange(min=1))
@click.option("--imgsz", "--img", "--img-size", "imgsz", default=640, type=click.IntRange(min=32),
              help="image size (pixels)")
@click.option("--device", default="", help="cuda device, i.e. 0, or cpu")
@click.option("--workers", default=8, type=click.IntRange(min=0), help="dataloader workers")
@click.option("--conf-thres", default=0.001, type=click.FloatRange(0.0, 1.0), help="confidence threshold")
@click.option("--iou-thres", default=0.6, type=click.FloatRange(0.0, 1.0), help="NMS IoU threshold")
@click.option("--single-cls", is_flag=True, help="score as a single class")
@click.option("--save-json", is_flag=True, help="also write COCO-format predictions.json")
@click.option("--project", default="runs/val", help="save to project/name")
@click.option("--name", default="exp", help="save to project/name")
@click.option("--exist-ok", is_flag=True, help="existing project/name ok, do not increment")
@click.version_option(__version__, prog_name="trainer.val")
def main(**options: Any) -> None:
    """Score a detector's weights on a data set's validation images (YOLOv5's val.py)."""
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stderr)
    validate(options)


if __name__ == "__main__":
    main()
