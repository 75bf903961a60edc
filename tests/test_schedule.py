"""LR schedule, warmup, parameter groups and weight-decay scaling, checked against YOLOv5's formulas."""

import math

import pytest
import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.dist import DistContext
from trainer.model.yolo import DetectionModel
from trainer.optim import (
    NOMINAL_BATCH,
    Warmup,
    build_optimizer,
    lr_lambda,
    scaled_weight_decay,
)
from trainer.train import build_training_parts


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def test_parameter_groups_split_bias_weights_norm():
    optimizer = build_optimizer(small_net(), "SGD", lr=0.01, momentum=0.937, weight_decay=5e-4)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert [p.shape for p in groups["bias"]["params"]] == [torch.Size([4]), torch.Size([2])]  # BN bias + conv bias
    assert [p.shape for p in groups["weights"]["params"]] == [torch.Size([4, 3, 3, 3]), torch.Size([2, 4, 1, 1])]
    assert [p.shape for p in groups["norm"]["params"]] == [torch.Size([4])]
    assert groups["weights"]["weight_decay"] == 5e-4
    assert groups["bias"]["weight_decay"] == groups["norm"]["weight_decay"] == 0.0
    assert optimizer.defaults["nesterov"] is True


@pytest.mark.parametrize("name,cls", [("Adam", torch.optim.Adam), ("AdamW", torch.optim.AdamW)])
def test_adam_uses_momentum_as_beta1(name, cls):
    optimizer = build_optimizer(small_net(), name, lr=0.001, momentum=0.9, weight_decay=0.0)
    assert isinstance(optimizer, cls) and optimizer.defaults["betas"] == (0.9, 0.999)


def test_linear_and_cosine_schedules_end_at_lrf():
    linear, cosine = lr_lambda(10, 0.01, cosine=False), lr_lambda(10, 0.01, cosine=True)
    assert linear(0) == pytest.approx(1.0) and linear(10) == pytest.approx(0.01)
    assert linear(5) == pytest.approx(0.5 * 0.99 + 0.01)
    assert cosine(0) == pytest.approx(1.0) and cosine(10) == pytest.approx(0.01)
    assert cosine(5) == pytest.approx((1 - math.cos(math.pi / 2)) / 2 * (0.01 - 1) + 1)


def test_weight_decay_scaled_to_nominal_batch():
    assert scaled_weight_decay(5e-4, 64) == pytest.approx(5e-4)
    assert scaled_weight_decay(5e-4, 16) == pytest.approx(5e-4)  # 16 × accumulate 4 = 64
    assert scaled_weight_decay(5e-4, 128) == pytest.approx(1e-3)


def test_warmup_length_is_at_least_100_iterations():
    assert Warmup.for_run(3.0, 10, 16, 0.1, 0.8, 0.937).iterations == 100
    assert Warmup.for_run(3.0, 50, 16, 0.1, 0.8, 0.937).iterations == 150
    assert Warmup.for_run(0.0, 50, 16, 0.1, 0.8, 0.937).iterations == 0


def test_warmup_interpolates_lr_momentum_and_accumulation():
    optimizer = build_optimizer(small_net(), "SGD", lr=0.01, momentum=0.937, weight_decay=5e-4)
    for group in optimizer.param_groups:
        group["initial_lr"] = 0.01
    warmup = Warmup(iterations=100, batch_size=16, warmup_bias_lr=0.1, warmup_momentum=0.8, momentum=0.937)
    warmup.apply(optimizer, 0, scheduled_lr_factor=1.0)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"bias": pytest.approx(0.1), "weights": 0.0, "norm": 0.0}
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.8)
    warmup.apply(optimizer, 50, scheduled_lr_factor=1.0)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["bias"] == pytest.approx(0.055) and lrs["weights"] == pytest.approx(0.005)
    assert optimizer.param_groups[1]["momentum"] == pytest.approx(0.8685)
    assert warmup.accumulate(0) == 1
    assert warmup.accumulate(50) == round(1 + 0.5 * (NOMINAL_BATCH / 16 - 1))
    assert warmup.accumulate(100) == warmup.accumulate(10_000) == 4
    warmup.apply(optimizer, 100, scheduled_lr_factor=0.9)  # the last warmup iteration lands on the schedule
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.009] * 3)
    assert all(g["momentum"] == 0.937 for g in optimizer.param_groups)
    warmup.apply(optimizer, 101, scheduled_lr_factor=0.5)  # after warmup nothing changes
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.009] * 3)
    Warmup(0, 16, 0.1, 0.8, 0.937).apply(optimizer, 0, scheduled_lr_factor=0.5)  # no warmup: nothing changes
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.009] * 3)


