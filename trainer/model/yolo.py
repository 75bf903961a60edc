"""The detector: YOLOv5-style model YAMLs parsed into a layer sequence ending in a Detect head.

The YAML schema is YOLOv5's (v6 and later), so users can bring their own model files:
`nc`, `depth_multiple`, `width_multiple`, `anchors`, and `backbone` / `head` lists of
`[from, number, module, args]` rows.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import UserError
from trainer.files import read_yaml
from trainer.model.blocks import C3, SPPF, Bottleneck, Concat, Conv
from trainer.paths import resolve_config

LOGGER = logging.getLogger(__name__)

Source = int | list[int]  # which earlier layer(s) feed a layer; -1 is the previous one


class Detect(nn.Module):
    """Per-level 1x1 convolutions predicting, for each anchor and cell, box, objectness and classes.

    `anchors` is a (levels, anchors per level, 2) buffer in grid units of each level (pixels
    divided by the level's stride), ordered like `stride`; it is saved in checkpoints and
    AutoAnchor rewrites it in place.
    """

    anchors: torch.Tensor
    stride: torch.Tensor

    def __init__(self, nc: int, anchors: Sequence[Sequence[float]], channels: Sequence[int]) -> None:
        super().__init__()
        if len(anchors) != len(channels):
            raise UserError(
                f"Detect: {len(anchors)} anchor levels but {len(channels)} input layers; "
                "give one anchor list per input layer"
            )
        if len({len(level) for level in anchors}) != 1 or len(anchors[0]) % 2:
            raise UserError(f"Detect: anchors {anchors} must be lists of w,h pairs of equal length")
        self.nc = nc
        self.no = nc + 5  # outputs per anchor: x, y, w, h, objectness, classes
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        # Pixels until DetectionModel measures the strides and calls set_strides().
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, self.na, 2))
        # Not persistent: checkpoints from YOLOv5 carry no stride entry, and it is re-measured.
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in channels)
        self._grids: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def set_strides(self, strides: torch.Tensor) -> None:
        """Record each level's stride and convert the anchors from pixels to grid units."""
        self.stride.copy_(strides)
        mean_area = self.anchors.prod(-1).mean(-1)  # still in pixels here
        # Large anchors belong on coarse levels; a YAML listing them the other way round is flipped.
        if (mean_area[-1] - mean_area[0]) * (self.stride[-1] - self.stride[0]) < 0:
            LOGGER.info("reversing anchor order so anchor size grows with stride")
            self.anchors.copy_(self.anchors.flip(0))
        self.anchors /= self.stride.view(-1, 1, 1)

    def initialize_biases(self) -> None:
        """Start from sensible priors instead of p=0.5 everywhere, which makes early losses huge.

        Objectness: about 8 objects per 640x640 image spread over the level's cells. Classes:
        about 0.6 / nc each.
        """
        with torch.no_grad():
            for conv, stride in zip(self.m, self.stride.tolist(), strict=True):
                bias = conv.bias.view(self.na, self.no)
                bias[:, 4] += math.log(8 / (640 / stride) ** 2)
                bias[:, 5:] += math.log(0.6 / (self.nc - 0.99))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Train mode: raw logits per level, (B, na, ny, nx, 5+nc). Eval mode: (decoded, raw)."""
        raw = []
        for conv, feature in zip(self.m, features, strict=True):
            batch, _, grid_h, grid_w = feature.shape
            logits = conv(feature).view(batch, self.na, self.no, grid_h, grid_w)
            raw.append(logits.permute(0, 1, 3, 4, 2).contiguous())
        if self.training:
            return raw
        return torch.cat([self._decode(level, logits) for level, logits in enumerate(raw)], 1), raw

    def _decode(self, level: int, logits: torch.Tensor) -> torch.Tensor:
        """Boxes as (cx, cy, w, h) in input pixels, then sigmoid objectness and class scores.

        Centres may move half a cell beyond their own cell and sizes reach 4x the anchor, the
        ranges the loss's neighbour-cell assignment and anchor_t matching train for. Decoded in
        float32 whatever the logits' dtype: under bfloat16 autocast, pixel coordinates from 512 to
        1024 would fall on a 4-pixel grid, too coarse for the IoU 0.95 end of mAP@0.5:0.95.
        """
        batch, _, grid_h, grid_w, _ = logits.shape
        xy, wh, scores = logits.float().sigmoid().split((2, 2, self.nc + 1), dim=4)
        stride = self.stride[level]
        # Anchors are read on every call (not cached) so an AutoAnchor update is always used.
        anchor_pixels = (self.anchors[level] * stride).view(1, self.na, 1, 1, 2)
        xy = (xy * 2 + self._cell_grid(grid_h, grid_w, logits)) * stride
        wh = (wh * 2) ** 2 * anchor_pixels
        return torch.cat((xy, wh, scores), dim=4).view(batch, -1, self.no)

    def _cell_grid(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor:
        """(1, 1, ny, nx, 2) cell x, y indices minus 0.5, cached per shape, device and dtype."""
        key = (grid_h, grid_w, like.device, like.dtype)
        if key not in self._grids:
            ys, xs = torch.meshgrid(
                torch.arange(grid_h, device=like.device, dtype=like.dtype),
                torch.arange(grid_w, device=like.device, dtype=like.dtype),
                indexing="ij",
            )
            self._grids[key] = torch.stack((xs, ys), dim=2).view(1, 1, grid_h, grid_w, 2) - 0.5
        return self._grids[key]


# Modules a model YAML may name, and how the parser fills in their arguments.
MODULES: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "Bottleneck": Bottleneck,
    "C3": C3,
    "SPPF": SPPF,
    "Concat": Concat,
    "nn.Upsample": nn.Upsample,
    "Detect": Detect,
}
CHANNEL_MODULES = (Conv, Bottleneck, C3, SPPF)  # args start with output channels; input is filled in
REQUIRED_KEYS = ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channel counts up to a multiple of 8, which GPU kernels handle best."""
    return math.ceil(value / divisor) * divisor


def placeholder_anchors(per_level: int, levels: int) -> list[list[float]]:
    """Square anchors on a geometric ladder from 10 to 400 px, small to large across levels.

    Used when a config gives only an anchor count; AutoAnchor replaces them with a fit to the
    labels, and they are still usable if AutoAnchor is turned off.
    """
    count = per_level * levels
    sizes = [10 * 40 ** (i / max(count - 1, 1)) for i in range(count)]
    return [
        [side for size in sizes[level * per_level : (level + 1) * per_level] for side in (size, size)]
        for level in range(levels)
    ]


def load_model_spec(cfg: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Read a model YAML (path or bundled short name) or copy a dict, and check its keys."""
    if isinstance(cfg, dict):
        spec, source = copy.deepcopy(cfg), "model config"
    else:
        path = resolve_config(cfg, "models")
        source = str(path)
        spec = read_yaml(path, "model config")
    if not isinstance(spec, dict):
        raise UserError(f"{source} must be a mapping with keys {', '.join(REQUIRED_KEYS)}")
    missing = [key for key in REQUIRED_KEYS if key not in spec]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}; a model config needs {', '.join(REQUIRED_KEYS)}")
    if not isinstance(spec["nc"], int) or spec["nc"] < 1:
        raise UserError(f"{source}: nc={spec['nc']!r} must be a positive integer (the number of classes)")
    return spec


def model_stride(cfg: str | Path | dict[str, Any]) -> int:
    """The largest stride of a model, from its config without building it: the Detect layer's
    input levels, P3/8 first (YOLOv5's P5 models have 3, stride 32; its P6 models 4, stride 64).
    Image sizes, training canvases and validation canvases are multiples of it."""
    spec = load_model_spec(cfg)
    rows = [row for part in ("backbone", "head") if isinstance(spec.get(part), list) for row in spec[part]]
    last = rows[-1] if rows else None
    if not (isinstance(last, list) and len(last) == 4 and last[2] == "Detect"):
        source = "the model config" if isinstance(cfg, dict) else f"model config {cfg}"
        raise UserError(f"{source}: its last layer must be [[from, ...], 1, Detect, [nc, anchors]]")
    sources = last[0] if isinstance(last[0], list) else [last[0]]
    return 8 * 2 ** (len(sources) - 1)


def stride_multiple(imgsz: int, stride: int) -> int:
    """--imgsz rounded up to a multiple of the model's largest stride, with a warning, as YOLOv5's
    train.py and val.py do (`--imgsz 3000` gives 3008; `--imgsz 1000` 1024 with a P6 model)."""
    rounded = max(stride, math.ceil(imgsz / stride) * stride)
    if rounded != imgsz:
        LOGGER.warning("--imgsz %d must be a multiple of the model's stride %d: using %d", imgsz, stride, rounded)
    return rounded


def _resolve_argument(value: Any, names: dict[str, Any]) -> Any:
    """YAML args may name top-level keys (`nc`, `anchors`) or write Python's `None`."""
    if isinstance(value, str):
        if value == "None":
            return None
        return names.get(value, value)
    return value


def _check_row(index: int, row: Any) -> tuple[Source, int, str, list[Any]]:
    if not (isinstance(row, (list, tuple)) and len(row) == 4):
        raise UserError(f"model layer {index}: {row!r} must be [from, number, module, args]")
    source, repeats, module_name, args = row
    sources = [source] if isinstance(source, int) else source
    if not all(isinstance(s, int) and (s == -1 or 0 <= s < index) for s in sources):
        raise UserError(f"model layer {index}: from={source!r} must be -1 or indices of earlier layers")
    if module_name not in MODULES:
        raise UserError(f"model layer {index}: unknown module {module_name!r}; supported: {', '.join(MODULES)}")
    if not isinstance(repeats, int) or repeats < 1:
        raise UserError(f"model layer {index}: number={repeats!r} must be a positive integer")
    return source, repeats, module_name, list(args or [])


def parse_model(spec: dict[str, Any], in_channels: int) -> tuple[nn.Sequential, list[Source], set[int]]:
    """Build the layers of a model spec; returns them, each layer's sources, and the indices
    of layers whose outputs later layers read (the rest are dropped during forward)."""
    names = {"nc": spec["nc"], "anchors": spec["anchors"]}
    anchors = spec["anchors"]
    per_level = anchors if isinstance(anchors, int) else len(anchors[0]) // 2
    detect_outputs = per_level * (spec["nc"] + 5)
    channels: list[int] = []  # output channels of every layer built so far

    def channels_of(source: int) -> int:
        return channels[source] if channels else in_channels

    layers: list[nn.Module] = []
    sources: list[Source] = []
    kept: set[int] = set()
    for index, row in enumerate(spec["backbone"] + spec["head"]):
        source, repeats, module_name, args = _check_row(index, row)
        module = MODULES[module_name]
        args = [_resolve_argument(argument, names) for argument in args]
        source_list = [source] if isinstance(source, int) else source
        if repeats > 1:
            repeats = max(round(repeats * spec["depth_multiple"]), 1)
        if module in CHANNEL_MODULES:
            out_channels = args[0]
            if out_channels != detect_outputs:
                out_channels = make_divisible(out_channels * spec["width_multiple"])
            args = [channels_of(source_list[0]), out_channels, *args[1:]]
            if module is C3:  # depth goes inside the block, not into a stack of blocks
                args.insert(2, repeats)
                repeats = 1
        elif module is Concat:
            out_channels = sum(channels_of(s) for s in source_list)
        elif module is Detect:
            args.append([channels_of(s) for s in source_list])
            if isinstance(args[1], int):
                args[1] = placeholder_anchors(args[1], len(source_list))
            out_channels = 0
        else:
            out_channels = channels_of(source_list[0])
        try:
            layer = nn.Sequential(*(module(*args) for _ in range(repeats))) if repeats > 1 else module(*args)
        except (TypeError, ValueError) as error:
            raise UserError(f"model layer {index}: {module_name} with args {args} failed: {error}") from None
        layers.append(layer)
        sources.append(source)
        kept.update(s % index for s in source_list if s != -1)
        channels.append(out_channels)
    return nn.Sequential(*layers), sources, kept


class DetectionModel(nn.Module):
    """A YOLOv5-style detector built from a model YAML.

    The layer sequence is `self.model`, so parameter names (`model.0.conv.weight`,
    `model.24.anchors`, ...) match YOLOv5 v6+ checkpoints.
    """

    def __init__(
        self,
        cfg: str | Path | dict[str, Any],
        nc: int | None = None,
        anchors: int | None = None,
        ch: int = 3,
    ) -> None:
        super().__init__()
        spec = load_model_spec(cfg)
        if nc is not None and nc != spec["nc"]:
            LOGGER.info("overriding model config nc=%s with nc=%s", spec["nc"], nc)
            spec["nc"] = nc
        if anchors is not None:
            if anchors < 1:
                raise UserError(f"anchors={anchors} must be at least 1 anchor per level")
            spec["anchors"] = round(anchors)  # hyp files hold it as a float
        self.yaml = spec
        self.nc: int = spec["nc"]
        self.model, self.sources, self.kept_outputs = parse_model(spec, ch)
        if not isinstance(self.model[-1], Detect):
            raise UserError("the model config's last layer must be Detect")
        self.detect.set_strides(self._measure_strides(ch))
        self.detect.initialize_biases()

    @property
    def detect(self) -> Detect:
        head = self.model[-1]
        assert isinstance(head, Detect)
        return head

    @property
    def stride(self) -> torch.Tensor:
        """Downsampling factor of each detection level, e.g. tensor([8., 16., 32.])."""
        return self.detect.stride

    def _measure_strides(self, in_channels: int, size: int = 128) -> torch.Tensor:
        # Eval mode so the probe leaves BatchNorm statistics untouched; 128 px still gives a
        # whole cell at stride 64 (P6 models) and costs a quarter of a 256 px probe.
        was_training = self.training
        self.eval()
        with torch.no_grad():
            _, raw = self.forward(torch.zeros(1, in_channels, size, size))
        self.train(was_training)
        return torch.tensor([size / level.shape[2] for level in raw], dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> Any:
        """Train mode: list of raw (B, na, ny, nx, 5+nc) logits per level.
        Eval mode: (decoded (B, boxes, 5+nc) in input pixels, that raw list)."""
        outputs: list[Any] = []
        value: Any = x
        for index, (layer, source) in enumerate(zip(self.model, self.sources, strict=True)):
            if source != -1:
                if isinstance(source, int):
                    value = outputs[source]
                else:
                    value = [value if s == -1 else outputs[s] for s in source]
            value = layer(value)
            outputs.append(value if index in self.kept_outputs else None)
        return value
