"""The graph rewrite of the ``cheapconv`` pass: a chosen Conv becomes a spatial Conv (depthwise,
grouped or one-hot shift) and a 1×1 Conv, a grouped Conv and a shuffle, or Slice shifts and a 1×1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxcompress.fitting import cheap_kernels
from onnxcompress.graph.edits import fresh_name, fresh_node_name, new_initializer

if TYPE_CHECKING:
    from onnxcompress.passes.cheapconv import CheapConvConfig

# Pad and Slice read their pads/starts from inputs (not attributes) from opset 11 on.
_MIN_SLICE_OPSET = 11
_INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass
class ConvSite:
    """A Conv chosen for substitution and what the rewrite needs to know about it."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    kernel: tuple[int, ...]
    dilations: tuple[int, ...]
    strides: tuple[int, ...]

    @classmethod
    def of(cls, node: ir.Node) -> ConvSite:
        """The site of an eligible Conv (constant weight and bias, spatial axes)."""
        weight_value = node.inputs[1]
        assert weight_value is not None and weight_value.const_value is not None
        weight = weight_value.const_value.numpy()
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = None if bias_value is None else bias_value.const_value.numpy()  # type: ignore[union-attr]
        spatial = weight.ndim - 2
        kernel = tuple(int(k) for k in weight.shape[2:])
        return cls(
            node=node,
            weight=weight,
            bias=bias,
            kernel=kernel,
            dilations=_ints(node, "dilations") or (1,) * spatial,
            strides=_ints(node, "strides") or (1,) * spatial,
        )


