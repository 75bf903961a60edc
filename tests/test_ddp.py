"""DDP on CPU (gloo) with real processes: equivalence with one process, distributed validation,
rank-0-only writes, resume under DDP, and a two-"node" rendezvous on localhost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.io import encode_jpeg, write_file

from trainer import dist
from trainer.dist import free_port

SCRIPT = Path(__file__).with_name("ddp_script.py")
pytestmark = pytest.mark.slow

# Every image has these boxes (class cx cy w h): equal target counts on every rank make the
# YOLOv5 loss's mean over targets split exactly across ranks.
LAYOUT = [(0, 0.30, 0.35, 0.30, 0.40), (1, 0.70, 0.65, 0.35, 0.25)]


@pytest.fixture(scope="module")
def layout_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layout")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 16), ("val", 8)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for index in range(count):
            image = torch.randint(0, 120, (3, 64, 64), generator=generator, dtype=torch.uint8)
            for cls, cx, cy, w, h in LAYOUT:
                x0, y0, x1, y1 = (int(64 * v) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
                colour = torch.randint(130, 256, (3, 1, 1), generator=generator, dtype=torch.uint8)
                image[:, y0:y1, x0:x1] = colour if cls == 0 else colour // 2 + 100
            write_file(str(root / "images" / split / f"{index}.jpg"), encode_jpeg(image, quality=95))
            (root / "labels" / split / f"{index}.txt").write_text(
                "".join(f"{c} {x} {y} {w} {h}\n" for c, x, y, w, h in LAYOUT))
    config = root / "data.yaml"
    config.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                      "names": ["bright", "dim"]}))
    return config


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def script(nproc: int, *args: str, cwd: Path) -> None:
    if nproc == 1:
        result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True)
    else:
        result = torchrun(nproc, str(SCRIPT), *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ddp_per_rank_batch_equals_one_process_on_the_total_batch(layout_data, tmp_path):
    script(1, "train", str(layout_data), "8", str(tmp_path / "single.pt"), cwd=tmp_path)
    script(2, "train", str(layout_data), "8", str(tmp_path / "ddp.pt"), cwd=tmp_path)
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    assert single["steps"] == ddp["steps"] == 4
    for name, value in single["model"].items():
        assert torch.allclose(value, ddp["model"][name], rtol=1e-4, atol=1e-6), name
    for name, value in single["ema"].items():
        assert torch.allclose(value, ddp["ema"][name], rtol=1e-4, atol=1e-6), name
    # Training really moved the weights, by far more than the tolerance above.
    change = max((value - single["initial"][name]).abs().max().item() for name, value in single["model"].items())
    assert change > 1e-2


def test_distributed_validation_equals_single_process(layout_data, tmp_path):
    script(1, "validate", str(layout_data), "4", str(tmp_path / "single.json"), cwd=tmp_path)
    script(2, "validate", str(layout_data), "4", str(tmp_path / "ddp.json"), cwd=tmp_path)
    single = json.loads((tmp_path / "single.json").read_text())
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    for key in ("precision", "recall", "map50", "map"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-9), key
    assert 0.1 < single["map"] < 0.9 and single["recall"] > 0.5  # true positives at varied IoUs: not vacuous
    for key in ("box_loss", "obj_loss", "cls_loss"):
        assert ddp[key] == pytest.approx(single[key], rel=0.05), key  # batch composition differs


def test_ddp_training_writes_from_rank_zero_only_and_resumes(tiny_data, tmp_path):
    args = ["-m", "trainer", "--data", str(tiny_data), "--imgsz", "64", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--project", str(tmp_path / "runs"), "--name", "ddp", "--epochs", "2"]
    result = torchrun(2, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]  # no ddp2 from rank 1
    rows = (tmp_path / "runs" / "ddp" / "results.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 epochs, written once
    assert result.stderr.count("Results saved to") == 1

    odd = torchrun(3, *args, cwd=tmp_path)
    assert odd.returncode != 0 and "must divide evenly" in odd.stderr

    # Resume under DDP: mark the finished run's checkpoint as written after epoch 1 of 2, with a
    # best fitness that epoch 2 cannot beat, so the run ends by validating best.pt across both ranks.
    state = torch.load(tmp_path / "runs" / "ddp" / "weights" / "last.pt", weights_only=True)
    state["epoch"] = 0
    state["scheduler"]["last_epoch"] = 1
    state["best_fitness"], state["best_epoch"] = 2.0, 0
    torch.save(state, tmp_path / "interrupted.pt")
    resumed_dir = tmp_path / "runs" / "ddp" / "weights"
    (resumed_dir / "last.pt").unlink()
    os.replace(tmp_path / "interrupted.pt", resumed_dir / "last.pt")
    result = torchrun(2, "-m", "trainer", "--resume", str(resumed_dir / "last.pt"), "--device", "cpu",
                      "--workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from epoch 2 of 2" in result.stderr
    assert f"Validating {resumed_dir / 'best.pt'} (epoch 1)" in result.stderr
    assert len((tmp_path / "runs" / "ddp" / "results.csv").read_text().splitlines()) == 4


def test_the_guides_torchrun_command_without_device_trains(tiny_data, tmp_path):
    """`torchrun --nproc_per_node 2 train.py --batch 16 --data ... --weights ''`, as YOLOv5's DDP guide
    writes it, names no --device: on a CPU host both ranks train with gloo."""
    result = torchrun(2, "-m", "trainer", "--batch", "8", "--data", str(tiny_data), "--weights", "", "--img", "64",
                      "--epochs", "1", "--workers", "0", "--project", str(tmp_path / "runs"), "--name", "guide",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 8 (4 per process × 2)" in result.stderr


def test_torchrun_without_device_gives_rank_r_gpu_r(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert dist.torchrun_devices("") == ["0", "1", "2", "3"]
    assert dist.torchrun_devices("2,3") == ["2", "3"]  # --device narrows it, as before
    assert dist.torchrun_devices("cpu") == ["cpu"]


def test_two_nodes_on_localhost_train_and_finish(tiny_data, tmp_path):
    port = str(free_port())
    common = ["--data", str(tiny_data), "--imgsz", "64", "--batch-size", "8", "--workers", "0", "--device", "cpu",
              "--epochs", "1", "--project", str(tmp_path / "runs"), "--name", "nodes", "--nnodes", "2",
              "--master-addr", "127.0.0.1", "--master-port", port]
    nodes = [subprocess.Popen([sys.executable, "-m", "trainer", *common, "--node-rank", str(rank)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "2 node(s)" in outputs[0]
    assert (tmp_path / "runs" / "nodes" / "weights" / "last.pt").is_file()
