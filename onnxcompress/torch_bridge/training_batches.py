"""Training data for fine-tuning: checks, per-epoch sharded order, batches, augmentation.

Also the memory layout batches take on the device (channels-last for image batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from onnxcompress.data import Dataset
from onnxcompress.errors import DataError
from onnxcompress.torch_bridge.distributed import DistributedContext
from onnxcompress.torch_bridge.finetune_config import FinetuneConfig


def check_dataset(data: Dataset, role: str) -> None:
    if len(data) == 0:
        raise DataError(f"finetune: the {role} data {data.name!r} holds no images")
    if not np.isfinite(data.x).all():
        raise DataError(f"finetune: the {role} data {data.name!r} holds NaN or infinite values")


class _ArrayData(torch.utils.data.Dataset):
    """Batched access to in-memory arrays for ``DataLoader`` workers (``__getitems__``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.x[index], None if self.y is None else self.y[index]


def _keep_batch(batch: Any) -> Any:
    return batch


def epoch_order(
    count: int, epoch: int, config: FinetuneConfig, context: DistributedContext
) -> list[int]:
    """This process's sample indices for ``epoch``: a seeded shuffle, sharded by rank."""
    sampler: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
        range(count),  # type: ignore[arg-type]
        num_replicas=context.world_size,
        rank=context.rank,
        shuffle=True,
        seed=config.seed,
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    if config.epoch_samples is not None:
        order = order[: max(1, math.ceil(config.epoch_samples / context.world_size))]
    return order


def split_batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches; a short last batch is dropped (a batch of 1 breaks batch norm)."""
    batches = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def batch_loader(
    x: torch.Tensor, y: torch.Tensor | None, batches: list[list[int]], workers: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    if workers == 0:
        data = _ArrayData(x, y)
        return (data.__getitems__(batch) for batch in batches)
    return torch.utils.data.DataLoader(
        _ArrayData(x, y),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_keep_batch,
        persistent_workers=False,
    )


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, padding: int, flip: bool
) -> torch.Tensor:
    """Random crop of each image from its zero-padded copy, then a random horizontal flip.

    Offsets and flips come from ``generator`` (on the CPU), so runs are reproducible whatever
    the device. Zero is the mean pixel after normalization.
    """
    n, c, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        rows = oy[:, None] + torch.arange(h, device=x.device)
        cols = ox[:, None] + torch.arange(w, device=x.device)
        x = padded[
            torch.arange(n, device=x.device)[:, None, None, None],
            torch.arange(c, device=x.device)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def in_fast_layout(x: torch.Tensor, channels_last: bool | None) -> torch.Tensor:
    """``x`` in the memory order the convolutions run fastest in (values unchanged)."""
    if x.dim() == 4 and (channels_last or channels_last is None):
        return x.contiguous(memory_format=torch.channels_last)
    return x
