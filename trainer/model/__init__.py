"""The detector: building blocks, the Detect head and the YAML-built DetectionModel."""

from trainer.model.blocks import C3, SPPF, Bottleneck, Concat, Conv
from trainer.model.yolo import (
    Detect,
    DetectionModel,
    load_model_spec,
    model_stride,
    parse_model,
    stride_multiple,
)

__all__ = [
    "C3",
    "SPPF",
    "Bottleneck",
    "Concat",
    "Conv",
    "Detect",
    "DetectionModel",
    "load_model_spec",
    "model_stride",
    "parse_model",
    "stride_multiple",
]
