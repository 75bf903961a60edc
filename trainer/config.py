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
        unknown = [key for key in values if key not in known]
        if unknown:
            shown = (key if isinstance(key, str) and key.isidentifier() else repr(key) for key in unknown)
            raise UserError(
                f"{source}: unknown hyperparameter(s) {', '.join(shown)}; "
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
class Flag:
    """How a config field is set on the command line; `trainer.flags` turns a field, its default and
    this into a click option. The flag is `--` + the field's name with dashes, unless `name` says
    otherwise; `low`/`high` bound a number, `choices` a string; `flag_value` is what the flag means
    given without a value (`--resume` alone); an `optional` flag left out is None, and the program
    decides the field's value (`--cfg`: the model of the --weights)."""

    help: str = ""
    name: str = ""
    aliases: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    flag_value: str | None = None
    optional: bool = False
    hidden: bool = False


FLAG = "flag"  # the key of a field's metadata that holds its Flag
NO_FLAG: dict[str, Flag | None] = {FLAG: None}  # a field no flag sets: say why where it is used


def flag(help: str = "", **details: Any) -> dict[str, Flag]:
    """A field's metadata: `field(default=..., metadata=flag("help text", low=1))`."""
    return {FLAG: Flag(help, **details)}


DEFAULT_MODEL = "yolov5n"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run was asked to do; saved as opt.yaml and in every checkpoint.

    Every field but `hyp` (read from the `--hyp` file named by `hyp_path`) and `deterministic` is
    a flag of `python -m trainer`, with the field's default.
    """

    data: str = field(default="synthetic",
                      metadata=flag("data.yaml path or a bundled name (synthetic = built-in data)"))
    cfg: str = field(default=DEFAULT_MODEL, metadata=flag(
        "model YAML path or a bundled name (yolov5n/s/m/l/x); default: the --weights' model, "
        f"else {DEFAULT_MODEL}", optional=True))
    weights: str = field(default="", metadata=flag(
        "initial weights: a last.pt or best.pt of evolvectl or YOLOv5 (yolov5s.pt)"))
    hyp: Hyp = field(default_factory=Hyp, metadata=NO_FLAG)  # parsed from the file --hyp names
    hyp_path: str = field(default="hyp.scratch-low",
                          metadata=flag("hyperparameter YAML path or bundled name", name="hyp"))
    epochs: int = field(default=100, metadata=flag(low=1))
    batch_size: int = field(default=16, metadata=flag("total batch size over all GPUs", aliases=("--batch",), low=1))
    imgsz: int = field(default=640, metadata=flag("train and val image size (pixels)",
                                                  aliases=("--img", "--img-size"), low=32))
    device: str = field(default="", metadata=flag("cuda device, i.e. 0 or 0,1,2,3 (DDP) or cpu"))
    workers: int = field(default=8, metadata=flag(
        "dataloader workers per process; default: 8, at most the CPUs available over the processes sharing "
        "them, and the batch per process", low=0, optional=True))
    project: str = field(default="runs/train", metadata=flag("save to project/name"))
    name: str = field(default="exp", metadata=flag("save to project/name"))
    exist_ok: bool = field(default=False, metadata=flag("existing project/name ok, do not increment"))
    resume: str = field(default="", metadata=flag("resume the most recent run, or the given last.pt",
                                                  flag_value="latest"))
    cache: str = field(default="", metadata=flag(
        "keep decoded, resized images in RAM (--cache, --cache ram) or in .npy files (--cache disk)",
        choices=("", "ram", "disk"), flag_value="ram"))
    rect: bool = field(default=False, metadata=flag(
        "rectangular training: batches of similar aspect ratio, each on its own canvas; no mosaic"))
    multi_scale: bool = field(default=False,
                              metadata=flag("vary the training image size by ±50% from batch to batch"))
    optimizer: str = field(default="SGD", metadata=flag(choices=("SGD", "Adam", "AdamW")))
    cos_lr: bool = field(default=False, metadata=flag("cosine LR schedule"))
    sgdr: int = field(default=0, metadata=flag(
        "cosine annealing with warm restarts (SGDR): epochs of the first cycle, over which lr falls from lr0 to "
        "lr0·lrf before it restarts; 0: off", low=0))
    sgdr_mult: int = field(default=1, metadata=flag("SGDR: each cycle this many times as long as the one before",
                                                    low=1))
    label_smoothing: float = field(default=0.0, metadata=flag(low=0.0, high=1.0))
    seed: int = field(default=0, metadata=flag("global training seed"))
    patience: int = field(default=100, metadata=flag("early stopping patience (0 = off)", low=0))
    # The indices of the model layers whose parameters do not train
    freeze: tuple[int, ...] = field(default=(), metadata=flag(
        "freeze the first N layers (10: the backbone), or the listed ones (0,1,2)"))
    single_cls: bool = field(default=False, metadata=flag("train multi-class data as single-class"))
    noval: bool = field(default=False, metadata=flag("only validate the final epoch"))
    nosave: bool = field(default=False, metadata=flag("only save the final checkpoint"))
    save_period: int = field(default=-1, metadata=flag("also save weights/epoch{N}.pt every N epochs (< 1: off)"))
    noautoanchor: bool = field(default=False, metadata=flag("disable AutoAnchor"))
    save_json: bool = field(default=False, metadata=flag("write COCO-format predictions.json"))
    noplots: bool = field(default=False, metadata=flag(
        "save no pictures (results.png, labels.jpg, batches, curves, confusion matrix)"))
    sync_bn: bool = field(default=False, metadata=flag("SyncBatchNorm in DDP (worth it at ≤8 images per GPU)"))
    # No flag, as in YOLOv5, whose train.py always seeds deterministically.
    deterministic: bool = field(default=True, metadata=NO_FLAG)

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


@dataclass(frozen=True)
class LaunchSettings:
    """How `python -m trainer` starts its DDP processes: runtime settings of one launch, never
    written into opt.yaml (a resumed run may start on other machines)."""

    nnodes: int = field(default=1, metadata=flag("DDP: number of machines", low=1))
    node_rank: int = field(default=0, metadata=flag("DDP: rank of this machine", low=0))
    master_addr: str = field(default="127.0.0.1", metadata=flag("DDP: address of the rank-0 machine"))
    master_port: int = field(default=0, metadata=flag("DDP: port (0 = free port)", low=0, high=65535))
    dist_timeout: float = field(default=30.0, metadata=flag("DDP: minutes to wait for peers", low=0.1))
    # torch.distributed.launch's old spelling; torchrun passes LOCAL_RANK in the environment instead
    local_rank: int = field(default=-1, metadata=flag(aliases=("--local_rank",), hidden=True))
