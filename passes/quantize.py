"""``quantize``: static int8 quantization with ONNX Runtime's own tool, as the last step of a run.

The step hands the model to ``onnxruntime.quantization.quantize_static`` in QDQ format
(QuantizeLinear/DequantizeLinear pairs around float ops, which ONNX Runtime fuses into int8
kernels when it loads the model) and brings the result back into the IR. Activation ranges are
calibrated on the run's ``--data``. This is the recipe "prune with compensation, fine-tune,
then quantize": quantizing last keeps the compensation the pruning passes folded into the
weights (the int8 grid is fitted to the weights as they finally are) and the pipeline reports
top-1, MACs and size after every step.

Why ONNX Runtime's tool rather than our own: it is what users deploy with, its QDQ output is
what its CPU and GPU providers fuse, and its calibrators (min-max, entropy, percentile) are
maintained with the runtime. The step adds the data plumbing, the choice of defaults and the
refusals: an already quantized model is left alone and says so, and the passes that train in
the torch bridge cannot follow a quantize step (run them before it).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxcompress.errors import PassConfigError, VerificationError
from onnxcompress.graph.canonicalize import infer_shapes
from onnxcompress.passes.base import CompressionPass, PassConfig, PassReport

logger = logging.getLogger(__name__)

ACTIVATION_TYPES = ("int8", "uint8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Ops that mean a model is quantized already (QDQ or QOperator format).
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
    }
)
# Above this many bytes of initializers the model goes to ONNX Runtime with external data
# (a protobuf holds at most 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


@dataclasses.dataclass
class QuantizeConfig(PassConfig):
    """Options of the quantize step.

    Attributes:
        activations: ``uint8`` (default; U8S8) or ``int8`` (S8S8, ONNX Runtime's own default
            for QDQ). Weights are always int8. On x86 CPUs ONNX Runtime's fast int8 convolution
            kernels take uint8 activations: on ResNet-20 (AVX-512 VNNI) uint8 ran 1.8-1.9x
            faster than float and int8 ran 0.6x, at the same accuracy.
        per_channel: one weight scale per output channel (default). Compensation folds scaled
            copies of removed filters into the kept ones, which spreads their ranges: one scale
            per tensor then wastes most of the int8 grid on the widest channel.
        calibrate: how activation ranges are chosen from the calibration data: ``minmax``
            (default, the observed range), ``entropy`` or ``percentile`` (both clip outliers;
            slower, they build histograms).
        samples: calibration samples used, the first of the run's calibration batch
            (``--data``, ``--calibration-size``). A few hundred are enough for min-max ranges.
        batch: samples per calibration batch (a model with a fixed batch size uses its own).
        reduce_range: 7-bit weights. Try it when a uint8 model loses accuracy on an x86 CPU
            without VNNI (AVX2 or AVX-512 only): ONNX Runtime's U8S8 kernels can saturate
            there. Costs some accuracy elsewhere.
    """

    activations: str = "uint8"
    per_channel: bool = True
    calibrate: str = "minmax"
    samples: int = 256
    batch: int = 16
    reduce_range: bool = False

    def validate(self) -> None:
        if self.activations not in ACTIVATION_TYPES:
            raise PassConfigError(
                f"quantize activations={self.activations!r}: use one of "
                f"{', '.join(ACTIVATION_TYPES)}"
            )
        if self.calibrate not in CALIBRATION_METHODS:
            raise PassConfigError(
                f"quantize calibrate={self.calibrate!r}: use one of "
                f"{', '.join(CALIBRATION_METHODS)}"
            )
        if self.samples < 1:
            raise PassConfigError(f"quantize samples={self.samples}: give at least 1")
        if self.batch < 1:
            raise PassConfigError(f"quantize batch={self.batch}: give at least 1")


class Quantize(CompressionPass[QuantizeConfig]):
    """Static int8 quantization (QDQ) with ONNX Runtime's ``quantize_static``."""

    name = "quantize"
    summary_line = "int8 static quantization (QDQ) with ONNX Runtime's tool, calibrated on --data"
    config_class = QuantizeConfig
    needs_data = True
    quantizes = True

    def run(self, model: ir.Model, report: PassReport) -> None:
        already = sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in QUANTIZED_OPS})
        if already:
            report.summary["stopped"] = (
                f"the model is quantized already ({', '.join(already)} in the graph); "
                "quantize a float model"
            )
            return
        name, batches = self._calibration_batches(model)
        proto = ir.serde.serialize_model(model)
        quantized = self._quantize(proto, name, batches)
        new = ir.serde.deserialize_model(quantized)
        # In place: the model keeps its identity and metadata and takes the quantized graph
        # (opset imports live on the graph in onnx_ir, so the quantizer's come along).
        model.graph = new.graph
        model.ir_version = max(model.ir_version, new.ir_version)
        infer_shapes(model)
        counts = _count_ops(model)
        report.modified = counts.get("QuantizeLinear", 0) > 0
        cfg = self.cfg
        samples = sum(len(b) for b in batches)
        report.summary = {
            "quantize_linear": counts.get("QuantizeLinear", 0),
            "dequantize_linear": counts.get("DequantizeLinear", 0),
            "int8_weights": _int8_weights(model),
            "activations": cfg.activations,
            "per_channel": cfg.per_channel,
            "calibrate": cfg.calibrate,
            "calibration_samples": samples,
        }
        if not report.modified:
            report.summary["stopped"] = "ONNX Runtime's quantizer found no op it quantizes"
            return
        source = self.context.calibration_spec or "the calibration data"
        report.notes.append(
            f"int8 QDQ: {report.summary['int8_weights']} weights int8"
            f"{' per channel' if cfg.per_channel else ''}, activations {cfg.activations} "
            f"calibrated ({cfg.calibrate}) on {samples} samples of {source}"
        )

    def _calibration_batches(self, model: ir.Model) -> tuple[str, list[np.ndarray]]:
        """The first real input's name and the calibration samples cut into feedable batches."""
        inputs = [v for v in model.graph.inputs if not v.is_initializer()]
        if len(inputs) != 1:
            raise PassConfigError(
                f"quantize calibrates models with one input; this one has {len(inputs)} "
                f"({', '.join(str(v.name) for v in inputs)})"
            )
        value = inputs[0]
        if value.dtype not in (None, ir.DataType.FLOAT):
            raise PassConfigError(
                f"quantize calibrates float32 inputs; input {value.name!r} is {value.dtype}"
            )
        assert self.context.calibration is not None  # needs_data
        x = np.ascontiguousarray(self.context.calibration[: self.cfg.samples], dtype=np.float32)
        batch = self.cfg.batch
        leading = value.shape[0] if value.shape is not None and len(value.shape) else None
        if isinstance(leading, int) and leading > 0:
            batch = leading  # a fixed batch size: feed exactly that many
            x = x[: len(x) - len(x) % batch] if len(x) >= batch else x
            if len(x) < batch:
                raise PassConfigError(
                    f"quantize: input {value.name!r} takes batches of {batch}, the calibration "
                    f"data has {len(x)} samples; give more (--calibration-size)"
                )
        return str(value.name), [x[i : i + batch] for i in range(0, len(x), batch)]

    def _quantize(self, proto: onnx.ModelProto, name: str, batches: list[np.ndarray]) -> Any:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._next: Iterator[np.ndarray] = iter(batches)

            def get_next(self) -> dict[str, np.ndarray] | None:
                chunk = next(self._next, None)
                return None if chunk is None else {name: chunk}

            def rewind(self) -> None:
                self._next = iter(batches)

        cfg = self.cfg
        methods = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }
        activation = QuantType.QInt8 if cfg.activations == "int8" else QuantType.QUInt8
        large = sum(init.ByteSize() for init in proto.graph.initializer) > EXTERNAL_DATA_BYTES
        with tempfile.TemporaryDirectory(prefix="onnxcompress-quantize-") as tmp:
            source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            onnx.save_model(proto, source, save_as_external_data=large)
            quiet = _DropAdvice()
            logging.getLogger().addFilter(quiet)
            try:
                quantize_static(
                    str(source),
                    str(target),
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=cfg.per_channel,
                    reduce_range=cfg.reduce_range,
                    activation_type=activation,
                    weight_type=QuantType.QInt8,
                    calibrate_method=methods[cfg.calibrate],
                    use_external_data_format=large,
                )
            except Exception as exc:  # the quantizer raises many types on graphs it cannot take
                raise VerificationError(
                    f"ONNX Runtime's quantizer could not quantize the model: {exc}"
                ) from exc
            finally:
                logging.getLogger().removeFilter(quiet)
            # Loaded with its weights before the folder goes.
            return onnx.load_model(target, load_external_data=True)


class _DropAdvice(logging.Filter):
    """Drops the quantizer's advice to run its pre-processing: the model it gets is
    canonicalized (constants and BatchNorm folded, shapes inferred), which is what that
    pre-processing does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def _count_ops(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _int8_weights(model: ir.Model) -> int:
    """DequantizeLinear nodes that decode a stored 8-bit initializer (a quantized weight)."""
    count = 0
    for node in model.graph.all_nodes():
        if node.op_type != "DequantizeLinear" or not node.inputs or node.inputs[0] is None:
            continue
        stored = node.inputs[0]
        if stored.is_initializer() and stored.dtype in (ir.DataType.INT8, ir.DataType.UINT8):
            count += 1
    return count
