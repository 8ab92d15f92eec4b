"""The three runners by name, imported on first use (importing the package loads no task code)."""

from __future__ import annotations

from types import ModuleType

from ..utils.errors import UsageError

RUNNERS = ("glue", "pos", "squad")


def runner_module(runner: str) -> ModuleType:
    """The runner's module (``glue``, ``pos``, ``squad``): its ``main``, ``ARGUMENTS`` and ``DEFAULTS``.
    Plain imports, one runner only, so the module graph (docs/module_graph.py) and linters see them."""
    if runner == "glue":
        from .glue import run as module
    elif runner == "pos":
        from .pos import run as module
    elif runner == "squad":
        from .squad import run as module
    else:
        raise UsageError(f"unknown runner {runner!r}; choose one of {list(RUNNERS)}.")
    return module
