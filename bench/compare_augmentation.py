"""Training samples from our augmentation pipeline against YOLOv5's, on the same images.

    python bench/compare_augmentation.py --data path/to/data.yaml [--imgsz 256] [--hyp hyp.scratch-low]
        [--samples 1600] [--seed 0] [--weights a.pt b.pt ...] [--pipelines ours,yolov5]

Both pipelines draw `--samples` training samples (mosaic, random perspective, colour, flips, as
the hyp says) from the data's training images: ours through the trainer's dataset, YOLOv5's
through its `LoadImagesAndLabels` (the `yolov5` package, 7.0.x, must be importable: run this
script with the Python that has it). Per pipeline:

- `boxes_per_image` (mean and standard error) and box sizes (√(w·h) as a share of the side:
  percentiles 5, 25, 50, 75, 95): what the geometric augmentation leaves of the labels;
- `pixel_mean`, `pixel_std`: what the colour augmentation does to the images;
- `loss`, for each `--weights`: the mean [box, obj, cls] loss (the trainer's own loss, the hyp's
  gains) of those fixed weights on the pipeline's batches of 16. The same trained model scored on
  both pipelines says whether one pipeline's samples are harder than the other's as a whole,
  which no single statistic does.

The same primary images are drawn for both (one index stream from `--seed`); the rest of each
sample is each pipeline's own randomness. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from trainer.checkpoint import load_weights
from trainer.config import Hyp
from trainer.data import load_data_config
from trainer.data.dataset import YoloDataset, collate
from trainer.data.labels import load_samples
from trainer.engine import to_model_input
from trainer.errors import UserError
from trainer.loss import DetectionLoss
from trainer.model import DetectionModel
from trainer.paths import resolve_config

BATCH = 16
PIPELINES = ("ours", "yolov5")
SIZE_PERCENTILES = (5, 25, 50, 75, 95)
# A batch: uint8 images (B, 3, H, W) and targets (N, 6) rows of image, class, cx, cy, w, h.
Batch = tuple[torch.Tensor, torch.Tensor]


def sample_indices(count: int, images: int, seed: int) -> list[int]:
    """The primary image of each sample, the same for both pipelines."""
    return np.random.default_rng(seed).integers(images, size=count).tolist()


def ours_batches(data_yaml: str, imgsz: int, hyp: Hyp, indices: Sequence[int], seed: int) -> Iterator[Batch]:
    data = load_data_config(data_yaml)
    dataset = YoloDataset(load_samples(data.train, data.nc, "train"), imgsz, augment=True, hyp=hyp, seed=seed)
    for start in range(0, len(indices), BATCH):
        # (epoch, index) keys: each batch its own epoch, so an image drawn twice is augmented anew.
        items = [dataset[(start // BATCH, index)] for index in indices[start:start + BATCH]]
        yield collate(items)[:2]


def yolov5_batches(data_yaml: str, imgsz: int, hyp_path: Path, indices: Sequence[int], seed: int) -> Iterator[Batch]:
    try:
        import yaml
        from yolov5.utils.dataloaders import LoadImagesAndLabels
    except ImportError as error:
        raise UserError(f"the yolov5 package is not importable ({error}); run this script with the Python "
                        "that has it, or pass --pipelines ours") from error
    random.seed(seed)
    np.random.seed(seed)
    data = load_data_config(data_yaml)
    hyp = yaml.safe_load(hyp_path.read_text())
    dataset = LoadImagesAndLabels([str(source) for source in data.train] if len(data.train) > 1 else str(data.train[0]),
                                  img_size=imgsz, batch_size=BATCH, augment=True, hyp=hyp, stride=32, prefix="")
    for start in range(0, len(indices), BATCH):
        images, targets, _, _ = LoadImagesAndLabels.collate_fn([dataset[index]
                                                                for index in indices[start:start + BATCH]])
        yield images, targets


def load_models(paths: Sequence[Path], nc: int) -> dict[str, DetectionModel]:
    models = {}
    for path in paths:
        weights = load_weights(str(path))
        model = DetectionModel(weights.model_name(), nc=nc)
        model.load_state_dict(weights.state, strict=False)
        models[str(path)] = model.float().eval()
    return models


def measure(batches: Iterator[Batch], models: dict[str, DetectionModel],
            loss_fn: DetectionLoss | None) -> dict[str, Any]:
    counts: list[int] = []
    sizes: list[float] = []
    pixel_sums = np.zeros(2)
    pixels = 0
    losses = {name: torch.zeros(3) for name in models}
    batch_count = 0
    for images, targets in batches:
        batch_count += 1
        counts += torch.bincount(targets[:, 0].long(), minlength=len(images)).tolist()
        sizes += (targets[:, 4] * targets[:, 5]).sqrt().tolist()
        values = images.double()
        pixel_sums += (values.sum().item(), values.square().sum().item())
        pixels += values.numel()
        if loss_fn is not None:
            inputs = to_model_input(images, torch.device("cpu"))
            with torch.no_grad():
                for name, model in models.items():
                    losses[name] += loss_fn([level.float() for level in model(inputs)[1]], targets)[1]
    mean = pixel_sums[0] / pixels
    return {
        "samples": len(counts),
        "boxes_per_image": round(float(np.mean(counts)), 4),
        "boxes_per_image_se": round(float(np.std(counts, ddof=1) / np.sqrt(len(counts))), 4),
        "box_size_percentiles": dict(zip(map(str, SIZE_PERCENTILES),
                                         np.percentile(sizes, SIZE_PERCENTILES).round(4).tolist(), strict=True)),
        "pixel_mean": round(mean, 2),
        "pixel_std": round(float(np.sqrt(pixel_sums[1] / pixels - mean**2)), 2),
        "loss": {name: [round(value, 5) for value in (total / batch_count).tolist()] for name, total in losses.items()},
    }


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a data YAML both trainers read")
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--hyp", default="hyp.scratch-low", help="a hyp YAML path or a bundled name")
    parser.add_argument("--samples", type=int, default=1600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, nargs="*", default=[],
                        help="trained weights to score each pipeline with")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="ours, yolov5 or both, comma-separated")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(argv)
    chosen = [name.strip() for name in args.pipelines.split(",") if name.strip()]
    if not chosen or set(chosen) - set(PIPELINES):
        raise UserError(f"--pipelines {args.pipelines!r}: choose from {', '.join(PIPELINES)}")
    torch.manual_seed(args.seed)
    hyp_path = resolve_config(args.hyp, "hyps")
    hyp = Hyp.from_yaml(hyp_path)
    data = load_data_config(args.data)
    indices = sample_indices(args.samples, len(load_samples(data.train, data.nc, "train")), args.seed)
    models = load_models(args.weights, data.nc)
    loss_fn = DetectionLoss.from_model(next(iter(models.values())), hyp, imgsz=args.imgsz) if models else None
    makers: dict[str, Callable[[], Iterator[Batch]]] = {
        "ours": lambda: ours_batches(args.data, args.imgsz, hyp, indices, args.seed),
        "yolov5": lambda: yolov5_batches(args.data, args.imgsz, hyp_path, indices, args.seed),
    }
    result = {"data": args.data, "imgsz": args.imgsz, "hyp": str(hyp_path), "seed": args.seed,
              **{name: measure(makers[name](), models, loss_fn) for name in chosen}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"compare_augmentation: {error}")
