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
    TORCHVISION_CLASSIFIERS,
    export_torchvision,
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


def check_model(model: Any, original_path: Path) -> tuple[bool, str]:
    """Checker (full), ORT session, output shapes as the original's, finite outputs."""
    import onnx
    import onnx_ir as ir

    from onnxcompress.runtime import make_session, random_feeds

    try:
        onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    except Exception as exc:
        return False, f"checker: {str(exc).splitlines()[0][:200]}"
    try:
        session = make_session(model)
    except Exception as exc:
        return False, f"ORT session: {str(exc).splitlines()[0][:200]}"
    reference = make_session(original_path)
    feeds = random_feeds(reference, batch=2 if _dynamic_batch(reference) else 1, seed=0)
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


def explain(report: dict[str, Any]) -> str:
    """Why a pass removed little: the frozen groups' reasons, most frequent first."""
    summary = report.get("summary", {})
    reasons = collections.Counter(_reason_kind(d["reason"]) for d in report.get("declined", []))
    parts = [
        f"{summary.get('groups_prunable', '?')} prunable / "
        f"{summary.get('groups_frozen', '?')} frozen groups"
    ]
    parts += [f"{count}x {reason}" for reason, count in reasons.most_common(3)]
    return "; ".join(parts)


def _reason_kind(reason: str) -> str:
    """A reason without node names, shapes and tensor names, so equal causes count together."""
    text = reason.split("; ")[0]
    text = _NODE_NAME.sub(r"\1", text)
    text = _SHAPE.sub("[..]", text)
    text = _QUOTED.sub("'..'", text)
    return text if len(text) <= 100 else text[:97] + "..."


def run_case(path: Path, pass_name: str, target_macs: float) -> dict[str, Any]:
    """Load, canonicalize, compress, measure and check one model with one pass."""
    from onnxcompress.metrics import model_metrics
    from onnxcompress.model import canonicalize, load_model
    from onnxcompress.passes import create_pass

    model = load_model(path)
    canonicalize(model)
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
            note=f"crash: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            traceback=traceback.format_exc(limit=-6),
            seconds=round(time.perf_counter() - start, 2),
        )
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    after = model_metrics(model)
    report = compression.report.as_dict()
    valid, problem = check_model(model, path)
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
    notes = []
    if not valid:
        notes.append(problem)
    if drop < MIN_DROP:
        notes.append(explain(report))
    row["note"] = "; ".join(notes)
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
    return out


def fmt_millions(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.1f}M"


def markdown(rows: list[dict[str, Any]], target_macs: float) -> str:
    lines = [
        f"Passes at `target_macs={target_macs}` (criterion `weights`, data-free), random seeded "
        "weights; MACs at batch 1 and the export size shown.",
        "",
        "| model | exporter | size | pass | MACs before | MACs after | drop | params before "
        "| params after | valid | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        drop = row.get("macs_drop")
        lines.append(
            "| "
            + " | ".join(
                [
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
                    row.get("note", "").replace("|", "/"),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="only these (torchvision or light_* names)")
    parser.add_argument("--passes", nargs="*", default=["lrf", "merge"])
    parser.add_argument("--exporters", nargs="*", default=list(EXPORTERS))
    parser.add_argument("--target-macs", type=float, default=0.7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="prunability", help="stem of the result files")
    args = parser.parse_args(argv)
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
            if exporter == "onnx-zoo":
                path = light_model(name)
            else:
                path = export_torchvision(name, exporter, size)
        except Exception as exc:
            message = f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"{name} {exporter}: {message}", flush=True)
            for pass_name in passes:
                rows.append(
                    {"model": name, "exporter": exporter, "size": size, "pass": pass_name}
                    | {"valid": False, "crashed": True, "note": message}
                )
            continue
        export_seconds = time.perf_counter() - t0
        for pass_name in passes:
            row = {"model": name, "exporter": exporter, "size": size, "pass": pass_name}
            row |= run_case(path, pass_name, args.target_macs)
            row["export_seconds"] = round(export_seconds, 2)
            rows.append(row)
            print(
                f"{name:22s} {exporter:11s} {pass_name:5s} drop={row.get('macs_drop')} "
                f"valid={row['valid']} {row.get('seconds')}s {row.get('note', '')}",
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
