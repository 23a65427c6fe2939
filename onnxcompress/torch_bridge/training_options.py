"""The training options a compression pass (or the CLI) shares with ``finetune``, handed over
in one place: ``finetune_config_from`` copies them by name into a ``FinetuneConfig``.
"""

from __future__ import annotations

from typing import Any

from onnxcompress.torch_bridge.finetune_config import FinetuneConfig

# ``FinetuneConfig``'s options that mean the same wherever a config carries them under that
# name. A pass's config declares the ones it has among its own options (their order is what
# ``onnxcompress passes`` lists and the reports write, so they are not inherited from a shared
# base, which would move them to the front). Not ``epochs`` nor ``time_budget_s``: a pass's
# are those of its whole run; nor ``hint_weight``: resect's weighs its layer-level learning only.
TRAINING_OPTIONS = (
    "lr",
    "batch_size",
    "weight_decay",
    "temperature",
    "alpha",
    "epoch_samples",
    "batchnorm",
    "batchnorm_between_convs",
    "device",
)


def finetune_config_from(options: object, **overrides: Any) -> FinetuneConfig:
    """The ``FinetuneConfig`` of one training run (validated, with its messages).

    Args:
        options: a pass's config or the CLI's arguments; each of ``TRAINING_OPTIONS`` it has
            is taken as it is, the others keep ``FinetuneConfig``'s defaults.
        overrides: what the run sets itself (its epochs, budget, loss, seed...), or a value
            the run derives from one of those options (a final learning rate, a default alpha).
    """
    shared = {name: getattr(options, name) for name in TRAINING_OPTIONS if hasattr(options, name)}
    return FinetuneConfig(**{**shared, **overrides})
