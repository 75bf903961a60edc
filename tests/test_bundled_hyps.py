"""Every bundled hyp file loads by its short name through `--hyp NAME`, lists every key once in
Hyp's order, and the ones copied from YOLOv5 hold YOLOv5's published numbers."""

from __future__ import annotations

import re

import pytest

from trainer import cli
from trainer.config import Hyp
from trainer.paths import CONFIGS

BUNDLED = sorted(path.stem for path in (CONFIGS / "hyps").glob("*.yaml"))

# A few of YOLOv5's published values per file, typed from the source, so a typo in a copy fails.
PUBLISHED = {
    "hyp.scratch-low": {"lrf": 0.01, "cls": 0.5, "obj": 1.0, "scale": 0.5, "mixup": 0.0, "anchors": None},
    "hyp.scratch-med": {"lrf": 0.1, "cls": 0.3, "obj": 0.7, "scale": 0.9, "mixup": 0.1, "copy_paste": 0.0,
                        "anchors": None},
    "hyp.scratch-high": {"lrf": 0.1, "cls": 0.3, "obj": 0.7, "scale": 0.9, "mixup": 0.1, "copy_paste": 0.1,
                         "anchors": None},
    "hyp.VOC": {"lr0": 0.00334, "lrf": 0.15135, "momentum": 0.74832, "warmup_epochs": 3.3835,
                "obj_pw": 0.67198, "anchor_t": 3.3744, "hsv_s": 0.54703, "mosaic": 0.85834, "mixup": 0.04266,
                "anchors": 3.412},
    "hyp.Objects365": {"lr0": 0.00258, "lrf": 0.17, "momentum": 0.779, "weight_decay": 0.00058,
                       "warmup_bias_lr": 0.0711, "box": 0.0539, "cls_pw": 0.825, "anchor_t": 3.44,
                       "hsv_h": 0.0188, "translate": 0.0902, "scale": 0.491, "anchors": 3.2},
    "hyp.no-augmentation": {"lrf": 0.1, "cls": 0.3, "obj": 0.7, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0,
                            "translate": 0.0, "scale": 0.0, "fliplr": 0.0, "mosaic": 0.0, "anchors": None},
    "hyp.finetune": {"lr0": 0.0032, "lrf": 0.12, "momentum": 0.843, "weight_decay": 0.00036, "box": 0.0296,
                     "obj": 0.301, "anchor_t": 2.91, "degrees": 0.373, "shear": 0.602, "flipud": 0.00856,
                     "mixup": 0.243, "copy_paste": 0.0, "anchors": None},
}
KEY_LINE = re.compile(r"^(\w+):")


def load_as_the_trainer_does(name: str) -> Hyp:
    """`python -m trainer --hyp NAME`: the flag names hyp_path, build_config resolves and reads it."""
    options = cli.parse_arguments(["--hyp", name])
    config = cli.build_config(cli.split_training_options(options)[0])
    assert config.hyp_path == name
    return config.hyp


def test_the_yolov5_files_are_all_bundled() -> None:
    assert set(PUBLISHED) | {"hyp.quickstart"} == set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_a_bundled_hyp_loads_by_name_with_every_key_once_in_order(name: str) -> None:
    hyp = load_as_the_trainer_does(name)
    lines = (CONFIGS / "hyps" / f"{name}.yaml").read_text().splitlines()
    keys = [match.group(1) for line in lines if (match := KEY_LINE.match(line))]
    expected = Hyp.keys() if hyp.anchors is not None else Hyp.keys()[:-1]
    assert keys == expected  # no key missing, repeated (YAML keeps the last silently) or moved
    for key, value in PUBLISHED.get(name, {}).items():
        assert getattr(hyp, key) == value, f"{name}: {key}"
