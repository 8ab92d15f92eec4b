"""bitfit-tasks: BitFit (bias-only fine-tuning) on the Hugging Face Trainer."""

from __future__ import annotations

from .config import MODES, BitFitConfig
from .core import BitFitState, prepare_model, random_masks
from .delta import AppliedDelta, Delta, apply_delta, export_merged, load_task_model, save_delta
from .multitask import MultiTaskBitFit
from .selection import (
    DEFAULT_BIAS_MAPS,
    GLOBAL_TERMS,
    LAYER_TERMS,
    PRESETS,
    TERMS,
    BiasMap,
    head_parameter_names,
    register_bias_map,
    select_bias_parameters,
    supported_model_types,
)
from .trainer import BitFitTrainer

__version__ = "0.1.0"

__all__ = [
    "AppliedDelta",
    "Delta",
    "MultiTaskBitFit",
    "apply_delta",
    "export_merged",
    "load_task_model",
    "save_delta",
    "BiasMap",
    "BitFitConfig",
    "BitFitState",
    "BitFitTrainer",
    "DEFAULT_BIAS_MAPS",
    "GLOBAL_TERMS",
    "LAYER_TERMS",
    "MODES",
    "PRESETS",
    "TERMS",
    "head_parameter_names",
    "prepare_model",
    "random_masks",
    "register_bias_map",
    "select_bias_parameters",
    "supported_model_types",
]
