"""Multi-process training helpers: detect a ``torchrun`` launch, set up and tear down DDP.

The trainers call these so that the same ``finetune`` runs as one process or as N processes
started by ``torchrun --nproc_per_node=N`` (nccl on GPUs, gloo on CPU), with one writer.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DistributedContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 in a single-process run).
        world_size: number of processes (1 in a single-process run).
        local_rank: rank on this machine; picks the GPU.
        device: the device this process trains on.
        created_group: this context initialized the process group (and so destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    created_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0


def launched_world_size() -> int:
    """The process count ``torchrun`` announced in ``WORLD_SIZE`` (1 when not launched by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """True in a single-process run and on rank 0 of a ``torchrun`` job (group up or not)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _choose_device(requested: str | None, local_rank: int) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def setup_distributed(device: str | None = None) -> DistributedContext:
    """Join the ``torchrun`` job this process belongs to, or describe a single-process run.

    The process group is created here unless the caller already created one (then it is used
    as is and left alone at teardown). The backend is nccl when training on CUDA, else gloo.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks ``cuda:LOCAL_RANK`` when a
            GPU is visible, else the CPU.
    """
    world_size = launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    chosen = _choose_device(device, local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            dist.get_rank(), dist.get_world_size(), local_rank, chosen, created_group=False
        )
    if world_size == 1:
        return DistributedContext(0, 1, 0, chosen)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    context = DistributedContext(
        dist.get_rank(), dist.get_world_size(), local_rank, chosen, created_group=True
    )
    logger.info("rank %d/%d on %s (%s backend)", context.rank, context.world_size, chosen, backend)
    return context


def teardown_distributed(context: DistributedContext, *, clean: bool = True) -> None:
    """Destroy the process group if ``setup_distributed`` created it.

    Args:
        clean: wait for every process first; False on an error path, where the others may
            never arrive.
    """
    if context.created_group and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    context.created_group = False


def all_reduce_sum(values: list[float], context: DistributedContext) -> list[float]:
    """Element-wise sum of ``values`` over all processes (unchanged in a single process)."""
    if not context.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu().tolist()]


def barrier(context: DistributedContext) -> None:
    """Wait for every process (no-op in a single process)."""
    if context.distributed:
        dist.barrier()
