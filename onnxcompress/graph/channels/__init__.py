"""Channel-dependency analysis: which channels of which tensors must be removed together.

Structural passes (``lrf``, ``merge``) rank and remove channels through the groups computed here;
nothing the analysis does not understand is ever offered for removal.

How it works
------------
Every activation tensor with a channel axis owns one *slot* per position on that axis. The
channel axis is axis 1 of ``[N, C, ...]`` feature maps and ``[N, F]`` feature vectors, or
wherever a Transpose moved it; each rule says where the channels of its outputs lie, and
``group.axis(tensor)`` tells the passes. A registry of per-op rules (one :class:`OpRule` object
per op family, ``registry.FAMILIES``) states how the slots of a node's inputs and outputs are
coupled: an activation joins input slot ``k`` to output slot ``k``, ``Concat`` joins input slot
``k`` of operand ``i`` to output slot ``offset_i + k``, ``Flatten`` joins channel ``k`` to the
``H*W`` columns it becomes, a depthwise ``Conv`` joins input ``k`` to its ``m`` outputs, a
channel-axis ``Pad`` creates *zero slots* that come from nowhere, and a ``Conv``/``Gemm`` ends the
coupling: it *consumes* its input slots (weight axis 1) and *produces* new ones (weight axis 0).
Rules also register the weights to slice (:class:`WeightSlice`) and the layout constants to
rewrite (:class:`LayoutFixup`: ``Slice`` bounds, ``Split`` sizes, ``Pad`` amounts, ``Reshape``
targets that spell a channel count, a depthwise ``Conv``'s ``group``); the same rule object
rewrites them after a cut and, for weighted layers, folds a compensation bias into the layer.

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
  expose a channel count, ops that mix channels (LRN, Softmax over channels), a Transpose that
  moves the batch axis and reshapes that are neither a flatten nor channel-preserving are
  blocked. Nothing unknown is ever cut.
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

The analysis stays valid while the graph is edited only through :mod:`onnxcompress.graph.surgery`:
all positions are stored in the original coordinates and mapped to current ones through the set
of removed components, so removing channels of one group never invalidates another group.

Limits: channels-last regions (ConvNeXt's permuted blocks, NHWC graphs from tf2onnx between their
Transposes) are followed: a Transpose carries the channels to their new axis, elementwise and
layout ops follow them there, and an op that ONNX defines on axis 1 (Conv, pooling,
BatchNormalization, Flatten...) freezes an input whose channels lie elsewhere. Channels off
axis 1 are cut through the families that carry no layout constant assuming axis 1
(``OpRule.cuts_any_axis``: elementwise, broadcast arithmetic with its per-channel constants
sliced on their own axis, reductions, softmax and normalizations over other axes, Transpose,
Squeeze): tf2onnx's NHWC squeeze-excite blocks prune. Any other op meeting them (Concat, Split,
Slice, Reshape, a MatMul contracting them...) freezes the group, naming the op. A
channel shuffle (Reshape-Transpose-Reshape, ShuffleNet) is frozen; LRN freezes the channels it
normalizes (removing one would change its neighbours).

Quantized (QDQ) graphs: channels flow through QuantizeLinear/DequantizeLinear, and a weight
stored as integers behind a DequantizeLinear is a constant whose rule reads, cuts and re-encodes
it (``WeightSlice.storage``); shared or blocked quantized weights are frozen.

Modules: ``groups`` (the data model), ``analysis`` (the walk and the grouping), ``rule`` (the
rule type and its helpers), ``registry`` (the families), and the families themselves:
``elementwise``, ``weighted``, ``layout``, ``shapes``, ``quantization``.

Typical use::

    analysis = analyze_channels(model)
    for group in analysis.prunable:
        filters = group.producer_matrix()    # [size, fan_in], rows = channels
        outgoing = group.consumer_matrix()   # [size, fan_out]
        saved = group.macs_per_channel()     # MACs per sample removed with one channel
    print(analysis.summary())                # frozen groups come with their reasons
"""

from __future__ import annotations

from onnxcompress.graph.channels.analysis import analyze_channels
from onnxcompress.graph.channels.groups import (
    CHANNEL_AXIS,
    ChannelAnalysis,
    ChannelGroup,
    LayoutFixup,
    WeightSlice,
)
from onnxcompress.graph.channels.registry import rule_for, supported_op_types
from onnxcompress.graph.channels.rule import OpRule

__all__ = [
    "CHANNEL_AXIS",
    "ChannelAnalysis",
    "ChannelGroup",
    "LayoutFixup",
    "OpRule",
    "WeightSlice",
    "analyze_channels",
    "rule_for",
    "supported_op_types",
]
