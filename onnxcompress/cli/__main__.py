"""``python -m onnxcompress.cli`` (and ``torchrun -m onnxcompress.cli``): the console script."""

from __future__ import annotations

import sys

from onnxcompress.cli import main

sys.exit(main())
