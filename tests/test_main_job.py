"""The README's main job, run exactly as the README gives it, as a new user would."""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.results import fitness

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_main_job() -> list[str]:
    """The `evolvectl start` line of the README's set-up block."""
    setup = README.read_text().split("## Set-up (fresh machine)", 1)[1].split("```", 2)[1]
    [line] = [line for line in setup.splitlines() if line.startswith("evolvectl start")]
    return shlex.split(line)


@pytest.mark.slow
def test_the_readme_main_job_evolves_the_bundled_weights_on_the_built_in_data(tmp_path: Path) -> None:
    """Fine-tuning the bundled yolov5n-synthetic.pt gives every generation a fitness well above
    noise level (it was 0.0001 from scratch), and the hyps make a difference between generations.
    Whether the best beats the base hyp by more than the noise is measured in bench/README.md,
    over several runs: one run's ranking of a dozen noisy trainings is no test."""
    command = readme_main_job()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("EVOLVECTL_")}
    result = subprocess.run([sys.executable, "-m", "orchestrator", *command[1:]], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=900, check=False)
    run_dir = tmp_path / "runs" / "evolve" / "exp"
    logs = "".join(log.read_text()[-2000:] for log in sorted((run_dir / "workers").glob("*.log")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs
    generations = int(command[command.index("--generations") + 1])
    with (run_dir / "evolve.csv").open() as file:
        rows = [[float(value) for value in row] for row in list(csv.reader(file))[1:]]
    assert len(rows) == generations
    scores = fitness([row[:7] for row in rows])
    summary = re.search(r"best fitness (\d\.\d+) \(generation (\d+)\) against the base hyp's (\d\.\d+)", result.stdout)
    assert summary, result.stdout
    best, base = float(summary[1]), float(summary[3])
    assert base > 0.05 and best >= base and best == pytest.approx(max(scores), abs=1e-4)
    assert max(scores) - min(scores) > 0.01, scores  # the hyps matter: not every generation scores alike
    assert "changed from base" in result.stdout and "hyp_evolve.yaml" in result.stdout
