"""Shared fixtures: paths to the shared data/models and small model builders."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
RESNET20 = SHARED / "models" / "resnet20_cifar10.onnx"
MNIST_DIR = SHARED / "data" / "mnist"
CIFAR_ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture
def resnet20_path() -> Path:
    if not RESNET20.exists():
        pytest.skip(f"{RESNET20} is absent (the shared models folder is not beside this clone)")
    return RESNET20
