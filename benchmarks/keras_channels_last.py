"""Channels-last reach: Keras applications through tf2onnx, pruned by lrf and merge.

tf2onnx keeps NHWC<->NCHW Transpose pairs around every squeeze-excite block of a Keras
MobileNetV3 (the block's mean is a ReduceMean over axes 1, 2 of the NHWC tensor, and the gate
multiplies the NHWC features). This exports the network with random weights (nothing is
downloaded), then runs ``lrf`` and ``merge`` at ``target_macs=0.7`` data-free, as a user would,
and reports the MACs reached and why any group was left alone. ``--models`` adds the other
Keras applications issue 19 tried (ResNet50, EfficientNetB0; default: all three).

TensorFlow does not belong in the project's environment: give an interpreter that has
``tensorflow-cpu`` and ``tf2onnx`` (about 2 minutes to install from the registry)::

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tf2onnx
    .venv/bin/python benchmarks/keras_channels_last.py --tf-python /tmp/tfenv/bin/python

Keras' random initialization leaves the classifier at zero (every output 0.1); the export
perturbs every weight so the graph computes something, but even then its output hardly depends
on the input (random deep nets saturate), so the verification's output deviation says little
here: what this measures is reach (groups cut, MACs, a valid model ONNX Runtime runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    DEFAULT_RESULTS,
    command_line,
    load_text,
    machine_state,
    markdown_table,
    setup_logging,
    write_results,
)

logger = logging.getLogger("keras_channels_last")

NAME = "keras_channels_last"
TARGET = 0.7

EXPORT = """
import sys
import numpy as np
import tensorflow as tf
import tf2onnx

application = getattr(tf.keras.applications, sys.argv[2])
model = application(weights=None, input_shape=(224, 224, 3), classes=10)
rng = np.random.default_rng(0)
for w in model.weights:
    value = w.numpy()
    if "moving_variance" in w.path:
        w.assign(rng.uniform(0.5, 1.5, value.shape).astype(value.dtype))
    else:
        w.assign((value + rng.normal(0, 0.05, value.shape)).astype(value.dtype))
spec = (tf.TensorSpec((None, 224, 224, 3), tf.float32, name="input"),)
fn = tf.function(lambda x: model(x, training=False))
tf2onnx.convert.from_function(fn, input_signature=spec, opset=17, output_path=sys.argv[1])
# Without ImageNet weights, EfficientNet's Normalization layer keeps its mean and variance as
# adapt() state, which tf2onnx exports as extra graph inputs (``.../Sub/y:0`` and
# ``.../Sqrt/x:0``, each [1, 1, 1, C]); with the released weights they are constants. Store
# the layer's values as initializers, as the released model would have them.
import onnx
from onnx import numpy_helper

norms = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Normalization)]
if norms:
    exported = onnx.load(sys.argv[1])
    norm = norms[0]
    values = {"Sub/y:0": np.asarray(norm.mean), "Sqrt/x:0": np.asarray(norm.variance)}
    for graph_input in list(exported.graph.input):
        suffix = next((key for key in values if graph_input.name.endswith(key)), None)
        if suffix is None:
            continue
        dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
        array = values[suffix].astype(np.float32).reshape(dims)
        exported.graph.initializer.append(numpy_helper.from_array(array, graph_input.name))
        exported.graph.input.remove(graph_input)
    onnx.save(exported, sys.argv[1])
print(tf.__version__, tf2onnx.__version__)
"""


MODELS = ("MobileNetV3Small", "ResNet50", "EfficientNetB0")


def export(tf_python: Path, work: Path, application: str) -> tuple[Path, str]:
    script, out = work / "export_keras.py", work / f"{application.lower()}_tf2onnx.onnx"
    script.write_text(EXPORT)
    done = subprocess.run(
        [str(tf_python), str(script), str(out), application],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"export failed:\n{done.stderr[-3000:]}")
    versions = done.stdout.strip().splitlines()[-1]
    return out, versions


def prune(model: Path, name: str, work: Path) -> dict[str, Any]:
    out, report_path = work / f"{model.stem}-{name}.onnx", work / f"{model.stem}-{name}.json"
    cli = Path(sys.executable).parent / "onnxcompress"
    command = [str(cli), "compress", str(model), "-o", str(out), "--force"]
    command += ["--pass", f"{name}:target_macs={TARGET}", "--report", str(report_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    record: dict[str, Any] = {"model": model.stem, "pass": name, "exit_code": done.returncode}
    if done.returncode not in (0, 3):
        record["stderr_tail"] = done.stderr[-2000:]
        return record
    report = json.loads(report_path.read_text())
    step = report["steps"][1]["report"]
    before, after = report["steps"][0]["metrics"], report["after"]
    record["macs"] = after["macs"] / before["macs"]
    record["params"] = after["params"] / before["params"]
    record["groups_cut"] = len(step["layers"])
    # The op and its role ("Pad ... meets channels moved", "Softmax ... normalizes") per reason.
    record["declined"] = dict(
        Counter(d["reason"].split(";")[0][:90] for d in step["declined"]).most_common()
    )
    record["macs_counted_at"] = report.get("macs_counted_at")
    record["missed"] = report.get("missed", [])
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-python", type=Path, required=True, help="python with tensorflow")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/onnxcompress-keras"))
    parser.add_argument("--name", default=NAME)
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated tf.keras.applications names (default {','.join(MODELS)})",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    records, versions, labels = [], "", {}
    for application in args.models.split(","):
        model, versions = export(args.tf_python, args.work_dir, application)
        records += [prune(model, name, args.work_dir) for name in ("lrf", "merge")]
        labels[model.stem] = application
    rows = [
        [
            labels.get(r["model"], r["model"]),
            r["pass"],
            f"{r['macs']:.3f}" if "macs" in r else "-",
            f"{r['params']:.3f}" if "params" in r else "-",
            str(r.get("groups_cut", "-")),
            "; ".join(f"{k} (x{v})" for k, v in r.get("declined", {}).items()) or "-",
        ]
        for r in records
    ]
    state = machine_state()
    markdown = "\n\n".join(
        [
            "# Keras applications through tf2onnx: channels-last reach",
            f"Random weights (perturbed), exported by tensorflow/tf2onnx {versions}, input "
            f"NHWC Nx224x224x3; each pass at `target_macs={TARGET}`, data-free; fractions of "
            f"the original. {load_text(state)}.",
            markdown_table(
                ["model", "pass", "MACs", "params", "groups cut", "groups left alone (why)"],
                rows,
            ),
            f"Reproduce: `{command_line()}`",
        ]
    )
    write_results(args.out_dir, args.name, markdown, {"records": records, "versions": versions})
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
