"""Compression passes (installed as ``onnxcompress.passes``) and their registry.

The registry maps a CLI name to ``module:Class``; modules import lazily so that a pass that
needs torch costs nothing until it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from onnxcompress.errors import PassConfigError

if TYPE_CHECKING:
    from onnxcompress.passes.base import CompressionPass, PassContext


@dataclass(frozen=True)
class PassEntry:
    name: str
    target: str  # "module:Class" relative to this package
    summary: str


# Order is the order `--help` lists them in.
REGISTRY: dict[str, PassEntry] = {
    entry.name: entry
    for entry in (
        PassEntry(
            "canonicalize",
            "canonical:Canonicalize",
            "fold constants and BatchNorm, infer shapes (always runs first)",
        ),
        PassEntry(
            "simplify",
            "canonical:Simplify",
            "onnxslim graph simplification (constant folding, dead code, fusions)",
        ),
        PassEntry(
            "lrf",
            "lrf:LinearlyReplaceableFilters",
            "remove linearly replaceable filters, fold the replacement into the next layer",
        ),
        PassEntry(
            "merge",
            "merge:MergeSimilarNeurons",
            "merge similar (or scaled) filters/neurons, summing their outgoing weights",
        ),
        PassEntry("lct", "lct:LayerwiseCompressiveTraining", "sparse/low-rank projected SGD + KD"),
        PassEntry("resect", "resect:IncrementalResection", "cut blocks/layers, bridge, distill"),
        PassEntry(
            "cheapconv",
            "cheapconv:CheapConvolutions",
            "cheap convs (separable/group/shift) + distillation",
        ),
        PassEntry(
            "finetune",
            "finetune:Finetune",
            "recover accuracy: distill from the original in the torch bridge",
        ),
        PassEntry(
            "quantize",
            "quantize:Quantize",
            "int8 static quantization (QDQ) with ONNX Runtime's tool, calibrated on --data",
        ),
    )
}


def register(name: str, target: str, summary: str) -> None:
    """Add a pass to the registry.

    ``target`` is ``module:Class``: a bare module name is looked up in this package (the shipped
    passes), a dotted one is imported as written (a pass that lives in the user's own package,
    ``mypackage.passes:MyPass``). The module is imported only when the pass is first used.
    """
    if target.count(":") != 1 or not all(target.partition(":")[::2]):
        raise PassConfigError(f"pass {name!r}: target {target!r} is not 'module:Class'")
    REGISTRY[name] = PassEntry(name, target, summary)


def available_passes() -> list[PassEntry]:
    return list(REGISTRY.values())


def pass_class(name: str) -> type[CompressionPass]:
    entry = REGISTRY.get(name)
    if entry is None:
        known = ", ".join(REGISTRY)
        raise PassConfigError(f"unknown pass {name!r} (available: {known})")
    module_name, _, class_name = entry.target.partition(":")
    qualified = module_name if "." in module_name else f"{__name__}.{module_name}"
    module = importlib.import_module(qualified)
    cls: type[CompressionPass] = getattr(module, class_name)
    return cls


def parse_pass_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``name:key=value,key=value`` into the name and its raw options."""
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise PassConfigError(f"--pass {spec!r}: expected NAME[:key=value,...]")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PassConfigError(
                f"--pass {spec!r}: option {item!r} is not key=value (e.g. {name}:target_macs=0.7)"
            )
        options[key.strip()] = value.strip()
    return name, options


def create_pass(
    name: str, options: Mapping[str, Any] | None = None, context: PassContext | None = None
) -> CompressionPass:
    """Instantiate a registered pass with validated options."""
    from onnxcompress.passes.base import parse_options

    cls = pass_class(name)
    config = parse_options(cls.config_class, options or {}, name)
    return cls(config, context)
