"""docs/architecture.md stays true: its example pass runs, and the layers import only downward.

The example pass is taken from the document itself, so a change that breaks the page's code
breaks this test.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.cli import main
from onnxcompress.passes import REGISTRY, register

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# Lowest first; a module may import its own layer and the layers before it in this list.
LAYERS = (
    ("onnxcompress.errors", "onnxcompress.deadline"),  # and the package root, which imports errors
    ("onnxcompress.fitting",),
    ("onnxcompress.data",),
    ("onnxcompress.graph",),
    ("onnxcompress.runtime",),
    ("onnxcompress.torch_bridge",),
    ("onnxcompress.passes",),
    ("onnxcompress.pipeline",),
    ("onnxcompress.cli",),
)


def layer_of(module: str) -> int | None:
    if module == "onnxcompress":
        return 0
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def package_modules() -> Iterator[tuple[str, Path]]:
    """(dotted name, file) of every module of the installed package, passes included."""
    for path in sorted((ROOT / "onnxcompress").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path
    for path in sorted((ROOT / "passes").rglob("*.py")):
        parts = ("onnxcompress", "passes", *path.relative_to(ROOT / "passes").with_suffix("").parts)
        yield ".".join(p for p in parts if p != "__init__"), path


def imported_modules(module: str, path: Path, known: set[str], *, top_level_only: bool) -> set[str]:
    """The onnxcompress modules ``module`` imports (relative imports resolved).

    ``top_level_only`` keeps the imports that run when the module loads: not those inside
    functions, and not those under ``if TYPE_CHECKING``.
    """
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(nodes: list[ast.stmt]) -> Iterator[ast.AST]:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            yield node
            if isinstance(node, ast.If | ast.Try):
                yield from walk(node.body)
                yield from walk(node.orelse)
                if isinstance(node, ast.Try):
                    for handler in node.handlers:
                        yield from walk(handler.body)

    nodes = walk(tree.body) if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            submodules = {f"{target}.{a.name}" for a in node.names} & known
            found.update(submodules)
            # ``from pkg import module`` reads nothing from pkg's namespace, so it is safe while
            # pkg is still initializing (its __init__ importing the module that says it); a
            # name that is not a module is read from pkg and counts as importing it.
            if len(submodules) < len(node.names):
                found.add(target)
    return {name for name in found if name.startswith("onnxcompress")}


def example_pass_source() -> str:
    match = re.search(r"```python example-pass\n(.*?)```", ARCHITECTURE.read_text(), re.S)
    assert match, "docs/architecture.md has no ```python example-pass block"
    return match.group(1)


@pytest.fixture
def example_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The documented pass, in a package of its own, registered as the page says."""
    package = tmp_path / "example_passes"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "drop_zero_bias.py").write_text(example_pass_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    register("drop-zero-bias", "example_passes.drop_zero_bias:DropZeroBias", "example")
    try:
        yield "drop-zero-bias"
    finally:
        REGISTRY.pop("drop-zero-bias", None)


def two_conv_model(path: Path) -> None:
    """Conv (all-zero bias) -> Relu -> Conv (non-zero bias)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(5, 4, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=5).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8, 8])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_the_documented_example_pass_is_an_exact_rewrite_through_the_cli(
    example_pass: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original, compressed = tmp_path / "model.onnx", tmp_path / "out.onnx"
    two_conv_model(original)
    code = main(["compress", str(original), "-o", str(compressed), "--pass", example_pass])
    assert code == 0, capsys.readouterr().err

    convs = {n.name: n for n in onnx.load(compressed).graph.node if n.op_type == "Conv"}
    assert [i for i in convs["conv1"].input if i] == ["x", "w1"]  # the zero bias went
    assert len(convs["conv2"].input) == 3  # the other one was declined
    assert "b1" not in {t.name for t in onnx.load(compressed).graph.initializer}
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    expected = run(original, x)
    got = run(compressed, x)
    assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_the_documented_example_pass_reports_its_decline(example_pass: str, tmp_path: Path):
    from onnxcompress.pipeline import compress

    original = tmp_path / "model.onnx"
    two_conv_model(original)
    result = compress(original, tmp_path / "out.onnx", [(example_pass, {})])
    step = next(s for s in result.steps if s.name == example_pass)
    assert step.report["declined"] == [{"node": "conv2", "reason": "bias is not zero"}]
    assert step.report["modified"] is True


def test_the_documented_example_pass_refuses_a_bad_option_before_any_work(
    example_pass: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    two_conv_model(original)
    code = main(
        ["compress", str(original), "-o", str(out), "--pass", f"{example_pass}:tolerance=-1"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "tolerance must be >= 0" in err and "Traceback" not in err
    assert not out.exists()


def test_a_registry_target_must_name_a_module_and_a_class() -> None:
    from onnxcompress.errors import PassConfigError

    with pytest.raises(PassConfigError, match="not 'module:Class'"):
        register("broken", "example_passes.drop_zero_bias", "no class named")
    assert "broken" not in REGISTRY


def test_every_module_imports_only_its_own_layer_and_those_below() -> None:
    violations = []
    modules = dict(package_modules())
    for module, path in modules.items():
        own = layer_of(module)
        assert own is not None, f"{module} belongs to no layer of docs/architecture.md"
        for imported in imported_modules(module, path, set(modules), top_level_only=False):
            theirs = layer_of(imported)
            if theirs is not None and theirs > own:
                violations.append(f"{module} imports {imported}")
    assert not violations, "\n".join(sorted(violations))


def test_the_modules_have_no_import_cycle_at_load_time() -> None:
    modules = dict(package_modules())
    edges = {
        name: {
            m
            for m in imported_modules(name, path, set(modules), top_level_only=True)
            if m in modules
        }
        for name, path in modules.items()
    }
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for child in sorted(edges[name]):
            if state.get(child) == "open":
                cycle = [*trail[trail.index(child) :], child] if child in trail else [name, child]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if child not in state:
                visit(child, [*trail, child])
        state[name] = "done"

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])


def test_every_package_directory_is_listed_for_the_wheel() -> None:
    """pyproject lists packages by hand (passes/ and recipes/ are mapped into the package); a
    package missing there works in the editable checkout and is absent from a built wheel."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli backport pyproject depends on there
        import tomli as tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "onnxcompress").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to pyproject.toml's packages: {sorted(on_disk - listed)}"
