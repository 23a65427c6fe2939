"""The data model of the channel analysis: groups of coupled channels and the weights they slice.

A :class:`ChannelAnalysis` holds the :class:`ChannelGroup` objects of one model plus the
bookkeeping that keeps them valid while surgery removes channels; a group lists the weight axes
(:class:`WeightSlice`) and layout constants (:class:`LayoutFixup`) its removal edits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.edits import private_initializer, set_initializer

if TYPE_CHECKING:
    from onnxcompress.graph.channels.rule import OpRule

Role = Literal["producer", "consumer", "param"]

# The channel axis of NCHW tensors (``[N, C, ...]`` feature maps, ``[N, F]`` feature vectors):
# where Conv, pooling, BatchNormalization and Gemm put channels, and where every graph input's
# channels are assumed to be.
CHANNEL_AXIS = 1


def describe(node: ir.Node) -> str:
    """How reasons and errors name a node: ``"Conv conv1"``."""
    return f"{node.op_type} {node.name or '<unnamed>'}"


def unique_nodes(nodes: Iterable[ir.Node]) -> list[ir.Node]:
    seen: set[int] = set()
    result = []
    for node in nodes:
        if id(node) not in seen:
            seen.add(id(node))
            result.append(node)
    return result


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
        storage: for a weight the node reads through an op that decodes it from stored
            constants (a DequantizeLinear of int8 values), that op's rule, which reads, cuts and
            re-encodes the stored tensors; None for a plain initializer.
    """

    node: ir.Node
    input_index: int
    axis: int
    tensor: ir.Value
    role: Role
    is_bias: bool = False
    out_axis: int | None = None
    macs_factor: int = 0
    storage: OpRule[Any] | None = None

    @property
    def decoder(self) -> ir.Node | None:
        """The node that decodes the weight from stored constants (None: an initializer)."""
        if self.storage is None:
            return None
        value = self.node.inputs[self.input_index]
        return None if value is None else value.producer()

    @property
    def value(self) -> ir.Value:
        """The initializer that holds the weight: the input itself, or the stored values its
        decoder reads (same shape). Surgery may have replaced it by a copy."""
        decoder = self.decoder
        if decoder is not None and self.storage is not None:
            return self.storage.stored_value(decoder)
        value = self.node.inputs[self.input_index]
        if value is None or value.const_value is None:
            raise ValueError(f"input {self.input_index} of {describe(self.node)} is not a constant")
        return value

    def array(self) -> np.ndarray:
        """The weight's current contents (decoded to floats when it is stored quantized)."""
        decoder = self.decoder
        if decoder is not None and self.storage is not None:
            return self.storage.decode(decoder)
        return self.value.const_value.numpy()  # type: ignore[union-attr]

    def cut(self, graph: ir.Graph, positions: np.ndarray) -> None:
        """Delete ``positions`` along ``axis`` (shared initializers are copied first)."""
        decoder = self.decoder
        if decoder is not None and self.storage is not None:
            self.storage.cut_stored(graph, decoder, self.axis, positions)
            return
        value = private_initializer(graph, self.node, self.input_index)
        array = value.const_value.numpy()  # type: ignore[union-attr]
        set_initializer(graph, value, np.delete(array, positions, axis=self.axis))

    def write(self, graph: ir.Graph, array: np.ndarray) -> np.ndarray | None:
        """Give the weight new contents (a folded compensation).

        Returns:
            For a weight stored quantized, how much each scale of its decoder grew to hold the
            new values (the scale's shape, 1 where unchanged), or None when no scale changed.
        """
        decoder = self.decoder
        if decoder is not None and self.storage is not None:
            return self.storage.encode(graph, decoder, array)
        value = private_initializer(graph, self.node, self.input_index)
        set_initializer(graph, value, array)
        return None

    def describe(self) -> str:
        return f"{describe(self.node)} input {self.input_index} axis {self.axis} ({self.role})"


@dataclasses.dataclass(frozen=True, eq=False)
class LayoutFixup:
    """A structural constant of a node that must be recomputed after channels are removed.

    Each op family that writes such constants (``Slice`` bounds, ``Split`` sizes, ``Pad``
    amounts, a depthwise ``Conv``'s ``group``...) has a subclass holding what its rule needs, in
    original coordinates; ``rule`` is the :class:`~onnxcompress.graph.channels.rule.OpRule` that
    made the fixup and knows how to apply it.
    """

    kind: ClassVar[str] = "layout"

    rule: OpRule[Any]
    node: ir.Node
    tensors: tuple[ir.Value, ...]

    def apply(self, graph: ir.Graph, analysis: ChannelAnalysis) -> None:
        """Rewrite the constant for the channels still alive in ``analysis``."""
        self.rule.fix(graph, analysis, self)


