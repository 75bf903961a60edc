"""P6 models (four detection levels, stride 64), end to end: the bundled YAMLs, image sizes rounded
to 64, training, validation, resume, and the Docker evolution article's command scaled down."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_trainer

from trainer.model import DetectionModel, load_model_spec, model_stride

# YOLOv5 v6+ P6 model sizes at nc=80, in millions of parameters.
YOLOV5_P6_PARAMETERS_M = {"n6": 3.2, "s6": 12.6, "m6": 35.7, "l6": 76.8, "x6": 140.7}
TINY = ["--batch-size", "8", "--workers", "0", "--device", "cpu", "--seed", "3"]


@pytest.mark.parametrize("size", ["n6", "s6", pytest.param("m6", marks=pytest.mark.slow),
                                  pytest.param("l6", marks=pytest.mark.slow),
                                  pytest.param("x6", marks=pytest.mark.slow)])
def test_p6_models_have_yolov5s_parameter_counts_and_four_levels(size: str) -> None:
    model = DetectionModel(f"yolov5{size}")
    # published to 0.1M
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(YOLOV5_P6_PARAMETERS_M[size], rel=0.02)
    assert model.stride.tolist() == [8, 16, 32, 64] and model_stride(f"yolov5{size}") == 64
    assert tuple(model.state_dict()["model.33.anchors"].shape) == (4, 3, 2)  # YOLOv5's names: Detect is layer 33
    outputs = DetectionModel(f"yolov5{size}", nc=2).eval()(torch.zeros(1, 3, 64, 128))
    assert [tuple(level.shape[2:4]) for level in outputs[1]] == [(8, 16), (4, 8), (2, 4), (1, 2)]


@pytest.mark.slow
def test_a_p6_model_trains_at_a_rounded_size_validates_and_resumes(tiny_data: Path, tmp_path: Path) -> None:
    """--imgsz 70 becomes 128, a multiple of 64 (a P5 model would train at 96)."""
    common = ["--data", str(tiny_data), "--cfg", "yolov5n6", "--imgsz", "70", *TINY, "--epochs", "2",
              "--project", str(tmp_path), "--name", "p6"]
    process = subprocess.Popen([sys.executable, "-m", "trainer", *common], cwd=tmp_path, stderr=subprocess.PIPE,
                               text=True)
    seen = []
    for line in process.stderr:  # SIGTERM in epoch 1: it finishes the epoch, saves last.pt and exits
        seen.append(line)
        if line.startswith("Training "):
            process.send_signal(signal.SIGTERM)
            break
    seen.extend(process.stderr)
    log = "".join(seen)
    assert process.wait(timeout=600) == 0, log[-3000:]
    assert "--imgsz 70 must be a multiple of the model's stride 64: using 128" in log
    assert "Stopped after epoch 1 of 2" in log
    resumed = run_trainer("--resume", str(tmp_path / "p6" / "weights" / "last.pt"), "--workers", "0", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from epoch 2 of 2" in resumed.stderr
    assert len((tmp_path / "p6" / "results.csv").read_text().splitlines()) == 3
    checkpoint = torch.load(tmp_path / "p6" / "weights" / "last.pt", weights_only=True)
    assert checkpoint["config"]["imgsz"] == 128 and checkpoint["config"]["cfg"] == "yolov5n6"
    validated = subprocess.run([sys.executable, "-m", "trainer.val", "--weights", str(tmp_path / "p6" / "weights" /
                                "best.pt"), "--data", str(tiny_data), "--imgsz", "70", "--device", "cpu",
                                "--workers", "0", "--project", str(tmp_path / "val")],
                               cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert "--imgsz 70 must be a multiple of the model's stride 64: using 128" in validated.stderr
    assert "all" in validated.stderr


@pytest.mark.slow
def test_the_articles_p6_command_scaled_down_runs_as_a_worker_and_as_start(tiny_data: Path, tmp_path: Path) -> None:
    """`train.py --weights yolov5s6.pt --imgsz 3000 --hyp hyp.finetune.yaml --optimizer AdamW --single-cls
    --project gbr --name search --exist-ok --resume --evolve 60`, with P6 weights from a short P6
    training, 150 px for 3000, and one-epoch generations. hyp.finetune's anchor_t sends AutoAnchor
    through four levels."""
    trained = run_trainer("--data", str(tiny_data), "--cfg", "yolov5n6", "--imgsz", "128", *TINY, "--epochs", "1",
                          "--project", str(tmp_path), "--name", "pretrain", "--noplots", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    weights = str(tmp_path / "pretrain" / "weights" / "best.pt")
    article = ["--weights", weights, "--imgsz", "150", "--hyp", "hyp.finetune.yaml", "--optimizer", "AdamW",
               "--single-cls", "--data", str(tiny_data), "--epochs", "1", *TINY]
    worker = run_trainer(*article, "--project", str(tmp_path / "gbr"), "--name", "search", "--exist-ok", "--resume",
                         "--evolve", "2", cwd=tmp_path)
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert "--imgsz 150 must be a multiple of the model's stride 64: using 192" in worker.stderr
    assert len((tmp_path / "gbr" / "search" / "evolve.csv").read_text().splitlines()) == 3
    start = subprocess.run([sys.executable, "-m", "orchestrator", "start", "--backend", "local", "--cpu-workers", "1",
                            "--generations", "2", "--weights", weights, "--imgsz", "150", "--hyp", "hyp.finetune",
                            "--data", str(tiny_data), "--epochs", "1", "--batch-size", "8", "--workers", "0",
                            "--name", "article", "--wait", "--", "--optimizer", "AdamW", "--single-cls"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    run_dir = tmp_path / "runs" / "evolve" / "article"
    logs = "".join(log.read_text()[-3000:] for log in (run_dir / "workers").glob("*.log"))
    assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:] + logs
    assert len((run_dir / "evolve.csv").read_text().splitlines()) == 3
    assert "budget reached" in start.stdout


def test_a_yolov5_p6_checkpoint_imports_as_the_p5_ones_do(tmp_path: Path) -> None:
    from test_weights import yolov5_style_checkpoint

    from trainer.checkpoint import load_weights

    model = DetectionModel("yolov5n6", nc=80)
    yolov5_style_checkpoint(tmp_path / "yolov5n6.pt", model)
    weights = load_weights(tmp_path / "yolov5n6.pt")
    assert weights.model_name() == "yolov5n6"  # recognised by its architecture
    expected = model.half().float().state_dict()
    assert all(torch.equal(weights.state[name], expected[name]) for name in expected)


def test_autoanchor_fits_twelve_anchors_over_a_p6_models_four_levels() -> None:
    from trainer.autoanchor import check_anchors

    spec = load_model_spec("yolov5n6")
    spec["anchors"] = [[500, 500, 510, 520, 530, 540]] * 4  # all far too big
    model = DetectionModel(spec, nc=1)
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([[8.0, 16.0], [40.0, 30.0], [120.0, 90.0], [400.0, 300.0]])[torch.arange(800) % 4]
    labels = labels * (1 + 0.1 * torch.randn(800, 2, generator=generator))
    report = check_anchors(model, labels, anchor_t=4.0, imgsz=1280, generations=200)
    assert report.replaced and report.bpr_after > 0.98
    pixels = (model.detect.anchors * model.stride.view(-1, 1, 1)).view(-1, 2)
    assert pixels.shape == (12, 2)
    areas = pixels.prod(dim=1)
    assert torch.all(areas[1:] >= areas[:-1])  # the smallest on P3/8, the largest on P6/64
