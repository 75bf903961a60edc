from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from trainer.errors import UserError
from trainer.model import Detect, DetectionModel, load_model_spec

DEFAULT_ANCHORS_PX = torch.tensor(
    [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]], dtype=torch.float32
).view(3, 3, 2)

# YOLOv5 v6+ model sizes at nc=80, in millions of parameters.
YOLOV5_PARAMETERS_M = {"n": 1.9, "s": 7.2, "m": 21.2, "l": 46.5, "x": 86.7}


@pytest.mark.parametrize(
    "size",
    ["n", "s", "m", pytest.param("l", marks=pytest.mark.slow), pytest.param("x", marks=pytest.mark.slow)],
)
def test_parameter_count_matches_yolov5(size: str) -> None:
    model = DetectionModel(f"yolov5{size}")
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(YOLOV5_PARAMETERS_M[size], rel=0.05)


def test_state_dict_follows_yolov5_layout() -> None:
    state = DetectionModel("yolov5s").state_dict()
    expected_shapes = {
        "model.0.conv.weight": (32, 3, 6, 6),  # 6x6 stride-2 stem, 64 x width 0.5
        "model.0.bn.running_mean": (32,),
        "model.2.cv1.conv.weight": (32, 64, 1, 1),
        "model.2.cv3.conv.weight": (64, 64, 1, 1),
        "model.2.m.0.cv2.conv.weight": (32, 32, 3, 3),
        "model.9.cv1.conv.weight": (256, 512, 1, 1),  # SPPF
        "model.9.cv2.conv.weight": (512, 1024, 1, 1),
        "model.24.m.0.weight": (255, 128, 1, 1),
        "model.24.m.2.bias": (255,),
        "model.24.anchors": (3, 3, 2),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "model.24.stride" not in state  # YOLOv5 checkpoints carry none
    assert not any(key.startswith("model.24.m.3") for key in state)


def test_batch_norm_uses_yolov5_settings() -> None:
    model = DetectionModel("yolov5n")
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batch_norms and all(m.eps == 1e-3 and m.momentum == 0.03 for m in batch_norms)
    head_convs = set(model.detect.m)
    body_convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m not in head_convs]
    assert body_convs and all(m.bias is None for m in body_convs)
    assert all(m.bias is not None for m in head_convs)


def test_strides_and_anchors_in_grid_units() -> None:
    model = DetectionModel("yolov5n")
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    detect = model.detect
    assert (detect.nl, detect.na, detect.no, detect.nc) == (3, 3, 85, 80)
    torch.testing.assert_close(detect.anchors * model.stride.view(-1, 1, 1), DEFAULT_ANCHORS_PX)


def test_anchors_listed_large_first_are_reordered() -> None:
    spec = load_model_spec("yolov5n")
    spec["anchors"] = list(reversed(spec["anchors"]))
    model = DetectionModel(spec)
    torch.testing.assert_close(model.detect.anchors * model.stride.view(-1, 1, 1), DEFAULT_ANCHORS_PX)


def test_train_forward_returns_raw_levels() -> None:
    model = DetectionModel("yolov5n", nc=3)
    outputs = model(torch.rand(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 8, 12, 8), (2, 3, 4, 6, 8), (2, 3, 2, 3, 8)]


def test_eval_decoding_places_boxes_on_cell_centres_with_anchor_sizes() -> None:
    model = DetectionModel("yolov5n", nc=2).eval()
    for conv in model.detect.m:  # all logits 0 -> every sigmoid is 0.5
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    with torch.no_grad():
        decoded, raw = model(torch.rand(1, 3, 64, 64))
    assert decoded.shape == (1, 3 * (64 + 16 + 4), 7)
    assert [tuple(r.shape) for r in raw] == [(1, 3, 8, 8, 7), (1, 3, 4, 4, 7), (1, 3, 2, 2, 7)]
    p3 = decoded[0, : 3 * 64].view(3, 8, 8, 7)
    # (0.5 * 2 - 0.5 + cell) * stride = centre of the cell; (0.5 * 2)^2 * anchor = anchor
    assert p3[0, 2, 5, :2].tolist() == [(5 + 0.5) * 8, (2 + 0.5) * 8]
    torch.testing.assert_close(p3[1, 0, 0, 2:4], DEFAULT_ANCHORS_PX[0, 1])
    p5 = decoded[0, -12:].view(3, 2, 2, 7)
    assert p5[2, 1, 1, :2].tolist() == [1.5 * 32, 1.5 * 32]
    torch.testing.assert_close(p5[2, 1, 1, 2:4], DEFAULT_ANCHORS_PX[2, 2])
    assert torch.all(decoded[..., 4:] == 0.5)


