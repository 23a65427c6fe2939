"""Model I/O: loading checks, canonicalization keeps outputs, atomic saves."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from zoo import export_torchvision

from onnxcompress.errors import ModelLoadError, ModelSaveError
from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.graph.model_io import clone_model, load_model, save_model
from onnxcompress.runtime.session import make_session, random_feeds


def run(model_or_path, feeds):
    return make_session(model_or_path, optimize=False).run(None, feeds)


def assert_same_outputs(path: Path, model: ir.Model, batch: int = 2) -> None:
    reference = make_session(path, optimize=False)
    feeds = random_feeds(reference, batch, seed=1)
    expected = reference.run(None, feeds)
    actual = run(model, feeds)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(e).max()))


def ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph)


def conv_bn_model(tmp_path: Path) -> Path:
    """Conv -> BN -> Relu -> Flatten(Reshape with constant shape) -> Gemm -> BN(1d)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "shift"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "var"),
        numpy_helper.from_array(rng.standard_normal((5, 64)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fc_b"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "s2"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "m2"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 5).astype(np.float32), "v2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["bn"], epsilon=1e-3
        ),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node(
            "Constant", [], ["shape"], value=numpy_helper.from_array(np.array([0, -1], np.int64))
        ),
        helper.make_node("Reshape", ["r", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["g"], transB=1),
        helper.make_node("BatchNormalization", ["g", "s2", "b2", "m2", "v2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "convbn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model.metadata_props.add(key="author", value="test")
    path = tmp_path / "convbn.onnx"
    onnx.save(model, path)
    return path


def test_batchnorm_folds_into_conv_and_gemm_exactly(tmp_path: Path) -> None:
    path = conv_bn_model(tmp_path)
    model = load_model(path)
    summary = canonicalize(model)
    assert summary.batchnorms_folded == 2
    assert summary.reshapes_to_flatten == 1
    assert ops(model) == {"Conv": 1, "Relu": 1, "Flatten": 1, "Gemm": 1}
    # user-visible names, opset and metadata survive
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert model.opset_imports[""] == 17
    assert model.metadata_props["author"] == "test"
    assert_same_outputs(path, model, batch=3)


def test_batchnorm_not_folded_when_conv_output_is_shared(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    inits = [numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")] + [
        numpy_helper.from_array(np.full(2, v, np.float32), n)
        for n, v in (("s", 2.0), ("b", 1.0), ("m", 0.5), ("v", 4.0))
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
        helper.make_node("Add", ["bn", "c"], ["y"]),  # c is also used raw: folding is illegal
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        inits,
    )
    path = tmp_path / "shared.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path
    )
    model = load_model(path)
    assert canonicalize(model).batchnorms_folded == 0
    assert ops(model)["BatchNormalization"] == 1
    assert_same_outputs(path, model)


def legacy_opset9_model(tmp_path: Path) -> Path:
    """An old-style model: IR 3, opset 9, initializers also listed as graph inputs, BN, Flatten."""
    rng = np.random.default_rng(1)
    arrays = {
        "conv_w": rng.standard_normal((6, 1, 3, 3)).astype(np.float32),
        "conv_b": rng.standard_normal(6).astype(np.float32),
        "bn_s": rng.uniform(0.5, 1.5, 6).astype(np.float32),
        "bn_b": rng.standard_normal(6).astype(np.float32),
        "bn_m": rng.standard_normal(6).astype(np.float32),
        "bn_v": rng.uniform(0.5, 1.5, 6).astype(np.float32),
        "fc_w": rng.standard_normal((6 * 4 * 4, 3)).astype(np.float32),
    }
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 1, 8, 8])] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape))
        for n, a in arrays.items()
    ]
    nodes = [
        helper.make_node("Conv", ["data", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "fc_w"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes,
        "legacy",
        inputs,
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    path = tmp_path / "legacy.onnx"
    onnx.save(model, path)
    return path


def test_legacy_opset9_initializers_as_inputs(tmp_path: Path) -> None:
    path = legacy_opset9_model(tmp_path)
    model = load_model(path)
    assert len(model.graph.inputs) == 8
    summary = canonicalize(model)
    assert summary.initializer_inputs_removed == 7
    assert [v.name for v in model.graph.inputs] == ["data"]
    assert summary.batchnorms_folded == 1
    assert model.opset_imports[""] == 9
    feeds = {"data": np.random.default_rng(2).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feeds)[0], run(path, feeds)[0], rtol=1e-4, atol=1e-5)


def test_initializer_input_kept_when_user_feeds_it(tmp_path: Path) -> None:
    path = legacy_opset9_model(tmp_path)
    model = load_model(path)
    canonicalize(model, keep_initializer_inputs=("fc_w",))
    assert [v.name for v in model.graph.inputs] == ["data", "fc_w"]


def test_resnet20_option_a_shortcut_folds(resnet20_path: Path) -> None:
    model = load_model(resnet20_path)
    summary = canonicalize(model)
    counts = ops(model)
    # the shortcut's shape arithmetic (Shape/Gather/ConstantOfShape/...) is gone; Pad stays
    for gone in ("Constant", "ConstantOfShape", "Shape", "Gather", "Cast", "Transpose", "Reshape"):
        assert counts[gone] == 0, gone
    assert counts["Pad"] == 2 and counts["Conv"] == 19 and counts["Flatten"] == 1
    assert summary.constants_folded > 0
    for node in model.graph:
        if node.op_type == "Pad":
            assert node.inputs[1] is not None and node.inputs[1].const_value is not None
    assert_same_outputs(resnet20_path, model, batch=4)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_canonicalize_torchvision_exports(name: str, exporter: str) -> None:
    path = export_torchvision(name, exporter, size=64)
    model = load_model(path)
    canonicalize(model)
    assert ops(model)["BatchNormalization"] == 0
    assert_same_outputs(path, model)


def test_clone_is_independent(tmp_path: Path) -> None:
    model = load_model(conv_bn_model(tmp_path))
    copy = clone_model(model)
    canonicalize(copy)
    assert ops(model)["BatchNormalization"] == 2
    assert ops(copy)["BatchNormalization"] == 0


# --- loading errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\x00\x01garbage\xff" * 50, "not"),
        (b"hello world, definitely not a protobuf", "not"),
    ],
)
def test_bad_files_raise_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.onnx")


