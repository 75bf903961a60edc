"""Hyp and TrainConfig validation, bundled config lookup, device parsing and run folders."""

import pytest
import yaml

from trainer.config import Hyp, TrainConfig
from trainer.dist import parse_devices
from trainer.errors import UserError
from trainer.paths import resolve_config
from trainer.train import next_run_dir


def test_bundled_hyp_matches_yolov5_defaults_in_order():
    hyp = Hyp.from_yaml(resolve_config("hyp.scratch-low", "hyps"))
    assert hyp == Hyp()
    assert list(hyp.as_dict())[:4] == ["lr0", "lrf", "momentum", "weight_decay"]
    assert len(hyp.as_dict()) == 28 and "anchors" not in hyp.as_dict()


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    path = tmp_path / "hyp.yaml"
    path.write_text(yaml.safe_dump({"lr0": 0.01, "learning_rate": 0.1}))
    with pytest.raises(UserError, match="learning_rate.*valid keys are: lr0"):
        Hyp.from_yaml(path)


@pytest.mark.parametrize("value,message", [("fast", "not a number"), (float("nan"), "finite")])
def test_bad_values_are_named(value, message):
    with pytest.raises(UserError, match=f"lr0=.*{message}"):
        Hyp.from_dict({"lr0": value})


@pytest.mark.parametrize("key,value,shown", [
    ("lr0", -0.01, "at least 0"),  # torch's SGD would raise a ValueError with a traceback
    ("weight_decay", -1e-4, "at least 0"),  # torch would take it silently
    ("momentum", 1.0, "at least 0 and below 1"),
    ("anchor_t", 0.5, "at least 1"),  # no label would match an anchor; at 0 a division by zero
    ("fliplr", 2.0, "from 0 to 1"),
    ("anchors", 0.0, "at least 1"),
])
def test_values_outside_their_range_are_named_with_the_range(key, value, shown):
    with pytest.raises(UserError, match=f"hyp: {key}={value:g} is out of range: {key} must be {shown}$"):
        Hyp.from_dict({key: value})


def test_range_edges_are_accepted():
    hyp = Hyp.from_dict({"lr0": 0.0, "momentum": 0.99999, "anchor_t": 1.0, "mosaic": 1.0, "scale": 1.5})
    assert (hyp.lr0, hyp.momentum, hyp.anchor_t, hyp.mosaic, hyp.scale) == (0.0, 0.99999, 1.0, 1.0, 1.5)


def test_partial_hyp_keeps_defaults_and_anchors_round_trip():
    hyp = Hyp.from_dict({"lr0": 0.02, "anchors": 3})
    assert hyp.lr0 == 0.02 and hyp.momentum == 0.937 and hyp.as_dict()["anchors"] == 3.0


def test_unreadable_and_non_mapping_hyp_files(tmp_path):
    with pytest.raises(UserError, match="cannot read hyp file"):
        Hyp.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a mapping"):
        Hyp.from_yaml(tmp_path / "list.yaml")


def test_train_config_round_trips_through_a_dict():
    cfg = TrainConfig(epochs=3, hyp=Hyp(lr0=0.02))
    assert TrainConfig.from_dict(cfg.as_dict()) == cfg


def test_resolve_config_lists_bundled_names_when_missing():
    with pytest.raises(UserError, match="hyp.scratch-low"):
        resolve_config("nope", "hyps")


def test_device_parsing_on_a_cpu_machine(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert parse_devices("cpu") == ["cpu"] and parse_devices("") == ["cpu"]
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        parse_devices("0,1")
    with pytest.raises(UserError, match="not valid"):
        parse_devices("gpu0")


def test_device_parsing_names_missing_gpus(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert parse_devices("0,1") == ["0", "1"] and parse_devices("cuda:1") == ["1"]
    with pytest.raises(UserError, match="GPU 3 does not exist"):
        parse_devices("1,3")


def test_run_dirs_increment_like_yolov5(tmp_path):
    assert next_run_dir(tmp_path, "exp", False) == tmp_path / "exp"
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp2").mkdir()
    assert next_run_dir(tmp_path, "exp", False) == tmp_path / "exp3"
    assert next_run_dir(tmp_path, "exp", True) == tmp_path / "exp"
