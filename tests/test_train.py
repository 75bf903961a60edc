"""The trainer as a user runs it: resume equivalence, run-folder contents, and every bad input."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TINY = ["--imgsz", "64", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--seed", "3"]


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user mistake: non-zero exit, one `Error:` line naming the problem, no traceback."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "Error:" in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.slow
def test_resume_after_interruption_ends_with_the_same_weights(tiny_data, tmp_path):
    common = ["--data", str(tiny_data), *TINY, "--epochs", "2", "--project", str(tmp_path)]
    straight = run_trainer(*common, "--name", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    # SIGTERM during epoch 1: the trainer finishes the epoch, saves last.pt (--nosave too) and exits cleanly.
    process = subprocess.Popen([sys.executable, "-m", "trainer", *common, "--name", "cut", "--nosave"], cwd=tmp_path,
                               stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("Training "):
            process.send_signal(signal.SIGTERM)
            break
    seen.extend(process.stderr)
    assert process.wait(timeout=600) == 0, "".join(seen)[-3000:]
    assert any("Stopped after epoch 1 of 2" in line for line in seen), "".join(seen)[-3000:]
    assert len((tmp_path / "cut" / "results.csv").read_text().splitlines()) == 2

    resumed = run_trainer("--resume", str(tmp_path / "cut" / "weights" / "last.pt"), "--workers", "0", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from epoch 2 of 2" in resumed.stderr

    a = torch.load(tmp_path / "straight" / "weights" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "weights" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and a["counter"] == b["counter"]
    for part in ("model",):
        for name, value in a[part].items():
            assert torch.allclose(value.float(), b[part][name].float(), rtol=1e-5, atol=1e-7), name
    for name, value in a["ema"]["module"].items():
        assert torch.allclose(value.float(), b["ema"]["module"][name].float(), rtol=1e-5, atol=1e-7), name
    assert (tmp_path / "straight" / "results.csv").read_text() == (tmp_path / "cut" / "results.csv").read_text()


@pytest.mark.slow
def test_run_folder_has_what_a_yolov5_user_expects(tiny_data, tmp_path):
    result = run_trainer("--data", str(tiny_data), *TINY, "--epochs", "1", "--project", str(tmp_path),
                         "--name", "exp", "--save-json", "--save-period", "1", "--noautoanchor", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stderr[result.stderr.index("Class     Images  Instances"):].splitlines()
    assert [line.split()[0] for line in table[1:3]] == ["all", "disc"]  # then a row per labelled class
    run = tmp_path / "exp"
    [events] = run.glob("events.out.tfevents.*")  # TensorBoard's, as YOLOv5 writes by default
    assert sorted(p.name for p in run.iterdir() if p != events) == [
        "F1_curve.png", "PR_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png",
        "hyp.yaml", "labels.jpg", "opt.yaml", "predictions.json", "results.csv", "results.png",
        "train_batch0.jpg", "train_batch1.jpg", "train_batch2.jpg",  # 4 batches of 8
        "val_batch0_labels.jpg", "val_batch0_pred.jpg", "weights",  # 16 images: one validation batch
    ]
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["best.pt", "epoch0.pt", "last.pt"]
    # As YOLOv5 ends a run: best.pt stripped to half-precision weights; last.pt whole, for --resume.
    best, last = (torch.load(run / "weights" / name, weights_only=True) for name in ("best.pt", "last.pt"))
    assert "optimizer" not in best and "optimizer" in last and best["epoch"] == last["epoch"] == 0
    assert {tensor.dtype for tensor in best["model"].values() if tensor.is_floating_point()} == {torch.float16}
    assert (run / "weights" / "best.pt").stat().st_size < (run / "weights" / "last.pt").stat().st_size / 3
    assert f"Optimiser state stripped from {run / 'weights' / 'best.pt'}" in result.stderr
    header = [cell.strip() for cell in (run / "results.csv").read_text().splitlines()[0].split(",")]
    assert header[:4] == ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss"]
    assert header[4:8] == ["metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95"]
    assert yaml.safe_load((run / "hyp.yaml").read_text())["lr0"] == 0.01
    assert yaml.safe_load((run / "opt.yaml").read_text())["epochs"] == 1
    scalars = EventAccumulator(str(events))
    scalars.Reload()
    logged = {tag: [(event.step, event.value) for event in scalars.Scalars(tag)] for tag in scalars.Tags()["scalars"]}
    row = [float(cell) for cell in (run / "results.csv").read_text().splitlines()[1].split(",")]
    assert logged == {name: [(0, pytest.approx(value, rel=1e-4, abs=1e-6))] for name, value in zip(header[1:], row[1:])}
    again = run_trainer("--data", str(tiny_data), *TINY, "--epochs", "1", "--project", str(tmp_path),
                        "--name", "exp", "--noval", "--nosave", "--noplots", "--noautoanchor", "--multi-scale",
                        "--cache", "disk", "--rect", cwd=tmp_path)
    assert again.returncode == 0 and (tmp_path / "exp2" / "weights" / "last.pt").is_file()
    sizes = {int(line.split()[6]) for line in again.stderr.splitlines() if line.strip().startswith("1/1 ")}
    assert len(sizes) > 1 and sizes <= {32, 64, 96}  # the batches' sizes: 64 px ± 50%, in steps of 32
    images = tiny_data.parent / "data" / "images"
    # Training images resized as training resizes them, in their own folder beside validation's.
    assert [len(list((images / folder).glob("*.npy"))) for folder in ("train-cache/64-training", "val-cache/64")] == [
        32, 16]
    assert sorted(p.name for p in (tmp_path / "exp2").iterdir() if not p.name.startswith("events.")) == [
        "hyp.yaml", "opt.yaml", "results.csv", "weights"]


def test_a_run_stopped_by_patience_reports_its_best_epoch_as_yolov5_does(tiny_data, tmp_path, monkeypatch, caplog):
    """Epoch 2 scores worse than epoch 1 and --patience 1 stops the run. As YOLOv5 ends, best.pt
    (epoch 1) is validated once more: the report, its pictures and predictions.json are epoch 1's."""
    from trainer import train
    from trainer.config import TrainConfig
    from trainer.dist import DistContext
    from trainer.results import ValidationResult

    scores = iter([0.9, 0.1])  # fitness of epochs 1 and 2
    monkeypatch.setattr(ValidationResult, "fitness", property(lambda result: next(scores)))
    cfg = TrainConfig(data=str(tiny_data), imgsz=64, batch_size=8, workers=0, device="cpu", seed=3, epochs=5,
                      patience=1, save_json=True, noautoanchor=True)
    with caplog.at_level("INFO", logger="trainer"):
        result = train.run(cfg, DistContext(), tmp_path / "exp")
    run = tmp_path / "exp"
    assert result.epochs_run == 2 and "Stopping early: no improvement in 1 epochs (best epoch 1)" in caplog.text
    assert f"Validating {run / 'weights' / 'best.pt'} (epoch 1)" in caplog.text
    rows = [[cell.strip() for cell in line.split(",")] for line in (run / "results.csv").read_text().splitlines()]
    column = rows[0].index("val/box_loss")
    assert rows[1][column] != rows[2][column]  # the two epochs' weights score apart
    assert result.result.box_loss == pytest.approx(float(rows[1][column]), rel=1e-4)
    assert {"val_batch0_labels.jpg", "val_batch0_pred.jpg", "predictions.json", "PR_curve.png"} <= {
        path.name for path in run.iterdir()}
    assert [torch.load(run / "weights" / name, weights_only=True)["epoch"] for name in ("best.pt", "last.pt")] == [0, 1]


