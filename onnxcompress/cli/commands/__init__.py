"""The ``onnxcompress`` commands, by theme: each ``cmd_*`` takes the parsed arguments and
returns an exit code; heavy libraries are imported inside them, so the CLI starts fast.
"""
