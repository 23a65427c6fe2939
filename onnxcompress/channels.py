"""Channel-dependency analysis: which channels of which tensors must be removed together.

Structural passes (``lrf``, ``merge``) rank and remove channels through the groups computed here;
nothing the analysis does not understand is ever offered for removal.

How it works
------------
Every activation tensor with a channel axis (axis 1: ``[N, C, ...]`` feature maps and ``[N, F]``
feature vectors) owns one *slot* per position on that axis. A registry of per-op rules (one
function per op family, ``_RULES``) states how the slots of a node's inputs and outputs are
coupled: an activation joins input slot ``k`` to output slot ``k``, ``Concat`` joins input slot
``k`` of operand ``i`` to output slot ``offset_i + k``, ``Flatten`` joins channel ``k`` to the
``H*W`` columns it becomes, a depthwise ``Conv`` joins input ``k`` to its ``m`` outputs, a
channel-axis ``Pad`` creates *zero slots* that come from nowhere, and a ``Conv``/``Gemm`` ends the
coupling: it *consumes* its input slots (weight axis 1) and *produces* new ones (weight axis 0).
Rules also register the weights to slice (:class:`WeightSlice`) and the layout constants to
rewrite (:class:`LayoutFixup`: ``Slice`` bounds, ``Split`` sizes, ``Pad`` amounts, ``Reshape``
targets that spell a channel count, a depthwise ``Conv``'s ``group``).

The connected components of the slot graph are the removable channels: removing one component
deletes one position from every tensor it touches and the matching rows/columns of every weight.
Components that touch exactly the same tensors the same number of times form a
:class:`ChannelGroup`, e.g. "the output channels of conv X" or "the residual stream of stage 2,
produced jointly by the conv2 of every block" -- the unit a pruner ranks within.

Why slots and not whole tensors: the ResNet "option A" shortcut (``Slice`` + ``Pad`` on the
channel axis) maps stage-1 channel ``k`` to stage-2 channel ``k + 8``; a tensor-level view would
couple all of stage 2 with all of stage 1, a slot-level view finds three residual groups (stage-1
channels carried through, stage-2 padding channels, stage-3 padding channels), each removable.

Safety rules:

* A rule that cannot prove what an op does to channels *blocks* the slots involved, with a reason
  naming the op and node; any component with a blocked slot is frozen, and so is its group.
  Unknown ops, graph inputs and graph outputs, tensors read inside subgraphs, shape values that
  expose a channel count, ops that mix channels (LRN, Softmax over channels, channel-moving
  Transpose) and reshapes that are neither a flatten nor channel-preserving are blocked. Nothing
  unknown is ever cut.
* A slot that no rule explains (its producer did not say where it comes from) is blocked.
* A group is never cut to zero channels (``surgery.remove_channels`` refuses): a tensor with no
  channels is not a valid ONNX value, and the rest of the network would lose its input.

Grouped convolutions are pruned by whole conv groups: the ``ci`` input channels and ``co``
output channels of one group form a single removable channel (with multiplicity ``ci`` / ``co``
on the tensors it touches), and the ``group`` attribute shrinks. This keeps every group's width,
as ONNX requires, with no cross-channel constraint; removing the same number of channels from
every group instead would couple components across groups, which this model does not express.
Depthwise convolutions are the ``ci = 1`` case: input channel ``k`` and its ``m`` outputs.
Passes that want per-channel granularity can skip groups whose ``multiplicity`` exceeds 1.

The analysis stays valid while the graph is edited only through :mod:`onnxcompress.surgery`:
all positions are stored in the original coordinates and mapped to current ones through the set
of removed components, so removing channels of one group never invalidates another group.

Limits: the channel axis is axis 1 everywhere, so channels-last regions (ConvNeXt's permuted
blocks, NHWC graphs from tf2onnx between their Transposes) are frozen at the Transpose; a channel
shuffle (Reshape-Transpose-Reshape, ShuffleNet) is frozen; LRN freezes the channels it
normalizes (removing one would change its neighbours).

Typical use::

    analysis = analyze_channels(model)
    for group in analysis.prunable:
        filters = group.producer_matrix()    # [size, fan_in], rows = channels
        outgoing = group.consumer_matrix()   # [size, fan_out]
        saved = group.macs_per_channel()     # MACs per sample removed with one channel
    print(analysis.summary())                # frozen groups come with their reasons
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

Role = Literal["producer", "consumer", "param"]


def _op_set(*names: str) -> frozenset[str]:
    """Op types from space-separated lists (keeps long op lists compact)."""
    return frozenset(op for chunk in names for op in chunk.split())


# Ops that apply the same linear map to every channel: a linear relation between channels
# (channel r = sum_k lambda_k channel k) survives them unchanged.
_UNIFORM_LINEAR_OPS = _op_set(
    "Identity Dropout AveragePool GlobalAveragePool Resize Upsample Flatten Reshape Squeeze "
    "Unsqueeze Transpose Concat Split Slice Gather Cast ReduceMean ReduceSum"
)
# Positively homogeneous (f(a x) = a f(x) for a > 0) and the same for every channel: a scale
# relation between channels (y_j = a y_i) survives them. Used by scale-aware merging.
_UNIFORM_HOMOGENEOUS_OPS = _UNIFORM_LINEAR_OPS | _op_set(
    "Relu LeakyRelu MaxPool GlobalMaxPool ReduceMax ReduceMin"
)


# ---------------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class WeightSlice:
    """An initializer axis that runs over the channels of an activation tensor.

    Position ``p`` on ``axis`` of the weight belongs to channel position ``p`` of ``tensor``
    (positions line up one to one; a channel that owns ``m`` positions of ``tensor``, such as a
    flattened feature map, owns ``m`` positions of the weight axis too).

    Attributes:
        node: the node that reads the weight.
        input_index: which input of ``node`` holds the weight (an initializer).
        axis: the weight axis that runs over the channels.
        tensor: the activation tensor whose channel axis ``axis`` mirrors: the node's output for
            producers (a Conv's ``W`` axis 0 and bias), its input for consumers (a Conv's ``W``
            axis 1, a Gemm's column block), the tensor it scales for per-channel params.
        role: ``producer`` (the weight computes the channels), ``consumer`` (the weight reads
            them; compensation is folded here) or ``param`` (per-channel parameters on the way:
            BatchNormalization, PRelu slopes, per-channel constants, depthwise kernels).
        is_bias: a bias or other additive term (no multiply-accumulates).
        out_axis: for consumers, the weight axis over the consumer's own outputs; the bias part
            of a compensation is summed over every other axis.
        macs_factor: how many times each weight element is used per sample (output pixels of a
            Conv, 1 for a Gemm); 0 for elementwise parameters, which count no MACs.
    """

    node: ir.Node
    input_index: int
    axis: int
    tensor: ir.Value
    role: Role
    is_bias: bool = False
    out_axis: int | None = None
    macs_factor: int = 0

    @property
    def value(self) -> ir.Value:
        """The initializer the node reads now (surgery may have replaced it by a copy)."""
        value = self.node.inputs[self.input_index]
        if value is None or value.const_value is None:
            raise ValueError(
                f"input {self.input_index} of {_describe(self.node)} is not a constant"
            )
        return value

    def array(self) -> np.ndarray:
        """The weight's current contents."""
        return self.value.const_value.numpy()  # type: ignore[union-attr]

    def describe(self) -> str:
        return f"{_describe(self.node)} input {self.input_index} axis {self.axis} ({self.role})"


@dataclasses.dataclass(frozen=True, eq=False)
class LayoutFixup:
    """A structural constant of a node that must be recomputed after channels are removed.

    ``kind`` selects the handler in :mod:`onnxcompress.surgery`; ``config`` holds what the
    handler needs in original coordinates (tensors, original offsets, where the constant lives).
    """

    kind: str
    node: ir.Node
    tensors: tuple[ir.Value, ...]
    config: Mapping[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class _ZeroSource:
    """Channel positions of a Pad output that hold the pad value rather than data."""

    node: ir.Node
    tensor: ir.Value
    positions: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class _PathStep:
    """A node that passes a group's channels through without ending them."""

    node: ir.Node
    tensors: tuple[ir.Value, ...]
    linear: bool
    homogeneous: bool


class ChannelGroup:
    """Channels that are ranked and removed together; one row per removable channel.

    Channel ``i`` of a group (``0 <= i < size``) is one connected component of coupled slots; all
    channels of a group touch the same tensors the same way, so they share producers, consumers
    and per-channel params (each at its own positions, see :meth:`positions`). Indices are into
    the group's *current* channels: after ``remove_channels`` the survivors are renumbered
    ``0..size-1`` in their original order.

    Attributes:
        analysis: the :class:`ChannelAnalysis` this group belongs to.
        id: index in ``analysis.groups``.
        name: producer node names (and "zeros of <Pad>"), for reports.
        tensors: every tensor carrying these channels, in graph order (for calibration capture).
        frozen_reason: why the group must not be cut, or None.
    """

    def __init__(
        self,
        analysis: ChannelAnalysis,
        group_id: int,
        components: np.ndarray,
        tensors: list[ir.Value],
        positions: dict[ir.Value, np.ndarray],
        frozen_reason: str | None,
    ) -> None:
        self.analysis = analysis
        self.id = group_id
        self._components = components
        self.tensors = tensors
        self._positions = positions
        self.frozen_reason = frozen_reason
        self.name = ""

    def __repr__(self) -> str:
        state = f"frozen: {self.frozen_reason}" if self.frozen_reason else "prunable"
        return f"ChannelGroup(id={self.id}, name={self.name!r}, size={self.size}, {state})"

    # -- membership ----------------------------------------------------------------------------

    @property
    def components(self) -> np.ndarray:
        """Global ids of the group's channels still present, in group order."""
        return self._components[~self.analysis._removed[self._components]]

    @property
    def size(self) -> int:
        """Number of channels the group has now."""
        return int((~self.analysis._removed[self._components]).sum())

    @property
    def original_size(self) -> int:
        return int(self._components.size)

    @property
    def is_frozen(self) -> bool:
        return self.frozen_reason is not None

    def multiplicity(self, tensor: ir.Value) -> int:
        """Positions one channel owns in ``tensor`` (``H*W`` after a Flatten, else 1)."""
        return int(self._positions[tensor].shape[1])

    def positions(self, tensor: ir.Value) -> np.ndarray:
        """Current positions of the group's channels on ``tensor``'s channel axis.

        Returns:
            int array ``[size, multiplicity]``; row ``i`` holds channel ``i``'s positions in
            ascending order. These index the channel axis of ``tensor`` and the ``axis`` of every
            :class:`WeightSlice` on ``tensor``.
        """
        if tensor not in self._positions:
            raise ValueError(f"tensor {tensor.name!r} carries no channel of group {self.id}")
        alive = ~self.analysis._removed[self._components]
        original = self._positions[tensor][alive]
        return self.analysis.current_positions(tensor)[original]

    # -- members -------------------------------------------------------------------------------

    def _slices(self, role: Role) -> list[WeightSlice]:
        seen: set[int] = set()
        result = []
        for tensor in self.tensors:
            for ws in self.analysis._records_by_tensor.get(tensor, ()):
                if ws.role == role and id(ws) not in seen:
                    seen.add(id(ws))
                    result.append(ws)
        return result

    @property
    def producers(self) -> list[WeightSlice]:
        """Weights whose output channels are this group (Conv ``W`` axis 0 and bias, Gemm...)."""
        return self._slices("producer")

    @property
    def consumers(self) -> list[WeightSlice]:
        """Weights that read these channels (Conv ``W`` axis 1, Gemm column blocks...)."""
        return self._slices("consumer")

    @property
    def params(self) -> list[WeightSlice]:
        """Per-channel parameters between producers and consumers (BN, PRelu, depthwise...)."""
        return self._slices("param")

    @property
    def slices(self) -> list[WeightSlice]:
        """Every weight axis the group's removal edits."""
        return self.producers + self.consumers + self.params

    @property
    def consumer_inputs(self) -> list[ir.Value]:
        """For each consumer (same order as :attr:`consumers`), the tensor it reads."""
        return [ws.tensor for ws in self.consumers]

    @property
    def producer_nodes(self) -> list[ir.Node]:
        """Nodes whose weights produce the group's channels, in graph order."""
        return _unique_nodes(ws.node for ws in self.producers if not ws.is_bias)

    @property
    def consumer_nodes(self) -> list[ir.Node]:
        return _unique_nodes(ws.node for ws in self.consumers)

    @property
    def producer_outputs(self) -> list[ir.Value]:
        """The tensors written by the producers (where a pass captures the raw channels)."""
        outputs = []
        for node in self.producer_nodes:
            for out in node.outputs:
                if out in self._positions and out not in outputs:
                    outputs.append(out)
        return outputs

    @property
    def zero_padding(self) -> list[ir.Node]:
        """Pad nodes that create some of these channels as constant (pad-value) channels."""
        return _unique_nodes(z.node for z in self._zero_sources())

    def _zero_sources(self) -> list[_ZeroSource]:
        sources = []
        for tensor in self.tensors:
            for zero in self.analysis._zero_by_tensor.get(tensor, ()):
                first = self._positions[tensor][0]
                if np.isin(first, zero.positions).all():
                    sources.append(zero)
        return sources

    @property
    def fixups(self) -> list[LayoutFixup]:
        """Structural constants that depend on this group's channel count."""
        seen: set[int] = set()
        result = []
        for tensor in self.tensors:
            for fix in self.analysis._fixups_by_tensor.get(tensor, ()):
                if id(fix) not in seen:
                    seen.add(id(fix))
                    result.append(fix)
        return result

    @property
    def path_nodes(self) -> list[ir.Node]:
        """Nodes that pass the channels through between producers and consumers."""
        return _unique_nodes(step.node for step in self._path_steps())

    def _path_steps(self) -> list[_PathStep]:
        steps: list[_PathStep] = []
        for tensor in self.tensors:
            for step in self.analysis._path_by_tensor.get(tensor, ()):
                if step not in steps:
                    steps.append(step)
        return steps

    @property
    def linear_path(self) -> bool:
        """Every op between producers and consumers applies one linear map to all channels.

        Then a linear relation between the producers' channels (filter ``r`` equals a
        combination of filters ``k``, biases included) holds unchanged at every consumer input,
        so compensating with the same coefficients is exact (up to zero-padding borders).
        Per-channel affine ops (unfolded BatchNormalization, per-channel Mul/Add, depthwise
        Conv) and non-linear ones (Relu) make this False.
        """
        return all(step.linear for step in self._path_steps())

    @property
    def homogeneous_path(self) -> bool:
        """Like :attr:`linear_path` but also allows Relu/MaxPool (positively homogeneous ops).

        A scale relation ``y_j = a * y_i`` with ``a > 0`` survives such a path.
        """
        return all(step.homogeneous for step in self._path_steps())

    # -- matrices for ranking ------------------------------------------------------------------

    def _stack(self, slices: Iterable[WeightSlice]) -> np.ndarray:
        blocks = [np.zeros((self.size, 0))]
        for ws in slices:
            rows = self.positions(ws.tensor)
            moved = np.moveaxis(ws.array(), ws.axis, 0)
            blocks.append(moved[rows].reshape(self.size, -1).astype(np.float64))
        return np.concatenate(blocks, axis=1)

    def producer_matrix(self, *, include_bias: bool = False) -> np.ndarray:
        """The group's filters, one row per channel, stacked across every producer.

        Row ``i`` concatenates, for each producer weight (a Conv's ``W[i]`` flattened, a Gemm's
        row or column ``i``...), the incoming weights of channel ``i``. Zero-padding channels
        contribute nothing (their rows are whatever the other producers give).

        Args:
            include_bias: append the producers' bias entries as extra columns.

        Returns:
            float64 ``[size, fan_in]``.
        """
        chosen = [ws for ws in self.producers if include_bias or not ws.is_bias]
        return self._stack(chosen)

    def producer_bias(self) -> np.ndarray:
        """The producers' bias entries per channel, float64 ``[size, n_bias]`` (may be 0 wide)."""
        return self._stack(ws for ws in self.producers if ws.is_bias)

    def consumer_matrix(self) -> np.ndarray:
        """The outgoing weights of each channel, stacked across every consumer.

        Row ``i`` concatenates each consumer's input slice for channel ``i`` (a Conv's
        ``W_next[:, i]`` flattened, a Gemm's block of columns). ``norm(row)`` is the
        ``||W_next[:, j]||`` term of the lrf score.

        Returns:
            float64 ``[size, fan_out]``.
        """
        return self._stack(self.consumers)

    # -- cost ----------------------------------------------------------------------------------

    def macs_per_channel(self) -> int:
        """Multiply-accumulates per sample saved by removing one channel, from current shapes.

        Counts the weighted layers only (Conv, ConvTranspose, Gemm, MatMul, depthwise kernels) --
        producers' rows, consumers' columns and depthwise rows -- as MAC counters usually do;
        elementwise ops and biases count nothing. A node that both reads and writes the group is
        counted twice for the element where its row and column cross (negligible).
        """
        total = 0
        for ws in self.slices:
            if ws.is_bias or ws.macs_factor == 0:
                continue
            array = ws.array()
            per_position = array.size // max(int(array.shape[ws.axis]), 1)
            total += per_position * self.multiplicity(ws.tensor) * ws.macs_factor
        return total

    def params_per_channel(self) -> int:
        """Weight elements removed with one channel (all sliced initializers, biases included)."""
        total = 0
        for ws in self.slices:
            array = ws.array()
            per_position = array.size // max(int(array.shape[ws.axis]), 1)
            total += per_position * self.multiplicity(ws.tensor)
        return total


class ChannelAnalysis:
    """The channel groups of one model, plus the bookkeeping surgery needs to keep them valid."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.groups: list[ChannelGroup] = []
        self._removed = np.zeros(0, dtype=bool)
        self._labels: dict[ir.Value, np.ndarray] = {}
        self._records_by_tensor: dict[ir.Value, list[WeightSlice]] = {}
        self._fixups_by_tensor: dict[ir.Value, list[LayoutFixup]] = {}
        self._zero_by_tensor: dict[ir.Value, list[_ZeroSource]] = {}
        self._path_by_tensor: dict[ir.Value, list[_PathStep]] = {}
        self._groups_by_tensor: dict[ir.Value, list[ChannelGroup]] = {}

    # -- queries -------------------------------------------------------------------------------

    @property
    def prunable(self) -> list[ChannelGroup]:
        """Groups that are not frozen and have at least two channels (one must always stay)."""
        return [g for g in self.groups if not g.is_frozen and g.size > 1]

    @property
    def frozen(self) -> list[tuple[ChannelGroup, str]]:
        """Frozen groups with the reason, for the report."""
        return [(g, g.frozen_reason) for g in self.groups if g.frozen_reason is not None]

    def groups_of(self, tensor: ir.Value) -> list[ChannelGroup]:
        """The groups that own channels of ``tensor``."""
        return list(self._groups_by_tensor.get(tensor, ()))

    def groups_produced_by(self, node: ir.Node) -> list[ChannelGroup]:
        """The groups whose producers include ``node``."""
        return [g for g in self.groups if node in g.producer_nodes]

    def current_positions(self, tensor: ir.Value) -> np.ndarray:
        """Map original channel positions of ``tensor`` to current ones (-1: removed)."""
        labels = self._labels[tensor]
        alive = ~self._removed[labels]
        current = np.cumsum(alive) - 1
        current[~alive] = -1
        return current

    def alive(self, tensor: ir.Value) -> np.ndarray:
        """Boolean mask over the original channel positions of ``tensor``: still present."""
        return ~self._removed[self._labels[tensor]]

    def channel_count(self, tensor: ir.Value) -> int:
        """Current size of ``tensor``'s channel axis."""
        return int(self.alive(tensor).sum())

    def is_tracked(self, tensor: ir.Value) -> bool:
        """Whether ``tensor`` has channel slots in this analysis."""
        return tensor in self._labels

    @property
    def tensors(self) -> list[ir.Value]:
        """Every tensor whose channels the analysis tracks."""
        return list(self._labels)

    def summary(self) -> str:
        """A human-readable table of the groups."""
        lines = [f"{len(self.groups)} channel groups, {len(self.prunable)} prunable"]
        for group in self.groups:
            state = "frozen" if group.is_frozen else "prunable"
            line = f"  #{group.id:<3} {group.size:>5} ch  {state:<8}  {group.name}"
            if group.frozen_reason:
                line += f"  -- {group.frozen_reason}"
            lines.append(line)
        return "\n".join(lines)

    # -- mutation, for onnxcompress.surgery ----------------------------------------------------

    def mark_removed(self, components: np.ndarray) -> None:
        """Record that these components are gone (called by ``surgery.remove_channels``)."""
        self._removed[components] = True

    def add_slice(self, weight_slice: WeightSlice) -> None:
        """Register a weight axis created after the analysis (a bias made by compensation)."""
        self._records_by_tensor.setdefault(weight_slice.tensor, []).append(weight_slice)

    def alias_tensor(self, new: ir.Value, like: ir.Value) -> None:
        """Track ``new`` as carrying exactly the channels of ``like`` (a node inserted after)."""
        self._labels[new] = self._labels[like]
        for group in self._groups_by_tensor.get(like, ()):
            group._positions[new] = group._positions[like]
            group.tensors.append(new)
        self._groups_by_tensor[new] = list(self._groups_by_tensor.get(like, ()))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def analyze_channels(model: ir.Model) -> ChannelAnalysis:
    """Compute the channel groups of a (canonicalized) model.

    The model should have static channel dims (``onnxcompress.model.canonicalize`` infers them);
    channels whose count is unknown are frozen.

    Returns:
        The analysis; ``.groups`` holds every group (frozen ones included, with reasons).
    """
    builder = _Builder(model)
    builder.run()
    return builder.finish()


# ---------------------------------------------------------------------------------------------
# The rule registry
# ---------------------------------------------------------------------------------------------

_Rule = Callable[[ir.Node, "_Builder"], None]
_RULES: dict[str, _Rule] = {}


def _rule(*op_types: str) -> Callable[[_Rule], _Rule]:
    """Register a rule for the op types given (each argument may list several, space-separated)."""

    def register(func: _Rule) -> _Rule:
        for op_type in _op_set(*op_types):
            _RULES[op_type] = func
        return func

    return register


def _describe(node: ir.Node) -> str:
    return f"{node.op_type} {node.name or '<unnamed>'}"


def _unique_nodes(nodes: Iterable[ir.Node]) -> list[ir.Node]:
    seen: set[int] = set()
    result = []
    for node in nodes:
        if id(node) not in seen:
            seen.add(id(node))
            result.append(node)
    return result


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _rank(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    if value.const_value is not None:
        return len(value.const_value.shape)
    if value.shape is None:
        return None
    return len(value.shape)


def _static_dim(value: ir.Value, axis: int) -> int | None:
    shape = value.const_value.shape if value.const_value is not None else value.shape
    if shape is None:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def _spatial(value: ir.Value | None) -> int | None:
    """Product of the dims after the channel axis, or None if any is not static."""
    if value is None or value.shape is None or len(value.shape) < 2:
        return None
    dims = value.shape.dims[2:]
    static = [d for d in dims if isinstance(d, int)]
    return math.prod(static) if len(static) == len(dims) else None


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None else default


def _attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else None


def _attr_str(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return attr.as_string() if attr is not None else default


class _Unsupported(Exception):
    """Raised by a rule for a node it cannot analyze; the driver freezes the node's channels."""


def _required(node: ir.Node, index: int) -> ir.Value:
    """A required input (absent only in malformed graphs, which are frozen)."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None:
        raise _Unsupported(f"{_describe(node)} lacks input {index}")
    return value


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _axes_operand(node: ir.Node, index: int, attr: str) -> tuple[bool, list[int] | None]:
    """Axes given as an input (newer opsets) or an attribute; (known, axes or None if absent)."""
    value = _input(node, index)
    if value is not None:
        array = _const(value)
        if array is None:
            return False, None
        return True, [int(a) for a in array.reshape(-1)]
    return True, _attr_ints(node, attr)


class _Builder:
    """Collects slots, couplings, weight slices and blocks while the rules run."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17))
        self.base: dict[ir.Value, int] = {}
        self.count: dict[ir.Value, int] = {}
        self.tensor_order: list[ir.Value] = []
        self.n_slots = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.explained: list[np.ndarray] = []
        self.records: list[WeightSlice] = []
        self.fixups: list[LayoutFixup] = []
        self.zero_sources: list[_ZeroSource] = []
        self.path_steps: list[_PathStep] = []
        self.touched: set[ir.Value] = set()

    # -- slots ---------------------------------------------------------------------------------

    def is_channel_tensor(self, value: ir.Value | None) -> bool:
        """A computed tensor with a channel axis (rank >= 2, or already tracked)."""
        if value is None or value.const_value is not None:
            return False
        if value in self.base:
            return True
        rank = _rank(value)
        return rank is not None and rank >= 2

    def channels(self, value: ir.Value | None) -> int | None:
        if value is None:
            return None
        if value in self.count:
            return self.count[value]
        if not self.is_channel_tensor(value):
            return None
        return _static_dim(value, 1)

    def slots(self, value: ir.Value | None, declare: int | None = None) -> np.ndarray | None:
        """Global slot ids of ``value``'s channels, allocating them on first use.

        ``declare`` gives the channel count when shape inference left it symbolic (the rule
        knows it from a weight shape or the op's semantics).
        """
        if value is None or value.const_value is not None:
            return None
        self.touched.add(value)
        if value in self.base:
            start = self.base[value]
            return np.arange(start, start + self.count[value])
        rank = _rank(value)
        if rank is not None and rank < 2:
            return None
        count = self.channels(value)
        if count is None:
            count = declare
        if count is None:
            return None
        self.base[value] = self.n_slots
        self.count[value] = count
        self.tensor_order.append(value)
        self.n_slots += count
        ids = np.arange(self.base[value], self.n_slots)
        if value.is_graph_input():
            self.blocks.append((ids, f"produced by graph input {value.name!r}"))
            self.explained.append(ids)
        return ids

    def touch(self, value: ir.Value | None) -> None:
        if value is not None:
            self.touched.add(value)

    def join(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size:
            self.edges.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))

    def explain(self, ids: np.ndarray | None) -> None:
        if ids is not None:
            self.explained.append(ids)

    def block(self, ids: np.ndarray | None, reason: str) -> None:
        if ids is not None and ids.size:
            self.blocks.append((ids, reason))

    def block_value(self, value: ir.Value | None, reason: str, *, explain: bool = False) -> None:
        ids = self.slots(value)
        self.block(ids, reason)
        if explain:
            self.explain(ids)

    def block_node(self, node: ir.Node, reason: str) -> None:
        """Freeze every channel tensor around ``node``."""
        for value in node.inputs:
            if self.is_channel_tensor(value):
                self.block_value(value, reason)
        for value in node.outputs:
            if self.is_channel_tensor(value):
                self.block_value(value, reason, explain=True)

    # -- records -------------------------------------------------------------------------------

    def weight(
        self,
        node: ir.Node,
        input_index: int,
        axis: int,
        tensor: ir.Value,
        role: Role,
        *,
        is_bias: bool = False,
        out_axis: int | None = None,
        macs_factor: int = 0,
    ) -> None:
        self.records.append(
            WeightSlice(node, input_index, axis, tensor, role, is_bias, out_axis, macs_factor)
        )

    def fixup(self, kind: str, node: ir.Node, tensors: Sequence[ir.Value], **config: Any) -> None:
        self.fixups.append(LayoutFixup(kind, node, tuple(tensors), config))

    def path(
        self, node: ir.Node, tensors: Sequence[ir.Value], *, linear: bool, homogeneous: bool
    ) -> None:
        self.path_steps.append(_PathStep(node, tuple(tensors), linear, homogeneous))

    def identity(self, node: ir.Node, x: ir.Value | None, y: ir.Value | None) -> bool:
        """Join channel k of ``x`` with channel k of ``y``; block both when counts disagree."""
        cx, cy = self.channels(x), self.channels(y)
        if cx is None and cy is None:
            self.touch(x)
            self.touch(y)
            return False
        xs = self.slots(x, declare=cy)
        ys = self.slots(y, declare=cx)
        if xs is None or ys is None or xs.size != ys.size:
            reason = f"{_describe(node)} changes the channel count"
            self.block(xs, reason)
            self.block(ys, reason)
            self.explain(ys)
            return False
        self.join(xs, ys)
        self.explain(ys)
        return True

    def passthrough(self, node: ir.Node, x: ir.Value | None, y: ir.Value | None) -> None:
        """Identity coupling plus the path classification of ``node``'s op."""
        if self.identity(node, x, y) and y is not None and x is not None:
            self.path(
                node,
                (x, y),
                linear=node.op_type in _UNIFORM_LINEAR_OPS,
                homogeneous=node.op_type in _UNIFORM_HOMOGENEOUS_OPS,
            )

    # -- driver --------------------------------------------------------------------------------

    def run(self) -> None:
        for node in list(self.graph):
            self.touched = set()
            domain_ok = node.domain in ("", "ai.onnx")
            rule = _RULES.get(node.op_type) if domain_ok else None
            try:
                if rule is None:
                    _unknown_op(node, self)
                else:
                    rule(node, self)
            except _Unsupported as exc:
                self.block_node(node, str(exc))
            for index, value in enumerate(node.inputs):
                if self.is_channel_tensor(value) and value not in self.touched:
                    self.block_value(
                        value, f"input {index} of {_describe(node)} is not understood here"
                    )
        for value in self.graph.outputs:
            if self.is_channel_tensor(value):
                self.block_value(value, f"reaches graph output {value.name!r}")
        for value in list(self.base):
            for use in value.uses():
                if use.node.graph is not self.graph:
                    self.block_value(value, f"read inside a subgraph by {_describe(use.node)}")
                    break

    def finish(self) -> ChannelAnalysis:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        analysis = ChannelAnalysis(self.model)
        n = self.n_slots
        if self.edges:
            a = np.concatenate([e[0] for e in self.edges])
            b = np.concatenate([e[1] for e in self.edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        if n:
            adjacency = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
            n_comp, labels = connected_components(adjacency, directed=False)
        else:
            n_comp, labels = 0, np.zeros(0, dtype=np.int64)

        explained = np.zeros(n, dtype=bool)
        for ids in self.explained:
            explained[ids] = True
        for value in self.tensor_order:
            start, count = self.base[value], self.count[value]
            missing = ~explained[start : start + count]
            if missing.any():
                producer = value.producer()
                source = _describe(producer) if producer is not None else "nothing known"
                self.blocks.append(
                    (
                        np.arange(start, start + count)[missing],
                        f"channels of {value.name!r} come from {source}, whose channel mapping "
                        "is not understood",
                    )
                )

        reasons: dict[int, list[str]] = {}
        for ids, reason in self.blocks:
            for comp in np.unique(labels[ids]):
                bucket = reasons.setdefault(int(comp), [])
                if reason not in bucket:
                    bucket.append(reason)

        # A component's signature: which tensors it touches and how often.
        tensor_index = np.zeros(n, dtype=np.int64)
        for t, value in enumerate(self.tensor_order):
            start = self.base[value]
            tensor_index[start : start + self.count[value]] = t
        n_tensors = max(len(self.tensor_order), 1)
        keys, counts = np.unique(
            labels.astype(np.int64) * n_tensors + tensor_index, return_counts=True
        )
        signature: dict[int, list[tuple[int, int]]] = {}
        for key, cnt in zip(keys.tolist(), counts.tolist(), strict=True):
            signature.setdefault(key // n_tensors, []).append((key % n_tensors, cnt))
        first_slot = np.full(n_comp, n, dtype=np.int64)
        np.minimum.at(first_slot, labels, np.arange(n))

        buckets: dict[tuple[Any, ...], list[int]] = {}
        for comp in range(n_comp):
            key = (tuple(signature[comp]), tuple(reasons.get(comp, ())))
            buckets.setdefault(key, []).append(comp)
        ordered = sorted(buckets.items(), key=lambda item: int(first_slot[item[1]].min()))

        analysis._removed = np.zeros(n_comp, dtype=bool)
        group_of = np.zeros(n_comp, dtype=np.int64)
        rank_in_group = np.zeros(n_comp, dtype=np.int64)
        group_specs = []
        for gid, ((sig, why), comps_list) in enumerate(ordered):
            comps = np.asarray(comps_list, dtype=np.int64)
            comps = comps[np.argsort(first_slot[comps], kind="stable")]
            group_of[comps] = gid
            rank_in_group[comps] = np.arange(comps.size)
            tensors = [self.tensor_order[t] for t, _ in sig]
            frozen: str | None = None
            if why:
                frozen = "; ".join(why[:3]) + (f" (+{len(why) - 3} more)" if len(why) > 3 else "")
            group_specs.append((comps, tensors, frozen))

        positions: list[dict[ir.Value, np.ndarray]] = [{} for _ in group_specs]
        for value in self.tensor_order:
            start, count = self.base[value], self.count[value]
            comp_labels = labels[start : start + count].astype(np.int64)
            analysis._labels[value] = comp_labels
            groups = group_of[comp_labels]
            order = np.lexsort((np.arange(count), rank_in_group[comp_labels], groups))
            sorted_groups = groups[order]
            bounds = np.flatnonzero(np.diff(sorted_groups)) + 1
            for chunk in np.split(order, bounds):
                gid = int(groups[chunk[0]])
                size = group_specs[gid][0].size
                positions[gid][value] = chunk.reshape(size, -1)

        for gid, (comps, tensors, frozen) in enumerate(group_specs):
            group = ChannelGroup(analysis, gid, comps, tensors, positions[gid], frozen)
            analysis.groups.append(group)
            for value in tensors:
                analysis._groups_by_tensor.setdefault(value, []).append(group)

        for record in self.records:
            if record.tensor in analysis._labels:
                analysis._records_by_tensor.setdefault(record.tensor, []).append(record)
        for fix in self.fixups:
            for value in fix.tensors:
                if value in analysis._labels:
                    analysis._fixups_by_tensor.setdefault(value, []).append(fix)
        for zero in self.zero_sources:
            analysis._zero_by_tensor.setdefault(zero.tensor, []).append(zero)
        for step in self.path_steps:
            for value in step.tensors:
                if value in analysis._labels:
                    analysis._path_by_tensor.setdefault(value, []).append(step)

        _name_groups(analysis.groups)
        logger.debug("channel analysis: %d slots, %d groups", n, len(analysis.groups))
        return analysis


def _name_groups(groups: list[ChannelGroup]) -> None:
    taken: dict[str, int] = {}
    for group in groups:
        parts = [node.name or node.op_type for node in group.producer_nodes]
        parts += [f"zeros of {node.name or 'Pad'}" for node in group.zero_padding]
        if not parts:
            parts = [group.tensors[0].name or f"tensor {group.id}"]
        name = ", ".join(parts[:3]) + (f" (+{len(parts) - 3} more)" if len(parts) > 3 else "")
        taken[name] = taken.get(name, 0) + 1
        group.name = name if taken[name] == 1 else f"{name} #{taken[name]}"


# ---------------------------------------------------------------------------------------------
# Rules: unknown ops, elementwise and per-channel ops
# ---------------------------------------------------------------------------------------------


def _unknown_op(node: ir.Node, b: _Builder) -> None:
    for value in node.inputs:
        if b.is_channel_tensor(value):
            b.block_value(
                value, f"consumed by an op with unknown channel semantics: {_describe(node)}"
            )
    for value in node.outputs:
        if b.is_channel_tensor(value):
            b.block_value(
                value,
                f"produced by an op with unknown channel semantics: {_describe(node)}",
                explain=True,
            )


def _block_extra_outputs(node: ir.Node, b: _Builder, reason: str) -> None:
    for value in node.outputs[1:]:
        if value.uses() or value.is_graph_output():
            b.block_node(node, reason)
            return


def _check_side_inputs(node: ir.Node, b: _Builder, first: int = 1) -> bool:
    """Side inputs (Clip bounds, Dropout ratio...) must be constants or scalars."""
    for value in node.inputs[first:]:
        if b.is_channel_tensor(value):
            b.block_node(node, f"{_describe(node)} takes a computed tensor as a side input")
            return False
        b.touch(value)
    return True


@_rule(
    "Relu LeakyRelu Elu Selu Celu Sigmoid HardSigmoid HardSwish Tanh Softplus Softsign Mish "
    "Gelu Clip Abs Neg Exp Log Sqrt Reciprocal Floor Ceil Round Sign Erf ThresholdedRelu Shrink "
    "Identity Cast Not IsNaN IsInf Sin Cos Dropout AveragePool MaxPool LpPool GlobalAveragePool "
    "GlobalMaxPool GlobalLpPool"
)
def _unary(node: ir.Node, b: _Builder) -> None:
    if not _check_side_inputs(node, b):
        return
    b.passthrough(node, node.inputs[0], node.outputs[0])
    # MaxPool's Indices and Dropout's mask: flat indices encode channel positions.
    _block_extra_outputs(node, b, f"the second output of {_describe(node)} is used")


_BROADCAST_LINEAR = frozenset({"Add", "Sub", "Sum"})


@_rule(
    "Add Sub Mul Div Pow Max Min Sum Mean PRelu Where Equal Less Greater LessOrEqual "
    "GreaterOrEqual And Or Xor Mod"
)
def _broadcast(node: ir.Node, b: _Builder) -> None:
    """Elementwise ops with numpy broadcasting; operands are right-aligned to the output."""
    y = node.outputs[0]
    ranks = [_rank(v) for v in node.inputs if v is not None]
    out_rank = _rank(y)
    if out_rank is None and ranks and all(r is not None for r in ranks):
        out_rank = max(r for r in ranks if r is not None)
    if out_rank is None or out_rank < 2:
        for value in node.inputs:
            if b.is_channel_tensor(value):
                b.block_node(node, f"{_describe(node)} has operands of unknown rank")
                return
            b.touch(value)
        return
    cy = b.channels(y)
    if cy is None:
        cy = next(
            (b.channels(v) for v in node.inputs if _rank(v) == out_rank and b.channels(v) != 1),
            None,
        )
    ys = b.slots(y, declare=cy)
    if ys is None:
        b.block_node(node, f"the channel count of {_describe(node)}'s output is unknown")
        return
    joined: list[ir.Value] = []
    per_channel_const = False
    for index, value in enumerate(node.inputs):
        if value is None:
            continue
        rank = _rank(value)
        if rank is None:
            b.block_node(node, f"{_describe(node)} has an operand of unknown rank")
            return
        axis = 1 - (out_rank - rank)
        if axis < 0:
            b.touch(value)
            continue
        if value.const_value is not None:
            width = _static_dim(value, axis)
            if width == ys.size and width != 1:
                b.weight(node, index, axis, y, "param")
                per_channel_const = True
            elif width != 1:
                b.block_node(node, f"{_describe(node)} broadcasts a constant of the wrong width")
                return
            continue
        if axis != 1:
            # A lower-rank computed operand puts one of its own non-channel axes on ours.
            b.block_node(node, f"{_describe(node)} broadcasts a lower-rank tensor onto channels")
            return
        dim = b.channels(value)
        if dim == 1 and ys.size != 1:
            b.touch(value)  # e.g. a spatial attention map shared by all channels
            continue
        xs = b.slots(value, declare=ys.size)
        if xs is None or xs.size != ys.size:
            b.block_node(node, f"{_describe(node)} mixes operands with different channel counts")
            return
        b.join(xs, ys)
        joined.append(value)
    if not joined:
        return  # output computed from constants and broadcasts only: left unexplained
    b.explain(ys)
    computed = [v for v in node.inputs if v is not None and v.const_value is None]
    op = node.op_type
    linear = (
        op in _BROADCAST_LINEAR and len(joined) == len(computed) and not _has_const(node)
    ) or (
        op in ("Mul", "Div")
        and len(computed) == 1
        and len(joined) == 1
        and not per_channel_const
        and (op == "Mul" or node.inputs[0] is joined[0])
    )
    homogeneous = linear or (op in ("Max", "Min") and len(joined) == len(computed) == 2)
    b.path(node, [*joined, y], linear=linear, homogeneous=homogeneous)


def _has_const(node: ir.Node) -> bool:
    return any(v is not None and v.const_value is not None for v in node.inputs)


@_rule("BatchNormalization")
def _batchnorm(node: ir.Node, b: _Builder) -> None:
    x, y = _required(node, 0), node.outputs[0]
    params = node.inputs[1:5]
    if any(_const(v) is None for v in params) or _attr_int(node, "training_mode", 0):
        b.block_node(node, f"{_describe(node)} has computed parameters or runs in training mode")
        return
    _block_extra_outputs(node, b, f"the running statistics of {_describe(node)} are used")
    if b.identity(node, x, y) and x is not None:
        for index in range(1, 5):
            b.weight(node, index, 0, y, "param")
        b.path(node, (x, y), linear=False, homogeneous=False)


@_rule("InstanceNormalization")
def _instancenorm(node: ir.Node, b: _Builder) -> None:
    x, y = _required(node, 0), node.outputs[0]
    if _const(_input(node, 1)) is None or _const(_input(node, 2)) is None:
        b.block_node(node, f"{_describe(node)} has computed parameters")
        return
    if b.identity(node, x, y) and x is not None:
        b.weight(node, 1, 0, y, "param")
        b.weight(node, 2, 0, y, "param")
        b.path(node, (x, y), linear=False, homogeneous=False)


@_rule("LayerNormalization")
def _layernorm(node: ir.Node, b: _Builder) -> None:
    x = _required(node, 0)
    rank = _rank(x)
    axis = _attr_int(node, "axis", -1)
    if rank is None or axis % rank < 2:
        b.block_node(node, f"{_describe(node)} normalizes over the channel axis")
        return
    if not _check_side_inputs(node, b):
        return
    _block_extra_outputs(node, b, f"the statistics outputs of {_describe(node)} are used")
    y = node.outputs[0]
    if b.identity(node, x, y) and x is not None:
        b.path(node, (x, y), linear=False, homogeneous=False)


@_rule("LRN", "GroupNormalization", "MeanVarianceNormalization")
def _cross_channel(node: ir.Node, b: _Builder) -> None:
    b.block_node(node, f"{_describe(node)} normalizes across channels")


@_rule("Softmax", "LogSoftmax", "Hardmax")
def _softmax(node: ir.Node, b: _Builder) -> None:
    x = _required(node, 0)
    rank = _rank(x)
    if rank is None:
        b.block_node(node, f"{_describe(node)} has an input of unknown rank")
        return
    axis = _attr_int(node, "axis", -1 if b.opset >= 13 else 1) % rank
    # Before opset 13 the op flattens every axis from ``axis`` on into one.
    covers_channels = axis == 1 or (b.opset < 13 and axis <= 1)
    if covers_channels or axis == 0:
        b.block_node(node, f"{_describe(node)} normalizes over the channel axis")
        return
    b.passthrough(node, x, node.outputs[0])


@_rule(
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceSum",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
)
def _reduce(node: ir.Node, b: _Builder) -> None:
    x = _required(node, 0)
    rank = _rank(x)
    known, axes = _axes_operand(node, 1, "axes")
    if rank is None or not known:
        b.block_node(node, f"{_describe(node)} reduces over axes that are not constant")
        return
    if not axes:
        if _attr_int(node, "noop_with_empty_axes", 0):
            b.touch(_input(node, 1))
            b.passthrough(node, x, node.outputs[0])
            return
        b.block_node(node, f"{_describe(node)} reduces over every axis, channels included")
        return
    normalized = {a % rank for a in axes}
    if normalized & {0, 1}:
        b.block_node(node, f"{_describe(node)} reduces over the channel (or batch) axis")
        return
    b.touch(_input(node, 1))
    b.passthrough(node, x, node.outputs[0])


@_rule("ArgMax", "ArgMin")
def _argreduce(node: ir.Node, b: _Builder) -> None:
    x = _required(node, 0)
    rank = _rank(x)
    if rank is None or _attr_int(node, "axis", 0) % rank in (0, 1):
        b.block_node(node, f"{_describe(node)} reduces over the channel (or batch) axis")
        return
    b.identity(node, x, node.outputs[0])


# ---------------------------------------------------------------------------------------------
# Rules: weighted layers
# ---------------------------------------------------------------------------------------------


@_rule("Conv")
def _conv(node: ir.Node, b: _Builder) -> None:
    x, w_value, y = _required(node, 0), _required(node, 1), node.outputs[0]
    bias_value = _input(node, 2)
    weight = _const(w_value)
    if weight is None or (bias_value is not None and _const(bias_value) is None):
        b.block_node(node, f"{_describe(node)} has a computed weight or bias")
        return
    group = _attr_int(node, "group", 1)
    cout, per_group = int(weight.shape[0]), int(weight.shape[1])
    spatial = _spatial(y) or 1
    if group == 1:
        xs = b.slots(x, declare=per_group)
        ys = b.slots(y, declare=cout)
        if xs is None or ys is None or xs.size != per_group or ys.size != cout:
            b.block_node(node, f"the channel counts around {_describe(node)} are unknown")
            return
        b.weight(node, 1, 1, x, "consumer", out_axis=0, macs_factor=spatial)
        b.weight(node, 1, 0, y, "producer", macs_factor=spatial)
        if bias_value is not None:
            b.weight(node, 2, 0, y, "producer", is_bias=True)
        b.explain(ys)
        return
    cin = b.channels(x)
    if cin == group * per_group and cout % group == 0:
        # Grouped (depthwise when per_group == 1): input channels g*ci .. g*ci+ci-1 feed only
        # outputs g*co .. g*co+co-1, so one conv group is one removable unit. Removing whole
        # groups keeps every group's width, which ONNX requires; ``group`` shrinks instead.
        per_out = cout // group
        xs = b.slots(x)
        ys = b.slots(y, declare=cout)
        if xs is None or ys is None or ys.size != cout:
            b.block_node(node, f"the channel counts around {_describe(node)} are unknown")
            return
        leaders = xs.reshape(group, per_group)[:, :1]
        b.join(np.repeat(leaders, per_out, axis=1).ravel(), ys)
        b.join(
            np.repeat(leaders, per_group - 1, axis=1).ravel(), xs.reshape(group, -1)[:, 1:].ravel()
        )
        b.explain(ys)
        b.weight(node, 1, 0, y, "param", macs_factor=spatial)
        if bias_value is not None:
            b.weight(node, 2, 0, y, "param", is_bias=True)
        b.fixup("conv_group", node, (x, y), input=x, per_group=per_group)
        b.path(node, (x, y), linear=False, homogeneous=False)
        return
    b.block_node(
        node,
        f"grouped Conv {node.name or '<unnamed>'} (group={group}) has channel counts that do not "
        "divide into its groups",
    )


@_rule("ConvTranspose")
def _conv_transpose(node: ir.Node, b: _Builder) -> None:
    x, w_value, y = _required(node, 0), _required(node, 1), node.outputs[0]
    bias_value = _input(node, 2)
    weight = _const(w_value)
    if weight is None or (bias_value is not None and _const(bias_value) is None):
        b.block_node(node, f"{_describe(node)} has a computed weight or bias")
        return
    if _attr_int(node, "group", 1) != 1:
        b.block_node(node, f"grouped {_describe(node)} couples channels group-wise")
        return
    cin, cout = int(weight.shape[0]), int(weight.shape[1])
    xs = b.slots(x, declare=cin)
    ys = b.slots(y, declare=cout)
    if xs is None or ys is None or xs.size != cin or ys.size != cout:
        b.block_node(node, f"the channel counts around {_describe(node)} are unknown")
        return
    spatial = _spatial(x) or 1  # every input pixel meets every kernel element once
    b.weight(node, 1, 0, x, "consumer", out_axis=1, macs_factor=spatial)
    b.weight(node, 1, 1, y, "producer", macs_factor=spatial)
    if bias_value is not None:
        b.weight(node, 2, 0, y, "producer", is_bias=True)
    b.explain(ys)


@_rule("Gemm")
def _gemm(node: ir.Node, b: _Builder) -> None:
    a, b_value, y = _required(node, 0), _required(node, 1), node.outputs[0]
    c_value = _input(node, 2)
    weight = _const(b_value)
    if weight is None or weight.ndim != 2 or _attr_int(node, "transA", 0):
        b.block_node(node, f"{_describe(node)} has a computed weight or a transposed input")
        return
    trans_b = _attr_int(node, "transB", 0)
    k, n = (weight.shape[1], weight.shape[0]) if trans_b else weight.shape
    bias = _const(c_value)
    if c_value is not None and bias is None:
        b.block_node(node, f"{_describe(node)} adds a computed tensor")
        return
    xs = b.slots(a, declare=int(k))
    ys = b.slots(y, declare=int(n))
    if xs is None or ys is None or xs.size != k or ys.size != n:
        b.block_node(node, f"the feature counts around {_describe(node)} are unknown")
        return
    b.weight(
        node, 1, 1 if trans_b else 0, a, "consumer", out_axis=0 if trans_b else 1, macs_factor=1
    )
    b.weight(node, 1, 0 if trans_b else 1, y, "producer", macs_factor=1)
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] == n and n != 1:
        b.weight(node, 2, bias.ndim - 1, y, "producer", is_bias=True)
    b.touch(c_value)
    b.explain(ys)


@_rule("MatMul")
def _matmul(node: ir.Node, b: _Builder) -> None:
    a, b_value, y = _required(node, 0), _required(node, 1), node.outputs[0]
    weight = _const(b_value)
    rank = _rank(a)
    if weight is not None and weight.ndim == 2 and rank == 2:
        k, n = weight.shape
        xs = b.slots(a, declare=int(k))
        ys = b.slots(y, declare=int(n))
        if xs is None or ys is None or xs.size != k or ys.size != n:
            b.block_node(node, f"the feature counts around {_describe(node)} are unknown")
            return
        b.weight(node, 1, 0, a, "consumer", out_axis=1, macs_factor=1)
        b.weight(node, 1, 1, y, "producer", macs_factor=1)
        b.explain(ys)
        return
    if weight is not None and weight.ndim <= 2 and rank is not None and rank >= 3:
        # Axis 1 is a batch axis of the matrix product: the same matrix for every channel.
        b.passthrough(node, a, y)
        return
    if weight is None and rank is not None and rank >= 3 and _rank(b_value) == rank:
        _broadcast(node, b)
        return
    b.block_node(node, f"{_describe(node)} multiplies computed tensors over the channel axis")


# ---------------------------------------------------------------------------------------------
# Rules: layout ops
# ---------------------------------------------------------------------------------------------


@_rule("Concat")
def _concat(node: ir.Node, b: _Builder) -> None:
    y = node.outputs[0]
    rank = _rank(y)
    if rank is None:
        b.block_node(node, f"{_describe(node)} has an output of unknown rank")
        return
    if rank < 2:
        for value in node.inputs:
            b.touch(value)
        return
    axis = _attr_int(node, "axis", 0) % rank
    if axis != 1:
        computed = [v for v in node.inputs if v is not None and v.const_value is None]
        if len(computed) != len(node.inputs):
            b.block_node(node, f"{_describe(node)} concatenates a constant")
            return
        for value in computed:
            b.identity(node, value, y)
        b.path(node, [*computed, y], linear=True, homogeneous=True)
        return
    counts = [
        b.channels(v) if v is not None and v.const_value is None else None for v in node.inputs
    ]
    if any(c is None for c in counts):
        b.block_node(node, f"{_describe(node)} concatenates channels of unknown count or constants")
        return
    ys = b.slots(y, declare=int(sum(c for c in counts if c is not None)))
    if ys is None or ys.size != sum(c for c in counts if c is not None):
        b.block_node(node, f"the channel counts around {_describe(node)} do not add up")
        return
    offset = 0
    for value in node.inputs:
        xs = b.slots(value)
        assert xs is not None  # counts were checked above
        b.join(xs, ys[offset : offset + xs.size])
        offset += xs.size
    b.explain(ys)
    b.path(node, [*node.inputs, y], linear=True, homogeneous=True)  # type: ignore[list-item]


@_rule("Split")
def _split(node: ir.Node, b: _Builder) -> None:
    x = _required(node, 0)
    rank = _rank(x)
    if rank is None or rank < 2:
        b.block_node(node, f"{_describe(node)} has an input of unknown rank")
        return
    axis = _attr_int(node, "axis", 0) % rank
    if axis != 1:
        if not _check_side_inputs(node, b):
            return
        for out in node.outputs:
            b.identity(node, x, out)
        b.path(node, [x, *node.outputs], linear=True, homogeneous=True)
        return
    cx = b.channels(x)
    split_value = _input(node, 1)
    if split_value is not None:
        sizes = _const(split_value)
        if sizes is None:
            b.block_node(node, f"{_describe(node)} splits channels by computed sizes")
            return
        form, split = "input", [int(s) for s in sizes.reshape(-1)]
    elif _attr_ints(node, "split") is not None:
        form, split = "attr", _attr_ints(node, "split") or []
    else:
        parts = len(node.outputs)
        if cx is None:
            split = []
        else:
            # Opset 18 ``num_outputs`` puts the remainder in the last part.
            chunk = -(-cx // parts)
            split = [min(chunk, cx - i * chunk) for i in range(parts)]
        form = "implicit"
    xs = b.slots(x)
    if xs is None or sum(split) != xs.size or len(split) != len(node.outputs):
        b.block_node(node, f"the channel counts around {_describe(node)} are unknown")
        return
    b.touch(split_value)
    offset = 0
    for out, size in zip(node.outputs, split, strict=True):
        ys = b.slots(out, declare=size)
        if ys is None or ys.size != size:
            b.block_node(node, f"the channel counts around {_describe(node)} do not add up")
            return
        b.join(xs[offset : offset + size], ys)
        b.explain(ys)
        offset += size
    b.fixup("split", node, [x, *node.outputs], input=x, outputs=tuple(node.outputs), form=form)
    b.path(node, [x, *node.outputs], linear=True, homogeneous=True)


def _slice_params(node: ir.Node, opset: int) -> tuple[str, list[list[int]]] | None:
    """(form, [starts, ends, axes, steps]) with every list constant, or None."""
    if opset < 10:
        starts, ends = _attr_ints(node, "starts"), _attr_ints(node, "ends")
        if starts is None or ends is None:
            return None
        axes = _attr_ints(node, "axes") or list(range(len(starts)))
        return "attr", [starts, ends, axes, [1] * len(starts)]
    arrays = []
    for index in (1, 2):
        array = _const(_input(node, index))
        if array is None:
            return None
        arrays.append([int(v) for v in array.reshape(-1)])
    axes_value, steps_value = _input(node, 3), _input(node, 4)
    axes_array, steps_array = _const(axes_value), _const(steps_value)
    if (axes_value is not None and axes_array is None) or (
        steps_value is not None and steps_array is None
    ):
        return None
    axes = (
        [int(v) for v in axes_array.reshape(-1)]
        if axes_array is not None
        else list(range(len(arrays[0])))
    )
    steps = (
        [int(v) for v in steps_array.reshape(-1)]
        if steps_array is not None
        else [1] * len(arrays[0])
    )
    return "input", [arrays[0], arrays[1], axes, steps]


@_rule("Slice")
def _slice(node: ir.Node, b: _Builder) -> None:
    x, y = _required(node, 0), node.outputs[0]
    rank = _rank(x)
    params = _slice_params(node, b.opset)
    if rank is None or params is None:
        b.block_node(node, f"{_describe(node)} slices with computed bounds")
        return
    for value in node.inputs[1:]:
        b.touch(value)
    if rank < 2:
        return
    form, (starts, ends, axes, steps) = params
    normalized = [a % rank for a in axes]
    if 0 in normalized:
        b.block_node(node, f"{_describe(node)} slices the batch axis")
        return
    if 1 not in normalized:
        b.passthrough(node, x, y)
        return
    entry = normalized.index(1)
    cx = b.channels(x)
    if steps[entry] != 1 or cx is None:
        b.block_node(node, f"{_describe(node)} slices channels with step {steps[entry]}")
        return
    start, end = starts[entry], ends[entry]
    start = max(0, min(cx, start + cx if start < 0 else start))
    end = max(0, min(cx, end + cx if end < 0 else end))
    count = max(0, end - start)
    xs = b.slots(x)
    ys = b.slots(y, declare=count)
    if xs is None or ys is None or ys.size != count or count == 0:
        b.block_node(node, f"the channel counts around {_describe(node)} are unknown")
        return
    b.join(xs[start:end], ys)
    b.explain(ys)
    b.fixup("slice", node, (x, y), input=x, output=y, entry=entry, start=start, form=form)
    b.path(node, (x, y), linear=True, homogeneous=True)


@_rule("Gather")
def _gather(node: ir.Node, b: _Builder) -> None:
    x, indices_value, y = _required(node, 0), _required(node, 1), node.outputs[0]
    b.touch(indices_value)
    if not b.is_channel_tensor(x):
        return  # shape arithmetic or an embedding table; its output is checked where used
    rank = _rank(x)
    indices = _const(indices_value)
    assert rank is not None
    axis = _attr_int(node, "axis", 0) % rank
    if indices is None or axis == 0:
        b.block_node(node, f"{_describe(node)} gathers along the batch axis or computed indices")
        return
    if axis >= 2:
        b.passthrough(node, x, y)
        return
    cx = b.channels(x)
    if indices.ndim != 1 or cx is None:
        b.block_node(node, f"{_describe(node)} gathers channels into a different layout")
        return
    picked = np.where(indices < 0, indices + cx, indices).astype(np.int64)
    xs = b.slots(x)
    ys = b.slots(y, declare=picked.size)
    if xs is None or ys is None or ys.size != picked.size:
        b.block_node(node, f"the channel counts around {_describe(node)} are unknown")
        return
    b.join(xs[picked], ys)
    b.explain(ys)
    b.fixup("gather", node, (x, y), input=x, output=y, indices=picked)
    b.path(node, (x, y), linear=True, homogeneous=True)


@_rule("Pad")
def _pad(node: ir.Node, b: _Builder) -> None:
    x, y = _required(node, 0), node.outputs[0]
    rank = _rank(x)
    if rank is None or rank < 2:
        b.block_node(node, f"{_describe(node)} pads a tensor of unknown rank")
        return
    mode = _attr_str(node, "mode", "constant")
    value = 0.0
    if b.opset < 11:
        pads, form = _attr_ints(node, "pads"), "attr"
        value = _attr_float(node, "value", 0.0)
        axes: list[int] | None = None
    else:
        pads_array = _const(_input(node, 1))
        pads = [int(v) for v in pads_array.reshape(-1)] if pads_array is not None else None
        form = "input"
        value_array = _const(_input(node, 2))
        if _input(node, 2) is not None and value_array is None:
            pads = None
        elif value_array is not None and value_array.size:
            value = float(value_array.reshape(-1)[0])
        known, axes = _axes_operand(node, 3, "__none__")
        if not known:
            pads = None
    if pads is None:
        b.block_node(node, f"{_describe(node)} pads by computed amounts")
        return
    for extra in node.inputs[1:]:
        b.touch(extra)
    axes = [a % rank for a in axes] if axes is not None else list(range(rank))
    if len(pads) != 2 * len(axes):
        b.block_node(node, f"{_describe(node)} has malformed pads")
        return
    befores = dict(zip(axes, pads[: len(axes)], strict=True))
    afters = dict(zip(axes, pads[len(axes) :], strict=True))
    if befores.get(0, 0) or afters.get(0, 0):
        b.block_node(node, f"{_describe(node)} pads the batch axis")
        return
    before, after = befores.get(1, 0), afters.get(1, 0)
    linear = mode in ("reflect", "edge", "wrap") or value == 0.0
    if before == 0 and after == 0:
        if b.identity(node, x, y):
            b.path(node, (x, y), linear=linear, homogeneous=linear)
        return
    cx = b.channels(x)
    if mode != "constant" or before < 0 or after < 0 or cx is None:
        b.block_node(node, f"{_describe(node)} pads the channel axis in mode {mode!r}")
        return
    xs = b.slots(x)
    ys = b.slots(y, declare=before + cx + after)
    if xs is None or ys is None or ys.size != before + cx + after:
        b.block_node(node, f"the channel counts around {_describe(node)} are unknown")
        return
    b.join(xs, ys[before : before + cx])
    b.explain(ys)
    zero_positions = np.concatenate([np.arange(before), np.arange(before + cx, ys.size)])
    b.zero_sources.append(_ZeroSource(node, y, zero_positions))
    entry_before = axes.index(1)
    b.fixup(
        "pad",
        node,
        (x, y),
        output=y,
        before=before,
        after=after,
        entry_before=entry_before,
        entry_after=len(axes) + entry_before,
        form=form,
    )
    b.path(node, (x, y), linear=value == 0.0, homogeneous=value == 0.0)


@_rule("Flatten")
def _flatten(node: ir.Node, b: _Builder) -> None:
    x, y = _required(node, 0), node.outputs[0]
    rank = _rank(x)
    if rank is None or rank < 2 or _attr_int(node, "axis", 1) % rank != 1:
        b.block_node(node, f"{_describe(node)} merges channels with the batch or spatial axes")
        return
    _flatten_channels(node, b, x, y)


def _flatten_channels(node: ir.Node, b: _Builder, x: ir.Value, y: ir.Value) -> bool:
    """Channel k of ``x`` becomes the contiguous block of ``H*W`` features k*HW .. of ``y``."""
    spatial = _spatial(x)
    xs = b.slots(x)
    if spatial is None or xs is None:
        b.block_node(node, f"{_describe(node)} flattens a tensor with non-static dims")
        return False
    ys = b.slots(y, declare=xs.size * spatial)
    if ys is None or ys.size != xs.size * spatial:
        b.block_node(node, f"the feature counts around {_describe(node)} do not add up")
        return False
    b.join(np.repeat(xs, spatial), ys)
    b.explain(ys)
    b.path(node, (x, y), linear=True, homogeneous=True)
    return True


@dataclasses.dataclass(frozen=True)
class _ShapeEntry:
    """One entry of a shape vector: a literal (with where it is stored) or a dim of a tensor."""

    literal: int | None = None
    address: tuple[ir.Node, int, int] | None = None
    dim_of: tuple[ir.Value, int] | None = None


def _trace_shape(
    value: ir.Value | None, user: ir.Node, index: int, depth: int = 0
) -> list[_ShapeEntry] | None:
    """Follow a shape vector through shape arithmetic (Shape, Gather, Concat...) to its sources."""
    if value is None or depth > 12:
        return None
    array = _const(value)
    if array is not None:
        if array.ndim > 1:
            return None
        return [
            _ShapeEntry(literal=int(v), address=(user, index, i))
            for i, v in enumerate(array.reshape(-1).tolist())
        ]
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    op = producer.op_type
    if op == "Shape":
        source = producer.inputs[0]
        rank = _rank(source)
        if source is None or rank is None:
            return None
        start = _attr_int(producer, "start", 0)
        end = _attr_int(producer, "end", rank)
        start, end = (s + rank if s < 0 else s for s in (start, end))
        return [_ShapeEntry(dim_of=(source, axis)) for axis in range(max(start, 0), min(end, rank))]
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        return _trace_shape(producer.inputs[0], producer, 0, depth + 1)
    if op == "Concat":
        entries: list[_ShapeEntry] = []
        for i, part in enumerate(producer.inputs):
            traced = _trace_shape(part, producer, i, depth + 1)
            if traced is None:
                return None
            entries.extend(traced)
        return entries
    if op == "Gather":
        data = _trace_shape(producer.inputs[0], producer, 0, depth + 1)
        indices = _const(producer.inputs[1])
        if data is None or indices is None or indices.ndim > 1:
            return None
        return [data[int(i)] for i in indices.reshape(-1)]
    if op == "Slice":
        data = _trace_shape(producer.inputs[0], producer, 0, depth + 1)
        bounds = [_const(_input(producer, i)) for i in (1, 2)]
        if data is None or any(x is None for x in bounds):
            return None
        start, end = (int(x.reshape(-1)[0]) for x in bounds)  # type: ignore[union-attr]
        steps = _const(_input(producer, 4))
        if steps is not None and int(steps.reshape(-1)[0]) != 1:
            return None
        return data[slice(start, end)]
    return None


@_rule("Reshape")
def _reshape(node: ir.Node, b: _Builder) -> None:
    x, y = _required(node, 0), node.outputs[0]
    b.touch(node.inputs[1])
    if not b.is_channel_tensor(x):
        if b.is_channel_tensor(y):
            b.block_value(
                y, f"{_describe(node)} builds channels from a lower-rank tensor", explain=True
            )
        return
    entries = _trace_shape(node.inputs[1], node, 1)
    cx = b.channels(x)
    if entries is None or cx is None or len(entries) < 2:
        b.block_node(node, f"{_describe(node)} has a target shape this analysis cannot follow")
        return
    allowzero = _attr_int(node, "allowzero", 0)
    batch = _static_dim(x, 0)

    def literal(entry: _ShapeEntry, number: int) -> bool:
        return entry.dim_of is None and entry.literal == number

    def batch_like(entry: _ShapeEntry) -> bool:
        if entry.dim_of is not None:
            return entry.dim_of[1] == 0
        return (entry.literal == 0 and not allowzero) or (
            batch is not None and entry.literal == batch
        )

    first, second = entries[0], entries[1]
    spatial = _spatial(x)
    if len(entries) == 2 and spatial is not None:
        flat = cx * spatial
        if (batch_like(first) and (literal(second, -1) or literal(second, flat))) or (
            literal(first, -1) and literal(second, flat)
        ):
            if literal(second, flat) and flat not in (0, -1):
                if second.address is None:
                    b.block_node(node, f"{_describe(node)} has a target shape it cannot edit")
                    return
                b.fixup("shape_entry", node, (y,), tensor=y, address=second.address)
            _flatten_channels(node, b, x, y)
            return
    keeps_channels = (
        (literal(second, 0) and not allowzero) or literal(second, cx) or (second.dim_of == (x, 1))
    )
    minus_ones = sum(literal(e, -1) for e in entries)
    if (batch_like(first) or literal(first, -1)) and keeps_channels and minus_ones <= 1:
        cy = _static_dim(y, 1) if _rank(y) == len(entries) else None
        if cy is not None and cy != cx:
            b.block_node(node, f"{_describe(node)} changes the channel count")
            return
        if literal(second, cx) and cx != 0:
            if second.address is None:
                b.block_node(node, f"{_describe(node)} has a target shape it cannot edit")
                return
            b.fixup("shape_entry", node, (y,), tensor=y, address=second.address)
        b.passthrough(node, x, y)
        return
    shown = [e.literal if e.dim_of is None else f"dim{e.dim_of[1]}" for e in entries]
    b.block_node(
        node,
        f"feeds Reshape {node.name or '<unnamed>'} whose target shape {shown} is not a "
        "flatten-style merge of channels nor channel-preserving",
    )


@_rule("Squeeze", "Unsqueeze")
def _squeeze(node: ir.Node, b: _Builder) -> None:
    x, y = _required(node, 0), node.outputs[0]
    if not b.is_channel_tensor(x) and not b.is_channel_tensor(y):
        b.touch(x)
        b.touch(_input(node, 1))
        return
    known, axes = _axes_operand(node, 1, "axes")
    b.touch(_input(node, 1))
    rank = _rank(y) if node.op_type == "Unsqueeze" else _rank(x)
    if not known or rank is None:
        b.block_node(node, f"{_describe(node)} has computed axes")
        return
    if axes is None:
        # Squeeze without axes drops every unit dim: safe only if batch and channels are not 1.
        if _static_dim(x, 0) == 1 or b.channels(x) == 1 or _static_dim(x, 0) is None:
            b.block_node(node, f"{_describe(node)} may drop the batch or channel axis")
            return
        axes = []
    if {a % rank for a in axes} & {0, 1}:
        b.block_node(node, f"{_describe(node)} moves the channel axis")
        return
    b.passthrough(node, x, y)


@_rule("Transpose")
def _transpose(node: ir.Node, b: _Builder) -> None:
    perm = _attr_ints(node, "perm")
    x = _required(node, 0)
    if not b.is_channel_tensor(x):
        b.touch(x)
        return
    if perm is None or perm[:2] != [0, 1]:
        b.block_node(node, f"{_describe(node)} moves the channel axis (perm={perm})")
        return
    b.passthrough(node, x, node.outputs[0])


@_rule("Resize", "Upsample")
def _resize(node: ir.Node, b: _Builder) -> None:
    x, y = _required(node, 0), node.outputs[0]
    rank = _rank(x)
    if rank is None or rank < 2:
        b.block_node(node, f"{_describe(node)} resizes a tensor of unknown rank")
        return
    axes = _attr_ints(node, "axes")
    axes = [a % rank for a in axes] if axes is not None else list(range(rank))
    if node.op_type == "Upsample" and b.opset < 9:
        scales_list = [float(s) for s in (node.attributes["scales"].as_floats())]
        scales: np.ndarray | None = np.asarray(scales_list)
        sizes_index = None
    else:
        if node.op_type == "Upsample" or b.opset < 11:
            scales_index, sizes_index = 1, None
        else:
            scales_index, sizes_index = 2, 3
        scales_value = _input(node, scales_index)
        scales = _const(scales_value)
        if scales_value is not None and scales is None:
            b.block_node(node, f"{_describe(node)} has computed scales")
            return
        if scales is not None and scales.size == 0:
            scales = None
    if scales is not None and 1 in axes and float(scales.reshape(-1)[axes.index(1)]) != 1.0:
        b.block_node(node, f"{_describe(node)} scales the channel axis")
        return
    if scales is not None and 0 in axes and float(scales.reshape(-1)[axes.index(0)]) != 1.0:
        b.block_node(node, f"{_describe(node)} scales the batch axis")
        return
    sizes_value = _input(node, sizes_index) if sizes_index is not None else None
    if sizes_value is not None:
        sizes = _const(sizes_value)
        if sizes is None:
            b.block_node(node, f"{_describe(node)} has computed output sizes")
            return
        if sizes.size and 1 in axes:
            assert sizes_index is not None
            cx = b.channels(x)
            if cx is None or int(sizes.reshape(-1)[axes.index(1)]) != cx:
                b.block_node(node, f"{_describe(node)} resizes the channel axis")
                return
            b.fixup("shape_entry", node, (y,), tensor=y, address=(node, sizes_index, axes.index(1)))
    for extra in node.inputs[1:]:
        if b.is_channel_tensor(extra):
            b.block_node(node, f"{_describe(node)} takes a computed tensor as a side input")
            return
        b.touch(extra)
    b.passthrough(node, x, y)


@_rule("Expand")
def _expand(node: ir.Node, b: _Builder) -> None:
    x, y = _required(node, 0), node.outputs[0]
    shape = _const(node.inputs[1])
    b.touch(node.inputs[1])
    out_rank = _rank(y)
    if not b.is_channel_tensor(x):
        if b.is_channel_tensor(y):
            b.block_value(
                y, f"{_describe(node)} broadcasts a tensor onto the channel axis", explain=True
            )
        b.touch(x)
        return
    if shape is None or out_rank is None or _rank(x) != out_rank:
        b.block_node(node, f"{_describe(node)} expands to a computed shape")
        return
    position = 1 - (out_rank - shape.size)
    cx = b.channels(x)
    if position >= 0:
        target = int(shape.reshape(-1)[position])
        if target not in (1, cx):
            b.block_node(node, f"{_describe(node)} broadcasts onto the channel axis")
            return
        if target == cx and cx != 1:
            b.fixup("shape_entry", node, (y,), tensor=y, address=(node, 1, position))
    b.passthrough(node, x, y)


@_rule("Tile")
def _tile(node: ir.Node, b: _Builder) -> None:
    repeats = _const(_input(node, 1))
    b.touch(_input(node, 1))
    if not b.is_channel_tensor(node.inputs[0]):
        b.touch(node.inputs[0])
        return
    if repeats is None or repeats.size < 2 or int(repeats[0]) != 1 or int(repeats[1]) != 1:
        b.block_node(node, f"{_describe(node)} repeats the batch or channel axis")
        return
    b.passthrough(node, node.inputs[0], node.outputs[0])


@_rule("Shape")
def _shape(node: ir.Node, b: _Builder) -> None:
    """Reading a shape is harmless unless the channel count flows somewhere."""
    x = _required(node, 0)
    b.touch(x)
    if not b.is_channel_tensor(x):
        return
    rank = _rank(x)
    assert rank is not None
    start = _attr_int(node, "start", 0)
    end = _attr_int(node, "end", rank)
    start, end = (s + rank if s < 0 else s for s in (start, end))
    read = range(max(start, 0), min(end, rank))
    if 1 not in read:
        return
    for use in node.outputs[0].uses():
        axes = _shape_entries_read(use.node, use.idx, len(read))
        if axes is None or any(read[i] == 1 for i in axes):
            b.block_value(
                x,
                f"its shape is read by {_describe(node)} and the channel count is used by "
                f"{_describe(use.node)}",
            )
            return
    if node.outputs[0].is_graph_output():
        b.block_value(x, f"its shape is a graph output via {_describe(node)}")


def _shape_entries_read(user: ir.Node, index: int, length: int) -> list[int] | None:
    """Which entries of a shape vector ``user`` reads, when it only picks some of them."""
    if index != 0:
        return None
    if user.op_type == "Gather" and _attr_int(user, "axis", 0) == 0:
        indices = _const(user.inputs[1])
        if indices is None:
            return None
        return [int(i) % length for i in indices.reshape(-1)]
    if user.op_type == "Slice":
        bounds = [_const(_input(user, i)) for i in (1, 2)]
        steps = _const(_input(user, 4))
        if any(x is None for x in bounds) or (steps is not None and int(steps.reshape(-1)[0]) != 1):
            return None
        start, end = (int(x.reshape(-1)[0]) for x in bounds)  # type: ignore[union-attr]
        return list(range(length))[slice(start, end)]
    return None


@_rule("Size")
def _size(node: ir.Node, b: _Builder) -> None:
    x = _required(node, 0)
    if b.is_channel_tensor(x):
        b.block_value(x, f"its element count is read by {_describe(node)}")
    b.touch(x)


@_rule("Constant", "ConstantOfShape", "Range", "EyeLike", "RandomNormal", "RandomUniform")
def _source(node: ir.Node, b: _Builder) -> None:
    """Ops that read no channels; a channel tensor they make stays unexplained (frozen)."""
    for value in node.inputs:
        if b.is_channel_tensor(value):
            b.block_value(value, f"consumed by {_describe(node)}")
        b.touch(value)


def supported_op_types() -> list[str]:
    """The op types the analysis has a rule for (any other op freezes what it touches)."""
    return sorted(_RULES)
