"""The input shapes a model is counted at: concrete dims for inputs exported with symbolic ones.

Detectors and segmenters are exported with symbolic height and width; their MACs depend on the
size they run at. These fix the inputs for good (``inspect --shape``) or for one count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import onnx_ir as ir

# Where a model records the input shapes its MACs are counted at (``count_macs_at``): graph
# metadata, which is never saved with the model and which a clone carries.
COUNTED_AT_META = "onnxcompress.counted_at"


def symbolic_dims(model: ir.Model) -> dict[str, list[str]]:
    """Graph inputs whose dims beyond the first (the batch axis) are symbolic or unknown."""
    found: dict[str, list[str]] = {}
    initializers = set(model.graph.initializers)
    for value in model.graph.inputs:
        if value.name in initializers or value.shape is None:
            continue
        dims = [str(d) if d is not None else "?" for d in list(value.shape)[1:]]
        symbolic = [
            d
            for d, raw in zip(dims, list(value.shape)[1:], strict=True)
            if not isinstance(raw, int)
        ]
        if symbolic:
            found[str(value.name)] = symbolic
    return found


def fix_input_shapes(
    model: ir.Model, shapes: dict[str, tuple[int, ...]], source: object = "model"
) -> None:
    """Give graph inputs concrete dims and re-infer every shape inside the graph from them.

    Raises:
        DataError: a name that is not a graph input, or dims of the wrong rank.
    """
    from onnxcompress.errors import DataError
    from onnxcompress.graph.canonicalize import infer_shapes

    graph = model.graph
    inputs = {str(value.name): value for value in graph.inputs}
    for name, dims in shapes.items():
        value = inputs.get(name)
        if value is None:
            raise DataError(
                f"{source}: --shape names {name!r}, not an input (inputs: {', '.join(inputs)})"
            )
        if value.shape is not None and len(value.shape) != len(dims):
            raise DataError(
                f"{source}: --shape {name} has {len(dims)} dims, the input has {len(value.shape)}"
            )
        value.shape = ir.Shape(dims)
    # Shapes inferred from the symbolic dims would be merged, not replaced: start afresh.
    initializers = set(graph.initializers)
    for node in graph:
        for out in node.outputs:
            if not out.is_graph_output() and out.name not in initializers:
                out.shape = None
    infer_shapes(model)


def count_macs_at(model: ir.Model, shapes: Mapping[str, Sequence[int]] | None) -> None:
    """Count ``model``'s MACs at these input shapes from now on (None: at its own shapes).

    Every :func:`model_metrics` of the model (and of its clones) then counts with the named
    inputs fixed to ``shapes``; the model itself keeps its symbolic dims.
    """
    if shapes:
        model.graph.meta[COUNTED_AT_META] = {
            str(name): tuple(int(d) for d in dims) for name, dims in shapes.items()
        }
    else:
        model.graph.meta.pop(COUNTED_AT_META, None)


def counted_at(model: ir.Model) -> dict[str, tuple[int, ...]] | None:
    """The input shapes ``count_macs_at`` recorded on ``model``, or None."""
    shapes = model.graph.meta.get(COUNTED_AT_META)
    return dict(shapes) if shapes else None


def shapes_differ(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether fixing the inputs to ``shapes`` would change any input's dims."""
    inputs = {str(value.name): value for value in model.graph.inputs}
    for name, dims in shapes.items():
        value = inputs.get(name)
        if value is None or value.shape is None:
            return True
        if tuple(value.shape) != tuple(dims):
            return True
    return False


def _all_values(model: ir.Model) -> Iterator[ir.Value]:
    for graph in model.graphs():
        yield from graph.inputs
        yield from graph.initializers.values()
        for node in graph:
            yield from node.outputs
        yield from graph.outputs


@contextlib.contextmanager
def shapes_fixed(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> Iterator[ir.Model]:
    """Within the block the named inputs have ``shapes`` and every shape in the graph follows
    from them; on leaving, every value has the shape and type it had. For counting and reading
    shapes only: values a block creates would keep the fixed shapes.

    Raises:
        DataError: a name that is not a graph input, or dims of the wrong rank.
    """
    saved = [(value, value.shape, value.type) for value in _all_values(model)]
    try:
        fix_input_shapes(model, {name: tuple(dims) for name, dims in shapes.items()})
        yield model
    finally:
        for value, shape, type_ in saved:
            value.shape = shape
            value.type = type_


def spatial_dims_open(model: ir.Model) -> dict[str, list[str]]:
    """Graph inputs whose dims beyond the batch axis stay symbolic once the model's recorded
    counting shapes (``count_macs_at``) are applied: where MACs cannot be counted honestly."""
    shapes = counted_at(model) or {}
    return {name: dims for name, dims in symbolic_dims(model).items() if name not in shapes}


def counting_shapes(
    model: ir.Model,
    given: Mapping[str, Sequence[int]] | None,
    data_dims: Sequence[int] | None,
    source: object = "model",
) -> dict[str, tuple[int, ...]]:
    """The input shapes to count ``model``'s MACs at, for the inputs whose height, width (or
    any dim past the batch) are symbolic: ``given`` (``--shape``) first, else the first input
    takes the calibration data's dims ``data_dims`` at batch 1. Inputs left out keep their own
    shapes (a symbolic batch alone counts as 1, MACs per image).

    Raises:
        DataError: ``given`` names something that is not an input, has the wrong rank, or
            contradicts a dim the model fixes (the batch aside).
    """
    from onnxcompress.errors import DataError

    inputs = [value for value in model.graph.inputs if not value.is_initializer()]
    by_name = {str(value.name): value for value in inputs}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in (given or {}).items():
        value = by_name.get(name)
        if value is None:
            raise DataError(
                f"{source}: --shape names {name!r}, not an input (inputs: {', '.join(by_name)})"
            )
        own = list(value.shape) if value.shape is not None else None
        if own is not None and len(own) != len(dims):
            raise DataError(
                f"{source}: --shape {name} has {len(dims)} dims, the input has {len(own)}"
            )
        for axis, (mine, theirs) in enumerate(zip(own or [], dims, strict=True)):
            if axis > 0 and isinstance(mine, int) and mine != theirs:
                raise DataError(
                    f"{source}: --shape {name}={'x'.join(map(str, dims))} contradicts the "
                    f"model, whose dim {axis} is {mine}"
                )
        shapes[name] = tuple(int(d) for d in dims)
    symbolic = symbolic_dims(model)
    if inputs and data_dims is not None:
        first, name = inputs[0], str(inputs[0].name)
        fits = first.shape is not None and len(first.shape) == len(data_dims)
        if name in symbolic and name not in shapes and fits:
            shapes[name] = (1, *(int(d) for d in data_dims[1:]))
    return shapes


@contextlib.contextmanager
def at_counted_shapes(model: ir.Model) -> Iterator[ir.Model]:
    """``shapes_fixed`` at the shapes ``count_macs_at`` recorded on ``model`` (nothing changes
    when it recorded none): for code that reads layer shapes to plan in MACs."""
    shapes = counted_at(model)
    if not shapes or not shapes_differ(model, shapes):
        yield model
        return
    with shapes_fixed(model, shapes):
        yield model


def shapes_text(shapes: Mapping[str, Sequence[int]] | None) -> str:
    """``input=1x3x224x224`` (comma-separated), as ``--shape`` takes them; ``-`` for none."""
    if not shapes:
        return "-"
    return ", ".join(f"{name}={'x'.join(map(str, dims))}" for name, dims in shapes.items())
