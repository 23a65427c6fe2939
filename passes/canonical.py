"""Canonicalization passes: the plain form every compression pass expects.

``canonicalize`` always runs first in a pipeline; ``simplify`` adds onnxslim's rewrites for
graphs whose exporter left more than constants to fold.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from onnxcompress.errors import VerificationError
from onnxcompress.graph.canonicalize import canonicalize, infer_shapes
from onnxcompress.passes.base import CompressionPass, PassConfig, PassReport

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CanonicalizeConfig(PassConfig):
    fold_constants: bool = True
    fold_batchnorm: bool = True


class Canonicalize(CompressionPass):
    """Fold constants and BatchNorm, rewrite dynamic flattens, infer shapes."""

    name = "canonicalize"
    compresses = False
    config_class = CanonicalizeConfig

    def run(self, model: ir.Model, report: PassReport) -> None:
        config = self.config
        assert isinstance(config, CanonicalizeConfig)
        summary = canonicalize(
            model, fold_constants=config.fold_constants, fold_batchnorm=config.fold_batchnorm
        )
        report.summary = summary.as_dict()
        report.modified = summary.nodes_after != summary.nodes_before or any(
            value for key, value in report.summary.items() if not key.startswith("nodes_")
        )


@dataclasses.dataclass
class SimplifyConfig(PassConfig):
    pass


class Simplify(CompressionPass):
    """Run onnxslim over the model and bring the result back into the IR.

    onnxslim is used (rather than onnxsim) because it imports in 0.05 s without torch and keeps
    tensor names; it folds with onnxruntime, so it reaches constant subgraphs our folding skips.
    """

    name = "simplify"
    compresses = False
    config_class = SimplifyConfig

    def run(self, model: ir.Model, report: PassReport) -> None:
        import onnxslim

        before = model.graph.num_nodes()
        proto = ir.serde.serialize_model(model)
        try:
            slimmed = onnxslim.slim(proto)
        except Exception as exc:  # onnxslim raises many types on exotic graphs
            raise VerificationError(f"onnxslim could not simplify the model: {exc}") from exc
        if slimmed is None:
            raise VerificationError("onnxslim returned no model")
        new = ir.serde.deserialize_model(slimmed)
        # Replace the graph contents in place: the pass contract is in-place.
        # (opset imports live on the graph in onnx_ir, so they come along.)
        model.graph = new.graph
        infer_shapes(model)
        after = model.graph.num_nodes()
        report.summary = {"nodes_before": before, "nodes_after": after}
        report.modified = after != before
