"""`python -m trainer.val`: the validation of training, for any weights, as YOLOv5's val.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from conftest import run_trainer

from trainer.checkpoint import save_checkpoint
from trainer.errors import UserError
from trainer.model.yolo import DetectionModel
from trainer.val import ValConfig, main, validate

OPTIONS: dict[str, Any] = {"batch_size": 16, "imgsz": 64, "device": "cpu", "workers": 0}


@pytest.mark.slow
def test_val_scores_a_run_exactly_as_its_last_epoch_did(tiny_data: Path, tmp_path: Path) -> None:
    trained = run_trainer("--data", str(tiny_data), "--imgsz", "64", "--batch-size", "8", "--workers", "0",
                          "--device", "cpu", "--epochs", "3", "--hyp", "hyp.quickstart", "--optimizer", "AdamW",
                          "--noautoanchor", "--project", str(tmp_path), "--name", "run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    header, *_, last = (tmp_path / "run" / "results.csv").read_text().splitlines()
    logged = dict(zip((cell.strip() for cell in header.split(",")), (float(cell) for cell in last.split(","))))
    assert logged["metrics/mAP_0.5"] > 0  # AdamW finds a few boxes in 3 epochs: the comparison means something
    # Training validates the EMA weights in batches of twice its own: 16 here.
    validation = validate(ValConfig(**OPTIONS, data=str(tiny_data),
                                    weights=str(tmp_path / "run" / "weights" / "last.pt"),
                                    project=str(tmp_path / "val")))
    assert validation.result.map50 == pytest.approx(logged["metrics/mAP_0.5"], rel=1e-4, abs=1e-9)
    assert validation.result.map == pytest.approx(logged["metrics/mAP_0.5:0.95"], rel=1e-4, abs=1e-9)
    assert validation.result.box_loss == pytest.approx(logged["val/box_loss"], rel=1e-4)


def test_val_prints_yolov5s_table_and_writes_coco_predictions(tiny_data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    save_checkpoint({"model": DetectionModel("yolov5n", nc=6).state_dict(), "config": {"cfg": "yolov5n"}},
                    tmp_path / "last.pt")
    result = CliRunner().invoke(main, ["--data", str(tiny_data), "--weights", "last.pt", "--imgsz", "64",
                                       "--workers", "0", "--device", "cpu", "--save-json"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "val" / "exp"
    predictions = json.loads((folder / "predictions.json").read_text())
    assert predictions and {"image_id", "category_id", "bbox", "score"} <= set(predictions[0])
    assert sorted(path.name for path in folder.iterdir()) == [  # 16 images, one batch
        "F1_curve.png", "PR_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png",
        "predictions.json", "val_batch0_labels.jpg", "val_batch0_pred.jpg"]


def test_weights_that_do_not_fit_the_data_are_a_user_error(tiny_data: Path, tmp_path: Path) -> None:
    save_checkpoint({"model": DetectionModel("yolov5n", nc=6).state_dict(), "config": {"cfg": "yolov5n"}},
                    tmp_path / "last.pt")
    config = ValConfig(**OPTIONS, data=str(tiny_data), weights=str(tmp_path / "last.pt"), project=str(tmp_path / "val"))
    with pytest.raises(UserError, match="does not fit a 1-class yolov5n model for this data"):
        validate(replace(config, single_cls=True))
    with pytest.raises(UserError, match="does not fit a 6-class yolov5s model"):
        validate(replace(config, cfg="yolov5s"))


def test_task_test_scores_the_test_split(tiny_data: Path, tmp_path: Path) -> None:
    save_checkpoint({"model": DetectionModel("yolov5n", nc=6).state_dict(), "config": {"cfg": "yolov5n"}},
                    tmp_path / "last.pt")
    config = ValConfig(**OPTIONS, data=str(tiny_data), weights=str(tmp_path / "last.pt"), task="test",
                       project=str(tmp_path / "val"))
    with pytest.raises(UserError, match="has no `test` split; add one to it, or use --task val"):
        validate(config)
    with_test = yaml.safe_load(tiny_data.read_text())
    with_test["test"] = with_test["train"]  # 32 images, where val has 16
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(with_test))
    assert validate(replace(config, data=str(tmp_path / "data.yaml"))).scores.images == 32
