"""Checkpoints of a fine-tuning run: what one holds, writing it safely, resuming from it.

A resumed run must be the same run (``run_fingerprint``) and ends with the same weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onnxcompress.data import Dataset
from onnxcompress.deadline import Deadline
from onnxcompress.errors import DataError, PassConfigError
from onnxcompress.torch_bridge.distributed import DistributedContext
from onnxcompress.torch_bridge.finetune_config import FinetuneConfig
from onnxcompress.torch_bridge.finetune_result import EpochRecord
from onnxcompress.torch_bridge.finetune_validation import BestEpoch
from onnxcompress.torch_bridge.module import OnnxModule

CHECKPOINT_FILE = "last.pt"
CHECKPOINT_VERSION = 1


def run_fingerprint(
    config: FinetuneConfig, student: OnnxModule, train: Dataset, context: DistributedContext
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: everything that shapes the run."""
    ignored = {"checkpoint_dir", "resume", "device", "num_workers", "eval_batch_size"}
    fields = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ignored
    }
    shapes = sorted((name, list(p.shape)) for name, p in student.named_onnx_parameters())
    return {
        "config": json.dumps(fields, sort_keys=True, default=str),
        "student": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
        "train_images": len(train),
        "world_size": context.world_size,
    }


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temp file, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects would run code.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"{path}: cannot read the checkpoint ({str(exc).splitlines()[0][:200]}); delete it "
            "to start over"
        ) from exc
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise DataError(f"{path}: not a finetune checkpoint of this version; delete it")
    return payload


def checkpoint_payload(
    epochs_done: int,
    fingerprint: dict[str, Any],
    history: Sequence[EpochRecord],
    best: BestEpoch,
    cohort: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    clock_before: float,
    deadline: Deadline,
    validation_seconds: float,
) -> dict[str, Any]:
    """Everything a resumed run needs to continue as if never interrupted; ``clock_before``:
    the seconds the runs it resumed had spent."""
    return {
        "version": CHECKPOINT_VERSION,
        "fingerprint": fingerprint,
        "epoch": epochs_done,
        "cohort": cohort.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "history": [record.as_dict() for record in history],
        "elapsed": clock_before + deadline.spent(),
        "validation_seconds": validation_seconds,
        "best": {"epoch": best.epoch, "top1": best.top1, "student": dict(best.state)},
    }


def restore_checkpoint(
    payload: dict[str, Any],
    fingerprint: dict[str, Any],
    path: Path,
    cohort: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> None:
    """Load a checkpoint's state, after checking that it comes from the same run."""
    saved = payload.get("fingerprint", {})
    differ = sorted(key for key in fingerprint if saved.get(key) != fingerprint[key])
    if differ:
        raise PassConfigError(
            f"{path}: the checkpoint comes from a different run ({', '.join(differ)} "
            "differ); start without --resume or use another checkpoint folder"
        )
    cohort.load_state_dict(payload["cohort"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    rng = payload["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
