"""Bias-only checkpoints ("deltas"): their files and the Hub (``files``), the format and its checked I/O
(``format``), applying and undoing them on a base (``apply``), merging them into a full model
(``merge``) and their model card (``card``). Imports ``core`` and ``utils``.

The names a user needs are re-exported here (``from bitfit_tasks.delta import load_task_model``)."""

from .apply import AppliedDelta, apply_delta, load_task_model
from .files import DELTA_CONFIG, DELTA_WEIGHTS, is_delta_dir
from .format import Delta, save_delta
from .merge import export_merged

__all__ = ["DELTA_CONFIG", "DELTA_WEIGHTS", "AppliedDelta", "Delta", "apply_delta", "export_merged",
           "is_delta_dir", "load_task_model", "save_delta"]
