"""Graph-level layer resection: which parts of a CNN can be cut out, and the cut itself.

The ``resect`` pass ranks and trains; this module finds its candidates on the ONNX graph
(residual branches, whole blocks, chain layers) and rewires the graph through ``onnx_ir``'s
def-use API. Bridge convolutions are fitted in closed form on activations, which takes ONNX
Runtime: that lives above this layer (``onnxcompress.passes.resect_bridge``) and comes in as a
``BridgeFitter``.

Three kinds of candidate, found by structure rather than by model name:

``branch``
    The residual branch of a block whose shortcut is the identity: ``Add(x, F(x))``. The
    branch's nodes and the Add go; the Add's readers read ``x``.
``block``
    A whole residual block (branch, non-identity shortcut, Add) between its entry ``x`` and its
    Add output. Equal shapes: the neighbours are connected directly; otherwise a **bridge**
    (1x1 Conv with the block's stride, in -> out channels) replaces it.
``layer``
    A compute layer (Conv, Gemm, MatMul with a constant weight) with the elementwise ops that
    only it feeds (BatchNormalization, activations). Equal shapes: direct connection; a
    channel- or stride-changing Conv gets a bridge.

A part is a candidate only if it is closed (nothing outside reads its inner tensors), its output
is not a graph output, the user did not exclude it, and the replacement reproduces its output
shape; every other part is declined with the reason.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from onnxcompress.graph.edits import drop_unused_initializers, fresh_name, new_initializer
from onnxcompress.graph.model_io import clone_model
from onnxcompress.graph.op_families import COMPUTE_OPS, DEFAULT_DOMAINS

logger = logging.getLogger(__name__)

KINDS = ("branch", "block", "layer")
# ``target_layers`` counts COMPUTE_OPS (graph.op_families), the ops that hold weights and MACs.
# Heads of ``layer`` candidates.
LAYER_OPS = frozenset({"Conv", "Gemm", "MatMul"})
# Elementwise ops that belong to the layer before them when only that layer feeds them (their
# other inputs constant): removing the layer removes them too.
TRAILING_OPS = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Clip",
        "Sigmoid",
        "Tanh",
        "HardSigmoid",
        "HardSwish",
        "Elu",
        "Selu",
        "Softplus",
        "Gelu",
        "PRelu",
        "BatchNormalization",
        "Add",
        "Sub",
        "Mul",
        "Div",
    }
)
# Ops whose second application changes nothing: Relu(Relu(x)) after a cut is dropped.
IDEMPOTENT_OPS = frozenset({"Relu"})
# A block larger than this many nodes is not searched further (keeps the search linear).
MAX_BLOCK_NODES = 256
BRIDGE_MARK = "onnxcompress.resect"


@dataclasses.dataclass
class Candidate:
    """A part of the graph that can be resected, and how.

    Attributes:
        key: stable identifier across edits of other parts: ``kind:exit tensor name``.
        kind: ``branch``, ``block`` or ``layer``.
        action: ``shortcut`` (readers read the shortcut), ``direct`` (readers read the entry)
            or ``bridge`` (a 1x1 Conv maps the entry to the exit's shape).
        entry: the tensor the part reads.
        exit: the tensor the part produces (its readers get the replacement).
        nodes: the nodes removed.
        stride: the bridge's stride (1, 1 when there is no bridge).
        in_channels / out_channels: channels of entry and exit (None for non-NCHW tensors).
        layers_removed: compute layers removed, minus the bridge.
        macs_removed: MACs (batch 1) removed, minus the bridge's.
        params_removed: parameters removed, minus the bridge's.
    """

    key: str
    kind: str
    action: str
    entry: ir.Value
    exit: ir.Value
    nodes: list[ir.Node]
    stride: tuple[int, int]
    in_channels: int | None
    out_channels: int | None
    layers_removed: int
    macs_removed: int
    params_removed: int

    @property
    def node_names(self) -> list[str]:
        return [node.name or node.op_type for node in self.nodes]

    def as_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "kind": self.kind,
            "action": self.action,
            "entry": self.entry.name,
            "exit": self.exit.name,
            "nodes": self.node_names,
            "stride": list(self.stride),
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "layers_removed": self.layers_removed,
            "macs_removed": self.macs_removed,
            "params_removed": self.params_removed,
        }


@dataclasses.dataclass
class CandidateSearch:
    """Every candidate of a graph, and every part that is not one, with the reason."""

    candidates: list[Candidate]
    declined: list[tuple[str, str]]

    def by_key(self) -> dict[str, Candidate]:
        return {c.key: c for c in self.candidates}


@dataclasses.dataclass
class BridgeFit:
    """A bridge's weights from the closed-form ridge fit.

    Attributes:
        weight: ``[Cout, Cin, 1, 1]``.
        bias: ``[Cout]``.
        r2: fraction of the target's variance (around its channel means) the fit explains on
            the calibration data.
        positions: how many (image, position) rows the fit used.
    """

    weight: np.ndarray
    bias: np.ndarray
    r2: float
    positions: int


# Fits the bridge of a cut: (model read at the entry, entry tensor, model whose exit tensor the
# bridge reproduces, exit tensor, stride) -> its weights.
BridgeFitter = Callable[[ir.Model, str, ir.Model, str, tuple[int, int]], BridgeFit]


@dataclasses.dataclass
class Resection:
    """What one cut did to a graph, for training and the report.

    Attributes:
        key: the candidate's key.
        teacher_tensor: the original network's tensor at the cut (the exit's name).
        student_tensor: the tensor the exit's readers now read (the bridge output keeps the
            exit's name; a shortcut or direct connection is the entry).
        bridge: name of the bridge node, if one was inserted.
        neighbours: names of the compute nodes next to the cut (they and the bridge learn in
            layer-level learning).
        removed: names of the nodes removed (the dropped repeated Relu included).
        fit_r2: the bridge fit's explained variance, if a bridge was fitted.
    """

    key: str
    teacher_tensor: str
    student_tensor: str
    bridge: str | None
    neighbours: list[str]
    removed: list[str]
    fit_r2: float | None = None


# ---------------------------------------------------------------------------------------------
# Candidate search
# ---------------------------------------------------------------------------------------------


def _label(node: ir.Node, position: dict[int, int]) -> str:
    return node.name or f"#{position.get(id(node), -1)}:{node.op_type}"


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _feature_dims(value: ir.Value) -> tuple[int, ...] | None:
    """Static dims after the batch axis, or None when any is unknown."""
    if value.shape is None or len(value.shape) < 2:
        return None
    dims = tuple(value.shape.dims[1:])
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(int(d) for d in dims)  # type: ignore[arg-type]


def _is_bridge(node: ir.Node) -> bool:
    return node.metadata_props.get(BRIDGE_MARK) == "bridge"


def _float_params(nodes: Iterable[ir.Node]) -> int:
    """Float initializer elements read by ``nodes`` and by nothing else."""
    members = {id(n) for n in nodes}
    seen: set[int] = set()
    total = 0
    for node in nodes:
        for value in node.inputs:
            if value is None or id(value) in seen or value.const_value is None:
                continue
            seen.add(id(value))
            if not value.const_value.dtype.is_floating_point():
                continue
            if all(id(user) in members for user, _ in value.uses()):
                total += int(np.prod(value.const_value.shape.numpy(), dtype=np.int64))
    return total


def _bridge_plan(entry: ir.Value, exit_: ir.Value) -> tuple[str, tuple[int, int], str | None]:
    """(action, stride, reason it is impossible) for replacing entry -> exit."""
    din, dout = _feature_dims(entry), _feature_dims(exit_)
    if din is None or dout is None:
        return "", (1, 1), "input or output shape unknown (run shape inference first)"
    if din == dout:
        return "direct", (1, 1), None
    if len(din) != 3 or len(dout) != 3:
        return (
            "",
            (1, 1),
            f"shape changes {list(din)} -> {list(dout)}; a bridge is a 1x1 Conv over NCHW tensors",
        )
    stride = []
    for size_in, size_out in zip(din[1:], dout[1:], strict=True):
        s = max(1, round(size_in / max(size_out, 1)))
        if size_out < 1 or -(-size_in // s) != size_out:
            return (
                "",
                (1, 1),
                f"spatial size {din[1]}x{din[2]} -> {dout[1]}x{dout[2]} is not what a strided "
                "1x1 bridge produces",
            )
        stride.append(s)
    return "bridge", (stride[0], stride[1]), None


def _compute_layers(nodes: Iterable[ir.Node]) -> int:
    return sum(1 for n in nodes if n.op_type in COMPUTE_OPS and n.domain in DEFAULT_DOMAINS)


def _make_candidate(
    key: str, kind: str, entry: ir.Value, exit_: ir.Value, nodes: list[ir.Node], action: str,
    stride: tuple[int, int],
) -> Candidate:  # fmt: skip
    from onnxcompress.graph.metrics import node_macs

    din, dout = _feature_dims(entry), _feature_dims(exit_)
    cin = din[0] if din is not None and len(din) == 3 else None
    cout = dout[0] if dout is not None and len(dout) == 3 else None
    macs = sum(node_macs(n) for n in nodes)
    params = _float_params(nodes)
    layers = _compute_layers(nodes)
    if action == "bridge":
        assert cin is not None and cout is not None and dout is not None
        macs -= cin * cout * dout[1] * dout[2]
        params -= cin * cout + cout
        layers -= 1
    return Candidate(
        key=key,
        kind=kind,
        action=action,
        entry=entry,
        exit=exit_,
        nodes=nodes,
        stride=stride,
        in_channels=cin,
        out_channels=cout,
        layers_removed=layers,
        macs_removed=macs,
        params_removed=params,
    )


def _closed(nodes: Sequence[ir.Node], exit_: ir.Value) -> str | None:
    """Why the part is not closed (an inner tensor read outside or a graph output), or None."""
    members = {id(n) for n in nodes}
    for node in nodes:
        for out in node.outputs:
            if out is exit_:
                continue
            if out.is_graph_output():
                return f"inner tensor {out.name!r} is a graph output"
            outside = [user for user, _ in out.uses() if id(user) not in members]
            if outside:
                reader = outside[0].name or outside[0].op_type
                return f"inner tensor {out.name!r} is also read by {reader}"
    return None


def _block_region(
    add: ir.Node, position: dict[int, int]
) -> tuple[ir.Value | None, list[ir.Node], str | None]:
    """The single-entry region that ends at ``add``: (entry, nodes in order, failure reason).

    Walks back from the Add's operands, always expanding the tensor produced latest, until one
    tensor is left: the nearest point every path into the Add starts from.
    """
    frontier: dict[int, ir.Value] = {}
    for value in add.inputs:
        if not _is_constant(value):
            assert value is not None
            frontier[id(value)] = value
    region: list[ir.Node] = [add]
    members = {id(add)}

    def produced_at(value: ir.Value) -> int:
        producer = value.producer()
        return position.get(id(producer), -1) if producer is not None else -1

    while len(frontier) > 1:
        value = max(frontier.values(), key=produced_at)
        producer = value.producer()
        if producer is None:
            return None, [], f"its operands do not meet before the graph input {value.name!r}"
        del frontier[id(value)]
        if id(producer) in members:
            continue
        region.append(producer)
        members.add(id(producer))
        if len(region) > MAX_BLOCK_NODES:
            return None, [], f"its operands do not meet within {MAX_BLOCK_NODES} nodes"
        for inp in producer.inputs:
            if not _is_constant(inp):
                assert inp is not None
                frontier[id(inp)] = inp
    if not frontier:
        return None, [], "it adds constants only"
    entry = next(iter(frontier.values()))
    region.sort(key=lambda n: position.get(id(n), -1))
    return entry, region, None


def _residual_candidate(
    add: ir.Node, position: dict[int, int], kinds: Sequence[str]
) -> tuple[Candidate | None, str]:
    """A ``branch`` or ``block`` candidate ending at ``add``, or the reason there is none."""
    operands = [v for v in add.inputs if not _is_constant(v)]
    if len(add.inputs) != 2 or len(operands) != 2:
        return None, "not a residual Add (one operand is constant)"
    exit_ = add.outputs[0]
    entry, region, reason = _block_region(add, position)
    if entry is None:
        return None, f"no residual block: {reason}"
    if len(region) < 2:
        return None, "no residual block: both operands are the same tensor"
    if exit_.is_graph_output():
        return None, f"its output {exit_.name!r} is a graph output"
    identity = any(v is entry for v in add.inputs)
    if identity:
        if "branch" not in kinds:
            return None, "residual branch (kind 'branch' not requested)"
        shortcut_dims, out_dims = _feature_dims(entry), _feature_dims(exit_)
        if shortcut_dims is None or shortcut_dims != out_dims:
            return None, "the identity shortcut's shape differs from the block output (broadcast)"
        reason_closed = _closed(region, exit_)
        if reason_closed is not None:
            return None, f"branch not removable: {reason_closed}"
        key = f"branch:{exit_.name}"
        return _make_candidate(key, "branch", entry, exit_, region, "shortcut", (1, 1)), ""
    if "block" not in kinds:
        return None, "residual block with a projection shortcut (kind 'block' not requested)"
    reason_closed = _closed(region, exit_)
    if reason_closed is not None:
        return None, f"block not removable: {reason_closed}"
    action, stride, reason = _bridge_plan(entry, exit_)
    if reason is not None:
        return None, f"block not replaceable: {reason}"
    key = f"block:{exit_.name}"
    return _make_candidate(key, "block", entry, exit_, region, action, stride), ""


def _layer_candidate(node: ir.Node) -> tuple[Candidate | None, str]:
    """A ``layer`` candidate headed by compute node ``node``, or the reason there is none."""
    if node.op_type in ("Gemm", "MatMul") and not all(_is_constant(v) for v in node.inputs[1:]):
        return None, "its weight is computed, not a constant"
    if node.op_type == "Conv" and not _is_constant(
        node.inputs[1] if len(node.inputs) > 1 else None
    ):
        return None, "its weight is computed, not a constant"
    entry = node.inputs[0]
    if entry is None or _is_constant(entry):
        return None, "its data input is a constant"
    nodes = [node]
    current = node.outputs[0]
    while not current.is_graph_output():
        uses = list(current.uses())
        if len(uses) != 1:
            break
        user, index = uses[0]
        if user.op_type not in TRAILING_OPS or user.domain not in DEFAULT_DOMAINS or index != 0:
            break
        if not all(_is_constant(v) for v in user.inputs[1:]) or len(user.outputs) != 1:
            break
        nodes.append(user)
        current = user.outputs[0]
    if current.is_graph_output():
        return None, f"its output {current.name!r} is a graph output"
    action, stride, reason = _bridge_plan(entry, current)
    if reason is not None:
        return None, reason
    if action == "bridge" and node.op_type != "Conv":
        return None, "a shape-changing non-Conv layer cannot take a 1x1 Conv bridge"
    key = f"layer:{current.name}"
    candidate = _make_candidate(key, "layer", entry, current, nodes, action, stride)
    if action == "bridge" and candidate.macs_removed <= 0:
        return None, "the bridge would cost as many MACs as the layer (already 1x1)"
    return candidate, ""


def find_candidates(
    model: ir.Model,
    *,
    kinds: Sequence[str] = KINDS,
    exclude: Sequence[str] = (),
) -> CandidateSearch:
    """Every part of ``model`` that can be resected, and the reason for each that cannot.

    Shapes must be on the graph (``onnxcompress.graph.canonicalize.infer_shapes``). Node names
    matching an ``exclude`` pattern (fnmatch) are never removed. Where height and width are
    symbolic, sizes and MACs are read at the input shapes MACs are counted at
    (``input_shapes.count_macs_at``), so a candidate's ``macs_removed`` is what it costs there.
    """
    from onnxcompress.graph.input_shapes import at_counted_shapes

    with at_counted_shapes(model):
        return _find_candidates(model, kinds, exclude)


def _find_candidates(
    model: ir.Model, kinds: Sequence[str], exclude: Sequence[str]
) -> CandidateSearch:
    graph = model.graph
    nodes = list(graph)
    position = {id(node): i for i, node in enumerate(nodes)}
    candidates: list[Candidate] = []
    declined: list[tuple[str, str]] = []
    covered: set[int] = set()

    def excluded(part: Candidate) -> str | None:
        for name in part.node_names:
            for pattern in exclude:
                if fnmatch.fnmatchcase(name, pattern):
                    return f"{name} is excluded by the user (exclude={pattern})"
        return None

    for node in nodes:
        if node.domain not in DEFAULT_DOMAINS or node.op_type != "Add":
            continue
        candidate, reason = _residual_candidate(node, position, kinds)
        if candidate is not None:
            reason = excluded(candidate) or ""
            if not reason:
                candidates.append(candidate)
                covered.update(id(n) for n in candidate.nodes)
                continue
        # Bias adds and the like are not worth listing: only Adds of two computed tensors.
        if len([v for v in node.inputs if not _is_constant(v)]) == 2:
            declined.append((_label(node, position), f"block at this Add: {reason}"))
    for node in nodes:
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in LAYER_OPS:
            continue
        if _is_bridge(node):
            declined.append((_label(node, position), "a bridge inserted by resect"))
            continue
        if "layer" not in kinds:
            if id(node) not in covered:
                declined.append((_label(node, position), "kind 'layer' not requested"))
            continue
        candidate, reason = _layer_candidate(node)
        if candidate is not None:
            reason = excluded(candidate) or ""
            if not reason:
                candidates.append(candidate)
                continue
        declined.append((_label(node, position), f"layer: {reason}"))
    return CandidateSearch(candidates, declined)


def compute_layer_count(model: ir.Model) -> int:
    """Compute layers (Conv, ConvTranspose, Gemm, MatMul) of the model."""
    return _compute_layers(model.graph)


def residual_add_count(model: ir.Model) -> int:
    """Adds of two computed tensors: one per residual block of a ResNet-style graph."""
    return sum(
        1
        for node in model.graph
        if node.op_type == "Add"
        and node.domain in DEFAULT_DOMAINS
        and sum(not _is_constant(v) for v in node.inputs) == 2
    )


def shared_feature_maps(teacher: ir.Model, student: ir.Model) -> list[tuple[str, str]]:
    """Hint pairs for distilling ``student`` (a resected ``teacher``) at its feature maps.

    For every feature-map shape (channels, height, width) that a convolution of the student
    produces, the last tensor of that shape (in graph order) that the teacher also computes
    under the same name and shape: in a CNN these are the outputs of its stages (resolutions).
    Cuts keep the names of the tensors they do not remove, so equal names are the same point
    of the two networks. Graph outputs are left out, and so are shapes no convolution makes
    (pooled features, the slices of a parameter-free shortcut).
    """

    def feature_shape(value: ir.Value) -> tuple[int, ...] | None:
        shape = value.shape
        if shape is None or len(shape) != 4:
            return None
        dims = tuple(shape)[1:]
        return dims if all(isinstance(d, int) for d in dims) else None  # type: ignore[return-value]

    in_teacher: dict[str, tuple[int, ...]] = {}
    for node in teacher.graph:
        for out in node.outputs:
            dims = feature_shape(out)
            if out.name and dims is not None and not out.is_graph_output():
                in_teacher[out.name] = dims
    conv_shapes = {
        dims
        for node in student.graph
        if node.op_type in ("Conv", "ConvTranspose") and node.domain in DEFAULT_DOMAINS
        for dims in [feature_shape(node.outputs[0])]
        if dims is not None
    }
    last: dict[tuple[int, ...], str] = {}
    for node in student.graph:
        for out in node.outputs:
            dims = feature_shape(out)
            if (
                out.name
                and dims is not None
                and not out.is_graph_output()
                and dims in conv_shapes
                and in_teacher.get(out.name) == dims
            ):
                last[dims] = out.name
    return [(name, name) for name in last.values()]


# ---------------------------------------------------------------------------------------------
# The cut
# ---------------------------------------------------------------------------------------------


def _compute_neighbours(start: ir.Value, forward: bool) -> list[ir.Node]:
    """The nearest compute nodes before (``forward=False``) or after a tensor.

    The walk crosses at most one merge (a node with several computed inputs, e.g. a residual
    Add): beyond it lie the layers of other blocks, which are not the cut's neighbours.
    """
    found: list[ir.Node] = []
    seen: set[int] = set()
    stack: list[tuple[ir.Value, int]] = [(start, 0)]
    while stack and len(seen) < 64:
        value, merges = stack.pop()
        if forward:
            nexts = [user for user, _ in value.uses()]
        else:
            producer = value.producer()
            nexts = [producer] if producer is not None else []
        for node in nexts:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in COMPUTE_OPS and node.domain in DEFAULT_DOMAINS:
                found.append(node)
                continue
            computed = [v for v in node.inputs if not _is_constant(v)]
            crossed = merges + (1 if len(computed) > 1 else 0)
            if crossed > 1:
                continue
            following = node.outputs if forward else computed
            stack.extend((v, crossed) for v in following if v is not None)
    return found


def _drop_repeated_idempotent(graph: ir.Graph, value: ir.Value) -> list[str]:
    """Remove ``Relu(value)`` readers when ``value`` is itself a Relu output (a no-op now)."""
    producer = value.producer()
    if producer is None or producer.op_type not in IDEMPOTENT_OPS:
        return []
    removed = []
    for user, index in list(value.uses()):
        if user.op_type != producer.op_type or index != 0 or user.domain != producer.domain:
            continue
        out = user.outputs[0]
        if out.is_graph_output():
            continue
        out.replace_all_uses_with(value)
        graph.remove(user, safe=True)
        removed.append(user.name or user.op_type)
    return removed


def apply_resection(
    model: ir.Model, candidate: Candidate, bridge: BridgeFit | None = None
) -> Resection:
    """Cut ``candidate`` out of ``model`` (in place), inserting the bridge when it has one.

    The bridge's output keeps the exit tensor's name, so the tensors downstream keep theirs.
    The candidate must come from ``find_candidates`` on this very model.

    Raises:
        ValueError: a bridge candidate without a fit, or a fit of the wrong shape.
    """
    graph = model.graph
    entry, exit_ = candidate.entry, candidate.exit
    exit_name = exit_.name or ""
    removed = [n.name or n.op_type for n in candidate.nodes]
    bridge_name: str | None = None
    fit_r2: float | None = None
    if candidate.action == "bridge":
        if bridge is None:
            raise ValueError(f"{candidate.key}: a bridge candidate needs a BridgeFit")
        expected = (candidate.out_channels, candidate.in_channels, 1, 1)
        if bridge.weight.shape != expected:
            raise ValueError(
                f"{candidate.key}: bridge weight {bridge.weight.shape}, expected {expected}"
            )
        base = (candidate.nodes[-1].name or exit_name).rstrip("/") or "resect"
        weight = new_initializer(graph, f"{base}/resect_bridge.weight", bridge.weight)
        bias = new_initializer(graph, f"{base}/resect_bridge.bias", bridge.bias)
        exit_.name = fresh_name(graph, f"{exit_name}__resected")
        output = ir.Value(name=exit_name, shape=exit_.shape, type=exit_.type)
        bridge_name = fresh_name(graph, f"{base}/resect_bridge")
        node = ir.Node(
            "",
            "Conv",
            [entry, weight, bias],
            attributes=[
                ir.AttrInt64s("kernel_shape", [1, 1]),
                ir.AttrInt64s("strides", list(candidate.stride)),
                ir.AttrInt64s("pads", [0, 0, 0, 0]),
                ir.AttrInt64s("dilations", [1, 1]),
                ir.AttrInt64("group", 1),
            ],
            outputs=[output],
            name=bridge_name,
            metadata_props={BRIDGE_MARK: "bridge"},
        )
        graph.insert_before(candidate.nodes[0], node)
        exit_.replace_all_uses_with(output)
        replacement = output
        fit_r2 = bridge.r2
    else:
        exit_.replace_all_uses_with(entry)
        replacement = entry
    graph.remove(candidate.nodes, safe=True)
    removed += _drop_repeated_idempotent(graph, replacement)
    # Constant-making nodes that only the removed part read are dead now.
    ir_common.RemoveUnusedNodesPass()(model)
    drop_unused_initializers(graph)
    neighbours = _compute_neighbours(entry, forward=False)
    neighbours += _compute_neighbours(replacement, forward=True)
    names = [n.name for n in neighbours if n.name]
    if bridge_name is not None:
        names.insert(0, bridge_name)
    logger.info("resected %s (%s): %d nodes removed", candidate.key, candidate.action, len(removed))
    return Resection(
        key=candidate.key,
        teacher_tensor=exit_name,
        student_tensor=replacement.name or "",
        bridge=bridge_name,
        neighbours=list(dict.fromkeys(names)),
        removed=removed,
        fit_r2=fit_r2,
    )


def resect_candidate(
    model: ir.Model,
    key: str,
    *,
    teacher: ir.Model | None = None,
    bridge_fitter: BridgeFitter | None = None,
    kinds: Sequence[str] = KINDS,
    exclude: Sequence[str] = (),
) -> Resection | None:
    """Find candidate ``key`` in ``model`` and cut it, fitting its bridge if it needs one.

    The bridge reads ``model``'s entry tensor and learns ``teacher``'s exit tensor (the
    model's own when ``teacher`` is None or lacks that tensor); ``bridge_fitter`` fits it on
    calibration data. Returns None when the candidate no longer exists (an earlier cut removed
    or changed it).

    Raises:
        ValueError: a bridge is needed and ``bridge_fitter`` is None.
    """
    candidate = find_candidates(model, kinds=kinds, exclude=exclude).by_key().get(key)
    if candidate is None:
        return None
    fit = None
    if candidate.action == "bridge":
        if bridge_fitter is None:
            raise ValueError(f"{key}: fitting a bridge needs calibration data")
        target = model
        exit_name = candidate.exit.name or ""
        if teacher is not None and _has_tensor(teacher, exit_name):
            target = teacher
        fit = bridge_fitter(model, candidate.entry.name or "", target, exit_name, candidate.stride)
    return apply_resection(model, candidate, fit)


def _has_tensor(model: ir.Model, name: str) -> bool:
    if any(v.name == name for v in model.graph.inputs):
        return True
    return any(out.name == name for node in model.graph for out in node.outputs)


def resected_copy(
    model: ir.Model, keys: Sequence[str], **options: object
) -> tuple[ir.Model, list[Resection]]:
    """A copy of ``model`` with the candidates ``keys`` cut in order (missing ones skipped)."""
    copy = clone_model(model)
    done = []
    for key in keys:
        result = resect_candidate(copy, key, **options)  # type: ignore[arg-type]
        if result is not None:
            done.append(result)
    return copy, done


__all__ = [
    "KINDS",
    "BridgeFit",
    "BridgeFitter",
    "Candidate",
    "CandidateSearch",
    "Resection",
    "apply_resection",
    "compute_layer_count",
    "find_candidates",
    "resect_candidate",
    "resected_copy",
    "residual_add_count",
    "shared_feature_maps",
]
