"""The networks of a fine-tuning run: the trained cohort, the frozen teacher, hint adapters.

``Cohort`` holds everything that trains (for DDP); ``FrozenTeacher`` gives targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from onnxcompress.errors import PassConfigError
from onnxcompress.torch_bridge.module import OnnxModule


def class_scores(output: Any) -> torch.Tensor:
    """The first output of a network: the class scores."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise PassConfigError("finetune: the network's first output is not a tensor")
    return output


class HintAdapter(nn.Module):
    """Maps a student tensor onto the teacher's shape: 1x1 conv (or linear) plus pooling."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        self.out_hw: tuple[int, int] | None = None
        cs, ct = student_shape[1], teacher_shape[1]
        if len(student_shape) == 4 and len(teacher_shape) == 4:
            self.project: nn.Module = (
                nn.Conv2d(cs, ct, kernel_size=1, bias=False) if cs != ct else nn.Identity()
            )
            if tuple(student_shape[2:]) != tuple(teacher_shape[2:]):
                self.out_hw = (int(teacher_shape[2]), int(teacher_shape[3]))
        elif len(student_shape) == 2 and len(teacher_shape) == 2:
            self.project = nn.Linear(cs, ct, bias=False) if cs != ct else nn.Identity()
        else:
            raise PassConfigError(
                f"finetune: hint tensors of shapes {tuple(student_shape)} (student) and "
                f"{tuple(teacher_shape)} (teacher) cannot be matched; pick tensors of equal rank "
                "(NCHW or NC)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_hw is not None:
            x = F.adaptive_avg_pool2d(x, self.out_hw)
        return self.project(x)


class Cohort(nn.Module):
    """Everything that trains, in one module so DDP synchronizes all of it.

    Network 0 is the student; the others are mutual-learning peers. Adapters map the student's
    hint tensors onto the teacher's.
    """

    def __init__(
        self,
        student: OnnxModule,
        peers: Sequence[nn.Module],
        student_capture: Sequence[str],
        adapters: Sequence[nn.Module],
    ) -> None:
        super().__init__()
        self.student = student
        self.peers = nn.ModuleList(peers)
        self.adapters = nn.ModuleList(adapters)
        self.student_capture = list(student_capture)

    def forward(
        self, views: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.student_capture:
            output, captured = self.student(views[0], capture=self.student_capture)
            hints = [
                adapter(captured[name])
                for adapter, name in zip(self.adapters, self.student_capture, strict=True)
            ]
        else:
            output, hints = self.student(views[0]), []
        logits = [class_scores(output)]
        for peer, view in zip(self.peers, views[1:], strict=True):
            logits.append(class_scores(peer(view)))
        return logits, hints


class FrozenTeacher:
    """Runs the frozen teacher and returns its logits and hint tensors."""

    def __init__(self, network: nn.Module, capture: Sequence[str]) -> None:
        self.network = network
        self.capture = list(capture)
        self._hooked: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        if capture and not isinstance(network, OnnxModule):
            modules = dict(network.named_modules())
            missing = [name for name in capture if name not in modules]
            if missing:
                raise PassConfigError(
                    f"finetune: the teacher has no submodule {', '.join(map(repr, missing))} "
                    "for hint_tensors; name submodules of the teacher nn.Module"
                )
            for name in capture:
                self._handles.append(modules[name].register_forward_hook(self._keeper(name)))

    def _keeper(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._hooked[name] = class_scores(output)

        return hook

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not self.capture:
            return class_scores(self.network(x)), []
        if isinstance(self.network, OnnxModule):
            output, captured = self.network(x, capture=self.capture)
            return class_scores(output), [captured[name] for name in self.capture]
        self._hooked.clear()
        output = self.network(x)
        return class_scores(output), [self._hooked[name] for name in self.capture]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def classifier_input(model: ir.Model | None, module: nn.Module) -> str | None:
    """The tensor entering the last Gemm/MatMul: the features the classifier reads."""
    if model is None or not isinstance(module, OnnxModule):
        return None
    name = None
    for node in model.graph:
        if node.op_type in ("Gemm", "MatMul") and node.inputs and node.inputs[0] is not None:
            name = node.inputs[0].name
    return name
