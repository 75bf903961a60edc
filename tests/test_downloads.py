"""Weights and datasets that download, against a real HTTP server on the loopback address
(conftest's FileServer: it answers Range requests, can cut a transfer halfway, and logs what
it was asked)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import FileServer, run_trainer
from test_weights import yolov5_style_checkpoint

from trainer.checkpoint import load_weights
from trainer.data.data_config import load_data_config
from trainer.data.synthetic import generate_synthetic
from trainer.downloads import WEIGHTS_CACHE_ENV, WEIGHTS_URL_ENV
from trainer.errors import UserError
from trainer.model import DetectionModel

NAMES = ["disc", "square", "triangle", "cross", "ring", "diamond"]


@pytest.fixture
def cache(tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(WEIGHTS_URL_ENV, server.url)
    monkeypatch.setenv(WEIGHTS_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "cache"


def _release_file(tmp_path: Path) -> bytes:
    yolov5_style_checkpoint(tmp_path / "made.pt", DetectionModel("yolov5n", nc=80))
    return (tmp_path / "made.pt").read_bytes()


def test_a_release_name_downloads_once_resuming_a_cut_transfer(server: FileServer, cache: Path,
                                                              tmp_path: Path) -> None:
    body = server.files["/yolov5n.pt"] = _release_file(tmp_path)
    server.cut.add("/yolov5n.pt")
    weights = load_weights("yolov5n.pt")
    assert weights.model_name() == "yolov5n" and (cache / "yolov5n.pt").read_bytes() == body
    # The first transfer was cut at half; the retry asked for the rest only.
    assert server.requests == [("/yolov5n.pt", None), ("/yolov5n.pt", f"bytes={len(body) // 2}-")]
    assert sorted(path.name for path in cache.iterdir()) == ["yolov5n.pt", "yolov5n.pt.lock"]
    assert load_weights("yolov5n.pt").model_name() == "yolov5n"
    assert len(server.requests) == 2  # cached: not fetched again


def test_without_the_file_or_a_network_one_line_says_where_to_put_it(server: FileServer, cache: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError) as missing:
        load_weights("yolov5s.pt")  # the server has no such file: HTTP 404, not retried
    assert str(missing.value) == (f"cannot download {server.url}/yolov5s.pt (HTTP 404); without a network, "
                                  f"download it yourself and put it at {cache / 'yolov5s.pt'}")
    assert server.requests == [("/yolov5s.pt", None)]
    monkeypatch.setenv(WEIGHTS_URL_ENV, "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(UserError, match=r"cannot download http://127.0.0.1:9/yolov5m6.pt \(.*\); without a network"):
        load_weights("yolov5m6.pt")
    assert not list(cache.glob("*.pt"))
    with pytest.raises(UserError, match="weights 'yolov5q.pt' not found"):  # not a release name: no download
        load_weights("yolov5q.pt")


def test_an_error_page_is_not_taken_for_weights(server: FileServer, cache: Path) -> None:
    server.files["/yolov5l.pt"] = b"<html>rate limited</html>"
    with pytest.raises(UserError, match=r"yolov5l.pt gave 25 bytes, too few for what it names"):
        load_weights("yolov5l.pt")
    assert not list(cache.glob("*.pt")) and not list(cache.glob("*.part"))  # only the lock file stays


def _dataset_zip(tmp_path: Path, members: dict[str, bytes] | None = None) -> bytes:
    """A YOLO dataset as coco128.zip is: one top folder with images/ and labels/."""
    generate_synthetic(tmp_path / "made" / "shapes", seed=0, n_train=8, n_val=4, size=64)
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted((tmp_path / "made").rglob("*")):
            if file.is_file():
                bundle.write(file, file.relative_to(tmp_path / "made"))
        for name, data in (members or {}).items():
            bundle.writestr(name, data)
    return archive.read_bytes()


def _data_yaml(folder: Path, download: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "shapes.yaml"
    path.write_text(yaml.safe_dump({"path": "../datasets/shapes", "train": "images/train", "val": "images/val",
                                    "names": NAMES, "download": download}, sort_keys=False))
    return path


def test_a_data_yaml_download_is_fetched_and_unpacked_once(server: FileServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/shapes.zip"] = _dataset_zip(tmp_path)
    monkeypatch.setenv("EVOLVECTL_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.chdir(tmp_path)
    config = _data_yaml(tmp_path / "configs", f"{server.url}/shapes.zip")
    data = load_data_config(config)
    assert data.root == (tmp_path / "datasets" / "shapes").resolve() and data.nc == 6
    assert len(list((data.root / "images" / "train").iterdir())) == 8
    assert not (tmp_path / "datasets" / "shapes.zip").exists()  # unpacked, then removed
    assert load_data_config(config).root == data.root and len(server.requests) == 1


@pytest.mark.parametrize("download", [
    "bash data/scripts/get_coco.sh",
    "from utils.general import download\nimport os\nos.system('touch ran')",
    "ftp://example.org/shapes.zip",
    f"http://127.0.0.1:9/{'x' * 200}.tar",
    ["http://127.0.0.1:9/a.zip"],
])
def test_code_in_a_download_key_is_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, download: object) -> None:
    monkeypatch.setenv("EVOLVECTL_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.chdir(tmp_path)
    config = _data_yaml(tmp_path / "configs", download)
    with pytest.raises(UserError, match="is not an http\\(s\\) URL of a .zip; evolvectl never runs code"):
        load_data_config(config)
    assert not (tmp_path / "ran").exists()


def test_an_archive_that_writes_outside_the_datasets_folder_is_refused(server: FileServer, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/shapes.zip"] = _dataset_zip(tmp_path, {"../escaped.txt": b"outside"})
    monkeypatch.setenv("EVOLVECTL_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"the archive's '../escaped.txt' lies outside"):
        load_data_config(_data_yaml(tmp_path / "configs", f"{server.url}/shapes.zip"))
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "datasets" / "shapes").exists()


@pytest.mark.slow
def test_a_user_trains_from_a_release_name_on_a_downloaded_dataset(server: FileServer, tmp_path: Path) -> None:
    """`python -m trainer --weights yolov5n.pt --data shapes.yaml` with neither on disk."""
    server.files["/yolov5n.pt"] = _release_file(tmp_path)
    server.files["/shapes.zip"] = _dataset_zip(tmp_path)
    config = _data_yaml(tmp_path / "configs", f"{server.url}/shapes.zip")
    environment = {WEIGHTS_URL_ENV: server.url, WEIGHTS_CACHE_ENV: str(tmp_path / "cache"),
                   "EVOLVECTL_DATASETS": str(tmp_path / "datasets")}
    result = run_trainer("--weights", "yolov5n.pt", "--data", str(config), "--epochs", "1", "--imgsz", "64",
                         "--batch-size", "4", "--workers", "0", "--device", "cpu", "--noplots",
                         "--project", str(tmp_path / "runs"), cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Downloaded {server.url}/yolov5n.pt" in result.stderr
    assert "Transferred" in result.stderr and (tmp_path / "runs" / "exp" / "weights" / "best.pt").is_file()
