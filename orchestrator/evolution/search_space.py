"""The declared search space of an evolution: for each hyperparameter, [gain, low, high].

`gain` scales how strongly a key mutates (0 freezes it); `low` and `high` clamp every
child. The bundled table is YOLOv5's classic one (configs/evolve/search_space.yaml); a
user file overrides it entry by entry, so narrowing one range or freezing one key does
not mean copying the whole table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from trainer.config import Hyp, valid_range
from trainer.errors import UserError
from trainer.files import read_yaml
from trainer.paths import resolve_config


@dataclass(frozen=True)
class Gene:
    """How one hyperparameter may evolve."""

    gain: float
    low: float
    high: float

    @property
    def evolves(self) -> bool:
        return self.gain > 0 and self.low < self.high


@dataclass(frozen=True)
class SearchSpace:
    """A validated, read-only mapping from hyperparameter name to its Gene."""

    genes: Mapping[str, Gene]

    @classmethod
    def from_mapping(cls, values: Any, source: str = "search space") -> SearchSpace:
        """Validate `{key: [gain, low, high]}`; every mistake is a UserError naming the key."""
        if not isinstance(values, Mapping):
            raise UserError(f"{source} must be a mapping of key: [gain, low, high]")
        valid = Hyp.keys()
        genes: dict[str, Gene] = {}
        for key, entry in values.items():
            if key not in valid:
                raise UserError(f"{source}: unknown hyperparameter {key!r}; valid keys are: {', '.join(valid)}")
            genes[key] = _parse_gene(key, entry, source)
        return cls(MappingProxyType(genes))

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        values = read_yaml(path, "search space")
        return cls.from_mapping(values, source=str(path))

    @classmethod
    def load(cls, override: str | Path | None = None) -> SearchSpace:
        """The bundled table, with the entries of the `override` file (if any) replacing its own."""
        space = cls.from_yaml(resolve_config("search_space", "evolve"))
        if override is None:
            return space
        return space.updated(cls.from_yaml(override))

    def updated(self, other: SearchSpace) -> SearchSpace:
        return SearchSpace(MappingProxyType({**self.genes, **other.genes}))

    def bounds(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gains, lows and highs aligned with `keys`; keys outside the space are frozen and unclamped."""
        frozen = Gene(0.0, -math.inf, math.inf)
        genes = [self.genes.get(key, frozen) for key in keys]
        return (
            np.array([gene.gain for gene in genes], dtype=float),
            np.array([gene.low for gene in genes], dtype=float),
            np.array([gene.high for gene in genes], dtype=float),
        )

    def evolved_keys(self, keys: Sequence[str]) -> list[str]:
        """The keys among `keys` that mutation can actually move."""
        return [key for key in keys if key in self.genes and self.genes[key].evolves]

    def require_evolvable(self, keys: Sequence[str]) -> None:
        """Refuse a run in which no key can move: mutation would never find a new child."""
        if not self.evolved_keys(keys):
            raise UserError(
                "the search space evolves none of the run's hyperparameters: give at least one "
                "key a gain above 0 and low < high"
            )


def _parse_gene(key: str, entry: Any, source: str) -> Gene:
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        raise UserError(f"{source}: {key}={entry!r} must be a list [gain, low, high]")
    numbers: list[float] = []
    for name, value in zip(("gain", "low", "high"), entry):
        # PyYAML reads `1e-5` (no dot) as a string, so numeric strings are accepted too.
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise UserError(f"{source}: {key} {name}={value!r} is not a finite number")
        numbers.append(number)
    gain, low, high = numbers
    if gain < 0:
        raise UserError(f"{source}: {key} gain={gain:g} is negative; use 0 to freeze a key")
    if low > high:
        raise UserError(f"{source}: {key} low={low:g} is above high={high:g}; swap them")
    valid = valid_range(key)
    for name, value in (("low", low), ("high", high)):  # children are clamped to [low, high], so they stay valid
        if value not in valid:
            raise UserError(f"{source}: {key} {name}={value:g} is out of range: {key} must be {valid}")
    return Gene(gain, low, high)
