"""The files an evolution derives from its journal: hyp_evolve.yaml, evolve.png and fitness.png,
recomputed from evolve.csv and replaced atomically, never edited; and each generation's
TensorBoard HParams record, written once beside them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure

from orchestrator.evolution.journal import Population
from trainer.files import save_figure, write_atomic
from trainer.results import RESULT_COLUMNS, fitness

logger = logging.getLogger(__name__)

HYP_EVOLVE_NAME = "hyp_evolve.yaml"
POPULATION_NAME = "evolve_population.yaml"
POPULATION_SIZE = 50  # as YOLOv5's population GA keeps
EVOLVE_PLOT_NAME = "evolve.png"
FITNESS_PLOT_NAME = "fitness.png"
TITLE = "# evolvectl hyperparameter evolution results"


def render_hyp_evolve(population: Population) -> str | None:
    """The best row as a hyp YAML with YOLOv5's comment header; None without a finite fitness."""
    best = population.best_row()
    if best is None:
        return None
    header = [
        TITLE,
        f"# Best generation: {best}",
        f"# Last generation: {len(population) - 1}",
        "# " + ", ".join(f"{name:>20s}" for name in RESULT_COLUMNS),
        "# " + ", ".join(f"{value:20.5g}" for value in population.results[best]),
    ]
    pooled, trainings = population.pooled()
    if trainings[best] > 1:
        header.append(f"# Mean fitness of its {trainings[best]} trainings: {pooled[best]:.5g}")
    body = yaml.safe_dump(population.hyp_at(best), sort_keys=False)
    return "\n".join(header) + "\n\n" + body


def write_hyp_evolve(run_dir: Path, population: Population) -> bool:
    return _write_text(run_dir / HYP_EVOLVE_NAME, render_hyp_evolve(population))


def _write_text(path: Path, text: str | None) -> bool:
    """Replace `path` with `text` atomically; False (nothing written) when there is no text."""
    if text is None:
        return False
    write_atomic(path, text.encode())
    return True


def render_evolve_population(population: Population, size: int = POPULATION_SIZE) -> str | None:
    """The best `size` rows as YOLOv5's evolve_population.yaml: individual name -> hyp, best
    first. `--resume_evolve` (or `--evolve-population`) seeds a new run from it."""
    ranked = population.ranked()[:size]
    if not ranked.size:
        return None
    individuals = {f"row{row + 1}": {key: float(value) for key, value in population.hyp_at(int(row)).items()}
                   for row in ranked}
    return (f"# best {len(ranked)} rows of evolve.csv by fitness (repeated genes once, by their mean)\n"
            + yaml.safe_dump(individuals, sort_keys=False))


def write_evolve_population(run_dir: Path, population: Population) -> bool:
    return _write_text(run_dir / POPULATION_NAME, render_evolve_population(population))


def plot_evolution(path: Path, population: Population, keys: Sequence[str]) -> None:
    """One scatter per evolved key: value against fitness, the best row marked."""
    fitness = population.fitness
    finite = np.isfinite(fitness)
    best = population.best_row()
    columns = max(1, math.ceil(math.sqrt(len(keys))))
    rows = max(1, math.ceil(len(keys) / columns))
    figure = Figure(figsize=(2.6 * columns, 2.4 * rows), tight_layout=True)
    for index, key in enumerate(keys):
        axes = figure.add_subplot(rows, columns, index + 1)
        values = population.hyps[:, population.hyp_keys.index(key)]
        axes.scatter(values[finite], fitness[finite], c=fitness[finite], cmap="viridis", s=6, alpha=0.6, linewidths=0)
        if best is not None:
            axes.plot(values[best], fitness[best], "k+", markersize=14)
            axes.set_title(f"{key} = {values[best]:.3g}", fontsize=9)
        axes.tick_params(labelsize=7)
    save_figure(figure, path)


def pruned_points(records: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """Each pruned generation as (rows finished before it, its fitness at the rung), from the provenance."""
    points, rows = [], 0
    for record in records:
        if record.get("status") == "ok":
            rows += 1
        elif record.get("status") == "pruned":
            points.append((rows, float(record.get("fitness", math.nan))))
    return points


def plot_fitness(path: Path, population: Population, pruned: Sequence[tuple[int, float]] = ()) -> None:
    """Fitness of every generation in order, with the best so far; pruned generations at their rung's fitness."""
    fitness = population.fitness
    generations = np.arange(len(population))
    running_best = np.fmax.accumulate(np.where(np.isfinite(fitness), fitness, -np.inf)) if len(fitness) else fitness
    figure = Figure(figsize=(7, 4), tight_layout=True)
    axes = figure.add_subplot()
    axes.scatter(generations, fitness, s=6, alpha=0.6, linewidths=0, label="generation")
    if pruned:
        positions, values = zip(*pruned)
        axes.scatter(positions, values, s=10, marker="x", color="0.6", linewidths=0.8,
                     label=f"pruned ({len(pruned)}), at its rung")
    axes.plot(generations, np.where(np.isfinite(running_best), running_best, np.nan), "r-", label="best so far")
    axes.set_xlabel("generation")
    axes.set_ylabel("fitness (0.1 mAP@0.5 + 0.9 mAP@0.5:0.95)")
    axes.legend(loc="lower right")
    save_figure(figure, path)


def write_plots(run_dir: Path, population: Population, keys: Sequence[str],
                pruned: Sequence[tuple[int, float]] = ()) -> bool:
    if population.best_row() is None:
        return False
    plot_evolution(run_dir / EVOLVE_PLOT_NAME, population, keys)
    plot_fitness(run_dir / FITNESS_PLOT_NAME, population, pruned)
    return True


TENSORBOARD_DIR = "tensorboard"


def write_tensorboard_generation(run_dir: Path, row: int, genes: dict[str, float], values: np.ndarray) -> None:
    """The generation's HParams record in <run>/tensorboard/generation<row>/, so that
    `tensorboard --logdir <run>` shows the search as a table and parallel coordinates. Like the
    plots, it never stops an evolution."""
    from trainer.tensorboard import write_hparams  # imports torch: only in a worker

    results = [float(value) for value in np.asarray(values, dtype=float).ravel()[: len(RESULT_COLUMNS)]]
    metrics = {"fitness": float(fitness(results)[0]), **dict(zip(RESULT_COLUMNS, results))}
    try:
        write_hparams(run_dir / TENSORBOARD_DIR / f"generation{row}", {key: float(value) for key, value in
                                                                        genes.items()}, metrics)
    except Exception as error:  # noqa: BLE001 - a missing record must never stop an evolution
        logger.warning("could not write the TensorBoard record of generation %d: %s", row, error)
