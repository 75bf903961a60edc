from __future__ import annotations

import logging
import re

import pytest
import torch

from trainer.progress import EpochProgress


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
