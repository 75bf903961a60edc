"""Fine-tuning: starting weights (--weights) from our checkpoints and from YOLOv5's pickled ones
without running them, and frozen layers (--freeze)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import export_weights, load_weights, save_checkpoint
from trainer.cli import build_config, parse_arguments, split_training_options
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.model.yolo import DetectionModel
from trainer.train import build_model

OPTIONS = {"hyp": "hyp.scratch-low", "cfg": None, "weights": ""}


class RunsCode:
    """Unpickling this would run `exec`, which would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def yolov5_style_checkpoint(path: Path, model: DetectionModel, **extra: object) -> None:
    """What YOLOv5's train.py saves: whole pickled modules (its EMA, in half precision), not state dicts."""
    torch.save({"epoch": 3, "best_fitness": 0.1, "model": copy.deepcopy(model).half(),
                "ema": copy.deepcopy(model).half(), "updates": 12, "optimizer": None,
                "opt": {"imgsz": 640}, **extra}, path)


def test_a_yolov5_checkpoint_gives_its_weights_without_running_its_pickle(tmp_path: Path) -> None:
    model = DetectionModel("yolov5s", nc=80)
    marker = tmp_path / "ran"
    path = tmp_path / "yolov5s.pt"
    yolov5_style_checkpoint(path, model, date=RunsCode(marker))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # torch's safe loader refuses it: our own reader is needed
    weights = load_weights(path)
    assert not marker.exists()
    expected = copy.deepcopy(model).half().float().state_dict()
    assert list(weights.state) == list(expected)  # YOLOv5's names and order
    assert all(torch.equal(weights.state[name], expected[name]) for name in expected)
    assert weights.model_name() == "yolov5s"  # recognised by its architecture


def test_without_cfg_the_model_is_the_weights_own_as_in_yolov5(tmp_path: Path) -> None:
    path = tmp_path / "yolov5s.pt"
    yolov5_style_checkpoint(path, DetectionModel("yolov5s", nc=80))
    assert build_config({**OPTIONS, "weights": str(path)}).cfg == "yolov5s"
    assert build_config({**OPTIONS, "weights": str(path), "cfg": "yolov5n"}).cfg == "yolov5n"  # --cfg wins
    assert build_config(OPTIONS).cfg == "yolov5n"
    ours = tmp_path / "last.pt"
    save_checkpoint({"model": DetectionModel("yolov5m", nc=2).state_dict(), "config": {"cfg": "yolov5m"}}, ours)
    assert build_config({**OPTIONS, "weights": str(ours)}).cfg == "yolov5m"


def test_transfer_keeps_every_weight_that_fits_and_refits_the_head_to_the_data(tmp_path: Path) -> None:
    source = DetectionModel("yolov5n", nc=80)
    path = tmp_path / "yolov5n.pt"
    yolov5_style_checkpoint(path, source)
    model = build_model(TrainConfig(cfg="yolov5n", weights=str(path)), nc=3, device=torch.device("cpu"))
    expected = copy.deepcopy(source).half().float().state_dict()
    own = model.state_dict()
    transferred = [name for name in own if own[name].shape == expected[name].shape]
    assert all(torch.equal(own[name], expected[name]) for name in transferred)
    assert {name for name in own if name not in transferred} == {f"model.24.m.{i}.{kind}" for i in range(3)
                                                                 for kind in ("weight", "bias")}


