"""EMA decay ramp and update, atomic checkpoints, bad checkpoint files."""

import math
import os
import pickle

import pytest
import torch
from torch import nn

from trainer.checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from trainer.config import TrainConfig
from trainer.dist import DistContext
from trainer.ema import ModelEMA
from trainer.errors import UserError
from trainer.parts import build_model, build_training_parts


def test_ema_decay_ramps_up_with_updates():
    ema = ModelEMA(nn.Linear(2, 2))
    ema.updates = 2000
    assert ema.current_decay() == pytest.approx(0.9999 * (1 - math.exp(-1)))


def test_ema_tracks_weighted_average_and_counts_updates():
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 0.0)
    ema = ModelEMA(model, decay=0.5, tau=1e-9)  # decay ≈ 0.5 from the first update
    nn.init.constant_(model.weight, 1.0)
    ema.update(model)
    ema.update(model)
    assert ema.updates == 2
    assert ema.module.weight.item() == pytest.approx(0.75)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_leaves_integer_buffers_alone_and_round_trips_state():
    model = nn.BatchNorm1d(3)
    ema = ModelEMA(model)
    model.num_batches_tracked += 5
    ema.update(model)
    assert ema.module.num_batches_tracked.item() == 0
    clone = ModelEMA(nn.BatchNorm1d(3))
    clone.load_state_dict(ema.state_dict())
    assert clone.updates == 1


def test_checkpoint_round_trip_and_no_temp_files_left(tmp_path):
    path = tmp_path / "weights" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 3}, path)
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
    assert os.listdir(path.parent) == ["last.pt"]


def test_checkpoint_record_round_trips_through_the_flat_file_every_last_pt_has(tmp_path):
    cfg = TrainConfig(cfg="yolov5n", epochs=3)
    parts = build_training_parts(cfg, DistContext(), build_model(cfg, 2, torch.device("cpu")), batches_per_epoch=4)
    parts.counter.iteration, parts.counter.last_step = 7, 5
    record = Checkpoint(epoch=1, best_fitness=0.25, best_epoch=0, config=cfg.as_dict(), model_yaml=parts.model.yaml,
                        names=["cat", "dog"], training=parts.state_dict())
    record.save(tmp_path / "last.pt")
    loaded = Checkpoint.load(tmp_path / "last.pt")
    assert (loaded.epoch, loaded.best_fitness, loaded.best_epoch, loaded.names) == (1, 0.25, 0, ["cat", "dog"])
    assert loaded.config == cfg.as_dict() and loaded.model_yaml == parts.model.yaml
    assert sorted(loaded.training) == sorted(Checkpoint.TRAINING_KEYS)
    fresh = build_training_parts(cfg, DistContext(), build_model(cfg, 2, torch.device("cpu")), batches_per_epoch=4)
    fresh.restore(loaded.training)
    assert (fresh.counter.iteration, fresh.counter.last_step) == (7, 5)
    for name, value in parts.ema.module.state_dict().items():
        assert torch.equal(fresh.ema.module.state_dict()[name], value), name
    # On disk it is the flat dict of earlier files: readers of `epoch`, `model` and `ema` find them.
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert raw["epoch"] == 1 and raw["counter"] == {"iteration": 7, "last_step": 5} and "format_version" in raw
    assert load_weights(tmp_path / "last.pt").model_name() == "yolov5n"


def test_an_old_style_checkpoint_dict_reads_as_a_record(tmp_path):
    """A last.pt written as a plain dict, as runs wrote them before the record, resumes."""
    cfg = TrainConfig(cfg="yolov5n", epochs=3)
    parts = build_training_parts(cfg, DistContext(), build_model(cfg, 2, torch.device("cpu")), batches_per_epoch=4)
    old = {**parts.state_dict(), "epoch": 2, "best_fitness": 0.5, "best_epoch": 1, "config": cfg.as_dict(),
           "model_yaml": parts.model.yaml, "names": ["cat", "dog"]}
    save_checkpoint(old, tmp_path / "old.pt")
    record = Checkpoint.from_dict(load_checkpoint(tmp_path / "old.pt"))
    assert (record.epoch, record.best_fitness, record.best_epoch, record.names) == (2, 0.5, 1, ["cat", "dog"])
    assert record.to_dict().keys() == old.keys()
    assert torch.equal(record.training["model"]["model.0.conv.weight"], old["model"]["model.0.conv.weight"])


def test_weights_only_checkpoints_cannot_be_resumed(tmp_path):
    save_checkpoint({"model": {}, "config": {"cfg": "yolov5n"}}, tmp_path / "start.pt")
    with pytest.raises(UserError, match="start.pt cannot be resumed: it has no ema, optimizer"):
        Checkpoint.load(tmp_path / "start.pt")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "epoch": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a local object: AttributeError before Python 3.14
        save_checkpoint({"model": {}, "bad": lambda: None}, path)  # lambdas cannot be pickled
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("cut", [0, 0.5])
def test_damaged_checkpoint_is_a_user_error(tmp_path, cut):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(100)}}, path)
    path.write_bytes(path.read_bytes()[: int(cut * path.stat().st_size)])
    with pytest.raises(UserError, match="cannot be read .*: it may be truncated or damaged"):
        load_checkpoint(path)


@pytest.mark.parametrize("write", [lambda path: torch.save(torch.nn.Linear(2, 2), path),
                                   lambda path: path.write_text("not a checkpoint at all")])
def test_a_pickled_model_or_a_foreign_file_is_named_as_not_ours(tmp_path, write):
    """YOLOv5's own .pt files pickle whole model objects; they are refused with one clear line."""
    path = tmp_path / "yolov5s.pt"
    write(path)
    with pytest.raises(UserError, match="yolov5s.pt is not an evolvectl checkpoint: torch's safe loader") as caught:
        load_checkpoint(path)
    assert "\n" not in caught.value.message


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
