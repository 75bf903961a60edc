"""The trainer as the evolution's objective: the one place the evolution core imports training.

A worker prepares the dataset, its caches and loader workers once; every generation reuses
them, and only the model, optimiser and hyperparameters are new each time. Failures are
classified (diverged, out of memory) instead of being recorded as fitness 0.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from orchestrator.evolution.loop import GenerationContext, GenerationFailed
from orchestrator.evolution.pruning import GenerationPruned
from trainer import dist
from trainer.config import Hyp, TrainConfig
from trainer.errors import TrainingDiverged, UserError
from trainer.results import ValidationResult
from trainer.train import PreparedData, prepare_data, run

LOGGER = logging.getLogger("trainer")


@dataclass(frozen=True)
class TrainerObjective:
    """Trains one child per call on the worker's one device, with data prepared once."""

    cfg: TrainConfig
    ctx: dist.DistContext
    prepared: PreparedData

    @classmethod
    def prepare(cls, cfg: TrainConfig) -> TrainerObjective:
        """Check the device, then verify labels, fill caches and start the loader workers."""
        if len(dist.parse_devices(cfg.device)) > 1 or dist.launched_by_torchrun():
            raise UserError("--evolve trains one generation per GPU: give one --device and start one worker "
                            "per GPU (evolvectl start --gpus ... does this)")
        ctx = dist.init_distributed(cfg.device)
        return cls(cfg, ctx, prepare_data(cfg, ctx))

    @property
    def device(self) -> str:
        return str(self.ctx.device)

    def __call__(self, hyp: Hyp, generation: GenerationContext) -> ValidationResult:
        child = self.cfg.replace(hyp=hyp, seed=generation.seed, noval=True, nosave=True)
        LOGGER.info("Generation %d (attempt %d, %s): training %d epochs", generation.claim,
                    generation.attempt, generation.source, child.epochs)
        def on_rung(epoch: int, result: ValidationResult) -> None:
            if generation.report(epoch, result.fitness):
                raise GenerationPruned(epoch, result.fitness)

        try:
            result = run(child, self.ctx, save_dir=None, prepared=self.prepared, rungs=generation.rungs,
                         on_rung=on_rung).result
            if result is None:  # only a stop signal ends a run before its first validation
                raise GenerationFailed("the training ended before its first validation")
            return result
        except TrainingDiverged as error:
            raise GenerationFailed(str(error), kind="diverged") from None
        except torch.cuda.OutOfMemoryError as error:
            raise GenerationFailed(f"CUDA out of memory: {error}", kind="oom") from None
        finally:
            gc.collect()  # the generation's model and optimiser go before the next one is built
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
