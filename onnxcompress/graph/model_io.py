"""Load, validate and save ONNX model files.

Loading validates the file (protobuf, checker, opset, external-data paths confined to the
model's folder) and turns every problem into a one-line ``ModelLoadError``. Saving is atomic: a
temp file, then a rename.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir import external_data as ir_external_data

from onnxcompress.errors import ModelLoadError, ModelSaveError
from onnxcompress.graph.op_families import DEFAULT_DOMAINS

# Beyond this a protobuf cannot hold the weights inline; ONNX's limit is 2 GiB.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**25
# Opsets below 7 predate the broadcasting rules every exporter has used since 2017.
MIN_OPSET = 7
# Where load_model records the file a model came from (graph.meta is never serialized): error
# messages name that file instead of the graph's internal name.
SOURCE_PATH_META = "onnxcompress.source_path"
# The tensors load_model found in external files, so that their mapped pages can be let go even
# after a pass replaced them in the graph (copies made by clone_model share this list).
EXTERNAL_TENSORS_META = "onnxcompress.external_tensors"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load and validate an ONNX model file.

    Raises:
        ModelLoadError: the file is missing, empty, not ONNX, fails the checker, uses an opset
            or IR version this onnx does not know, or references external data that is missing
            or lies outside the model's folder.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types for garbage input
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from exc
    validate_proto(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{path}: the graph cannot be read ({_first_line(exc)})") from exc
    ir_external_data.set_base_dir(model.graph, str(path.parent))
    model.graph.meta[SOURCE_PATH_META] = str(path)
    model.graph.meta[EXTERNAL_TENSORS_META] = [
        value.const_value
        for value in model.graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    ]
    return model


def model_label(model: ir.Model) -> str:
    """How messages name a model: the file it was loaded from, else its graph's name."""
    source = model.graph.meta.get(SOURCE_PATH_META)
    return str(source) if source else (model.graph.name or "<model>")


def validate_proto(proto: onnx.ModelProto, path: Path) -> None:
    """Structural checks that make a model safe and meaningful to rewrite."""
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(f"{path}: not an ONNX model (no graph in the file)")
    if proto.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(
            f"{path}: IR version {proto.ir_version} is newer than this onnx supports "
            f"({onnx.IR_VERSION}); upgrade onnx or re-export with an older IR version"
        )
    default_opset = next(
        (o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS), None
    )
    max_opset = onnx.defs.onnx_opset_version()
    if default_opset is None:
        raise ModelLoadError(f"{path}: the model imports no default-domain opset")
    if not MIN_OPSET <= default_opset <= max_opset:
        raise ModelLoadError(
            f"{path}: opset {default_opset} is not supported (supported: {MIN_OPSET}..{max_opset})"
        )
    _check_external_data_locations(proto, path)
    has_external = any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in _iter_tensor_protos(proto.graph)
    )
    try:
        # Given a proto, the checker looks for external data in the cwd; given the path, beside
        # the model, where the files were checked above.
        onnx.checker.check_model(str(path) if has_external else proto)
    except Exception as exc:
        raise ModelLoadError(f"{path}: invalid ONNX model: {_first_line(exc)}") from exc


