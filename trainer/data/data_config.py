"""The dataset description file (YOLOv5's data.yaml): where the images are and what the classes are."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.data.labels import IMAGE_SUFFIXES, image_list_entries
from trainer.data.synthetic import ensure_synthetic
from trainer.downloads import download_dataset
from trainer.errors import UserError
from trainer.files import read_yaml
from trainer.paths import resolve_config

DATASETS_ENV = "EVOLVECTL_DATASETS"
SYNTHETIC_KEYS = {"seed": 0, "train": 400, "val": 100, "size": 256}


@dataclass(frozen=True)
class DataConfig:
    """A validated data.yaml: the image sources of each split and the class names."""

    root: Path
    train: list[Path]  # folders of images and/or .txt files listing images
    val: list[Path]
    nc: int
    names: list[str]
    test: list[Path] = field(default_factory=list)  # optional, for `python -m trainer.val --task test`

    def class_names(self, single_cls: bool) -> list[str]:
        """The names a model trained on this data predicts; one class, `item`, with --single-cls."""
        return ["item"] if single_cls else self.names


def datasets_dir() -> Path:
    """Where generated datasets live: $EVOLVECTL_DATASETS, else ./datasets."""
    return Path(os.environ.get(DATASETS_ENV) or "datasets").absolute()


def load_data_config(name_or_path: str | Path) -> DataConfig:
    """Read and check a data.yaml (a path, or a bundled name such as `synthetic`).

    A file with a `synthetic:` block describes a generated dataset: it is generated into
    its `path` first if it is not there yet.
    """
    path = resolve_config(name_or_path, "data")
    values = read_yaml(path, "data config")
    if not isinstance(values, dict):
        raise UserError(f"data config {path} must be a mapping with keys path, train, val, names")

    synthetic = values.get("synthetic")
    root = _resolve_root(values.get("path"), path, generated=synthetic is not None, download=values.get("download"))
    if synthetic is not None:
        ensure_synthetic(root, **_synthetic_options(synthetic, path))
    names = _class_names(values, path)
    return DataConfig(
        root=root,
        train=_split_sources(values, "train", root, path),
        val=_split_sources(values, "val", root, path),
        nc=len(names),
        names=names,
        test=_split_sources(values, "test", root, path) if values.get("test") not in (None, "", []) else [],
    )


def _resolve_root(value: Any, config: Path, generated: bool, download: Any = None) -> Path:
    """The dataset root. A relative `path` is looked up from the working directory, then
    from the config's folder; a generated dataset's relative path is under datasets_dir().
    A folder found nowhere is fetched from the YAML's `download:` zip into datasets_dir(), as
    YOLOv5 does (`path: ../datasets/coco128` then lies at datasets/coco128)."""
    if value is not None and not isinstance(value, str | int | float):
        raise UserError(f"{config}: path={value!r} must be a folder name, not a {type(value).__name__}")
    root = Path(str(value)) if value not in (None, "") else Path()
    if root.is_absolute():
        return root
    if generated:
        return datasets_dir() / root
    for base in (Path.cwd(), config.parent):
        if _is_folder(base / root):
            return (base / root).resolve()
    if download is not None:
        download_dataset(download, datasets_dir(), config)
        for candidate in (Path.cwd() / root, config.parent / root, datasets_dir() / root.name):
            if _is_folder(candidate):
                return candidate.resolve()
        raise UserError(f"{config}: the download {download} holds no folder {root.name} in {datasets_dir()}; "
                        "fix `path` to name the folder it unpacks")
    raise UserError(
        f"{config}: dataset folder path={value!r} not found in {Path.cwd()} or {config.parent}; "
        "fix `path`, use an absolute path, or give a `download:` URL of a zip"
    )


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long, or one the file system cannot hold, is no folder
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.exists() and not path.is_dir()
    except OSError:
        return False


def _synthetic_options(block: Any, config: Path) -> dict[str, int]:
    if not isinstance(block, dict):
        raise UserError(f"{config}: `synthetic` must be a mapping of {', '.join(SYNTHETIC_KEYS)}")
    unknown = sorted(set(block) - set(SYNTHETIC_KEYS))
    if unknown:
        raise UserError(
            f"{config}: unknown synthetic option(s) {', '.join(unknown)}; valid: {', '.join(SYNTHETIC_KEYS)}"
        )
    options = {**SYNTHETIC_KEYS, **block}
    for key, value in options.items():
        minimum = 0 if key == "seed" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise UserError(f"{config}: synthetic {key}={value!r} must be an integer >= {minimum}")
    options["n_train"], options["n_val"] = options.pop("train"), options.pop("val")
    return options


def _class_names(values: dict[str, Any], config: Path) -> list[str]:
    """Names from a list or an {index: name} mapping, checked against `nc` when given."""
    names = values.get("names")
    nc = values.get("nc")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise UserError(
                f"{config}: names keys {sorted(names)} must be the class indices 0..{len(names) - 1}"
            )
        names = [names[index] for index in range(len(names))]
    if names is None:
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
            raise UserError(
                f"{config}: give `names` (a list of class names) or nc, a positive integer (got nc={nc!r})"
            )
        return [f"class{index}" for index in range(nc)]
    if not isinstance(names, list) or not names:
        raise UserError(f"{config}: names={names!r} must be a non-empty list or an {{index: name}} mapping")
    if nc is not None and nc != len(names):
        raise UserError(f"{config}: nc={nc!r} but {len(names)} names are given; make them agree or drop nc")
    return [str(name) for name in names]


def _split_sources(values: dict[str, Any], split: str, root: Path, config: Path) -> list[Path]:
    """A split's image folders and image-list files, each checked to exist and hold images."""
    entries = values.get(split)
    if entries in (None, "", []):
        raise UserError(f"{config}: `{split}` is missing; give a folder of images or a .txt list of them")
    sources = []
    for entry in entries if isinstance(entries, list) else [entries]:
        source = Path(str(entry))
        source = source if source.is_absolute() else root / source
        if _is_folder(source):
            has_images = any(file.suffix.lower() in IMAGE_SUFFIXES for file in source.rglob("*"))
        elif _is_file(source) and source.suffix == ".txt":
            has_images = bool(image_list_entries(source))
        elif _is_file(source):
            raise UserError(
                f"{config}: {split}={entry!r} ({source}) must be a folder of images or a .txt list"
            )
        else:
            raise UserError(f"{config}: {split} folder {entry!r} not found (looked for {source})")
        if not has_images:
            raise UserError(
                f"{config}: {split}={entry!r} ({source}) has no images; "
                f"supported types are {', '.join(IMAGE_SUFFIXES)}"
            )
        sources.append(source)
    return sources
