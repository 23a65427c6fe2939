"""The exit codes of ``onnxcompress``: a leaf module, so every command can import them.

0 done, 1 a bug (a traceback), 2 a user error (one line on stderr), 3 ``compress --strict``
missed a target, 130 interrupted.
"""

from __future__ import annotations

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_MISSED = 0, 1, 2, 3
EXIT_INTERRUPTED = 130
