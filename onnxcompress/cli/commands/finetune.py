"""``onnxcompress finetune``: train a compressed model, distilling from the original."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from onnxcompress.cli.exit_codes import EXIT_OK
from onnxcompress.cli.formatting import format_finetune_history
from onnxcompress.errors import OnnxCompressError


def _hint_pairs(specs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for spec in specs:
        teacher, _, student = spec.partition("=")
        if not teacher.strip():
            raise OnnxCompressError(f"--hint {spec!r}: give TEACHER_TENSOR[=STUDENT_TENSOR]")
        pairs.append((teacher.strip(), (student or teacher).strip()))
    return tuple(pairs)


def cmd_finetune(args: argparse.Namespace) -> int:
    import contextlib

    from onnxcompress.data import Preprocess
    from onnxcompress.deadline import Deadline
    from onnxcompress.errors import ModelSaveError
    from onnxcompress.graph.model_io import load_model, save_model
    from onnxcompress.runtime.evaluate import dataset_for_model
    from onnxcompress.torch_bridge.distributed import is_main_process
    from onnxcompress.torch_bridge.finetune_config import finetune_config_from
    from onnxcompress.torch_bridge.train import finetune
    from onnxcompress.torch_bridge.training_checkpoint import CHECKPOINT_FILE

    output = Path(args.output)
    inputs = [Path(args.student)] + ([Path(args.teacher)] if args.teacher else [])
    if any(output.resolve() == path.resolve() for path in inputs):
        raise ModelSaveError(f"{output}: refusing to overwrite an input model; choose another -o")
    if output.exists() and not args.force:
        raise ModelSaveError(f"{output}: already exists (pass --force to replace it)")
    if not output.parent.exists():
        raise ModelSaveError(f"{output}: the folder {output.parent} does not exist")
    default_checkpoints = args.checkpoint_dir is None
    checkpoint_dir = Path(args.checkpoint_dir or f"{output}.ckpt")
    # The shared training options (``TRAINING_OPTIONS``: --lr, --alpha...) go over by name;
    # the rest are named or converted here.
    config = finetune_config_from(
        args,
        epochs=args.epochs,
        optimizer=args.optimizer,
        schedule=args.schedule,
        max_grad_norm=args.max_grad_norm or None,
        loss=args.loss,
        hint_tensors=_hint_pairs(args.hint),
        peers=args.peers,
        augment=args.augment,
        time_budget_s=args.time_budget * 60 if args.time_budget is not None else None,
        seed=args.seed,
        num_workers=args.workers,
        checkpoint_dir=str(checkpoint_dir),
        resume=args.resume,
    )
    config.validate()
    # The time budget covers the whole command, loading the models and the data too: its
    # deadline starts now and the run draws from it (rather than starting its own).
    deadline = Deadline(config.time_budget_s, label="finetune")
    student = load_model(args.student)
    teacher = load_model(args.teacher) if args.teacher else None
    # A student written by another tool may lack the preprocessing metadata its teacher has.
    fallback = Preprocess.from_metadata(teacher.metadata_props) if teacher is not None else None
    train = dataset_for_model(student, args.data, preprocess=fallback)
    val = dataset_for_model(student, args.val, preprocess=fallback) if args.val else None
    main_process = is_main_process()
    result = finetune(
        student,
        teacher,
        train,
        val,
        dataclasses.replace(config, time_budget_s=None),
        progress=not args.quiet and main_process and sys.stderr.isatty(),
        deadline=deadline,
    )
    if not main_process:
        return EXIT_OK
    written = save_model(result.model, output, overwrite=args.force, protect=tuple(inputs))
    if args.report:
        from onnxcompress.pipeline.run import write_json_atomic

        write_json_atomic(
            args.report,
            {
                "student": args.student,
                "teacher": args.teacher,
                "output": str(written),
                "data": args.data,
                "val": args.val,
                **result.as_dict(),
            },
        )
    if default_checkpoints:
        # The default folder is ours and the run is complete: nothing left to resume.
        (checkpoint_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            checkpoint_dir.rmdir()
    if not args.quiet:
        history = format_finetune_history(result)
        if history:
            print(history)
        print(f"wrote {written}")
    return EXIT_OK
