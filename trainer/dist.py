"""Everything that touches torch.distributed: process-group setup, the runtime context, collectives.

Model, loss and data code never import torch.distributed; they receive a `DistContext`.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.errors import UserError
from trainer.graphs import GraphedModel


@dataclass(frozen=True)
class DistContext:
    """Runtime facts about this process; never written back into the config."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - torch.device is immutable

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def parse_devices(device: str) -> list[str]:
    """`""` → best available, `cpu`, `0`, `0,1,2,3` (or `cuda:0`) → list of device strings."""
    spec = device.strip().lower().replace("cuda:", "")
    if spec == "cpu":
        return ["cpu"]
    if spec in ("", "auto"):
        return ["0"] if torch.cuda.is_available() else ["cpu"]
    ids = [part.strip() for part in spec.split(",") if part.strip()]
    if not all(part.isdigit() for part in ids):
        raise UserError(f"--device {device!r} is not valid: use cpu, 0, or a list like 0,1,2,3")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device} asks for CUDA, but no CUDA GPU is visible: use --device cpu")
    count = torch.cuda.device_count()
    missing = [part for part in ids if int(part) >= count]
    if missing:
        raise UserError(f"--device {device}: GPU {', '.join(missing)} does not exist (visible: 0-{count - 1})")
    return ids


def torchrun_devices(device: str) -> list[str]:
    """The GPUs the processes of a torchrun launch pick from by local rank. Without `--device`
    that is every visible GPU, so `torchrun --nproc_per_node 4 -m trainer ...` (the DDP guides'
    command, which names no device) puts rank r on GPU r, as YOLOv5 does; `--device` narrows it."""
    if device.strip().lower() in ("", "auto") and torch.cuda.is_available():
        return [str(index) for index in range(torch.cuda.device_count())]
    return parse_devices(device)


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str, timeout_minutes: float = 30.0) -> DistContext:
    """Build the context for this process, joining the process group when launched by torchrun.

    NCCL on CUDA, gloo on CPU. Under torchrun each process takes GPU `local_rank` from the
    `--device` list, so `--device 2,3` trains on GPUs 2 and 3; without `--device`, from every
    visible GPU (`torchrun_devices`).
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistContext(device=_torch_device(parse_devices(device)[0]))
    devices = torchrun_devices(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if devices == ["cpu"]:
        torch_device, backend = torch.device("cpu"), "gloo"
    else:
        if local_rank >= len(devices):
            raise UserError(
                f"{int(os.environ.get('LOCAL_WORLD_SIZE', world_size))} processes per node but "
                f"--device {device} names {len(devices)} GPU(s): give one GPU per process"
            )
        torch_device, backend = _torch_device(devices[local_rank]), "nccl"
        torch.cuda.set_device(torch_device)
    dist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        device_id=torch_device if backend == "nccl" else None,
    )
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def _torch_device(name: str) -> torch.device:
    return torch.device("cpu") if name == "cpu" else torch.device(f"cuda:{name}")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that nothing listens on now, for a rendezvous we start ourselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wrap_model(model: nn.Module, ctx: DistContext, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel once, with SyncBatchNorm when asked; identity in a single process."""
    if not ctx.distributed:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel or a GraphedModel."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, GraphedModel)):
        model = model.module
    return model


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.distributed:
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / ctx.world_size


def broadcast_object(value: Any, ctx: DistContext, source: int = 0) -> Any:
    """Rank `source`'s value on every rank (used for early stopping and AutoAnchor)."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def gather_objects(value: Any, ctx: DistContext) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    if not ctx.distributed:
        return [value]
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
