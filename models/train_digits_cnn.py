"""Train the demo model `digits_resnet.onnx`: a small residual CNN for scikit-learn's digits.

The demo and the tests need a real trained CNN with BatchNormalization and residual additions that
ships with the repository and trains in under two minutes on two CPU cores; this script makes it.

Usage:
    python models/train_digits_cnn.py --out models/digits_resnet.onnx --seed 0
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from onnx_export import export_classifier
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from onnxcompress.data import Preprocess

logger = logging.getLogger(__name__)

# sklearn's order: the first 1,400 images train the model, the remaining 397 are held out.
TRAIN_COUNT = 1400
# Digits pixels are 0..16; the scaled range 0..1 is then centred to -1..1.
SCALE, MEAN, STD = 1 / 16, 0.5, 0.5
PREPROCESS = Preprocess(scale=SCALE, mean=(MEAN,), std=(STD,))
CLASSES = tuple(str(k) for k in range(10))


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut (identity, or a 1x1 projection when shapes change)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem 1->32, two identity blocks at 8x8, one stride-2 block to 64 channels, GAP, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.stage1 = nn.Sequential(ResidualBlock(32, 32), ResidualBlock(32, 32))
        self.stage2 = ResidualBlock(32, 64, stride=2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 NCHW with the model's preprocessing, split in sklearn's order."""
    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]
    x = (images * SCALE - MEAN) / STD
    y = digits.target.astype(np.int64)
    return x[:TRAIN_COUNT], y[:TRAIN_COUNT], x[TRAIN_COUNT:], y[TRAIN_COUNT:]


def random_shift(
    batch: torch.Tensor, generator: torch.Generator, max_shift: int = 1
) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value."""
    _, _, h, w = batch.shape
    span = 2 * max_shift + 1
    padded = F.pad(batch, [max_shift] * 4, value=float(batch.min()))
    offsets = torch.randint(0, span * span, (len(batch),), generator=generator)
    shifted = torch.empty_like(batch)
    # One slice per offset rather than per image: a Python loop over images costs more than
    # the forward pass of this small network.
    for offset in offsets.unique().tolist():
        dy, dx = divmod(offset, span)
        chosen = offsets == offset
        shifted[chosen] = padded[chosen, :, dy : dy + h, dx : dx + w]
    return shifted


def train(
    x: np.ndarray, y: np.ndarray, *, seed: int, epochs: int, batch_size: int = 64
) -> DigitsResNet:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsResNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        total_loss = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = random_shift(inputs[index], generator)
            loss = F.cross_entropy(model(batch), labels[index], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(index)
        logger.info("epoch %d/%d  loss %.4f", epoch + 1, epochs, total_loss / len(inputs))
    return model.eval()


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    logits = model(torch.from_numpy(x))
    return 100.0 * float((logits.argmax(1).numpy() == y).mean())


def export(model: nn.Module, path: Path, sample: np.ndarray) -> None:
    """Export with BatchNormalization kept as nodes, plus preprocessing metadata."""
    metadata = {
        **PREPROCESS.to_metadata(),
        "onnxcompress.dataset": "digits",
        "onnxcompress.classes": ",".join(CLASSES),
    }
    export_classifier(model, path, sample, metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("digits_resnet.onnx"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    torch.set_num_threads(args.threads)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_split()
    start = time.perf_counter()
    model = train(x_train, y_train, seed=args.seed, epochs=args.epochs)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(f"trained in {seconds:.1f} s ({args.epochs} epochs, seed {args.seed}), {params} params")
    print(f"torch top-1 on digits[{TRAIN_COUNT}:]: {torch_accuracy(model, x_test, y_test):.2f}%")

    export(model, args.out, x_test[:64])
    from onnxcompress.graph.model_io import load_model
    from onnxcompress.runtime.evaluate import accuracy, dataset_for_model

    onnx_model = load_model(args.out)
    result = accuracy(onnx_model, dataset_for_model(onnx_model, f"digits[{TRAIN_COUNT}:]"))
    print(f"wrote {args.out}")
    split = f"digits[{TRAIN_COUNT}:]"
    print(f"ONNX Runtime top-1 on {split}: {result.top1:.2f}% ({result.samples} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
