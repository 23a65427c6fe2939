"""Shared fixtures: paths to the shared data/models, and a summary line when they are absent.

The trained model and the real datasets live in ``../shared`` beside the clone (the environment
variable ``ONNXCOMPRESS_TEST_SHARED`` points elsewhere). A test that needs one of them asks for
its fixture, which skips with a reason starting ``SHARED_SKIP_PREFIX``; the end of the run
counts those skips in one line, so a green run says what it did not test.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ONNXCOMPRESS_TEST_SHARED") or ROOT.parent / "shared")
RESNET20 = SHARED / "models" / "resnet20_cifar10.onnx"
MNIST_DIR = SHARED / "data" / "mnist"
CIFAR_ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
# Every skip for a missing shared file starts with this; the summary hook counts them by it.
SHARED_SKIP_PREFIX = "needs ../shared:"
# Channel widths default to the CPU's vector block (16 with AVX-512, 8 with AVX2); the suite
# runs on both kinds of machine, so it fixes the block and gets the same results on each
# (tests/test_latency_model.py checks the detection itself).
os.environ.setdefault("ONNXCOMPRESS_VECTOR_BLOCK", "8")


@pytest.fixture(autouse=True, scope="session")
def _private_latency_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Latency models timed by the tests go to a cache of their own, not the user's."""
    os.environ["ONNXCOMPRESS_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


def skip_without_shared(path: Path) -> Path:
    """``path`` (a file under ``SHARED``) if it exists; otherwise skip the test, saying so."""
    if not path.exists():
        pytest.skip(f"{SHARED_SKIP_PREFIX} {path} is absent")
    return path


@pytest.fixture
def resnet20_path() -> Path:
    return skip_without_shared(RESNET20)


@pytest.fixture
def mnist_dir() -> Path:
    """The folder of the real MNIST test set (t10k images and labels, gzipped)."""
    skip_without_shared(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    skip_without_shared(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    return MNIST_DIR


@pytest.fixture
def batchnorm_insertions(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The names of the BatchNorms each training run put in (``insert_batchnorms`` watched),
    one list per call, in order."""
    from onnxcompress.torch_bridge import batchnorm

    calls: list[list[str]] = []
    insert = batchnorm.insert_batchnorms

    def watched(*args: Any, **kwargs: Any) -> list[str]:
        calls.append(insert(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(batchnorm, "insert_batchnorms", watched)
    return calls


@pytest.fixture
def cifar_archive() -> Path:
    """All of CIFAR-10 as JPEG files in an ImageFolder tar.gz."""
    return skip_without_shared(CIFAR_ARCHIVE)


def _skip_reason(report: pytest.TestReport) -> str:
    # A skip's longrepr is (file, line, "Skipped: <reason>").
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


# Outermost wrapper: the note comes after the short summary's SKIPPED lines, just before the
# final counts.
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Generator[None]:
    yield
    skipped = {
        report.nodeid
        for report in terminalreporter.stats.get("skipped", [])
        if SHARED_SKIP_PREFIX in _skip_reason(report)
    }
    if not skipped:
        return
    tests = f"{len(skipped)} test" + ("" if len(skipped) == 1 else "s")
    if SHARED.is_dir():
        cause = f"files they need are missing from {SHARED} (the SKIPPED lines name them)"
    else:
        cause = f"../shared (models, data) is not beside this clone (looked in {SHARED})"
    terminalreporter.write_line(f"note: {tests} skipped because {cause}", yellow=True, bold=True)
