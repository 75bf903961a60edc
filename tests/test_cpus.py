"""Loader processes sized to the machine: the default --workers, and an explicit one kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import cpus
from trainer.cli import build_config
from trainer.cpus import WORKERS_ON_HOST, available_cpus, cgroup_cpu_quota, default_loader_workers


@pytest.fixture
def sixteen_cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A host of 16 CPUs with no container quota; returns an empty cgroup folder to write one into."""
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cpus, "CGROUP_ROOT", tmp_path)
    return tmp_path


@pytest.mark.parametrize(("environ", "batch", "expected"), [
    ({}, 16, 8),  # one process: YOLOv5's 8
    ({WORKERS_ON_HOST: "8"}, 16, 2),  # 8 GPU workers on one host: 16 CPUs / 8
    ({WORKERS_ON_HOST: "2", "LOCAL_WORLD_SIZE": "4"}, 16, 2),  # 2 DDP jobs of 4 processes each
    ({WORKERS_ON_HOST: "32"}, 16, 0),  # more processes than CPUs: load in the training process
    ({}, 4, 4),  # no more loaders than images in a batch
    ({}, 1, 0),
    ({WORKERS_ON_HOST: "garbage"}, 16, 8),
])
def test_default_loader_workers_share_the_cpus(sixteen_cpus: Path, environ: dict, batch: int, expected: int) -> None:
    assert default_loader_workers(batch, environ, sixteen_cpus) == expected


@pytest.mark.parametrize(("files", "quota", "cpus_left"), [
    ({"cpu.max": "max 100000\n"}, None, 16),
    ({"cpu.max": "250000 100000\n"}, 2.5, 2),  # docker run --cpus 2.5 (cgroup v2)
    ({"cpu.max": "50000 100000\n"}, 0.5, 1),  # never below one
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0, 4),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, 16),
    ({"cpu.max": "garbage\n"}, None, 16),
])
def test_a_container_quota_caps_the_cpus(sixteen_cpus: Path, files: dict, quota: float | None, cpus_left: int) -> None:
    for name, text in files.items():
        (sixteen_cpus / name).parent.mkdir(parents=True, exist_ok=True)
        (sixteen_cpus / name).write_text(text)
    assert cgroup_cpu_quota(sixteen_cpus) == quota
    assert available_cpus(sixteen_cpus) == cpus_left
    assert default_loader_workers(16, {}, sixteen_cpus) == min(8, cpus_left)


def test_build_config_sizes_workers_unless_given(sixteen_cpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (sixteen_cpus / "cpu.max").write_text("1200000 100000\n")  # a container of 12 CPUs
    monkeypatch.setenv(WORKERS_ON_HOST, "4")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert build_config({"batch_size": 16}).workers == 3  # 12 CPUs / 4 workers
    assert build_config({"batch_size": 16, "workers": 12}).workers == 12  # an explicit --workers is honoured
    assert build_config({"batch_size": 16, "workers": 0}).workers == 0
    monkeypatch.setenv(WORKERS_ON_HOST, "1")
    monkeypatch.setenv("WORLD_SIZE", "8")  # DDP: batch 16 over 8 processes is 2 per process
    assert build_config({"batch_size": 16}).workers == 2
