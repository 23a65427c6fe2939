"""Tests for onnxcompress.data: spec grammar, every source kind, preprocessing, archive safety.

Fixtures are written in tmp_path; tests of the real MNIST/CIFAR-10 files skip when absent.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from onnxcompress.data import (
    DEFAULT_SPEC,
    METADATA_PREFIX,
    Dataset,
    Preprocess,
    fit_to_input,
    load_dataset,
    parse_spec,
    spread_index,
)
from onnxcompress.data import archive as archive_module
from onnxcompress.errors import DataError

# Label counts of the MNIST t10k set, a fixed property of the published files.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _raises(spec: str, *fragments: str, cache_dir: Path | None = None) -> DataError:
    """load_dataset(spec) raises a one-line DataError naming the spec and every fragment."""
    with pytest.raises(DataError) as info:
        load_dataset(spec, cache_dir=cache_dir)
    message = str(info.value)
    assert "\n" not in message
    assert spec in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


# ---------------------------------------------------------------------------------------------
# Spec grammar
# ---------------------------------------------------------------------------------------------


def test_parse_spec_grammar() -> None:
    spec = parse_spec("npz:/a/b.npz[10:20:2]?scale=1/255&mean=0.5&per_class=3:7&limit=5")
    assert spec.kind == "npz"
    assert spec.path == Path("/a/b.npz")
    assert spec.slice == slice(10, 20, 2)
    assert spec.per_class == slice(3, 7, None)
    assert spec.limit == 5
    assert spec.preprocess() == Preprocess(scale=1 / 255, mean=(0.5,))
    assert "per_class" not in spec.options

    assert parse_spec("digits[:500]").slice == slice(None, 500, None)
    assert parse_spec("digits[-100:]").slice == slice(-100, None, None)
    assert parse_spec("DIGITS").kind == "digits"
    assert parse_spec("folder:x?per_class=100").per_class == slice(0, 100)
    nhwc = parse_spec("npz:f.npz?layout=nhwc&resize=32x24&channels=3")
    assert nhwc.preprocess() == Preprocess(resize=(32, 24), channels=3, layout="NHWC")
    assert parse_spec("mnist:d?split=train").options == {"split": "train"}


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("imagenet:/x", "unknown kind 'imagenet'"),
        ("npz", "needs a path"),
        ("folder:", "needs a path"),
        ("digits:/x", "takes no path"),
        ("digits[1:2:0]", "zero step"),
        ("digits[a:b]", "not a Python slice"),
        ("digits[5]", "not a Python slice"),
        ("digits?foo=1", "valid options: channels, layout, limit, mean"),
        ("digits?split=test", "applies to mnist data only"),
        ("digits?layout=NHWC", "applies to npz data only"),
        ("digits?scale=1&scale=2", "given twice"),
        ("digits?scale", "has no value"),
        ("digits?scale=abc", "not a number"),
        ("digits?scale=0", "non-zero"),
        ("digits?resize=3x4x5", "not N or HxW"),
        ("digits?resize=0", "positive"),
        ("digits?channels=2", "1 or 3"),
        ("digits?std=0", "positive"),
        ("digits?mean=nan", "finite"),
        ("digits?limit=-1", "zero or more"),
        ("digits?per_class=a:b", "not a Python slice"),
        ("mnist:/x?split=val", "test or train"),
        ("npz:f.npz?layout=NWHC", "NCHW or NHWC"),
    ],
)
def test_parse_spec_errors(spec: str, fragment: str) -> None:
    with pytest.raises(DataError) as info:
        parse_spec(spec)
    message = str(info.value)
    assert fragment in message
    assert spec in message
    assert "\n" not in message


def test_empty_spec_and_path_hint(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        parse_spec("  ")
    with pytest.raises(DataError, match="folder:"):
        parse_spec(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DEFAULT_SPEC)


def test_digits(digits: Dataset) -> None:
    from sklearn.datasets import load_digits

    reference = load_digits()
    assert digits.x.shape == (1797, 1, 8, 8)
    assert digits.x.dtype == np.float32 and digits.x.flags.c_contiguous
    assert digits.x.min() == 0.0 and digits.x.max() == 1.0
    np.testing.assert_allclose(digits.x[:, 0] * 16, reference.images, atol=1e-5)
    assert digits.y is not None and digits.y.dtype == np.int64
    np.testing.assert_array_equal(digits.y, reference.target)
    assert set(digits.y.tolist()) == set(range(10))
    assert digits.classes == [str(d) for d in range(10)]
    assert digits.name == "digits"


def test_digits_slices(digits: Dataset) -> None:
    assert digits.y is not None
    head = load_dataset("digits[:500]")
    tail = load_dataset("digits[1400:]")
    assert len(head) == 500 and len(tail) == 397
    np.testing.assert_array_equal(head.x, digits.x[:500])
    np.testing.assert_array_equal(tail.x, digits.x[1400:])
    np.testing.assert_array_equal(tail.y, digits.y[1400:])
    stepped = load_dataset("digits[10:40:3]?limit=4")
    np.testing.assert_array_equal(stepped.y, digits.y[10:40:3][:4])
    assert len(load_dataset("digits?limit=7")) == 7


def test_per_class_on_labelled_arrays(digits: Dataset) -> None:
    assert digits.y is not None
    ds = load_dataset("digits?per_class=2:5")
    assert ds.y is not None
    assert np.bincount(ds.y).tolist() == [3] * 10
    # Original order is kept: the 3rd..5th image of each class, wherever they sit.
    expected = np.sort(np.concatenate([np.flatnonzero(digits.y == c)[2:5] for c in range(10)]))
    np.testing.assert_array_equal(ds.x, digits.x[expected])


@pytest.mark.parametrize("spec", ["digits[2000:]", "digits?limit=0", "digits?per_class=5:5"])
def test_empty_selection(spec: str) -> None:
    _raises(spec, "selection is empty", "1797")


# ---------------------------------------------------------------------------------------------
# MNIST idx
# ---------------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    blob = header + array.astype(np.uint8).tobytes()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_synthetic_idx(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 3, 4), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels)

    ds = load_dataset(f"mnist:{tmp_path}")  # no t10k files: falls back to train
    assert ds.x.shape == (7, 1, 3, 4)
    np.testing.assert_allclose(ds.x[:, 0], images / 255.0, atol=1e-7)
    np.testing.assert_array_equal(ds.y, labels)
    direct = load_dataset(f"mnist:{tmp_path}/train-images-idx3-ubyte{suffix}[2:]")
    np.testing.assert_array_equal(direct.x, ds.x[2:])
    np.testing.assert_array_equal(direct.y, labels[2:])
    _raises(f"mnist:{tmp_path}?split=test", "t10k-images-idx3-ubyte")


def test_mnist_bad_files(tmp_path: Path) -> None:
    images = np.zeros((4, 2, 2), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    # Without labels the data still loads, unlabelled.
    unlabelled = load_dataset(f"mnist:{tmp_path}")
    assert unlabelled.y is None and unlabelled.classes is None
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    _raises(f"mnist:{tmp_path}", "3 labels for 4 images")
    blob = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(blob[:-1])
    _raises(f"mnist:{tmp_path}", "truncated")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + blob[4:])
    _raises(f"mnist:{tmp_path}", "not an idx file of 3-D")
    _raises(f"mnist:{tmp_path / 'nowhere'}", "no such file or folder")


def test_mnist_real(mnist_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(f"mnist:{mnist_dir}")
    assert ds.x.shape == (10000, 1, 28, 28)
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    np.testing.assert_allclose(ds.x * 255, np.round(ds.x * 255), atol=1e-3)
    assert ds.y is not None
    assert ds.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(ds.y).tolist() == MNIST_TEST_COUNTS

    # The same files, decompressed, load identically.
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(mnist_dir / f"{name}.gz", "rb") as src:
            (tmp_path / name).write_bytes(src.read())
    plain = load_dataset(f"mnist:{tmp_path}")
    np.testing.assert_array_equal(plain.x, ds.x)
    np.testing.assert_array_equal(plain.y, ds.y)

    # The benchmark convention: the last 2,000 images, normalised to [-1, 1].
    evaluation = load_dataset(f"mnist:{mnist_dir}[8000:]?mean=0.5&std=0.5")
    assert len(evaluation) == 2000
    np.testing.assert_allclose(evaluation.x, (ds.x[8000:] - 0.5) / 0.5, atol=1e-6)
    assert evaluation.x.min() == -1.0 and evaluation.x.max() == 1.0


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def nchw_uint8() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(6, 3, 4, 5), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.int32)
    return x, y


def test_npz_layouts(tmp_path: Path, nchw_uint8: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = nchw_uint8
    np.savez(tmp_path / "nchw.npz", x=x, y=y)
    np.savez(tmp_path / "nhwc.npz", x=x.transpose(0, 2, 3, 1), y=y)
    np.savez(tmp_path / "grey.npz", x=x[:, 0])
    np.savez(tmp_path / "float.npz", x=x.astype(np.float64) / 7.0, y=y.astype(np.float32))

    nchw = load_dataset(f"npz:{tmp_path / 'nchw.npz'}")
    np.testing.assert_allclose(nchw.x, x / 255.0, atol=1e-7)
    assert nchw.y is not None and nchw.y.dtype == np.int64
    np.testing.assert_array_equal(nchw.y, y)
    assert nchw.classes is None

    nhwc = load_dataset(f"npz:{tmp_path / 'nhwc.npz'}?layout=NHWC")
    np.testing.assert_array_equal(nhwc.x, nchw.x)
    assert nhwc.x.flags.c_contiguous

    grey = load_dataset(f"npz:{tmp_path / 'grey.npz'}")
    assert grey.x.shape == (6, 1, 4, 5) and grey.y is None
    np.testing.assert_array_equal(grey.x[:, 0], nchw.x[:, 0])

    floats = load_dataset(f"npz:{tmp_path / 'float.npz'}")  # float input: scale 1
    np.testing.assert_allclose(floats.x, x / 7.0, rtol=1e-6)
    np.testing.assert_array_equal(floats.y, y)
    doubled = load_dataset(f"npz:{tmp_path / 'float.npz'}[1:3]?scale=2")
    np.testing.assert_allclose(doubled.x, 2.0 * x[1:3].astype(np.float64) / 7.0, rtol=1e-6)


def test_npz_class_names(tmp_path: Path, nchw_uint8: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = nchw_uint8
    np.savez(tmp_path / "named.npz", x=x, y=y, classes=np.array(["a", "b", "c"]))
    assert load_dataset(f"npz:{tmp_path / 'named.npz'}").classes == ["a", "b", "c"]


def test_npz_errors(tmp_path: Path, nchw_uint8: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = nchw_uint8
    np.savez(tmp_path / "keys.npz", images=x, labels=y)
    _raises(f"npz:{tmp_path / 'keys.npz'}", "['images', 'labels']", "'x'")
    np.savez(tmp_path / "short_y.npz", x=x, y=y[:4])
    _raises(f"npz:{tmp_path / 'short_y.npz'}", "y has shape (4,)")
    np.savez(tmp_path / "soft_y.npz", x=x, y=np.linspace(0, 1, 6))
    _raises(f"npz:{tmp_path / 'soft_y.npz'}", "integer class indices")
    np.savez(tmp_path / "flat.npz", x=x.reshape(6, -1))
    _raises(f"npz:{tmp_path / 'flat.npz'}", "(6, 60)")
    # Object arrays need pickle, which must never be loaded from a user's file.
    np.savez(tmp_path / "pickled.npz", x=np.array([x[0], "x"], dtype=object))
    _raises(f"npz:{tmp_path / 'pickled.npz'}", "pickled.npz")
    np.save(tmp_path / "single.npy", x)
    _raises(f"npz:{tmp_path / 'single.npy'}", "np.savez")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _raises(f"npz:{tmp_path / 'junk.npz'}", "not a readable .npz")
    _raises(f"npz:{tmp_path / 'missing.npz'}", "no such file")
    bad = x.astype(np.float32)
    bad[2, 1, 0, 0] = np.inf
    bad[3, 0, 1, 1] = np.nan
    np.savez(tmp_path / "nonfinite.npz", x=bad)
    _raises(f"npz:{tmp_path / 'nonfinite.npz'}", "2 values are NaN or infinite")
    # Slicing happens before preprocessing: the bad images can be left out.
    assert len(load_dataset(f"npz:{tmp_path / 'nonfinite.npz'}[:2]")) == 2


# ---------------------------------------------------------------------------------------------
# Preprocessing options
# ---------------------------------------------------------------------------------------------


def test_option_channels_and_normalisation(digits: Dataset) -> None:
    rgb = load_dataset("digits[:50]?channels=3")
    assert rgb.x.shape == (50, 3, 8, 8)
    for c in range(3):
        np.testing.assert_array_equal(rgb.x[:, c], digits.x[:50, 0])

    norm = load_dataset("digits[:50]?mean=0.5&std=0.25")
    np.testing.assert_allclose(norm.x, (digits.x[:50] - 0.5) / 0.25, atol=1e-6)

    # mean/std are per channel *after* conversion, so three values fit channels=3.
    per = load_dataset("digits[:50]?channels=3&mean=0.1,0.2,0.3&std=1,2,4")
    for c, (m, s) in enumerate([(0.1, 1), (0.2, 2), (0.3, 4)]):
        np.testing.assert_allclose(per.x[:, c], (digits.x[:50, 0] - m) / s, atol=1e-6)
    _raises("digits?mean=0.1,0.2", "mean has 2 values", "1 channel")
    _raises("digits?channels=3&std=1,2", "std has 2 values", "give 1 or 3")


def test_option_rgb_to_grey_averages(
    tmp_path: Path, nchw_uint8: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = nchw_uint8
    np.savez(tmp_path / "rgb.npz", x=x)
    grey = load_dataset(f"npz:{tmp_path / 'rgb.npz'}?channels=1")
    assert grey.x.shape == (6, 1, 4, 5)
    np.testing.assert_allclose(grey.x[:, 0], x.mean(axis=1) / 255.0, atol=1e-6)
    np.savez(tmp_path / "four.npz", x=np.zeros((2, 4, 3, 3), dtype=np.uint8))
    _raises(f"npz:{tmp_path / 'four.npz'}?channels=3", "cannot convert 4 channels to 3")


def test_option_resize(tmp_path: Path, digits: Dataset) -> None:
    big = load_dataset("digits[:20]?resize=16")
    assert big.x.shape == (20, 1, 16, 16)
    assert big.x.min() >= 0.0 and big.x.max() <= 1.0 + 1e-6
    # Resizing preserves the mean brightness of an image to within interpolation error.
    np.testing.assert_allclose(big.x.mean(axis=(2, 3)), digits.x[:20].mean(axis=(2, 3)), atol=0.03)
    assert load_dataset("digits[:3]?resize=4x6").x.shape == (3, 1, 4, 6)
    same = load_dataset("digits[:20]?resize=8x8")
    np.testing.assert_array_equal(same.x, digits.x[:20])

    # Bilinear with half-pixel centres: [0, 1] widens to [0, .25, .75, 1] (torch's
    # align_corners=False gives the same numbers).
    ramp = np.array([[[[0.0, 1.0], [0.0, 1.0]]]], dtype=np.float32)
    np.savez(tmp_path / "ramp.npz", x=ramp)
    wide = load_dataset(f"npz:{tmp_path / 'ramp.npz'}?resize=2x4")
    np.testing.assert_allclose(wide.x[0, 0], [[0, 0.25, 0.75, 1]] * 2, atol=1e-6)


def test_preprocess_order_scale_resize_channels_normalise(tmp_path: Path) -> None:
    x = np.full((2, 1, 2, 2), 200, dtype=np.uint8)
    np.savez(tmp_path / "const.npz", x=x)
    ds = load_dataset(f"npz:{tmp_path / 'const.npz'}?resize=3&channels=3&mean=0.5,0.25,0&std=0.5")
    assert ds.x.shape == (2, 3, 3, 3)
    for c, mean in enumerate((0.5, 0.25, 0.0)):
        np.testing.assert_allclose(ds.x[:, c], (200 / 255 - mean) / 0.5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Preprocess settings and model metadata
# ---------------------------------------------------------------------------------------------


def test_preprocess_metadata_round_trip() -> None:
    settings = Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=(32, 24), channels=3)
    props = settings.to_metadata()
    # the pixel scale belongs to the data source: never stored, and ignored when present
    assert Preprocess(scale=1 / 255).to_metadata() == {}
    assert Preprocess.from_metadata({METADATA_PREFIX + "scale": "0.0625"}) is None
    assert props[METADATA_PREFIX + "resize"] == "32,24"
    assert all(key.startswith(METADATA_PREFIX) for key in props)
    assert Preprocess.from_metadata({**props, "producer": "torch"}) == settings  # exact floats
    assert Preprocess.from_metadata({"producer": "torch"}) is None
    assert Preprocess().to_metadata() == {}
    partial = Preprocess.from_metadata({METADATA_PREFIX + "mean": "0.5"})
    assert partial == Preprocess(mean=(0.5,))
    with pytest.raises(DataError, match="model metadata"):
        Preprocess.from_metadata({METADATA_PREFIX + "std": "0.5,x"})
    # Lists become tuples, so settings stay hashable.
    assert hash(Preprocess(mean=[0.5], std=[0.5])) == hash(Preprocess(mean=(0.5,), std=(0.5,)))  # type: ignore[arg-type]


def test_preprocess_merged() -> None:
    base = Preprocess(scale=1 / 255, mean=(0.5,), std=(0.5,), layout="NHWC")
    merged = base.merged(Preprocess(mean=(0.1,), resize=(8, 8)))
    assert merged == Preprocess(
        scale=1 / 255, mean=(0.1,), std=(0.5,), resize=(8, 8), layout="NHWC"
    )
    assert base.merged(None) is base
    assert Preprocess().merged(Preprocess(layout="NHWC")).layout == "NHWC"


def test_preprocess_argument_gives_defaults(digits: Dataset) -> None:
    model_settings = Preprocess(mean=(0.5,), std=(0.5,))
    ds = load_dataset("digits[:10]", preprocess=model_settings)
    np.testing.assert_allclose(ds.x, (digits.x[:10] - 0.5) / 0.5, atol=1e-6)
    overridden = load_dataset("digits[:10]?std=0.25", preprocess=model_settings)
    np.testing.assert_allclose(overridden.x, (digits.x[:10] - 0.5) / 0.25, atol=1e-6)
    raw = load_dataset("digits[:10]", preprocess=Preprocess(scale=1.0))
    np.testing.assert_allclose(raw.x, digits.x[:10] * 16, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Dataset and fit_to_input
# ---------------------------------------------------------------------------------------------


def test_dataset_batches_and_subset(digits: Dataset) -> None:
    assert digits.y is not None
    small = digits.subset(slice(0, 10))
    assert len(small) == 10 and small.classes == digits.classes
    batches = list(small.batches(4))
    assert [len(xb) for xb, _ in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([xb for xb, _ in batches]), small.x)
    np.testing.assert_array_equal(
        np.concatenate([yb for _, yb in batches if yb is not None]), digits.y[:10]
    )
    picked = digits.subset(np.array([5, 1, 3]))
    np.testing.assert_array_equal(picked.x, digits.x[[5, 1, 3]])
    assert picked.x.flags.c_contiguous
    unlabelled = Dataset(small.x, None, "x")
    assert all(yb is None for _, yb in unlabelled.batches(3))
    with pytest.raises(ValueError):
        next(small.batches(0))
    with pytest.raises(ValueError):
        Dataset(small.x.astype(np.float64), None, "x")


def test_fit_to_input(digits: Dataset) -> None:
    assert fit_to_input(digits, ["N", 1, 8, 8]) is digits
    assert fit_to_input(digits, [None, 1, "h", "w"]) is digits
    assert fit_to_input(digits, [1, 1, 8, -1]) is digits
    assert fit_to_input(digits, [np.int64(1), np.int64(1), np.int64(8), None]) is digits  # type: ignore[list-item]
    with pytest.raises(DataError, match="channels=3"):
        fit_to_input(digits, [None, np.int64(3), 8, 8])  # type: ignore[list-item]
    with pytest.raises(DataError) as info:
        fit_to_input(digits, ["N", 3, 32, 32])
    message = str(info.value)
    assert "add ?channels=3&resize=32 " in message and "'digits'" in message
    with pytest.raises(DataError, match=r"add \?resize=16x12 "):
        fit_to_input(digits, ["N", 1, 16, 12])
    with pytest.raises(DataError, match="add &channels=3 "):
        fit_to_input(load_dataset("digits[:5]?mean=0.5"), ["N", 3, 8, 8])
    with pytest.raises(DataError, match=r"\[N, 64\]"):
        fit_to_input(digits, ["N", 64])


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------

CLASSES = ["cat", "dog", "emu"]
PER_CLASS = 5


def _pixel(label: int, index: int) -> tuple[int, int, int]:
    red = 20 * label + index
    return red, red + 100, 255 - red


def _build_tree(root: Path, size: tuple[int, int] = (6, 4)) -> Path:
    """An image-folder tree whose every image is one colour that encodes (class, index)."""
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for index in range(PER_CLASS):
            colour = np.array(_pixel(label, index), dtype=np.uint8)
            image = np.broadcast_to(colour, (*size, 3))
            Image.fromarray(np.ascontiguousarray(image)).save(folder / f"{index:04d}.png")
        (folder / "notes.txt").write_text("not an image")
        (folder / ".hidden.png").write_bytes(b"ignored")
    return root


def _colours(ds: Dataset) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in np.round(px * 255)) for px in ds.x[:, :, 0, 0]]


def test_folder_labels_and_pixels(tmp_path: Path) -> None:
    root = _build_tree(tmp_path / "tree")
    ds = load_dataset(f"folder:{root}")
    assert ds.x.shape == (15, 3, 6, 4)
    assert ds.classes == CLASSES
    assert ds.y is not None and ds.y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert _colours(ds) == [_pixel(label, i) for label in range(3) for i in range(PER_CLASS)]

    picked = load_dataset(f"folder:{root}[1:5]?per_class=1:3")
    assert picked.y is not None and picked.y.tolist() == [0, 1, 1, 2]
    assert _colours(picked) == [_pixel(0, 2), _pixel(1, 1), _pixel(1, 2), _pixel(2, 1)]

    grey = load_dataset(f"folder:{root}[:5]?channels=1")
    assert grey.x.shape == (5, 1, 6, 4)
    for k in range(5):
        r, g, b = _pixel(0, k)
        luma = (r * 299 + g * 587 + b * 114) / 1000
        assert abs(grey.x[k, 0, 0, 0] * 255 - luma) <= 1.0


def test_folder_unlabelled_and_empty(tmp_path: Path) -> None:
    root = _build_tree(tmp_path / "tree")
    flat = load_dataset(f"folder:{root / 'dog'}")
    assert len(flat) == PER_CLASS and flat.y is None and flat.classes is None
    _raises(f"folder:{root / 'dog'}?per_class=0:2", "per_class needs labels")
    nested = tmp_path / "nested"
    shutil.copytree(root, nested / "test")
    _raises(f"folder:{nested}", "one level deeper", str(nested / "test"))
    (tmp_path / "empty").mkdir()
    _raises(f"folder:{tmp_path / 'empty'}", "no images")
    _raises(f"folder:{tmp_path / 'absent'}", "no such file or folder")
    _raises(f"folder:{root / 'cat' / '0000.png'}", "not a folder or a tar archive")


def test_folder_unreadable_image_named(tmp_path: Path) -> None:
    root = _build_tree(tmp_path / "tree")
    (root / "dog" / "0002.png").write_bytes(b"\x89PNG broken")
    _raises(f"folder:{root}", "cannot read image", "dog/0002.png")
    # Only the selected images are decoded, so slicing around the broken file works.
    assert len(load_dataset(f"folder:{root}[:5]")) == 5


def test_folder_mixed_sizes_need_resize(tmp_path: Path) -> None:
    root = _build_tree(tmp_path / "tree")
    Image.new("RGB", (9, 7), (10, 20, 30)).save(root / "emu" / "0009.png")
    _raises(f"folder:{root}", "differ in size", "resize=HxW")
    ds = load_dataset(f"folder:{root}?resize=5x5")
    assert ds.x.shape == (16, 3, 5, 5)
    # A one-colour image stays that colour through a resize.
    colour = np.broadcast_to(np.array([10.0, 20.0, 30.0])[:, None, None], (3, 5, 5))
    np.testing.assert_allclose(ds.x[-1] * 255, colour, atol=1e-3)
    np.testing.assert_allclose(ds.x[0, 0] * 255, np.full((5, 5), _pixel(0, 0)[0]), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------


def _tar_directory(source: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return archive


@pytest.fixture()
def extractions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Records every extraction (by the folder extracted) that really reads the archive."""
    calls: list[tuple[str, ...]] = []
    real = archive_module._extract_into

    def spy(archive: Path, dest: Path, prefix: tuple[str, ...], where: str) -> None:
        calls.append(prefix)
        real(archive, dest, prefix, where)

    monkeypatch.setattr(archive_module, "_extract_into", spy)
    return calls