def _iter_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensor_protos(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensor_protos(sub)


def _check_external_data_locations(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse external data that is missing or escapes the model's folder.

    A hostile model could name ``../../etc/passwd`` or an absolute path as its weights file;
    reading it would leak another file's bytes into the output.
    """
    base = path.parent.resolve()
    for tensor in _iter_tensor_protos(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} has external data without a location"
            )
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} points its data at an absolute path {location!r}; "
                "external data must lie in the model's folder"
            )
        target = (base / location).resolve()
        if target != base and base not in target.parents:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} points its data outside the model's folder "
                f"({location!r}); refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{path}: external data file {location!r} for tensor {tensor.name!r} is missing"
            )
        if target.stat().st_nlink > 1:
            # A hard link passes every path check yet may be another file's bytes (onnx_ir
            # refuses to read it too, later and with a traceback).
            raise ModelLoadError(
                f"{path}: external data file {location!r} for tensor {tensor.name!r} is a hard "
                "link shared with another file; refusing to read it (copy the file instead)"
            )
        offset = int(info.get("offset", 0) or 0)
        length = int(info.get("length", 0) or 0)
        if offset + length > target.stat().st_size:
            raise ModelLoadError(
                f"{path}: external data for tensor {tensor.name!r} runs past the end of "
                f"{location!r}"
            )


def _first_line(exc: BaseException) -> str:
    # The checker spreads one message over several lines ("input 'w' of node:\nname: conv2
    # OpType: Conv\n is not output of any previous nodes"): joined, it names the node.
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def model_nbytes(model: ir.Model) -> int:
    """Bytes held by the model's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)


def publish(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename the finished temporary file ``tmp`` onto ``path``, readable as the umask says.

    ``tempfile.mkstemp`` creates owner-only (0600) files; what is published (a model, a
    report) is an ordinary file, so its mode is set from the umask first. The rename is atomic:
    readers see the old file or the whole new one.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    protect: tuple[str | os.PathLike[str], ...] = (),
) -> Path:
    """Write ``model`` to ``path`` atomically.

    The model goes to a temporary file in the destination folder first and is renamed over the
    destination only once complete, so a crash never leaves a partial file. Models whose weights
    exceed protobuf's 2 GiB limit get their weights in ``<name>.data`` beside the file.

    Args:
        overwrite: replace an existing file at ``path``; otherwise raise.
        protect: paths that must never be written (the user's input model).
    """
    path = Path(path)
    resolved = path.resolve()
    for other in protect:
        if Path(other).resolve() == resolved:
            raise ModelSaveError(
                f"{path}: refusing to overwrite the input model; choose another -o"
            )
    if path.exists() and not overwrite:
        raise ModelSaveError(f"{path}: already exists (pass --force to replace it)")
    if not path.parent.exists():
        raise ModelSaveError(f"{path}: the folder {path.parent} does not exist")
    # A model whose weights came in an external file keeps them in one: writing its tensors
    # "unmodified" would leave references relative to the input's folder, not the output's.
    external = model_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES or has_external_data(model)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = f"{path.name}.data"
    tmp_data = path.parent / f".{data_name}.tmp"
    try:
        if external:
            # The data file is referenced by name from the model, so it is written under a temp
            # name that the rename below turns into ``data_name``.
            ir.save(model, tmp, external_data=tmp_data.name)
            _rewrite_external_location(tmp, tmp_data.name, data_name)
            os.replace(tmp_data, path.parent / data_name)
        else:
            ir.save(model, tmp)
        publish(tmp, path)
    except OSError as exc:
        raise ModelSaveError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        for leftover in (tmp, tmp_data):
            if leftover.exists():
                leftover.unlink()
    return path


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer still reads its data from an external file."""
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for value in model.graph.initializers.values()
    )


def drop_resident_external_pages(model: ir.Model) -> None:
    """Let the kernel drop the pages of external weights this process has read.

    Weights in external files are memory-mapped; once read they count in the resident set
    until unmapped. The mapping is read-only and shared, so the pages can be dropped and are
    read back from the page cache on the next access, while arrays viewing them stay valid.
    Cuts a pass's peak memory by the model's size when the next step maps the file again
    (ONNX Runtime verifying against the input file).
    """
    import mmap

    tensors = [value.const_value for value in model.graph.initializers.values()]
    tensors += model.graph.meta.get(EXTERNAL_TENSORS_META, [])
    for tensor in tensors:
        raw = getattr(tensor, "raw", None) if isinstance(tensor, ir.ExternalTensor) else None
        if isinstance(raw, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            try:
                raw.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):  # closed, or the platform refuses: only a saving lost
                continue


def _rewrite_external_location(model_path: Path, old: str, new: str) -> None:
    proto = onnx.load(str(model_path), load_external_data=False)
    for tensor in _iter_tensor_protos(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    with open(model_path, "wb") as handle:
        handle.write(proto.SerializeToString())


def serialize_leaving_out(
    model: ir.Model, leave_out: Callable[[ir.TensorProtocol], bool], location: str
) -> tuple[onnx.ModelProto, list[tuple[str, ir.TensorProtocol]]]:
    """Serialize ``model`` without copying its big weights into the proto.

    Every initializer tensor ``leave_out`` picks is written as an external-data reference to
    ``location`` (offset 0, its own length), a placeholder for whoever reads the proto to fill
    in (ONNX Runtime's external initializers, a sparse stand-in for the checker). Other tensors
    still in external files are read in, since the reader has no folder to resolve them
    against. The model is unchanged afterwards; its tensors are swapped only while serializing.

    Returns:
        The proto and the (initializer name, tensor) pairs left out, in order.
    """
    left_out: list[tuple[ir.Value, ir.TensorProtocol]] = []
    inlined: list[tuple[ir.Value, ir.TensorProtocol]] = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not value.name:
            continue
        if leave_out(tensor):
            left_out.append((value, tensor))
        elif isinstance(tensor, ir.ExternalTensor):
            inlined.append((value, tensor))
    try:
        for value, tensor in inlined:
            value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name)
        for value, tensor in left_out:
            value.const_value = ir.ExternalTensor(
                location,
                0,
                tensor.nbytes,
                tensor.dtype,
                shape=ir.Shape([int(d) for d in tensor.shape.numpy()]),
                name=value.name or "",
            )
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in [*left_out, *inlined]:
            value.const_value = tensor
    return proto, [(value.name or "", tensor) for value, tensor in left_out]


def model_to_bytes(model: ir.Model) -> bytes:
    """Serialize for an in-memory ONNX Runtime session (models below 2 GiB).

    Weights still on disk (external data) are read into memory first: a session built from
    bytes has no folder to resolve external paths against.
    """
    if has_external_data(model):
        ir_external_data.load_to_model(model)
    return ir.serde.serialize_model(model).SerializeToString()


def clone_model(model: ir.Model) -> ir.Model:
    """A deep, independent copy (weights included).

    The copy no longer claims to be the file the original was loaded from: messages about it
    name its graph instead.
    """
    copy = model.clone()
    copy.graph.meta.pop(SOURCE_PATH_META, None)
    return copy