class ConvRewriter:
    """Builds and splices in the replacement of each chosen Conv, as ``cfg`` says.

    Args:
        cfg: the pass's options (kind, groups, mix, shift_op...).
        fit_data: the activation init will refit the 1×1 and its bias: the 1×1 gets a bias
            of its own even where the Conv had none.
    """

    def __init__(self, cfg: CheapConvConfig, fit_data: bool) -> None:
        self.cfg = cfg
        self.fit_data = fit_data

    def rewrite(
        self, model: ir.Model, site: ConvSite, layer: dict[str, Any], fixed_nodes: list[str]
    ) -> list[ir.Node]:
        """Replace ``site``'s Conv in ``model`` and return the new nodes (the last one reads as
        the Conv did); the closed form's error goes into ``layer``, and the names of spatial
        Convs that must stay fixed (one-hot shift kernels) into ``fixed_nodes``."""
        cfg = self.cfg
        if cfg.kind == "separable":
            sep = cheap_kernels.separable(site.weight, cfg.smoothness, site.dilations)
            layer["rel_error"] = sep.rel_error
            return self._two_convs(model, site, sep.depthwise, site.weight.shape[1], sep.pointwise)
        if cfg.kind == "group":
            if cfg.mix == "conv":
                grp = cheap_kernels.grouped(
                    site.weight, cfg.groups, cfg.refine, cfg.smoothness, site.dilations
                )
                layer["rel_error"] = grp.rel_error
                return self._two_convs(model, site, grp.grouped, cfg.groups, grp.mixing)
            shuf = cheap_kernels.shuffled(
                site.weight, cfg.groups, cfg.assignment, cfg.smoothness, site.dilations
            )
            layer["rel_error"] = shuf.rel_error
            return self._shuffled(model, site, shuf)
        shf = cheap_kernels.shift(site.weight, cfg.smoothness, site.dilations)
        layer["rel_error"] = shf.rel_error
        layer["distinct_shifts"] = len({tuple(p) for p in shf.positions.tolist()})
        pads = self._slice_pads(model, site) if cfg.shift_op == "slice" else None
        if pads is None:
            if cfg.shift_op == "slice":
                layer["shift_op"] = "conv"
            one_hot = shf.one_hot(site.kernel, site.weight.dtype)
            nodes = self._two_convs(model, site, one_hot, site.weight.shape[1], shf.pointwise)
            fixed_nodes.append(nodes[0].name or "")
            return nodes
        return self._shift_slices(model, site, shf, pads)

    def _spatial_attributes(self, site: ConvSite, group: int) -> list[ir.Attr]:
        """The original Conv's attributes (pads, auto_pad, strides, dilations) with ``group``."""
        attrs = [
            ir.Attr(attr.name, attr.type, attr.value)
            for name, attr in site.node.attributes.items()
            if name not in ("group", "kernel_shape")
        ]
        attrs.append(ir.AttrInt64("group", group))
        attrs.append(ir.AttrInt64s("kernel_shape", list(site.kernel)))
        return attrs

    def _pointwise(
        self, model: ir.Model, site: ConvSite, source: ir.Value, weight: np.ndarray
    ) -> ir.Node:
        graph, node = model.graph, site.node
        inputs = [source, new_initializer(graph, f"{_base(site)}.pointwise.weight", weight)]
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        if self.fit_data:
            # The activation fit rewrites the bias: give the 1×1 one of its own.
            bias = site.bias if site.bias is not None else np.zeros(weight.shape[0], weight.dtype)
            inputs.append(new_initializer(graph, f"{_base(site)}.pointwise.bias", bias.copy()))
        elif bias_value is not None:
            inputs.append(bias_value)
        ones = [1] * len(site.kernel)
        return ir.Node(
            "",
            "Conv",
            inputs,
            [ir.AttrInt64("group", 1), ir.AttrInt64s("kernel_shape", ones)],
            name=fresh_node_name(graph, f"{node.name or 'Conv'}/pointwise"),
        )

    def _two_convs(
        self,
        model: ir.Model,
        site: ConvSite,
        spatial_weight: np.ndarray,
        group: int,
        pointwise_weight: np.ndarray,
    ) -> list[ir.Node]:
        """k×k Conv (``group`` groups, no bias) then a 1×1 Conv carrying the bias."""
        graph, node = model.graph, site.node
        suffix = {"separable": "depthwise", "group": "grouped", "shift": "shift"}[self.cfg.kind]
        spatial = ir.Node(
            "",
            "Conv",
            [
                node.inputs[0],
                new_initializer(graph, f"{_base(site)}.{suffix}.weight", spatial_weight),
            ],
            self._spatial_attributes(site, int(group)),
            name=fresh_node_name(graph, f"{node.name or 'Conv'}/{suffix}"),
        )
        spatial.outputs[0].name = fresh_name(graph, f"{node.outputs[0].name}.{suffix}")
        pointwise = self._pointwise(model, site, spatial.outputs[0], pointwise_weight)
        self._replace(model, site, [spatial, pointwise])
        return [spatial, pointwise]

    def _shuffled(
        self, model: ir.Model, site: ConvSite, factors: cheap_kernels.ShuffleFactors
    ) -> list[ir.Node]:
        """Grouped conv (rows in shuffled order, bias with them), then Gather on channels."""
        graph, node = model.graph, site.node
        inputs = [
            node.inputs[0],
            new_initializer(graph, f"{_base(site)}.grouped.weight", factors.grouped),
        ]
        if site.bias is not None:
            inputs.append(
                new_initializer(graph, f"{_base(site)}.grouped.bias", site.bias[factors.order])
            )
        conv = ir.Node(
            "",
            "Conv",
            inputs,
            self._spatial_attributes(site, self.cfg.groups),
            name=fresh_node_name(graph, f"{node.name or 'Conv'}/grouped"),
        )
        conv.outputs[0].name = fresh_name(graph, f"{node.outputs[0].name}.grouped")
        indices = new_initializer(graph, f"{_base(site)}.shuffle", factors.inverse.astype(np.int64))
        gather = ir.Node(
            "",
            "Gather",
            [conv.outputs[0], indices],
            [ir.AttrInt64("axis", 1)],
            name=fresh_node_name(graph, f"{node.name or 'Conv'}/shuffle"),
        )
        self._replace(model, site, [conv, gather])
        return [conv, gather]

    def _slice_pads(self, model: ir.Model, site: ConvSite) -> tuple[int, ...] | None:
        """Explicit (begin..., end...) pads of the Conv, or None where Slice cannot shift.

        ``auto_pad=SAME_*`` pads depend on the input size: known only for static dims.
        """
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < _MIN_SLICE_OPSET:
            return None
        node, spatial = site.node, len(site.kernel)
        auto_attr = node.attributes.get("auto_pad")
        auto_pad = auto_attr.as_string() if auto_attr is not None else "NOTSET"
        if auto_pad in ("NOTSET", ""):
            return _ints(node, "pads") or (0,) * (2 * spatial)
        if auto_pad == "VALID":
            return (0,) * (2 * spatial)
        source = node.inputs[0]
        dims = source.shape if source is not None else None
        if dims is None or len(dims) != spatial + 2:
            return None
        begins, ends = [], []
        for axis in range(spatial):
            size = dims[axis + 2]
            if not isinstance(size, int):
                return None
            stride, reach = site.strides[axis], site.dilations[axis] * (site.kernel[axis] - 1) + 1
            total = max((-(-size // stride) - 1) * stride + reach - size, 0)
            small, big = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else big)
            ends.append(big if auto_pad == "SAME_UPPER" else small)
        return (*begins, *ends)

    def _shift_slices(
        self,
        model: ir.Model,
        site: ConvSite,
        factors: cheap_kernels.ShiftFactors,
        pads: tuple[int, ...],
    ) -> list[ir.Node]:
        """Gather (channels sorted by shift), Pad, one Slice per shift, Concat, 1×1 Conv."""
        graph, node = model.graph, site.node
        base, label = _base(site), node.name or "Conv"
        spatial = len(site.kernel)
        flat = np.ravel_multi_index(tuple(factors.positions.T), site.kernel)
        order = np.argsort(flat, kind="stable").astype(np.int64)
        nodes: list[ir.Node] = []
        source = node.inputs[0]
        assert source is not None
        if not np.array_equal(order, np.arange(order.size)):
            gather = ir.Node(
                "",
                "Gather",
                [source, new_initializer(graph, f"{base}.shift.order", order)],
                [ir.AttrInt64("axis", 1)],
                name=fresh_node_name(graph, f"{label}/shift_order"),
            )
            nodes.append(gather)
            source = gather.outputs[0]
        if any(pads):
            pad = ir.Node(
                "",
                "Pad",
                [
                    source,
                    new_initializer(
                        graph,
                        f"{base}.shift.pads",
                        np.array([0, 0, *pads[:spatial], 0, 0, *pads[spatial:]], np.int64),
                    ),
                ],
                [ir.AttrString("mode", "constant")],
                name=fresh_node_name(graph, f"{label}/shift_pad"),
            )
            nodes.append(pad)
            source = pad.outputs[0]
        axes = new_initializer(
            graph, f"{base}.shift.axes", np.arange(1, spatial + 2, dtype=np.int64)
        )
        steps = new_initializer(
            graph, f"{base}.shift.steps", np.array([1, *site.strides], dtype=np.int64)
        )
        pieces: list[ir.Value] = []
        sorted_flat = flat[order]
        for tap in np.unique(sorted_flat):
            channels = np.nonzero(sorted_flat == tap)[0]
            start_c, end_c = int(channels[0]), int(channels[-1]) + 1
            taps = np.unravel_index(int(tap), site.kernel)
            starts, ends = [start_c], [end_c]
            for axis in range(spatial):
                offset = int(taps[axis]) * site.dilations[axis]
                reach = site.dilations[axis] * (site.kernel[axis] - 1) + 1
                # Counting from the end keeps the slice valid for any (dynamic) input size.
                tail = reach - 1 - offset
                starts.append(offset)
                ends.append(-tail if tail > 0 else int(_INT64_MAX))
            piece = ir.Node(
                "",
                "Slice",
                [
                    source,
                    new_initializer(graph, f"{base}.shift.starts", np.array(starts, np.int64)),
                    new_initializer(graph, f"{base}.shift.ends", np.array(ends, np.int64)),
                    axes,
                    steps,
                ],
                name=fresh_node_name(graph, f"{label}/shift_{int(tap)}"),
            )
            nodes.append(piece)
            pieces.append(piece.outputs[0])
        if len(pieces) > 1:
            concat = ir.Node(
                "",
                "Concat",
                pieces,
                [ir.AttrInt64("axis", 1)],
                name=fresh_node_name(graph, f"{label}/shift_concat"),
            )
            nodes.append(concat)
            shifted = concat.outputs[0]
        else:
            shifted = pieces[0]
        shifted.name = fresh_name(graph, f"{node.outputs[0].name}.shifted")
        pointwise = self._pointwise(model, site, shifted, factors.pointwise[:, order])
        nodes.append(pointwise)
        self._replace(model, site, nodes)
        return nodes

    def _replace(self, model: ir.Model, site: ConvSite, new_nodes: Sequence[ir.Node]) -> None:
        graph, node = model.graph, site.node
        old_inputs = [value for value in node.inputs[1:] if value is not None]
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], list(new_nodes), [node.outputs[0]], [new_nodes[-1].outputs[0]]
        )
        # The replaced conv's weight and bias, unless something else still reads them: left
        # behind, ONNX Runtime warns about each one whenever it loads the model.
        for value in old_inputs:
            if value.uses() or value.is_graph_output() or value.is_graph_input():
                continue
            if value.name is not None and graph.initializers.get(value.name) is value:
                del graph.initializers[value.name]


def _ints(node: ir.Node, name: str) -> tuple[int, ...] | None:
    attr = node.attributes.get(name)
    return tuple(int(v) for v in attr.as_ints()) if attr is not None else None


def _base(site: ConvSite) -> str:
    """Stem of the new initializers' names: the replaced weight's name."""
    weight = site.node.inputs[1]
    return (weight.name if weight is not None and weight.name else None) or (
        site.node.name or "conv"
    )


__all__ = ["ConvRewriter", "ConvSite"]
