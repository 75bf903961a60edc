"""The search algorithms a run can use, chosen per run with `--search` and recorded in its state.

- `elite` (the default): samples children from the elites' distribution (`elite.py`);
- `population`: YOLOv5 master's population GA, asynchronous and shared (`population.py`);
- `classic`: YOLOv5 v7.0's GA with its defects fixed (`ga.py`).

Each is a `Search`: `propose(context, rng) -> Proposal`, a pure function of the journal's rows.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from orchestrator.evolution.elite import EliteSearch
from orchestrator.evolution.ga import ClassicSearch
from orchestrator.evolution.population import PopulationSearch
from orchestrator.evolution.proposals import Proposal, SearchContext
from trainer.errors import UserError

DEFAULT_SEARCH = EliteSearch.name
# A run created before searches were recorded used the classic GA.
LEGACY_SEARCH = ClassicSearch.name


class Search(Protocol):
    name: str

    def propose(self, context: SearchContext, rng: np.random.Generator) -> Proposal:
        """A new child (unlike every row and child in flight) and the rows it came from."""


SEARCHES: dict[str, type[Search]] = {search.name: search for search in (EliteSearch, PopulationSearch, ClassicSearch)}


def search_named(name: str) -> Search:
    try:
        return SEARCHES[name]()
    except KeyError:
        raise UserError(f"--search {name!r}: choose one of {', '.join(SEARCHES)}") from None
