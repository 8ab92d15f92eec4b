"""bitfit-tasks: BitFit (bias-only fine-tuning) on the Hugging Face Trainer.

The public API is the user story: configure (:class:`BitFitConfig`), select biases
(:func:`prepare_model`, :func:`select_bias_parameters`, :func:`register_bias_map`), train
(:class:`BitFitTrainer`), keep and share the tiny result (:class:`Delta`, :func:`save_delta`,
:func:`apply_delta`, :func:`load_task_model`, :func:`export_merged`), serve many tasks on one
backbone (:class:`MultiTaskBitFit`), and the runners' entry points (:func:`run_glue`,
:func:`run_squad`, :func:`run_pos`, the ``main`` of ``run_*.py``). Everything else lives in the
submodules.
"""

from __future__ import annotations

from typing import Any

from .core.bias_maps import PRESETS, TERMS, BiasMap, register_bias_map, supported_model_types
from .core.config import MODES, BitFitConfig
from .core.prepare import prepare_model
from .core.selection import select_bias_parameters
from .delta.apply import AppliedDelta, apply_delta, load_task_model
from .delta.format import Delta, save_delta
from .delta.merge import export_merged
from .serving.multitask import MultiTaskBitFit
from .training.trainer import BitFitTrainer

# The one place the version is written (pyproject.toml reads it from here).
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The runners' mains, imported on first use: importing the package loads no datasets or task
    code. Plain imports, so the module graph (docs/module_graph.py) and linters see them."""
    if name in ("run_glue", "run_squad", "run_pos"):
        from .tasks.registry import runner_module

        return runner_module(name.removeprefix("run_")).main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MODES",
    "PRESETS",
    "TERMS",
    "AppliedDelta",
    "BiasMap",
    "BitFitConfig",
    "BitFitTrainer",
    "Delta",
    "MultiTaskBitFit",
    "apply_delta",
    "export_merged",
    "load_task_model",
    "prepare_model",
    "register_bias_map",
    "run_glue",
    "run_pos",
    "run_squad",
    "save_delta",
    "select_bias_parameters",
    "supported_model_types",
]