def test_weights_that_fit_nothing_or_hold_no_model_are_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "yolov5x.pt"
    yolov5_style_checkpoint(path, DetectionModel("yolov5n", nc=80))
    with pytest.raises(UserError, match="no convolution in .*yolov5x.pt fits the yolov5x model: pass the --cfg"):
        build_model(TrainConfig(cfg="yolov5x", weights=str(path)), nc=80, device=torch.device("cpu"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "linear.pt")
    with pytest.raises(UserError, match="linear.pt is neither an evolvectl nor a YOLOv5 checkpoint"):
        load_weights(tmp_path / "linear.pt")
    custom = DetectionModel("yolov5n", nc=80)
    custom.yaml = {**custom.yaml, "width_multiple": 0.3}
    yolov5_style_checkpoint(tmp_path / "custom.pt", custom)
    with pytest.raises(UserError, match="custom.pt was trained from a model config that is not bundled here"):
        build_config({**OPTIONS, "weights": str(tmp_path / "custom.pt")})
    assert build_config({**OPTIONS, "weights": str(tmp_path / "custom.pt"), "cfg": "yolov5n"}).cfg == "yolov5n"


@pytest.mark.parametrize(("flag", "layers"), [("0", ()), ("3", (0, 1, 2)), ("4,2,4", (2, 4))])
def test_freeze_takes_a_count_or_a_list_as_in_yolov5(flag: str, layers: tuple[int, ...]) -> None:
    assert build_config(split_training_options(parse_arguments(["--freeze", flag]))[0]).freeze == layers
    assert TrainConfig.from_dict(TrainConfig(freeze=layers).as_dict()).freeze == layers  # opt.yaml, checkpoints
    with pytest.raises(UserError, match="'x1' is not a layer count"):
        parse_arguments(["--freeze", "x1"])


def test_frozen_layers_do_not_train_and_the_rest_do() -> None:
    model = build_model(TrainConfig(cfg="yolov5n", freeze=(0, 1, 2)), nc=3, device=torch.device("cpu"))
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert frozen and frozen == {name for name, _ in model.named_parameters()
                                 if name.split(".")[1] in ("0", "1", "2")}
    with pytest.raises(UserError, match="layer 25 does not exist; the model has layers 0 to 24"):
        build_model(TrainConfig(cfg="yolov5n", freeze=(25,)), nc=3, device=torch.device("cpu"))


def test_weights_are_read_once_while_the_file_is_unchanged(tmp_path: Path) -> None:
    """An evolution builds its model from --weights every generation."""
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {"cfg": "yolov5n"}}, path)
    first = load_weights(path)
    assert load_weights(str(path)) is first
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {"cfg": "yolov5s"}}, path)  # a new run wrote it
    assert load_weights(path).model_name() == "yolov5s" and torch.equal(load_weights(path).state["w"], torch.ones(3))


def test_exported_weights_are_the_ema_in_half_precision_and_start_a_run(tmp_path: Path) -> None:
    """As YOLOv5 strips best.pt: no optimiser, fp16. The bundled yolov5n-synthetic.pt is one."""
    model, ema = DetectionModel("yolov5n", nc=6), DetectionModel("yolov5n", nc=6)
    save_checkpoint({"model": model.state_dict(), "ema": {"module": ema.state_dict(), "updates": 5},
                     "optimizer": {"state": {}}, "config": {"cfg": "yolov5n", "epochs": 3}, "model_yaml": {},
                     "names": list("abcdef"), "epoch": 2}, tmp_path / "best.pt")
    export_weights(tmp_path / "best.pt", tmp_path / "small.pt")
    exported = torch.load(tmp_path / "small.pt", weights_only=True)
    assert set(exported) == {"format_version", "model", "config", "model_yaml", "names", "epoch"}
    assert exported["epoch"] == 2  # the epoch it was saved after, for the record
    expected = ema.state_dict()
    assert all(exported["model"][name].dtype == (torch.float16 if value.is_floating_point() else value.dtype)
               and torch.equal(exported["model"][name], value.half() if value.is_floating_point() else value)
               for name, value in expected.items())
    assert (tmp_path / "small.pt").stat().st_size < (tmp_path / "best.pt").stat().st_size / 3
    started = build_model(TrainConfig(cfg="yolov5n", weights=str(tmp_path / "small.pt")), nc=6,
                          device=torch.device("cpu")).state_dict()
    assert all(torch.equal(started[name], value.half().float() if value.is_floating_point() else value)
               for name, value in expected.items())


def test_the_bundled_weights_resolve_by_name_and_fit_the_built_in_data() -> None:
    weights = load_weights("yolov5n-synthetic")
    assert weights.model_name() == "yolov5n" and load_weights("yolov5n-synthetic.pt").state is weights.state
    model = build_model(TrainConfig(weights="yolov5n-synthetic"), nc=6, device=torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[name], value.float()) for name, value in weights.state.items()
               if value.is_floating_point())
    with pytest.raises(UserError, match="weights 'nothere.pt' not found: .* or a bundled one: yolov5n-synthetic"):
        load_weights("nothere.pt")
