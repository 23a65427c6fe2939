"""``onnxcompress passes``: the registered passes, what each does and its options."""

from __future__ import annotations

import argparse

from onnxcompress.cli.exit_codes import EXIT_OK


def cmd_passes(args: argparse.Namespace) -> int:
    import dataclasses

    from onnxcompress.passes import available_passes, pass_class
    from onnxcompress.torch_bridge.training_options import TRAINING_OPTIONS

    for entry in available_passes():
        cls = pass_class(entry.name)
        fields = dataclasses.fields(cls.config_class)
        # The training options every training pass shares go on a line of their own, after
        # what is particular to the pass.
        shared = [f for f in fields if f.name in TRAINING_OPTIONS]
        own = ", ".join(f"{f.name}={f.default!r}" for f in fields if f not in shared)
        if cls.needs_training_data:
            data = " [needs --train-data or --data]"
        else:
            data = " [needs --data]" if cls.needs_data else ""
        print(f"{entry.name}{data}: {entry.summary}")
        if own:
            print(f"    options: {own}")
        if shared:
            print(f"    training: {', '.join(f'{f.name}={f.default!r}' for f in shared)}")
    return EXIT_OK