def test_archive_loads_like_folder_and_is_cached(
    tmp_path: Path, extractions: list[tuple[str, ...]]
) -> None:
    root = _build_tree(tmp_path / "tree")
    archive = _tar_directory(root, tmp_path / "set.tar.gz", "pkg/test")
    cache = tmp_path / "cache"
    expected = load_dataset(f"folder:{root}?per_class=1:4")

    first = load_dataset(f"folder:{archive}/pkg/test?per_class=1:4", cache_dir=cache)
    np.testing.assert_array_equal(first.x, expected.x)
    np.testing.assert_array_equal(first.y, expected.y)
    assert first.classes == CLASSES
    assert extractions == [("pkg", "test")]
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and not entries[0].startswith(".")

    again = load_dataset(f"folder:{archive}/pkg/test", cache_dir=cache)
    inner = load_dataset(f"folder:{archive}/pkg/test/dog", cache_dir=cache)  # enclosed folder
    assert len(again) == 15 and len(inner) == PER_CLASS
    assert extractions == [("pkg", "test")], "a cached extraction was redone"
    assert sorted(p.name for p in cache.iterdir()) == entries

    # A changed archive (new mtime) is extracted afresh.
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_dataset(f"folder:{archive}/pkg/test[:1]", cache_dir=cache)
    assert len(extractions) == 2

    _raises(f"folder:{archive}/pkg/nothing", "no folder 'pkg/nothing'", "['pkg']", cache_dir=cache)
    _raises(f"folder:{archive}/pkg/test/cat/0000.png", "is a file, not a folder", cache_dir=cache)
    fresh = tmp_path / "fresh-cache"  # the same, when nothing enclosing is cached yet
    _raises(f"folder:{archive}/pkg/test/cat/0000.png", "is a file, not a folder", cache_dir=fresh)
    assert list(fresh.iterdir()) == []


