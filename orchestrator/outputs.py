"""Files and views derived from evolve.csv: always recomputed, never edited by hand.

`hyp_evolve.yaml` is cheap and rewritten after every generation; the plots take about a
second at 10,000 rows, so workers render them outside the lock and at most every so
often. Every file is replaced atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure
from rich.table import Table

from orchestrator.journal import RESULT_COLUMNS, Population
from trainer.config import Hyp
from trainer.files import save_figure, write_atomic

HYP_EVOLVE_NAME = "hyp_evolve.yaml"
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
    body = yaml.safe_dump(population.hyp_at(best), sort_keys=False)
    return "\n".join(header) + "\n\n" + body


def write_hyp_evolve(run_dir: Path, population: Population) -> bool:
    text = render_hyp_evolve(population)
    if text is None:
        return False
    write_atomic(run_dir / HYP_EVOLVE_NAME, text.encode())
    return True


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


def plot_fitness(path: Path, population: Population) -> None:
    """Fitness of every generation in order, with the best so far."""
    fitness = population.fitness
    generations = np.arange(len(population))
    running_best = np.fmax.accumulate(np.where(np.isfinite(fitness), fitness, -np.inf)) if len(fitness) else fitness
    figure = Figure(figsize=(7, 4), tight_layout=True)
    axes = figure.add_subplot()
    axes.scatter(generations, fitness, s=6, alpha=0.6, linewidths=0, label="generation")
    axes.plot(generations, np.where(np.isfinite(running_best), running_best, np.nan), "r-", label="best so far")
    axes.set_xlabel("generation")
    axes.set_ylabel("fitness (0.1 mAP@0.5 + 0.9 mAP@0.5:0.95)")
    axes.legend(loc="lower right")
    save_figure(figure, path)


def write_plots(run_dir: Path, population: Population, keys: Sequence[str]) -> bool:
    if population.best_row() is None:
        return False
    plot_evolution(run_dir / EVOLVE_PLOT_NAME, population, keys)
    plot_fitness(run_dir / FITNESS_PLOT_NAME, population)
    return True


def summary_table(population: Population, base_hyp: Hyp, top: int = 5) -> Table:
    """The `top` fittest rows with the hyperparameters that differ from the base hyp."""
    fitness = population.fitness
    ranked = [int(row) for row in np.argsort(-np.where(np.isfinite(fitness), fitness, -np.inf), kind="stable")]
    ranked = [row for row in ranked if np.isfinite(fitness[row])][:top]
    base = base_hyp.as_dict(include_unset=True)
    table = Table(title=f"Top {len(ranked)} of {len(population)} generations")
    for name in ("rank", "generation", "fitness", "mAP@0.5", "mAP@0.5:0.95"):
        table.add_column(name, justify="right")
    table.add_column("changed from base")
    for rank, row in enumerate(ranked, start=1):
        table.add_row(
            str(rank),
            str(row),
            f"{fitness[row]:.4f}",
            f"{population.results[row, 2]:.4f}",
            f"{population.results[row, 3]:.4f}",
            _largest_changes(population.hyp_at(row), base),
        )
    return table


def _largest_changes(hyp: dict[str, float], base: dict[str, float | None], shown: int = 4) -> str:
    """The few keys that moved most from the base, relative to their base value (all are in hyp_evolve.yaml)."""
    changed = {
        key: value for key, value in hyp.items()
        if base.get(key) is None or not math.isclose(value, base[key], rel_tol=1e-4, abs_tol=1e-9)
    }
    if not changed:
        return "(base hyp)"

    def relative(key: str) -> float:
        reference = base.get(key)
        return math.inf if not reference else abs(changed[key] - reference) / abs(reference)

    ordered = sorted(changed, key=relative, reverse=True)
    text = ", ".join(f"{key} {_number(base.get(key))} → {_number(changed[key])}" for key in ordered[:shown])
    return text + (f" (+{len(ordered) - shown} more)" if len(ordered) > shown else "")


def _number(value: float | None) -> str:
    return "unset" if value is None else f"{value:.5g}"