@dataclasses.dataclass(frozen=True, eq=False)
class ZeroSource:
    """Channel positions of a Pad output that hold the pad value rather than data."""

    node: ir.Node
    tensor: ir.Value
    positions: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class PathStep:
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

    def axis(self, tensor: ir.Value) -> int:
        """The axis of ``tensor`` that holds the group's channels (1 for NCHW tensors)."""
        self._check_member(tensor)
        return self.analysis.axis(tensor)

    def positions(self, tensor: ir.Value) -> np.ndarray:
        """Current positions of the group's channels on ``tensor``'s channel axis.

        Returns:
            int array ``[size, multiplicity]``; row ``i`` holds channel ``i``'s positions in
            ascending order. These index :meth:`axis` of ``tensor`` and the ``axis`` of every
            :class:`WeightSlice` on ``tensor``.
        """
        self._check_member(tensor)
        alive = ~self.analysis._removed[self._components]
        original = self._positions[tensor][alive]
        return self.analysis.current_positions(tensor)[original]

    def _check_member(self, tensor: ir.Value) -> None:
        if tensor not in self._positions:
            raise ValueError(f"tensor {tensor.name!r} carries no channel of group {self.id}")

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
        return unique_nodes(ws.node for ws in self.producers if not ws.is_bias)

    @property
    def consumer_nodes(self) -> list[ir.Node]:
        return unique_nodes(ws.node for ws in self.consumers)

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
        return unique_nodes(z.node for z in self._zero_sources())

    def _zero_sources(self) -> list[ZeroSource]:
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
        return unique_nodes(step.node for step in self._path_steps())

    def _path_steps(self) -> list[PathStep]:
        steps: list[PathStep] = []
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

    def slice_matrix(self, slices: Iterable[WeightSlice]) -> np.ndarray:
        """The entries of ``slices`` per channel: row ``i`` concatenates channel ``i``'s parts.

        Each slice contributes its positions of channel ``i`` on its ``axis`` (a Conv's
        ``W[i]`` or ``W[:, i]``, a Gemm's block of columns...), flattened.

        Returns:
            float64 ``[size, total width]`` (0 wide for no slices).
        """
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
        return self.slice_matrix(chosen)

    def producer_bias(self) -> np.ndarray:
        """The producers' bias entries per channel, float64 ``[size, n_bias]`` (may be 0 wide)."""
        return self.slice_matrix(ws for ws in self.producers if ws.is_bias)

    def consumer_matrix(self) -> np.ndarray:
        """The outgoing weights of each channel, stacked across every consumer.

        Row ``i`` concatenates each consumer's input slice for channel ``i`` (a Conv's
        ``W_next[:, i]`` flattened, a Gemm's block of columns). ``norm(row)`` is the
        ``||W_next[:, j]||`` term of the lrf score.

        Returns:
            float64 ``[size, fan_out]``.
        """
        return self.slice_matrix(self.consumers)

    # -- cost ----------------------------------------------------------------------------------

    def macs_per_channel(self, factors: Mapping[ir.Node, float] | None = None) -> int:
        """Multiply-accumulates per sample saved by removing one channel, from current shapes.

        Counts the weighted layers only (Conv, ConvTranspose, Gemm, MatMul, depthwise kernels) --
        producers' rows, consumers' columns and depthwise rows -- as MAC counters usually do;
        elementwise ops and biases count nothing. A node that both reads and writes the group is
        counted twice for the element where its row and column cross (negligible).

        Args:
            factors: MACs per weight element of the nodes whose shapes here are symbolic,
                counted at the run's input shapes (``metrics.macs_per_weight_element``); they
                replace those nodes' ``macs_factor``.
        """
        total = 0.0
        for ws in self.slices:
            if ws.is_bias or ws.macs_factor == 0:
                continue
            array = ws.array()
            per_position = array.size // max(int(array.shape[ws.axis]), 1)
            factor = factors.get(ws.node, ws.macs_factor) if factors else ws.macs_factor
            total += per_position * self.multiplicity(ws.tensor) * factor
        return round(total)

    def params_per_channel(self) -> int:
        """Weight elements removed with one channel (all sliced initializers, biases included)."""
        total = 0
        for ws in self.slices:
            array = ws.array()
            per_position = array.size // max(int(array.shape[ws.axis]), 1)
            total += per_position * self.multiplicity(ws.tensor)
        return total


class ChannelAnalysis:
    """The channel groups of one model, plus the bookkeeping surgery needs to keep them valid.

    Filled by :func:`~onnxcompress.graph.channels.analysis.analyze_channels`.
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.groups: list[ChannelGroup] = []
        self._removed = np.zeros(0, dtype=bool)
        self._labels: dict[ir.Value, np.ndarray] = {}
        self._axes: dict[ir.Value, int] = {}
        self._records_by_tensor: dict[ir.Value, list[WeightSlice]] = {}
        self._fixups_by_tensor: dict[ir.Value, list[LayoutFixup]] = {}
        self._zero_by_tensor: dict[ir.Value, list[ZeroSource]] = {}
        self._path_by_tensor: dict[ir.Value, list[PathStep]] = {}
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

    def axis(self, tensor: ir.Value) -> int:
        """The channel axis of a tracked ``tensor``."""
        return self._axes[tensor]

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

    # -- mutation, for onnxcompress.graph.surgery ----------------------------------------------

    def mark_removed(self, components: np.ndarray) -> None:
        """Record that these components are gone (called by ``surgery.remove_channels``)."""
        self._removed[components] = True

    def slice_of(self, node: ir.Node, input_index: int) -> WeightSlice | None:
        """A recorded slice of input ``input_index`` of ``node`` (it says how the input is
        stored), or None when the analysis recorded none."""
        for tensor in [*node.outputs, *node.inputs]:
            for ws in self._records_by_tensor.get(tensor, ()) if tensor is not None else ():
                if ws.node is node and ws.input_index == input_index:
                    return ws
        return None

    def add_slice(self, weight_slice: WeightSlice) -> None:
        """Register a weight axis created after the analysis (a bias made by compensation)."""
        self._records_by_tensor.setdefault(weight_slice.tensor, []).append(weight_slice)

    def alias_tensor(self, new: ir.Value, like: ir.Value) -> None:
        """Track ``new`` as carrying exactly the channels of ``like`` (a node inserted after)."""
        self._labels[new] = self._labels[like]
        self._axes[new] = self._axes[like]
        for group in self._groups_by_tensor.get(like, ()):
            group._positions[new] = group._positions[like]
            group.tensors.append(new)
        self._groups_by_tensor[new] = list(self._groups_by_tensor.get(like, ()))
