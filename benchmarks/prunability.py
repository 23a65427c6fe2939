"""Prunability of real CNNs: the README's table of what ``lrf`` and ``merge`` do to the zoo.

Exports every torchvision classifier of ``tests/zoo.py`` through both exporters (random,
seeded weights, small inputs) plus onnx's light model zoo, runs each pass at ``target_macs``
and records MACs/params before and after, whether the result is a valid runnable model, and
why the MACs dropped less than 20% where they did.

    .venv/bin/python benchmarks/prunability.py            # full sweep, writes benchmarks/results
    .venv/bin/python benchmarks/prunability.py --models resnet18 light_squeezenet --passes lrf
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import logging
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# tests/ holds the exporters the tests share
from zoo import (  # noqa: E402
    DYNAMIC_HW,
    KNOWN_LIMITS,
    SEGMENTATION_MODELS,
    SMP_SEGMENTERS,
    TIMM_CLASSIFIERS,
    TORCHVISION_CLASSIFIERS,
    ULTRALYTICS_MODELS,
    export_segmentation,
    export_smp,
    export_timm,
    export_torchvision,
    export_ultralytics,
    light_model,
    light_model_names,
)

logger = logging.getLogger("prunability")

# Reasons name nodes as "<OpType> <name>"; exporters' names hold digits, slashes or dots.
_NODE_NAME = re.compile(r"\b([A-Z][A-Za-z]+) (?:<unnamed>|[^\s']*[0-9/._:][^\s']*)")
_SHAPE = re.compile(r"\[[^\]]*\]")
_QUOTED = re.compile(r"'[^']*'")

EXPORTERS = ("torchscript", "dynamo")
# A pass "prunes" a model when it removes at least this fraction of the MACs at target 0.7.
MIN_DROP = 0.2


def check_model(
    model: Any, original_path: Path, shape: tuple[int, ...] | None = None
) -> tuple[bool, str]:
    """Checker (full), ORT session, output shapes as the original's, finite outputs (random
    inputs of ``shape`` for a model with symbolic height and width)."""
    import onnx
    import onnx_ir as ir

    from onnxcompress.runtime.session import make_session, random_feeds

    try:
        onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    except Exception as exc:
        return False, f"checker: {str(exc).splitlines()[0][:200]}"
    try:
        session = make_session(model)
    except Exception as exc:
        return False, f"ORT session: {str(exc).splitlines()[0][:200]}"
    reference = make_session(original_path)
    overrides = {reference.get_inputs()[0].name: (2, *shape[1:])} if shape else None
    feeds = random_feeds(
        reference, batch=2 if _dynamic_batch(reference) else 1, seed=0, overrides=overrides
    )
    try:
        outputs = session.run(None, feeds)
    except Exception as exc:
        return False, f"ORT run: {str(exc).splitlines()[0][:200]}"
    expected = reference.run(None, feeds)
    for new, old in zip(outputs, expected, strict=True):
        if new.shape != old.shape:
            return False, f"output shape {new.shape} != {old.shape}"
        if not np.all(np.isfinite(new)):
            return False, "non-finite outputs"
    return True, ""


def _dynamic_batch(session: Any) -> bool:
    return not isinstance(session.get_inputs()[0].shape[0], int)


def note(row: dict[str, Any]) -> str:
    """The table's note: what is wrong with the result, or why the MACs dropped < 20%."""
    if row.get("crashed") or not row.get("valid"):
        return row.get("problem", "")
    drop = row.get("macs_drop") or 0.0
    limit = KNOWN_LIMITS.get(row["model"])
    if limit is not None:
        return limit.explanation
    if drop >= MIN_DROP:
        return ""
    parts = [f"{row.get('groups_prunable')} prunable / {row.get('groups_frozen')} frozen groups"]
    reasons = collections.Counter(row.get("declined", {}))
    parts += [f"{count}x {reason}" for reason, count in reasons.most_common(3)]
    return "; ".join(parts)


def _reason_kind(reason: str) -> str:
    """A reason without node names, shapes and tensor names, so equal causes count together."""
    text = reason.split("; ")[0]
    text = _NODE_NAME.sub(r"\1", text)
    text = _SHAPE.sub("[..]", text)
    text = _QUOTED.sub("'..'", text)
    return text if len(text) <= 100 else text[:97] + "..."