def test_boxes_decode_in_float32_under_bfloat16_autocast() -> None:
    """At 640 px, bfloat16 holds coordinates above 512 only to 4 px: too coarse for mAP at IoU 0.95."""
    model = DetectionModel("yolov5n", nc=2).eval()
    image = torch.rand(1, 3, 640, 640)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoded, raw = model(image)
    assert raw[0].dtype == torch.bfloat16 and decoded.dtype == torch.float32
    with torch.no_grad():  # the same bfloat16 logits decoded in float32 by hand
        expected = torch.cat([model.detect._decode(level, logits.float()) for level, logits in enumerate(raw)], 1)
    assert torch.equal(decoded, expected)
    centres = decoded[0, :, :2]
    assert (centres[centres > 512] % 4 != 0).any()  # not on bfloat16's 4-pixel grid


def test_eval_handles_changing_input_sizes() -> None:
    model = DetectionModel("yolov5n", nc=1).eval()
    with torch.no_grad():
        small, _ = model(torch.rand(1, 3, 64, 64))
        wide, _ = model(torch.rand(1, 3, 64, 128))
        again, _ = model(torch.rand(1, 3, 64, 64))
    assert small.shape[1] == again.shape[1] == 3 * (64 + 16 + 4)
    assert wide.shape[1] == 2 * small.shape[1]
    # The last box of a 64x128 input sits in the bottom-right cell of P5.
    assert wide[0, -1, 0] > 96 and wide[0, -1, 1] > 32


def test_detect_bias_priors() -> None:
    model = DetectionModel("yolov5n", nc=5)
    detect = model.detect
    for conv, stride in zip(detect.m, detect.stride.tolist(), strict=True):
        bias = conv.bias.detach().view(detect.na, detect.no)
        init_bound = 1 / math.sqrt(conv.in_channels)  # Conv2d's own uniform bias init
        objectness_prior = math.log(8 / (640 / stride) ** 2)
        class_prior = math.log(0.6 / (5 - 0.99))
        assert torch.all((bias[:, 4] - objectness_prior).abs() <= init_bound)
        assert torch.all((bias[:, 5:] - class_prior).abs() <= init_bound)


def test_anchor_count_creates_placeholders() -> None:
    model = DetectionModel("yolov5n", anchors=4)
    detect = model.detect
    assert detect.anchors.shape == (3, 4, 2)
    assert detect.m[0].out_channels == 4 * 85
    pixels = (detect.anchors * model.stride.view(-1, 1, 1)).view(-1, 2)
    areas = pixels.prod(dim=1)
    assert torch.all(areas[1:] > areas[:-1])  # small to large, level by level


def test_user_yaml_file_and_nc_override(tmp_path: Path) -> None:
    spec = load_model_spec("yolov5n")
    spec["nc"] = 7
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert DetectionModel(path).detect.nc == 7
    assert DetectionModel(str(path), nc=2).detect.no == 7
    assert DetectionModel(path, nc=2).yaml["nc"] == 2


def test_unknown_module_and_missing_keys_are_user_errors() -> None:
    spec = load_model_spec("yolov5n")
    spec["backbone"][1][2] = "Focus"
    with pytest.raises(UserError, match="Focus"):
        DetectionModel(spec)
    incomplete = load_model_spec("yolov5n")
    del incomplete["anchors"]
    with pytest.raises(UserError, match="anchors"):
        DetectionModel(incomplete)
    with pytest.raises(UserError, match="yolov9000"):
        DetectionModel("yolov9000")


def test_detect_rejects_mismatched_levels() -> None:
    with pytest.raises(UserError, match="anchor levels"):
        Detect(nc=1, anchors=[[10, 13, 16, 30]], channels=[16, 32])


def test_model_and_loss_do_not_use_torch_distributed() -> None:
    root = Path(__file__).resolve().parent.parent / "trainer"
    for path in [*sorted((root / "model").glob("*.py")), root / "loss.py"]:
        assert "torch.distributed" not in path.read_text(), path
