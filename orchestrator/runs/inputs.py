"""The files a run's workers read (dataset, data YAML, hyp, model, search space), made visible to them.

Local workers read the host's files directly. Container workers see only their mounts, so
the dataset folder is mounted read-only at `/datasets/<folder>`, and a copy of the data YAML
that points there is written into the run folder (which they share). Host files given for
--hyp, --cfg, --weights, --search-space and --evolve-population are copied into `<run>/inputs/`;
bundled names (yolov5s, hyp.scratch-low, yolov5n-synthetic) are passed as they are, since the image has them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.runs.plan import TrainerOptions
from trainer.downloads import resolve_weights
from trainer.errors import UserError
from trainer.files import atomic_output
from trainer.paths import CONFIGS, resolve_config

# Inside every container the run volume is /runs and the dataset folder /datasets/<name>.
RUNS_DIR = "/runs"
DATASETS_DIR = "/datasets"
CONTAINER_DATA_NAME = "data.yaml"
INPUTS_DIR = "inputs"
SPLITS = ("train", "val", "test")
# Option name -> configs/ folder its bundled names live in.
CONFIG_KINDS = {"cfg": "models", "hyp": "hyps", "search_space": "evolve"}


@dataclass(frozen=True)
class StagedInputs:
    """The trainer options as the workers must see them, and the dataset folder to mount (if any)."""

    options: TrainerOptions
    dataset_dir: Path | None


def container_dataset_path(dataset_dir: Path) -> str:
    """Where a worker sees the host's `dataset_dir`."""
    return f"{DATASETS_DIR}/{dataset_dir.absolute().name}"


def container_run_dir(run: str) -> str:
    """Where every container sees the run folder (the trainer writes to <project>/<name> = this)."""
    return f"{RUNS_DIR}/evolve/{run}"


def resolve_dataset(data: str) -> tuple[Path, Path]:
    """The data YAML and the dataset root on the host; generates a synthetic dataset if missing."""
    from trainer.data.data_config import (
        load_data_config,  # imports torch: only when starting a run
    )

    config = load_data_config(data)
    return resolve_config(data, "data").absolute(), config.root.absolute()


def stage_local(options: TrainerOptions) -> StagedInputs:
    """Host paths made absolute, so workers find them whatever their working directory."""
    data_yaml, _ = resolve_dataset(options.data)
    paths = {name: _local_path(getattr(options, name), kind) for name, kind in CONFIG_KINDS.items()}
    population = options.evolve_population
    if population is not None:
        population = ",".join(str(_existing(part).absolute()) for part in population.split(","))
    weights = None if options.weights is None else _weights_source(options.weights)
    weights = options.weights if weights is None else str(weights.absolute())
    staged = options.with_paths(data=str(data_yaml), evolve_population=population, weights=weights, **paths)
    return StagedInputs(staged, None)


def stage_for_containers(options: TrainerOptions, run: str, run_dir: Path) -> StagedInputs:
    """Write the container-side data YAML and copies of host config files into the run folder."""
    data_yaml, dataset_root = resolve_dataset(options.data)
    inside_run = container_run_dir(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = container_data_yaml(data_yaml, dataset_root, container_dataset_path(dataset_root))
    (run_dir / CONTAINER_DATA_NAME).write_text(text)
    paths: dict[str, str | None] = {"data": f"{inside_run}/{CONTAINER_DATA_NAME}"}
    for name, kind in CONFIG_KINDS.items():
        paths[name] = _copied_config(getattr(options, name), kind, run_dir, inside_run)
    if options.evolve_population is not None:
        paths["evolve_population"] = _copied_population(options.evolve_population, run_dir, inside_run)
    if options.weights is not None:
        paths["weights"] = _copied_weights(options.weights, run_dir, inside_run)
    return StagedInputs(options.with_paths(**paths), dataset_root)


def container_data_yaml(data_yaml: Path, dataset_root: Path, container_root: str) -> str:
    """The data YAML with `path` at the container's mount and every split relative to it.

    A `synthetic:` block is kept: the mounted dataset carries the same fingerprint, so the
    workers find it complete and never try to write to the read-only mount.
    """
    values: dict[str, Any] = yaml.safe_load(data_yaml.read_text())
    values["path"] = container_root
    for split in SPLITS:
        if values.get(split) not in (None, ""):
            entries = values[split]
            moved = [_relative_entry(entry, dataset_root, data_yaml) for entry in _as_list(entries)]
            values[split] = moved if isinstance(entries, list) else moved[0]
    header = f"# Written by evolvectl from {data_yaml}: the dataset as the worker containers see it.\n"
    return header + yaml.safe_dump(values, sort_keys=False)


def _as_list(entries: Any) -> list[Any]:
    return entries if isinstance(entries, list) else [entries]


def _relative_entry(entry: Any, dataset_root: Path, data_yaml: Path) -> str:
    path = Path(str(entry))
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(dataset_root))
    except ValueError:
        raise UserError(
            f"{data_yaml}: '{entry}' lies outside the dataset folder {dataset_root}, the only one mounted "
            "into the workers; move it under `path` or use --backend local"
        ) from None


def _existing(part: str) -> Path:
    path = Path(part.strip())
    if not path.exists():
        raise UserError(f"--evolve-population '{part.strip()}' not found: give hyp YAMLs, an evolve.csv or a folder")
    return path


def _local_path(value: str | None, kind: str) -> str | None:
    if value is None:
        return None
    path = resolve_config(value, kind)  # a UserError naming the bundled choices when not found
    return str(path.absolute()) if Path(value).is_file() else value


def _copied_config(value: str | None, kind: str, run_dir: Path, inside_run: str) -> str | None:
    """A host file copied into <run>/inputs/ (its container path), or the bundled name unchanged."""
    if value is None:
        return None
    source = resolve_config(value, kind)
    if not Path(value).is_file():
        return value
    destination = run_dir / INPUTS_DIR / kind / source.name
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    return f"{inside_run}/{INPUTS_DIR}/{kind}/{source.name}"


def _weights_source(value: str) -> Path | None:
    """The host file --weights names, a YOLOv5 release name downloaded on the host first (once,
    not in every worker); None for a bundled name, which workers resolve themselves."""
    path = resolve_weights(value)
    return None if path.parent == CONFIGS / "weights" and not Path(value).is_file() else path


def _copied_weights(value: str, run_dir: Path, inside_run: str) -> str:
    """The weights file copied into <run>/inputs/weights/, atomically: running workers of the run
    may be reading the copy that a second `start` replaces. A bundled name is passed as it is."""
    source = _weights_source(value)
    if source is None:
        return value
    with source.open("rb") as original, atomic_output(run_dir / INPUTS_DIR / "weights" / source.name) as copy:
        shutil.copyfileobj(original, copy)
    return f"{inside_run}/{INPUTS_DIR}/weights/{source.name}"


def _copied_population(value: str, run_dir: Path, inside_run: str) -> str:
    """Seed files (or the files of seed folders) copied into <run>/inputs/population/."""
    destination = run_dir / INPUTS_DIR / "population"
    destination.mkdir(parents=True, exist_ok=True)
    for part in value.split(","):
        source = _existing(part)
        files = sorted(source.iterdir()) if source.is_dir() else [source]
        for file in files:
            if file.suffix in (".yaml", ".yml", ".csv"):
                shutil.copyfile(file, destination / file.name)
    return f"{inside_run}/{INPUTS_DIR}/population"