def test_truncated_model(tmp_path: Path, resnet20_path: Path) -> None:
    data = resnet20_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_model(path)


def test_unsupported_opset(tmp_path: Path) -> None:
    path = conv_bn_model(tmp_path)
    proto = onnx.load(path)
    proto.opset_import[0].version = 99
    onnx.save(proto, path)
    with pytest.raises(ModelLoadError, match="opset 99"):
        load_model(path)


def _external_model(tmp_path: Path, location: str) -> Path:
    weights = np.arange(64, dtype=np.float32).reshape(8, 8)
    tensor = numpy_helper.from_array(weights, "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(weights.nbytes))):
        tensor.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [tensor],
    )
    path = tmp_path / "ext.onnx"
    path.write_bytes(
        helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10
        ).SerializeToString()
    )
    return path


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "missing.bin"])
def test_external_data_must_stay_in_the_model_folder(tmp_path: Path, location: str) -> None:
    with pytest.raises(ModelLoadError):
        load_model(_external_model(tmp_path, location))


def test_external_data_symlink_escaping_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(np.arange(64, dtype=np.float32).tobytes())
    inside = tmp_path / "inside"
    inside.mkdir()
    os.symlink(outside / "w.bin", inside / "w.bin")
    with pytest.raises(ModelLoadError, match="outside"):
        load_model(_external_model(inside, "w.bin"))


def test_external_data_inside_folder_loads(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(np.arange(64, dtype=np.float32).tobytes())
    model = load_model(_external_model(tmp_path, "w.bin"))
    weights = model.graph.initializers["w"].const_value
    assert weights is not None
    np.testing.assert_array_equal(weights.numpy().ravel(), np.arange(64, dtype=np.float32))


# --- saving ----------------------------------------------------------------------------------


def test_save_is_atomic_and_refuses_to_clobber(tmp_path: Path) -> None:
    src = conv_bn_model(tmp_path)
    original_bytes = src.read_bytes()
    model = load_model(src)
    canonicalize(model)
    out = tmp_path / "out.onnx"
    save_model(model, out)
    assert load_model(out).graph.num_nodes() == model.graph.num_nodes()
    with pytest.raises(ModelSaveError, match="exists"):
        save_model(model, out, overwrite=False)
    with pytest.raises(ModelSaveError, match="input model"):
        save_model(model, src, protect=(src,))
    assert src.read_bytes() == original_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convbn.onnx", "out.onnx"]


def test_save_failure_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    model = load_model(conv_bn_model(tmp_path))
    out = tmp_path / "out.onnx"

    def broken_save(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(ModelSaveError, match="No space"):
        save_model(model, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convbn.onnx"]


def test_large_models_get_external_data(tmp_path: Path, monkeypatch) -> None:
    import onnxcompress.graph.model_io as model_module

    monkeypatch.setattr(model_module, "EXTERNAL_DATA_THRESHOLD_BYTES", 100)
    src = conv_bn_model(tmp_path)
    model = load_model(src)
    out = tmp_path / "big.onnx"
    save_model(model, out)
    assert (tmp_path / "big.onnx.data").exists()
    assert not list(tmp_path.glob("*.tmp"))
    reloaded = load_model(out)
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32)}
    np.testing.assert_allclose(run(reloaded, feeds)[0], run(src, feeds)[0], rtol=1e-6)
