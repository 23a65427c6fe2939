"""``onnxcompress passes``: the registered passes, what each does and its options."""

from __future__ import annotations

import argparse

from onnxcompress.cli.exit_codes import EXIT_OK


def cmd_passes(args: argparse.Namespace) -> int:
    import dataclasses

    from onnxcompress.passes import available_passes, pass_class

    for entry in available_passes():
        cls = pass_class(entry.name)
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.config_class))
        if cls.needs_training_data:
            data = " [needs --train-data or --data]"
        else:
            data = " [needs --data]" if cls.needs_data else ""
        print(f"{entry.name}{data}: {entry.summary}")
        if fields:
            print(f"    options: {fields}")
    return EXIT_OK