def test_archive_cache_location_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _build_tree(tmp_path / "tree")
    archive = _tar_directory(root, tmp_path / "set.tgz", "data")
    monkeypatch.setenv("ONNXCOMPRESS_CACHE", str(tmp_path / "env-cache"))
    assert len(load_dataset(f"folder:{archive}/data")) == 15
    assert len(list((tmp_path / "env-cache" / "datasets").iterdir())) == 1


def test_archive_crash_leaves_no_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _build_tree(tmp_path / "tree")
    archive = _tar_directory(root, tmp_path / "set.tar.gz", "data")
    cache = tmp_path / "cache"
    copies = 0
    real_copy = shutil.copyfileobj

    def crash_on_third(*args: object, **kwargs: object) -> None:
        nonlocal copies
        copies += 1
        if copies == 3:
            raise KeyboardInterrupt
        real_copy(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "copyfileobj", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(f"folder:{archive}/data", cache_dir=cache)
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    assert len(load_dataset(f"folder:{archive}/data", cache_dir=cache)) == 15


def _hostile_archive(path: Path, bad: tarfile.TarInfo, payload: bytes = b"evil") -> Path:
    """A valid image tree plus one hostile member, written after the good ones."""
    good = io.BytesIO()
    Image.new("RGB", (2, 2), (1, 2, 3)).save(good, format="PNG")
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("data/cls/0000.png")
        info.size = len(good.getvalue())
        tar.addfile(info, io.BytesIO(good.getvalue()))
        if bad.isreg():
            bad.size = len(payload)
            tar.addfile(bad, io.BytesIO(payload))
        else:
            tar.addfile(bad)
    with tarfile.open(path) as tar:
        assert bad.name in tar.getnames()  # tarfile kept the hostile name as written
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


HOSTILE: dict[str, Callable[[Path], tuple[tarfile.TarInfo, str]]] = {
    "parent": lambda base: (_member("../evil"), "climbs out"),
    "nested-parent": lambda base: (_member("data/../../evil"), "climbs out"),
    "absolute": lambda base: (_member(str(base / "evil")), "absolute path"),
    "symlink": lambda base: (
        _member("data/cls/link.png", tarfile.SYMTYPE, str(base / "evil")),
        "symbolic link",
    ),
    "hardlink": lambda base: (
        _member("data/cls/hard.png", tarfile.LNKTYPE, "data/cls/0000.png"),
        "hard link",
    ),
    "device": lambda base: (_member("data/cls/dev", tarfile.CHRTYPE), "device"),
    "fifo": lambda base: (_member("data/cls/fifo", tarfile.FIFOTYPE), "FIFO"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_refused(tmp_path: Path, case: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    member, fragment = HOSTILE[case](tmp_path)
    archive = _hostile_archive(work / "bad.tar.gz", member)
    cache = work / "cache"
    error = _raises(f"folder:{archive}/data", cache_dir=cache)
    assert fragment in str(error)
    assert not (tmp_path / "evil").exists()
    assert not (work / "evil").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["bad.tar.gz", "cache"]
    assert list(cache.iterdir()) == [], "a refused archive left files in the cache"


def test_archive_caps_and_garbage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _build_tree(tmp_path / "tree")
    archive = _tar_directory(root, tmp_path / "set.tar.gz", "data")
    cache = tmp_path / "cache"
    monkeypatch.setattr(archive_module, "MAX_ARCHIVE_BYTES", 200)
    assert "MAX_ARCHIVE_BYTES" in str(_raises(f"folder:{archive}/data", cache_dir=cache))
    monkeypatch.setattr(archive_module, "MAX_ARCHIVE_BYTES", 2**30)
    monkeypatch.setattr(archive_module, "MAX_ARCHIVE_MEMBERS", 5)
    assert "more than 5 members" in str(_raises(f"folder:{archive}/data", cache_dir=cache))
    assert list(cache.iterdir()) == []
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 50)
    junk = _raises(f"folder:{tmp_path / 'junk.tar.gz'}/x", cache_dir=cache)
    assert "not a readable tar archive" in str(junk)


# ---------------------------------------------------------------------------------------------
# Real CIFAR-10 (JPEG) archive
# ---------------------------------------------------------------------------------------------


def test_cifar_evaluation_half(
    cifar_archive: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cache = tmp_path_factory.mktemp("cifar-cache")
    norm = "mean=0.485,0.456,0.406&std=0.229,0.224,0.225"
    spec = f"folder:{cifar_archive}/cifar10-jpeg/test?per_class=500:1000&{norm}"
    started = time.perf_counter()
    ds = load_dataset(spec, cache_dir=cache)
    elapsed = time.perf_counter() - started
    assert ds.x.shape == (5000, 3, 32, 32)
    assert ds.classes == CIFAR_CLASSES
    assert ds.y is not None and np.bincount(ds.y).tolist() == [500] * 10
    assert fit_to_input(ds, ["batch", 3, 32, 32]) is ds

    tree = archive_module.extract_archive(cifar_archive, cache, inside=("cifar10-jpeg", "test"))
    test_dir = tree / "cifar10-jpeg" / "test"
    for label, image_name in [(0, "0500.jpg"), (9, "0999.jpg")]:
        index = label * 500 + (0 if image_name == "0500.jpg" else 499)
        pixels = np.asarray(Image.open(test_dir / CIFAR_CLASSES[label] / image_name).convert("RGB"))
        expected = (pixels.transpose(2, 0, 1) / 255.0 - np.array(IMAGENET_MEAN)[:, None, None]) / (
            np.array(IMAGENET_STD)[:, None, None]
        )
        np.testing.assert_allclose(ds.x[index], expected, atol=1e-5)

    # The calibration half is the other 500 files of each class, from the same cache.
    calibration = load_dataset(
        f"folder:{cifar_archive}/cifar10-jpeg/test[:3]?per_class=0:500&{norm}", cache_dir=cache
    )
    assert calibration.y is not None and calibration.y.tolist() == [0, 0, 0]
    assert not np.allclose(calibration.x[0], ds.x[0])
    print(f"CIFAR-10 evaluation half: extracted + decoded in {elapsed:.1f} s")


@given(total=st.integers(1, 5000), count=st.integers(1, 6000))
@settings(max_examples=200, deadline=None)
def test_spread_index_is_strictly_increasing_and_even(total: int, count: int) -> None:
    index = spread_index(total, count)
    assert index.size == min(total, count)
    assert index[0] == 0 and index[-1] < total
    assert np.all(np.diff(index) >= 1)
    # Gaps differ by at most one: no stretch of the data is skipped.
    gaps = np.diff(np.append(index, total))
    assert gaps.max() - gaps.min() <= 1


def test_spread_subset_of_class_sorted_data_keeps_every_class() -> None:
    labels = np.repeat(np.arange(10), 500)  # an image folder: 500 of class 0, then class 1, ...
    data = Dataset(np.zeros((labels.size, 1, 2, 2), np.float32), labels, "sorted")
    assert set(data.subset(slice(0, 512)).y.tolist()) == {0, 1}  # what the first 512 give
    picked = data.spread(512)
    assert picked.y is not None
    counts = np.bincount(picked.y, minlength=10)
    assert counts.sum() == 512 and counts.min() >= 51 and counts.max() <= 52
    assert data.spread(None) is data and data.spread(len(data)) is data
    with pytest.raises(ValueError, match="positive"):
        spread_index(10, 0)