def run_case(
    path: Path, pass_name: str, target_macs: float, shape: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """Load, canonicalize, compress, measure and check one model with one pass.

    ``shape``: for a model with symbolic height and width, the input shape its MACs (and the
    pass's budget) are counted at, as ``compress --shape`` does.
    """
    from onnxcompress.graph.canonicalize import canonicalize
    from onnxcompress.graph.input_shapes import count_macs_at
    from onnxcompress.graph.metrics import model_metrics
    from onnxcompress.graph.model_io import load_model
    from onnxcompress.passes import create_pass

    model = load_model(path)
    canonicalize(model)
    if shape is not None:
        count_macs_at(model, {str(model.graph.inputs[0].name): shape})
    before = model_metrics(model)
    row: dict[str, Any] = {
        "macs_before": before.macs,
        "params_before": before.params,
    }
    compression = create_pass(pass_name, {"target_macs": target_macs, "criterion": "weights"})
    start = time.perf_counter()
    try:
        compression(model)
    except Exception as exc:
        row.update(
            valid=False,
            crashed=True,
            problem=f"crash: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            traceback=traceback.format_exc(limit=-6),
            seconds=round(time.perf_counter() - start, 2),
        )
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    after = model_metrics(model)
    report = compression.report.as_dict()
    valid, problem = check_model(model, path, shape)
    drop = 1.0 - after.macs / before.macs if before.macs else 0.0
    row.update(
        macs_after=after.macs,
        params_after=after.params,
        macs_drop=round(drop, 4),
        valid=valid,
        crashed=False,
        groups_prunable=report["summary"].get("groups_prunable"),
        groups_frozen=report["summary"].get("groups_frozen"),
        declined=dict(collections.Counter(_reason_kind(d["reason"]) for d in report["declined"])),
    )
    if not valid:
        row["problem"] = problem
    return row


def cases(models: list[str] | None, exporters: list[str]) -> list[tuple[str, str, int]]:
    """(model, exporter or ``onnx-zoo``, input size) in table order."""
    wanted = set(models) if models else None
    out = [
        (name, exporter, size)
        for name, size in TORCHVISION_CLASSIFIERS
        for exporter in exporters
        if wanted is None or name in wanted
    ]
    out += [(name, "onnx-zoo", 224) for name in light_model_names() if not wanted or name in wanted]
    # Each exported at a fixed size and with dynamic H/W; timm, smp and ultralytics need the
    # zoo extra.
    families = list(SEGMENTATION_MODELS)
    for module, models in (
        ("timm", TIMM_CLASSIFIERS),
        ("segmentation_models_pytorch", SMP_SEGMENTERS),
        ("ultralytics", ULTRALYTICS_MODELS),
    ):
        if importlib.util.find_spec(module) is not None:
            families += models
        else:
            print(f"{module} is not installed (pip install -e '.[zoo]'): its models skipped")
    out += [
        (name, exporter, size)
        for name, size in families
        for exporter in ("torchscript", DYNAMIC_HW)
        if wanted is None or name in wanted
    ]
    return out


def export(name: str, exporter: str, size: int) -> Path:
    if exporter == "onnx-zoo":
        return light_model(name)
    if name in dict(SEGMENTATION_MODELS):
        return export_segmentation(name, exporter, size)
    if name in dict(TIMM_CLASSIFIERS):
        return export_timm(name, exporter, size)
    if name in dict(SMP_SEGMENTERS):
        return export_smp(name, exporter, size)
    if name in dict(ULTRALYTICS_MODELS):
        return export_ultralytics(name, exporter, size)
    return export_torchvision(name, exporter, size)


def fmt_millions(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.1f}M"


def markdown(rows: list[dict[str, Any]], target_macs: float) -> str:
    """The README table (one row per model, exporters merged where they agree), then every run."""
    passes = list(dict.fromkeys(row["pass"] for row in rows))
    pruned = sum(1 for r in rows if r.get("valid") and (r.get("macs_drop") or 0.0) >= MIN_DROP)
    limited = sum(1 for r in rows if r.get("valid") and r["model"] in KNOWN_LIMITS)
    lines = [
        f"Each pass at `target_macs={target_macs}` (criterion `weights`, data-free) on random "
        "seeded weights; MACs at batch 1 and the input size shown (a dynamic-H/W export is "
        "counted at that size, as `compress --shape` does); valid = full onnx.checker, "
        "an ONNX Runtime session, the original's output shapes, finite outputs.",
        "",
        f"{len(rows)} runs: {pruned} valid with at least {MIN_DROP:.0%} fewer MACs, {limited} "
        f"valid at a documented limit, {len(rows) - pruned - limited} failed.",
        "",
        "| model | exporter | size | MACs before | "
        + " | ".join(f"MACs after `{p}`" for p in passes)
        + " | params before | "
        + " | ".join(f"params after `{p}`" for p in passes)
        + " | valid | note |",
        "|---|---|---|---|" + "---|" * (2 * len(passes)) + "---|---|---|",
    ]
    for group in _compact_groups(rows, passes):
        first = group[0]
        runs = [r for r in rows if r["model"] == first["model"] and r["exporter"] in first["_exp"]]
        cells = [first["model"], " + ".join(first["_exp"]), str(first["size"])]
        cells.append(fmt_millions(first.get("macs_before")))
        cells += [_after(group, p, "macs") for p in passes]
        cells.append(fmt_millions(first.get("params_before")))
        cells += [_after(group, p, "params") for p in passes]
        cells.append("yes" if all(r.get("valid") for r in runs) else "**no**")
        notes = list(dict.fromkeys(note(r) for r in runs if note(r)))
        cells.append("; ".join(notes).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Every run:", ""]
    lines += [
        "| model | exporter | size | pass | MACs before | MACs after | drop | params before "
        "| params after | valid | pass seconds | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        drop = row.get("macs_drop")
        cells = [
            row["model"],
            row["exporter"],
            str(row["size"]),
            row["pass"],
            fmt_millions(row.get("macs_before")),
            fmt_millions(row.get("macs_after")),
            "-" if drop is None else f"{100 * drop:.0f}%",
            fmt_millions(row.get("params_before")),
            fmt_millions(row.get("params_after")),
            "yes" if row.get("valid") else "**no**",
            str(row.get("seconds", "-")),
            note(row).replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _after(group: list[dict[str, Any]], pass_name: str, what: str) -> str:
    row = next((r for r in group if r["pass"] == pass_name), None)
    if row is None or row.get(f"{what}_after") is None:
        return "-"
    text = fmt_millions(row[f"{what}_after"])
    if what == "macs" and row.get("macs_drop") is not None:
        text += f" (-{100 * row['macs_drop']:.0f}%)"
    return text


def _compact_groups(rows: list[dict[str, Any]], passes: list[str]) -> list[list[dict[str, Any]]]:
    """Per model, one group of rows per exporter, merged when the exporters' numbers agree."""
    keys = ("macs_before", "macs_after", "params_before", "params_after", "valid")
    by_model: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {}).setdefault(row["exporter"], []).append(row)
    groups = []
    for exporters in by_model.values():
        signatures = {
            exporter: tuple(tuple(r.get(k) for k in keys) for r in runs)
            for exporter, runs in exporters.items()
        }
        if len(set(signatures.values())) == 1:
            merged = [dict(r, _exp=list(exporters)) for r in next(iter(exporters.values()))]
            groups.append(merged)
        else:
            groups += [
                [dict(r, _exp=[exporter]) for r in runs] for exporter, runs in exporters.items()
            ]
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="*", help="only these (torchvision, segmentation or light_* names)"
    )
    parser.add_argument("--passes", nargs="*", default=["lrf", "merge"])
    parser.add_argument("--exporters", nargs="*", default=list(EXPORTERS))
    parser.add_argument("--target-macs", type=float, default=0.7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="prunability", help="stem of the result files")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the .md from the existing .json"
    )
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads((args.out / f"{args.name}.json").read_text())
        table = markdown(saved["rows"], saved["target_macs"])
        (args.out / f"{args.name}.md").write_text(table)
        print(table)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from onnxcompress.passes import REGISTRY

    passes = [p for p in args.passes if p in REGISTRY]
    for missing in sorted(set(args.passes) - set(passes)):
        print(f"pass {missing!r} is not registered here; skipped", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name, exporter, size in cases(args.models, args.exporters):
        t0 = time.perf_counter()
        try:
            path = export(name, exporter, size)
        except Exception as exc:
            message = f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"{name} {exporter}: {message}", flush=True)
            for pass_name in passes:
                rows.append(
                    {"model": name, "exporter": exporter, "size": size, "pass": pass_name}
                    | {"valid": False, "crashed": True, "problem": message}
                )
            continue
        export_seconds = time.perf_counter() - t0
        for pass_name in passes:
            row = {"model": name, "exporter": exporter, "size": size, "pass": pass_name}
            shape = (1, 3, size, size) if exporter == DYNAMIC_HW else None
            row |= run_case(path, pass_name, args.target_macs, shape)
            row["export_seconds"] = round(export_seconds, 2)
            rows.append(row)
            print(
                f"{name:22s} {exporter:11s} {pass_name:5s} drop={row.get('macs_drop')} "
                f"valid={row['valid']} {row.get('seconds')}s {note(row)}",
                flush=True,
            )
            (args.out / f"{args.name}.json").write_text(
                json.dumps(
                    {"target_macs": args.target_macs, "rows": rows, "partial": True}, indent=1
                )
            )
    total = time.perf_counter() - started
    payload = {"target_macs": args.target_macs, "rows": rows, "seconds": round(total, 1)}
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    table = markdown(rows, args.target_macs)
    (args.out / f"{args.name}.md").write_text(table)
    print(table)
    print(f"sweep took {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
