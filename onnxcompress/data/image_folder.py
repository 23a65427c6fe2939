"""The ``folder`` source: an image-folder tree (one subfolder per class, or images only), on disk
or inside a tar archive, decoded with Pillow only for the images selected."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxcompress.data.archive import ARCHIVE_SUFFIXES, extract_archive
from onnxcompress.data.messages import data_error, first_line
from onnxcompress.data.source import Source

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp"}
)


def resolve_folder(path: Path, cache_dir: Path | None, where: str) -> Path:
    """The image-folder root a ``folder:`` path names, extracting an archive when it is one."""
    if path.is_dir():
        return path
    parts = path.parts
    for end in range(1, len(parts) + 1):
        prefix = Path(*parts[:end])
        if prefix.is_file():
            archive, inside = prefix, parts[end:]
            break
        if not prefix.exists():
            raise data_error(where, f"no such file or folder: {prefix}")
    else:  # pragma: no cover - a path whose every prefix exists is a file or folder above
        raise data_error(where, f"no such file or folder: {path}")
    if not archive.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise data_error(
            where,
            f"{archive} is a file, not a folder or a tar archive ({', '.join(ARCHIVE_SUFFIXES)})",
        )
    if ".." in inside:
        raise data_error(where, "the path inside the archive may not contain '..'")
    root = extract_archive(archive, cache_dir, inside=inside, where=where).joinpath(*inside)
    if not root.is_dir():
        raise data_error(
            where, f"{'/'.join(inside)!r} inside {archive.name} is a file, not a folder"
        )
    return root


def _visible(entries: Sequence[os.DirEntry[str]]) -> list[os.DirEntry[str]]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _image_files(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        return [
            e.path
            for e in _visible(list(it))
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
        ]


def folder_source(root: Path, channels: int | None, where: str) -> Source:
    with os.scandir(root) as it:
        entries = _visible(list(it))
    class_dirs = [e for e in entries if e.is_dir()]
    files: list[str] = []
    labels_list: list[int] = []
    classes: list[str] | None = None
    if class_dirs:
        classes = [e.name for e in class_dirs]
        for label, entry in enumerate(class_dirs):
            found = _image_files(entry.path)
            files.extend(found)
            labels_list.extend([label] * len(found))
    if not files:
        files = _image_files(str(root))
        classes, labels_list = None, []
    if not files:
        nested = (
            f"; its subfolders hold folders, not images: point the spec one level deeper, e.g. "
            f"{root / class_dirs[0].name}"
            if class_dirs
            else ""
        )
        raise data_error(where, f"no images in {root} (one subfolder of images per class){nested}")
    labels = np.asarray(labels_list, dtype=np.int64) if classes is not None else None
    mode = "L" if channels == 1 else "RGB"

    def fetch(index: np.ndarray) -> np.ndarray | list[np.ndarray]:
        return _decode_images([files[i] for i in index], mode, where)

    return Source(len(files), labels, classes, 1.0 / 255.0, fetch)


def _decode_images(paths: Sequence[str], mode: str, where: str) -> list[np.ndarray]:
    """Decode image files to uint8 CHW arrays; Pillow in a loop is ~0.2 ms per CIFAR JPEG."""
    from PIL import Image

    started = time.perf_counter()
    images: list[np.ndarray] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert(mode))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise data_error(where, f"cannot read image {path} ({first_line(exc)})") from exc
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    logger.debug("decoded %d images in %.2f s", len(images), time.perf_counter() - started)
    return images
