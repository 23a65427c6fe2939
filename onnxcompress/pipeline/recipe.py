"""Recipes: a compression run written down as TOML data (steps, data specs, budgets, latency).

A recipe is read with the standard library's TOML parser and checked key by key; nothing in it
is executed. Every ``compress`` flag has a recipe key, and flags given on the command line win.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxcompress.errors import PassConfigError
from onnxcompress.pipeline.budget import Budget, LatencySettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

logger = logging.getLogger(__name__)

# The pass a recipe writes as ``finetune = {...}`` (and the command line as ``--finetune``).
FINETUNE = "finetune"
TOP_LEVEL_KEYS = ("description", "seed", "data", "budget", "latency", "step")
DATA_KEYS = ("calibration", "train", "validation", "calibration_size")
LATENCY_KEYS = ("provider", "batch", "threads", "warmup", "runs")
# Recipes shipped with the project; a bare name (``--recipe fast-halving``) resolves here.
# The package root is one level up from this module (onnxcompress/pipeline/recipe.py):
# an installed wheel has onnxcompress/recipes, a source checkout has recipes/ beside it.
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DIRS = (
    _PACKAGE_ROOT / "recipes",
    _PACKAGE_ROOT.parent / "recipes",
)


@dataclasses.dataclass
class Step:
    """One step of a run: a registered pass with options.

    Attributes:
        name: the pass name (``finetune`` too: recipes write it as ``finetune = {...}``).
        options: the pass's options (a finetune step's: ``FinetuneConfig`` fields, ``teacher``
            and ``select``).
    """

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_finetune(self) -> bool:
        return self.name == FINETUNE

    def as_pair(self) -> tuple[str, dict[str, Any]]:
        return self.name, dict(self.options)

    def as_dict(self) -> dict[str, Any]:
        if self.is_finetune:
            return {FINETUNE: dict(self.options)}
        return {"pass": self.name, **self.options}


@dataclasses.dataclass
class DataSpecs:
    """Dataset specs of a run (see ``onnxcompress.data``).

    Attributes:
        calibration: inputs passes fit on (``--data``); its first ``calibration_size`` samples.
        train: training data of finetune steps (``--train-data``); default: ``calibration``.
        validation: labelled data for accuracy, budgets and the verification gate
            (``--val-data``/``--eval-data``).
        calibration_size: samples of ``calibration`` used (``--calibration-size``).
    """

    calibration: str | None = None
    train: str | None = None
    validation: str | None = None
    calibration_size: int | None = None

    def merged(self, overrides: DataSpecs) -> DataSpecs:
        values = dataclasses.asdict(self)
        values.update({k: v for k, v in dataclasses.asdict(overrides).items() if v is not None})
        return DataSpecs(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Recipe:
    """A whole run: steps in order, data, budget, latency settings.

    Attributes:
        steps: passes and finetune steps in order (canonicalization is added by the pipeline).
        data: dataset specs.
        budget: targets and the accuracy constraint.
        latency: how latency budgets and the report's latency are measured.
        seed: seed of every random choice (None: the command's default).
        description: free text shown in the report.
        source: the file the recipe came from, if any.
    """

    steps: list[Step] = dataclasses.field(default_factory=list)
    data: DataSpecs = dataclasses.field(default_factory=DataSpecs)
    budget: Budget = dataclasses.field(default_factory=Budget)
    latency: LatencySettings = dataclasses.field(default_factory=LatencySettings)
    seed: int | None = None
    description: str | None = None
    source: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "source": self.source,
            "seed": self.seed,
            "data": self.data.as_dict(),
            "budget": self.budget.as_dict(),
            "latency": dataclasses.asdict(self.latency),
            "steps": [step.as_dict() for step in self.steps],
        }


def shipped_recipes() -> dict[str, Path]:
    """The recipes that come with the project, by name (file name without ``.toml``)."""
    found: dict[str, Path] = {}
    for folder in SHIPPED_DIRS:
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                found.setdefault(path.stem, path)
    return found


def find_recipe(name_or_path: str | os.PathLike[str]) -> Path:
    """A recipe file by path, or a shipped recipe by name.

    Raises:
        PassConfigError: neither a file nor a shipped recipe's name.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    known = ", ".join(shipped) or "(none found)"
    raise PassConfigError(
        f"{name_or_path}: no such recipe file, and no shipped recipe has that name "
        f"(shipped: {known})"
    )


def load_recipe(name_or_path: str | os.PathLike[str]) -> Recipe:
    """Read and check a recipe file (or a shipped recipe by name).

    Raises:
        PassConfigError: the file cannot be read, is not TOML, or has an unknown key, a value of
            the wrong type or an unknown pass; the message names the file and the key.
    """
    path = find_recipe(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PassConfigError(f"{path}: cannot read the recipe ({exc})") from exc
    recipe = parse_recipe(text, str(path))
    recipe.source = str(path)
    return recipe


def parse_recipe(text: str, where: str = "<recipe>") -> Recipe:
    """Parse recipe TOML text; ``where`` names it in error messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PassConfigError(f"{where}: not valid TOML ({exc})") from exc
    _only_keys(document, TOP_LEVEL_KEYS, where, "the top level")
    seed = document.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise PassConfigError(f"{where}: seed = {seed!r} must be an integer")
    description = document.get("description")
    if description is not None and not isinstance(description, str):
        raise PassConfigError(f"{where}: description must be a string")
    raw_steps = document.get("step", [])
    if not isinstance(raw_steps, list):
        raise PassConfigError(f"{where}: steps are written as [[step]] tables")
    steps = [_parse_step(raw, index, where) for index, raw in enumerate(raw_steps, start=1)]
    return Recipe(
        steps=steps,
        data=_parse_data(_table(document, "data", where), where),
        budget=Budget.from_mapping(_table(document, "budget", where), where),
        latency=_parse_latency(_table(document, "latency", where), where),
        seed=seed,
        description=description,
    )


def _table(document: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise PassConfigError(f"{where}: {key} must be a table ([{key}])")
    return value


def _only_keys(table: Mapping[str, Any], allowed: Sequence[str], where: str, what: str) -> None:
    for key in table:
        if key not in allowed:
            raise PassConfigError(
                f"{where}: {what} has no key {key!r} (keys: {', '.join(allowed)})"
            )


def _parse_data(table: Mapping[str, Any], where: str) -> DataSpecs:
    _only_keys(table, DATA_KEYS, where, "[data]")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "calibration_size":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PassConfigError(f"{where}: [data] calibration_size must be an integer >= 1")
        elif not isinstance(value, str) or not value.strip():
            raise PassConfigError(
                f'{where}: [data] {key} must be a dataset spec string, e.g. "digits[:500]"'
            )
        values[key] = value
    return DataSpecs(**values)


def _parse_latency(table: Mapping[str, Any], where: str) -> LatencySettings:
    _only_keys(table, LATENCY_KEYS, where, "[latency]")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "provider":
            if not isinstance(value, str):
                raise PassConfigError(f'{where}: [latency] provider must be a string like "cpu"')
        elif isinstance(value, bool) or not isinstance(value, int):
            raise PassConfigError(f"{where}: [latency] {key} must be an integer")
        values[key] = value
    return LatencySettings(**values)


def _parse_step(raw: Any, index: int, where: str) -> Step:
    label = f"{where}: step {index}"
    if not isinstance(raw, dict):
        raise PassConfigError(f"{label}: must be a table ([[step]])")
    has_pass, has_finetune = "pass" in raw, FINETUNE in raw
    if has_pass == has_finetune:
        raise PassConfigError(
            f'{label}: give either pass = "NAME" (with its options) or finetune = {{...}}'
        )
    if has_finetune:
        if len(raw) != 1:
            others = ", ".join(k for k in raw if k != FINETUNE)
            raise PassConfigError(
                f"{label}: a finetune step takes its options inside finetune = {{...}} "
                f"(found also: {others})"
            )
        options = raw[FINETUNE]
        if not isinstance(options, dict):
            raise PassConfigError(f"{label}: finetune must be a table, e.g. {{ epochs = 1 }}")
        return Step(FINETUNE, check_finetune_options(dict(options), label))
    name = raw["pass"]
    if not isinstance(name, str):
        raise PassConfigError(f"{label}: pass must be a pass name string")
    options = {k: v for k, v in raw.items() if k != "pass"}
    check_pass_options(name, options, label)
    return Step(name, options)


def check_pass_options(name: str, options: Mapping[str, Any], label: str) -> None:
    """Raise PassConfigError (prefixed with ``label``) for an unknown pass or a bad option."""
    from onnxcompress.passes import pass_class
    from onnxcompress.passes.base import parse_options

    if name == FINETUNE:
        check_finetune_options(dict(options), label)
        return
    try:
        parse_options(pass_class(name).config_class, options, name)
    except PassConfigError as exc:
        raise PassConfigError(f"{label}: {exc}") from None


def check_finetune_options(options: dict[str, Any], label: str) -> dict[str, Any]:
    """Check a finetune step's ``teacher`` and ``select`` (prefixed with ``label``); its
    training options are checked, as the pass's config, before the run does any work."""
    from onnxcompress.passes.finetune import check_step_choices

    try:
        check_step_choices(options.get("teacher", "original"), options.get("select", "last"))
    except PassConfigError as exc:
        raise PassConfigError(f"{label}: {exc}") from None
    return options


def parse_step_flag(kind: str, spec: str) -> Step:
    """A ``--pass NAME[:k=v,...]`` or ``--finetune k=v,...`` flag as a step."""
    from onnxcompress.passes import parse_pass_spec

    if kind == FINETUNE:
        name, options = parse_pass_spec(f"{FINETUNE}:{spec}")
        return Step(FINETUNE, check_finetune_options(dict(options), f"--finetune {spec!r}"))
    name, options = parse_pass_spec(spec)
    if name == FINETUNE:
        return Step(FINETUNE, check_finetune_options(dict(options), f"--pass {spec!r}"))
    return Step(name, dict(options))


def with_overrides(
    recipe: Recipe,
    *,
    steps: Sequence[Step] | None = None,
    data: DataSpecs | None = None,
    budget: Budget | None = None,
    latency: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> Recipe:
    """``recipe`` with what the command line set replacing its values.

    Steps are replaced as a whole when any are given (a partial merge of two step lists has no
    obvious meaning); data, budget and latency are merged key by key.
    """
    latency_values = dataclasses.asdict(recipe.latency)
    latency_values.update({k: v for k, v in (latency or {}).items() if v is not None})
    return Recipe(
        steps=list(steps) if steps else list(recipe.steps),
        data=recipe.data.merged(data) if data is not None else recipe.data,
        budget=recipe.budget.merged(budget) if budget is not None else recipe.budget,
        latency=LatencySettings(**latency_values),
        seed=seed if seed is not None else recipe.seed,
        description=recipe.description,
        source=recipe.source,
    )


__all__ = [
    "FINETUNE",
    "DataSpecs",
    "Recipe",
    "Step",
    "find_recipe",
    "load_recipe",
    "parse_recipe",
    "parse_step_flag",
    "shipped_recipes",
    "with_overrides",
]
