"""What ``finetune`` returns: the trained model, its module and the training history.

``EpochRecord`` is one row of the history, ``FinetuneResult`` the whole outcome.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir
import torch

from onnxcompress.graph.model_io import clone_model
from onnxcompress.torch_bridge.module import OnnxModule
from onnxcompress.torch_bridge.writeback import write_back


@dataclasses.dataclass
class EpochRecord:
    """One row of the training history (epoch 0: the model as given, before training).

    Attributes:
        epoch: 1-based epoch number; 0 for the starting point.
        loss: mean training loss of the student over the epoch (None for epoch 0).
        val_top1: validation top-1 in percent (agreement with the teacher when the validation
            data has no labels; None without validation data).
        seconds: wall time of the epoch, validation included.
        images_per_second: training throughput over all processes.
        lr: learning rate at the end of the epoch.
        images: training images seen in the epoch, over all processes.
        val_images: images the validation scored: fewer than the validation data holds when
            the time budget ran out during it.
    """

    epoch: int
    loss: float | None
    val_top1: float | None
    seconds: float
    images_per_second: float | None = None
    lr: float | None = None
    images: int | None = None
    val_images: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FinetuneResult:
    """What ``finetune`` returns.

    Attributes:
        model: a copy of the student with the best epoch's weights written back.
        module: the trained student as an ``OnnxModule`` holding those weights (eval mode).
        history: epoch 0 (before training) and every trained epoch.
        best_epoch: the epoch whose weights ``model`` holds; 0 means no epoch beat the
            starting point on validation and the weights are the ones given.
        best_top1: validation top-1 of that epoch.
        teacher_top1: the teacher's validation top-1, when both exist.
        seconds: time of the whole run (on the deadline's clock).
        world_size: processes that trained.
        out_of_time: ``time_budget_s`` ended the run before all epochs were done.
        validations_cut_short: validations (the teacher's included) the deadline ended before
            they had scored every image; their top-1 is over a spread subset.
        trained_graph: with ``batchnorm``, the graph that trained (BatchNorms inserted), whose
            state an ``after_step`` hook saw; None without.
        inserted: the BatchNormalization nodes inserted into ``trained_graph``.
    """

    model: ir.Model
    module: OnnxModule
    history: list[EpochRecord]
    best_epoch: int
    best_top1: float | None
    teacher_top1: float | None
    seconds: float
    world_size: int = 1
    out_of_time: bool = False
    validations_cut_short: int = 0
    trained_graph: ir.Model | None = dataclasses.field(default=None, repr=False)
    inserted: tuple[str, ...] = ()

    def model_from_state(self, state: Mapping[str, torch.Tensor]) -> tuple[ir.Model, OnnxModule]:
        """The student's graph holding the weights of ``state`` (a ``state_dict`` of the module
        that trained, as an ``after_step`` hook sees it: with ``batchnorm`` the BatchNorms are
        folded away like in ``model``), and its module in eval mode."""
        if self.trained_graph is None:
            module = copy.deepcopy(self.module)
            module.load_state_dict(state)
            return write_back(clone_model(self.model), module), module.eval()
        from onnxcompress.torch_bridge.batchnorm import fold_batchnorms

        trained = OnnxModule(self.trained_graph)
        trained.load_state_dict(state)
        model = write_back(clone_model(self.trained_graph), trained)
        fold_batchnorms(model, self.inserted)
        device = next(self.module.parameters(), torch.empty(0)).device
        return model, OnnxModule(model).to(device).eval()

    @property
    def initial_top1(self) -> float | None:
        return self.history[0].val_top1 if self.history else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "best_top1": self.best_top1,
            "initial_top1": self.initial_top1,
            "teacher_top1": self.teacher_top1,
            "seconds": round(self.seconds, 3),
            "world_size": self.world_size,
            "out_of_time": self.out_of_time,
            "validations_cut_short": self.validations_cut_short,
            "history": [record.as_dict() for record in self.history],
        }