@pytest.mark.slow
def test_fine_tuning_from_a_yolov5_checkpoint_takes_its_model_and_weights(tiny_data, tmp_path):
    """`--weights yolov5s.pt --freeze 10` as YOLOv5 users run it: no --cfg, COCO's 80 classes onto 6,
    the backbone frozen."""
    from test_weights import yolov5_style_checkpoint

    from trainer.model.yolo import DetectionModel

    source = DetectionModel("yolov5s", nc=80)
    yolov5_style_checkpoint(tmp_path / "yolov5s.pt", source)
    result = run_trainer("--data", str(tiny_data), "--weights", "yolov5s.pt", "--freeze", "10", *TINY,
                         "--epochs", "1", "--noautoanchor", "--project", str(tmp_path), "--name", "tuned", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Transferred 343/349 items from yolov5s.pt" in result.stderr  # all but the 80-class output layers
    assert yaml.safe_load((tmp_path / "tuned" / "opt.yaml").read_text())["cfg"] == "yolov5s"
    start = {name: parameter.detach().half().float() for name, parameter in source.named_parameters()}
    trained = torch.load(tmp_path / "tuned" / "weights" / "last.pt", weights_only=True)["model"]
    backbone = {name for name in start if int(name.split(".")[1]) < 10}
    assert all(torch.equal(trained[name], start[name]) for name in backbone)  # --freeze 10: the backbone
    kernels = [name for name in start if name not in backbone and start[name].ndim == 4]  # BN scales of 1 barely
    assert not any(torch.equal(trained[name], start[name]) for name in kernels)  # move in 4 warmup steps


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_missing_data_config(tmp_path):
    assert_user_error(run_trainer("--data", "nowhere.yaml", *TINY, cwd=tmp_path), "nowhere.yaml", "not found")


def test_nc_that_disagrees_with_names(tmp_path):
    (tmp_path / "images").mkdir()
    data = write_yaml(tmp_path / "d.yaml", {"path": str(tmp_path), "train": "images", "val": "images",
                                            "nc": 3, "names": ["a", "b"]})
    assert_user_error(run_trainer("--data", str(data), *TINY, cwd=tmp_path), "nc")


def test_missing_image_folder(tmp_path):
    data = write_yaml(tmp_path / "d.yaml", {"path": str(tmp_path), "train": "images/train", "val": "images/val",
                                            "names": ["a"]})
    assert_user_error(run_trainer("--data", str(data), *TINY, cwd=tmp_path), "images/train")


def test_empty_dataset(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
    data = write_yaml(tmp_path / "d.yaml", {"path": str(tmp_path), "train": "images/train", "val": "images/val",
                                            "names": ["a"]})
    assert_user_error(run_trainer("--data", str(data), *TINY, cwd=tmp_path), "images")


def test_unknown_hyp_key(tmp_path, tiny_data):
    hyp = write_yaml(tmp_path / "hyp.yaml", {"lr0": 0.01, "lr_zero": 0.1})
    assert_user_error(run_trainer("--data", str(tiny_data), "--hyp", str(hyp), *TINY, cwd=tmp_path), "lr_zero")


def test_hyp_value_out_of_range(tmp_path, tiny_data):
    hyp = write_yaml(tmp_path / "hyp.yaml", {"lr0": -0.01})  # torch's SGD would raise its own ValueError
    assert_user_error(run_trainer("--data", str(tiny_data), "--hyp", str(hyp), *TINY, cwd=tmp_path),
                      "lr0=-0.01 is out of range")


def test_missing_weights_fail_before_the_data_is_prepared(tmp_path, tiny_data):
    """A YOLOv5 release name is downloaded; with no server to answer, one line says where to put it."""
    offline = {"EVOLVECTL_WEIGHTS_URL": "http://127.0.0.1:9", "EVOLVECTL_WEIGHTS": str(tmp_path / "cache")}
    result = run_trainer("--data", str(tiny_data), "--weights", "yolov5s.pt", *TINY, cwd=tmp_path, env=offline)
    assert_user_error(result, "cannot download http://127.0.0.1:9/yolov5s.pt",
                      f"download it yourself and put it at {tmp_path / 'cache' / 'yolov5s.pt'}")
    assert "train:" not in result.stderr  # the dataset summary ("train: 8 images, ...") comes later


def test_unknown_model_config(tmp_path, tiny_data):
    assert_user_error(run_trainer("--data", str(tiny_data), "--cfg", "yolov9q", *TINY, cwd=tmp_path), "yolov9q")


def test_resume_without_a_checkpoint(tmp_path):
    assert_user_error(run_trainer("--resume", str(tmp_path / "last.pt"), cwd=tmp_path), "last.pt")
    assert_user_error(run_trainer("--resume", cwd=tmp_path), "no last.pt")


def test_gpus_on_a_machine_without_cuda(tmp_path, tiny_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_user_error(run_trainer("--data", str(tiny_data), "--device", "0,1", cwd=tmp_path), "no CUDA GPU")


def test_bad_flag_values_are_rejected_by_the_parser(tmp_path):
    result = run_trainer("--epochs", "0", cwd=tmp_path)
    assert result.returncode == 2 and "--epochs" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_training_on_the_built_in_data_learns(tmp_path):
    """The README's first training (bundled hyp.quickstart) on the built-in set reaches a floor.

    The floor: an untrained model scores about 4e-5 mAP@0.5 on these images (see test_ddp's
    validation test), and this recipe reaches 0.04 to 0.045. 0.02 is 500 times
    chance and leaves room for run-to-run differences between machines. AdamW at YOLOv5's
    Adam lr0 (1e-3) learns in few optimiser steps; the nominal batch of 64 leaves only
    about 6 steps per epoch here, too few for SGD in a test's time.
    """
    result = run_trainer("--data", "synthetic", "--hyp", "hyp.quickstart", "--optimizer", "AdamW", "--epochs", "30",
                         "--imgsz", "96", "--batch-size", "16", "--workers", "2", "--device", "cpu", "--noval",
                         "--patience", "0", "--project", str(tmp_path / "runs"), "--name", "learn", cwd=tmp_path,
                         timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(",") for line in (tmp_path / "runs" / "learn" / "results.csv").read_text().splitlines()]
    header, first, last = [cell.strip() for cell in rows[0]], rows[1], rows[-1]
    column = header.index("metrics/mAP_0.5")
    assert float(last[column]) > 0.02, last
    box = header.index("train/box_loss")
    assert float(last[box]) < float(first[box])  # the box loss fell over the run
