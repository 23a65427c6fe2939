"""Tar archives of image folders, extracted once and safely (plain files and folders only, no
escaping paths, size and member caps) into a cache keyed by the archive's path, size and mtime."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from onnxcompress.data.messages import data_error, first_line

logger = logging.getLogger(__name__)

# An archive that decompresses past this is more likely a bomb than a dataset; raise the cap
# deliberately for ImageNet-sized trees.
MAX_ARCHIVE_BYTES = 4 * 2**30
# Ten times CIFAR-10's 60,000 files; tar headers alone could otherwise exhaust inodes.
MAX_ARCHIVE_MEMBERS = 1_000_000
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def default_cache_dir() -> Path:
    """Where archives are extracted: ``$ONNXCOMPRESS_CACHE/datasets``, else
    ``$XDG_CACHE_HOME/onnxcompress/datasets``, else ``~/.cache/onnxcompress/datasets``."""
    root = os.environ.get("ONNXCOMPRESS_CACHE")
    if root:
        return Path(root).expanduser() / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "onnxcompress" / "datasets"


def extract_archive(
    archive: Path, cache_dir: Path | None = None, *, inside: Sequence[str] = (), where: str = ""
) -> Path:
    """Extract a tar archive (or only its folder ``inside``) once into the cache.

    Members keep their paths, so the wanted folder is ``result.joinpath(*inside)``. The cache
    entry is named after the archive's absolute path, size and mtime (a changed archive is
    extracted afresh) and the folder extracted; an entry holding an enclosing folder, or the
    whole archive, is reused. Extraction goes to a temp folder renamed into place at the end:
    a crash leaves no half-filled entry, and concurrent extractions both succeed. Every member
    is checked, also those outside ``inside``.

    Raises:
        DataError: the archive is unreadable, has no folder ``inside``, or holds a member that
            is not a plain file or folder, whose path is absolute or climbs out with '..', or
            it exceeds MAX_ARCHIVE_BYTES or MAX_ARCHIVE_MEMBERS; or the cache is not writable.
    """
    where = where or str(archive)
    archive = archive.expanduser().resolve()
    stat = archive.stat()
    key = _sha(f"{archive}\0{stat.st_size}\0{stat.st_mtime_ns}")
    root = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    prefix = tuple(part for part in inside if part not in ("", "."))

    def entry(depth: int) -> Path:
        return root / (key if depth == 0 else f"{key}-{_sha('/'.join(prefix[:depth]))[:12]}")

    for depth in range(len(prefix) + 1):
        if entry(depth).is_dir():
            logger.debug("data %s: reusing %s", where, entry(depth))
            return entry(depth)
    final = entry(len(prefix))
    shown = "/".join((archive.name, *prefix))
    logger.info("data %s: extracting %s into %s (once)", where, shown, final)
    started = time.perf_counter()
    partial: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=root))
        _extract_into(archive, partial, prefix, where)
        try:
            os.rename(partial, final)
        except OSError:
            if not final.is_dir():
                raise
            logger.debug("data %s: another process extracted %s first", where, shown)
    except OSError as exc:
        raise data_error(
            where,
            f"cannot write the extraction cache {root} ({first_line(exc)}); set "
            "ONNXCOMPRESS_CACHE to a writable folder",
        ) from exc
    finally:
        if partial is not None and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    logger.info("data %s: extracted in %.1f s", where, time.perf_counter() - started)
    return final


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "FIFO"
    if member.issparse():
        return "sparse file"
    return "special member"


def _member_parts(name: str, where: str) -> tuple[str, ...]:
    """The path components of a member, refusing any path that could leave the target folder."""
    # Plain string splitting: PurePosixPath costs seconds on a 60,000-member archive.
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise data_error(
            where, f"archive member {name!r} has an absolute path; refusing to extract"
        )
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise data_error(
            where, f"archive member {name!r} climbs out with '..'; refusing to extract"
        )
    return parts


def _extract_into(archive: Path, dest: Path, prefix: tuple[str, ...], where: str) -> None:
    """Stream the members under ``prefix`` into ``dest``, creating only folders and files.

    Links and devices are refused rather than skipped: a dataset never needs them, and an
    archive that has them was not made for this.
    """
    members = 0
    total = 0
    extracted = 0
    top_level: set[str] = set()
    made: set[Path] = set()
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                members += 1
                if members > MAX_ARCHIVE_MEMBERS:
                    raise data_error(
                        where, f"{archive.name} has more than {MAX_ARCHIVE_MEMBERS} members"
                    )
                parts = _member_parts(member.name, where)
                if parts:
                    top_level.add(parts[0])
                if member.isdir():
                    # Made even when empty: an empty class folder still takes a label.
                    if parts[: len(prefix)] == prefix:
                        dest.joinpath(*parts).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isreg() or member.issparse() or not parts:
                    raise data_error(
                        where,
                        f"archive member {member.name!r} is a {_member_kind(member)}; only "
                        "plain files and folders are extracted",
                    )
                total += member.size
                if total > MAX_ARCHIVE_BYTES:
                    raise data_error(
                        where,
                        f"{archive.name} unpacks to more than {MAX_ARCHIVE_BYTES} bytes "
                        "(onnxcompress.data.archive.MAX_ARCHIVE_BYTES)",
                    )
                if parts[: len(prefix)] != prefix:
                    continue
                if parts == prefix:
                    raise data_error(
                        where, f"{'/'.join(prefix)!r} inside {archive.name} is a file, not a folder"
                    )
                target = dest.joinpath(*parts)
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - isreg() members always have data
                    continue
                with source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
                extracted += 1
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise data_error(
            where, f"{archive} is not a readable tar archive ({first_line(exc)})"
        ) from exc
    if prefix and not extracted:
        raise data_error(
            where,
            f"no folder {'/'.join(prefix)!r} with files inside {archive.name}; its top level "
            f"holds {sorted(top_level)[:10]}",
        )
