"""A model's skeleton on the meta device: its modules, parameter names and shapes, built from a config
with no memory and no weights. The one place this is done (the selection's check for added biases,
the merge's config flags, serving's task heads and the runners' check before loading)."""

from __future__ import annotations

import torch
from torch import nn


def meta_skeleton(cls, config) -> nn.Module:
    """``cls(config)`` (a model class) or ``cls.from_config(config)`` (an ``AutoModelFor*`` class) on the
    meta device. Errors are the class's own: each caller decides what a class that cannot be built means."""
    with torch.device("meta"):
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls(config)
        return cls.from_config(config)
