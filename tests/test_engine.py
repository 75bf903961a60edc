"""The training loop itself: stopping on a non-finite loss, and CUDA graphs matching eager steps."""

from __future__ import annotations

import copy

import pytest
import torch

from trainer.config import Hyp
from trainer.dist import DistContext
from trainer.ema import ModelEMA
from trainer.engine import autocast, train_one_epoch
from trainer.errors import TrainingDiverged
from trainer.graphs import GraphedModel
from trainer.loss import DetectionLoss
from trainer.model import DetectionModel, load_model_spec
from trainer.optim import Warmup, build_optimizer
from trainer.parts import StepCounter, TrainingParts, amp_dtype_for, freeze_layers
from trainer.progress import EpochProgress
from trainer.train import seed_everything

SIZE = 64


def tiny_model(device: torch.device) -> DetectionModel:
    spec = load_model_spec("yolov5n")
    spec["width_multiple"] = 0.125
    return DetectionModel(spec, nc=3).to(device, memory_format=torch.channels_last)


def random_batches(sizes: list[int], seed: int = 0) -> list[tuple]:
    """Loader-shaped batches: uint8 images, then [image, class, cx, cy, w, h] rows on the host."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        images = torch.randint(0, 256, (size, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
        count = 3 * size
        targets = torch.cat([torch.randint(0, size, (count, 1), generator=generator),
                             torch.randint(0, 3, (count, 1), generator=generator),
                             0.2 + 0.6 * torch.rand(count, 2, generator=generator),
                             0.05 + 0.3 * torch.rand(count, 2, generator=generator)], 1).float()
        batches.append((images, targets, [""] * size, [None] * size))
    return batches


def train(train_model: torch.nn.Module, model: DetectionModel, batches: list[tuple], ctx: DistContext,
          loss_fn: DetectionLoss | None = None) -> list[torch.Tensor]:
    """One epoch over `batches` with the run's optimiser, accumulation (4 batches of 16) and EMA."""
    loss_fn = loss_fn or DetectionLoss.from_model(model, Hyp(), imgsz=SIZE)
    seen: list[torch.Tensor] = []

    def recording_loss(preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, items = loss_fn(preds, targets)
        seen.append(items.clone())
        return loss, items

    optimizer = build_optimizer(model, "SGD", 0.01, 0.937, 5e-4)
    amp_dtype = amp_dtype_for(ctx.device)
    parts = TrainingParts(model=model, train_model=train_model, optimizer=optimizer,
                          scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0),
                          lr_factor=lambda epoch: 1.0,
                          scaler=torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16),
                          ema=ModelEMA(model), warmup=Warmup(0, 16, 0.1, 0.8, 0.937), loss_fn=recording_loss,
                          amp_dtype=amp_dtype, counter=StepCounter())
    train_one_epoch(parts, batches, 0, ctx, EpochProgress(False, 0, 1, len(batches), ctx.device))
    return [items.cpu() for items in seen]


@pytest.mark.parametrize("batches,bad", [(6, float("nan")), (3, float("inf"))], ids=["mid-epoch", "last-step"])
def test_non_finite_loss_stops_training_naming_the_iteration(batches: int, bad: float) -> None:
    """The check reads each step's losses one step late; a bad last step is still caught."""
    seed_everything(0, deterministic=True)
    ctx = DistContext()
    model = tiny_model(ctx.device)
    loss_fn = DetectionLoss.from_model(model, Hyp(), imgsz=SIZE)
    calls = 0

    def bad_at_iteration_2(preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal calls
        loss, items = loss_fn(preds, targets)
        calls += 1
        return (loss * bad, items * bad) if calls == 3 else (loss, items)

    with pytest.raises(TrainingDiverged, match=r"not finite at iteration 2 .*lower lr0"):
        train(model, model, random_batches([4] * batches), ctx, loss_fn=bad_at_iteration_2)  # type: ignore[arg-type]
    assert calls <= 4  # noticed one step later at the latest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("frozen", [(), (0, 1)], ids=["all-trained", "freeze"])
def test_cuda_graph_steps_match_eager_steps(frozen: tuple[int, ...]) -> None:
    """Same losses at every step and the same weights, BatchNorm statistics and gradients-free
    state after an epoch with accumulation and a short last batch (which runs eagerly). Layers
    frozen as --freeze does keep their weights under graphs too: no decay, no momentum."""
    ctx = DistContext(device=torch.device("cuda", 0))
    seed_everything(0, deterministic=True)
    eager_model = tiny_model(ctx.device)
    if frozen:
        freeze_layers(eager_model, frozen)
    start = {name: value.clone() for name, value in eager_model.named_parameters() if not value.requires_grad}
    assert bool(start) == bool(frozen)
    graphed_model = copy.deepcopy(eager_model)
    batches = random_batches([16] * 9 + [8])
    eager_losses = train(eager_model, eager_model, batches, ctx)
    wrapper = GraphedModel(graphed_model)
    with autocast(ctx.device, amp_dtype_for(ctx.device)):
        wrapper.capture(torch.zeros(16, 3, SIZE, SIZE, device=ctx.device).contiguous(memory_format=torch.channels_last))
    assert wrapper.captured, "capture failed"
    graphed_losses = train(wrapper, graphed_model, batches, ctx)
    for step, (eager, graphed) in enumerate(zip(eager_losses, graphed_losses, strict=True)):
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6, msg=f"losses differ at step {step}")
    graphed_state = graphed_model.state_dict()
    for name, value in eager_model.state_dict().items():
        torch.testing.assert_close(graphed_state[name], value, rtol=1e-5, atol=1e-6, msg=f"{name} differs")
    for name, value in start.items():
        assert torch.equal(graphed_state[name], value), f"frozen {name} changed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_model_replays_only_the_captured_training_shape() -> None:
    """Before capture, for another batch size and in eval mode the model runs eagerly."""
    device = torch.device("cuda", 0)
    wrapper = GraphedModel(tiny_model(device))
    batch = torch.rand(4, 3, SIZE, SIZE, device=device).contiguous(memory_format=torch.channels_last)
    eager = [output.detach().clone() for output in wrapper(batch)]
    assert not wrapper.captured
    wrapper.capture(batch)
    assert wrapper.captured
    replayed = wrapper(batch)  # train mode normalises with the batch's own statistics: same outputs
    torch.testing.assert_close([output.detach() for output in replayed], eager)
    sum(output.float().sum() for output in replayed).backward()
    assert wrapper(batch[:2])[0].shape[0] == 2
    wrapper.eval()
    decoded, raw = wrapper(batch)
    assert decoded.shape[0] == 4 and len(raw) == 3
