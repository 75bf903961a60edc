"""Typed, frozen configuration: hyperparameters (the evolvable part) and the run's options."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


from trainer.errors import UserError
from trainer.files import read_yaml


@dataclass(frozen=True)
class ValidRange:
    """The values a hyperparameter can take and still mean something: low <= value <= high, or
    value < high where `high_open`."""

    low: float = 0.0
    high: float = math.inf
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        return self.low <= value and (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"at least {self.low:g}"
        if self.high_open:
            return f"at least {self.low:g} and below {self.high:g}"
        return f"from {self.low:g} to {self.high:g}"


# No hyperparameter is negative: a negative rate, gain or probability means nothing, and torch
# takes some of them silently (negative weight decay, say). A few have upper limits too.
PROBABILITY = ValidRange(0.0, 1.0)
VALID_RANGES = {
    "momentum": ValidRange(0.0, 1.0, high_open=True),  # SGD diverges at 1; Adam refuses beta1 = 1
    "warmup_momentum": ValidRange(0.0, 1.0, high_open=True),
    "iou_t": PROBABILITY,  # an IoU
    "anchor_t": ValidRange(1.0),  # a width/height ratio: below 1 no label matches any anchor
    "hsv_s": PROBABILITY,  # gains of 1 ± hsv_s: above 1 the factor can go negative
    "hsv_v": PROBABILITY,
    "translate": PROBABILITY,  # a share of the image
    **dict.fromkeys(("flipud", "fliplr", "mosaic", "mixup", "copy_paste"), PROBABILITY),
    "anchors": ValidRange(1.0),  # anchors per level
}


def valid_range(key: str) -> ValidRange:
    return VALID_RANGES.get(key, ValidRange())


@dataclass(frozen=True)
class Hyp:
    """Training hyperparameters, in the keys and order of YOLOv5's hyp files.

    Field order is the column order of evolve.csv, so it must not change.
    """

    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    box: float = 0.05
    cls: float = 0.5
    cls_pw: float = 1.0
    obj: float = 1.0
    obj_pw: float = 1.0
    iou_t: float = 0.20
    anchor_t: float = 4.0
    fl_gamma: float = 0.0
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    perspective: float = 0.0
    flipud: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0
    mixup: float = 0.0
    copy_paste: float = 0.0
    anchors: float | None = None  # anchors per level; None keeps the model's own anchors

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "hyp") -> Hyp:
        """Validate a mapping (from YAML or an evolve.csv row) into a Hyp.

        Unknown keys, non-numeric or non-finite values and values outside their key's valid
        range are errors; missing keys keep their defaults so older or partial hyp files still load.
        """
        known = set(cls.keys())
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"{source}: unknown hyperparameter(s) {', '.join(unknown)}; "
                f"valid keys are: {', '.join(cls.keys())}"
            )
        clean: dict[str, float | None] = {}
        for key, value in values.items():
            if key == "anchors" and value is None:
                clean[key] = None
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise UserError(f"{source}: {key}={value!r} is not a number") from None
            if not math.isfinite(number):
                raise UserError(f"{source}: {key}={value!r} must be finite")
            if number not in valid_range(key):
                raise UserError(f"{source}: {key}={number:g} is out of range: {key} must be {valid_range(key)}")
            clean[key] = number
        return cls(**clean)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Hyp:
        path = Path(path)
        values = read_yaml(path, "hyp file")
        if not isinstance(values, dict):
            raise UserError(f"hyp file {path} must be a mapping of key: value")
        return cls.from_dict(values, source=str(path))

    def as_dict(self, include_unset: bool = False) -> dict[str, float]:
        values = dataclasses.asdict(self)
        if values["anchors"] is None and not include_unset:
            del values["anchors"]
        return values

    def replace(self, **changes: float) -> Hyp:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run was asked to do; saved as opt.yaml and in every checkpoint."""

    data: str = "synthetic"
    cfg: str = "yolov5n"
    weights: str = ""
    hyp: Hyp = field(default_factory=Hyp)
    hyp_path: str = "hyp.scratch-low"
    epochs: int = 100
    batch_size: int = 16
    imgsz: int = 640
    device: str = ""
    workers: int = 8
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False
    resume: str = ""
    cache: str = ""  # "" | "ram" | "disk"
    multi_scale: bool = False
    rect: bool = False  # batches of similar aspect ratio on their own canvases; no mosaic
    optimizer: str = "SGD"
    cos_lr: bool = False
    label_smoothing: float = 0.0
    seed: int = 0
    patience: int = 100
    freeze: tuple[int, ...] = ()  # indices of model layers whose parameters do not train
    single_cls: bool = False
    noval: bool = False
    nosave: bool = False
    save_period: int = -1  # also keep weights/epoch{N}.pt every N epochs; off below 1
    noautoanchor: bool = False
    save_json: bool = False
    noplots: bool = False
    sync_bn: bool = False
    deterministic: bool = True

    def as_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["hyp"] = self.hyp.as_dict()
        values["freeze"] = list(self.freeze)  # YAML has lists, not tuples
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        values["hyp"] = Hyp.from_dict(values.get("hyp", {}), source="opt.yaml")
        values["freeze"] = tuple(values.get("freeze", ()))
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
