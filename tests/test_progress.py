from __future__ import annotations

import logging
import re

import pytest
import torch

from trainer.metrics import DetectionMetrics
from trainer.progress import EpochProgress, class_table


def test_plain_lines_show_progress_elapsed_time_and_rate(caplog: pytest.LogCaptureFixture) -> None:
    """Off a terminal (container logs, CI) the bar becomes log lines a person can still read."""
    progress = EpochProgress(True, epoch=2, epochs=5, total=4, device=torch.device("cpu"), log_every=2)
    with caplog.at_level(logging.INFO, logger="trainer"):
        for _ in progress.track(range(4)):
            progress.describe([0.1, 0.05, 0.02], instances=7, size=320)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].split() == list(EpochProgress.HEADER)
    assert len(lines) == 3  # header, then every 2 of 4 batches
    assert re.fullmatch(r"\s*3/5\s+0G\s+0\.1\s+0\.05\s+0\.02\s+7\s+320 4/4 \[\d+s, [\d.]+ it/s\]", lines[-1])


def test_disabled_progress_only_iterates(caplog: pytest.LogCaptureFixture) -> None:
    progress = EpochProgress(False, epoch=0, epochs=1, total=3, device=torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert list(progress.track(range(3))) == [0, 1, 2]
    assert not caplog.records


def test_losses_on_a_device_are_read_when_the_line_is_written(caplog: pytest.LogCaptureFixture) -> None:
    """The engine passes its running mean as a tensor (reading it would wait for the GPU)."""
    progress = EpochProgress(True, epoch=0, epochs=1, total=2, device=torch.device("cpu"), log_every=2)
    losses = torch.zeros(3)
    with caplog.at_level(logging.INFO, logger="trainer"):
        for _step in progress.track(range(2)):
            progress.describe(losses, instances=3, size=64)
            losses.add_(0.25)  # changed after describe, before the line: the line shows the latest
    lines = [record.getMessage() for record in caplog.records]
    assert lines[1].split()[2:5] == ["0.25", "0.25", "0.25"]
    assert lines[2].split()[2:5] == ["0.5", "0.5", "0.5"]


def test_class_table_has_all_then_each_labelled_class_as_yolov5_prints_it() -> None:
    metrics = DetectionMetrics()
    box = [10.0, 10.0, 50.0, 50.0]
    # Image 1: a cat found, a dog missed. Image 2: a second cat found. No bird anywhere.
    metrics.update(torch.tensor([[*box, 0.9, 0.0]]), torch.tensor([[0.0, *box], [2.0, 60.0, 60.0, 90.0, 90.0]]))
    metrics.update(torch.tensor([[*box, 0.8, 0.0]]), torch.tensor([[0.0, *box]]))
    lines = class_table(metrics.compute(), ["cat", "bird", "dog"])
    assert lines[0].split() == ["Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95"]
    assert [line.split()[:3] for line in lines[1:]] == [["all", "2", "3"], ["cat", "2", "2"], ["dog", "2", "1"]]
    assert lines[2].split()[3:] == ["1", "1", "1", "1"]
    assert lines[3].split()[3:] == ["0", "0", "0", "0"]
    assert len({len(line) for line in lines}) == 1  # fixed-width columns
    single = class_table(metrics.compute(), ["item"])
    assert [line.split()[0] for line in single] == ["Class", "all"]  # no class rows for one class, as in YOLOv5