def test_learning_rate_per_epoch_follows_yolov5():
    """The lr of each group at each epoch's end, as results.csv logs it, for 5 epochs of 250
    batches of 16 (warmup: 750 iterations), equals what YOLOv5 v7.0 logs for that run, to its
    five significant digits. Its scheduler runs one epoch behind, so epochs 3 and 4 both train
    at lr0 · lf(3)."""
    cfg = TrainConfig(epochs=5, batch_size=16, imgsz=320)
    parts = build_training_parts(cfg, DistContext(), DetectionModel("yolov5n", nc=6), batches_per_epoch=250)
    logged = []
    for epoch in range(cfg.epochs):
        for iteration in range(epoch * 250, (epoch + 1) * 250):
            parts.warmup.apply(parts.optimizer, iteration, parts.lr_factor(epoch))
        parts.optimizer.step()  # no gradients, so no change; the scheduler expects a step before its own
        logged.append([group["lr"] for group in parts.optimizer.param_groups])
        parts.scheduler.step()
    bias, weights, norm = zip(*logged)
    assert bias == pytest.approx([0.07012, 0.038803, 0.0061653, 0.00406, 0.00406], rel=1e-4)
    assert weights == norm == pytest.approx([0.00332, 0.005336, 0.0060319, 0.00406, 0.00406], rel=1e-4)


def test_sgdr_restarts_each_cycle_at_lr0_and_lengthens_cycles_by_its_multiplier():
    lf = lr_lambda(epochs=100, lrf=0.1, cosine=False, restart=2, restart_mult=2)
    factors = [lf(epoch) for epoch in range(14)]  # cycles: epochs 0-1, 2-5, 6-13
    starts = [0, 2, 6]
    assert [factors[start] for start in starts] == [1.0, 1.0, 1.0]
    assert factors[1] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 2)) / 2)
    assert factors[5] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 3 / 4)) / 2)
    assert all(factors[e] > factors[e + 1] for e in range(13) if e + 1 not in starts)  # falls within a cycle
    assert lr_lambda(10, 0.1, False, restart=3)(7) == pytest.approx(lr_lambda(10, 0.1, False, restart=3)(1))


def test_sgdr_resumes_exactly_from_the_schedulers_state():
    """A resumed run rebuilds the schedule and loads the scheduler's state: the lr goes on as if uninterrupted."""
    cfg = TrainConfig(epochs=12, batch_size=16, imgsz=320, sgdr=3, sgdr_mult=2)

    def lrs(parts, epochs):
        seen = []
        for _ in range(epochs):
            parts.optimizer.step()
            parts.scheduler.step()
            seen.append(parts.optimizer.param_groups[0]["lr"])
        return seen

    whole = lrs(build_training_parts(cfg, DistContext(), DetectionModel("yolov5n", nc=2), batches_per_epoch=10), 12)
    first = build_training_parts(cfg, DistContext(), DetectionModel("yolov5n", nc=2), batches_per_epoch=10)
    head = lrs(first, 5)
    resumed = build_training_parts(cfg, DistContext(), DetectionModel("yolov5n", nc=2), batches_per_epoch=10)
    resumed.scheduler.load_state_dict(first.scheduler.state_dict())
    assert head + lrs(resumed, 7) == pytest.approx(whole)
    assert whole[3] == pytest.approx(cfg.hyp.lr0) and whole[2] < whole[3]  # the restart after the first 3 epochs


def test_sgdr_and_cos_lr_together_are_refused():
    from trainer.cli import build_config
    from trainer.errors import UserError

    with pytest.raises(UserError, match="--cos-lr and --sgdr 5 are two schedules"):
        build_config({"cos_lr": True, "sgdr": 5})
