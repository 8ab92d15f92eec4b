"""Finding the Trainer checkpoint to resume from (``--resume_from_checkpoint``)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers import TrainingArguments

from ..delta.files import is_delta_dir
from ..delta.format import Delta
from ..utils.errors import UsageError

logger = logging.getLogger("bitfit_tasks")


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``true`` for the newest *complete*
    checkpoint in ``--output_dir`` (as the HF examples do with ``get_last_checkpoint``). Checked
    before any data or model is loaded; the resolved path is written back into the arguments."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none", "no"):
        training_args.resume_from_checkpoint = None
        return None
    if str(value).lower() in ("true", "last", "yes", "1"):
        path = last_complete_checkpoint(training_args.output_dir)
        if path is None:
            raise UsageError(
                f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in --output_dir "
                f"{training_args.output_dir!r}; train with --save_strategy epoch (or steps) to write "
                "checkpoints, or drop the flag to start from scratch."
            )
    else:
        path = str(value)
        if not Path(path).is_dir():
            raise UsageError(f"--resume_from_checkpoint {path!r} is not a folder; pass a checkpoint-N folder "
                             "or 'true' for the last checkpoint in --output_dir.")
        if not (Path(path) / "trainer_state.json").is_file():
            raise UsageError(f"--resume_from_checkpoint {path!r} has no trainer_state.json, so it is not a "
                             "complete Trainer checkpoint; pass a checkpoint-N folder written during training.")
        why = damaged(Path(path))
        if why is not None:
            newest = last_complete_checkpoint(str(Path(path).parent), warn=False)
            other = f" (the newest intact one here: {newest})" if newest else ""
            raise UsageError(f"--resume_from_checkpoint {path}: {why}; pass another checkpoint{other} or "
                             "'true' for the newest intact one.")
    training_args.resume_from_checkpoint = path
    return path


def last_complete_checkpoint(output_dir: str | None, *, warn: bool = True) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that holds a readable ``trainer_state.json``
    (Trainer writes it after the weights and optimizer state, so a save killed half-way has none, or
    a cut-short one, and is skipped) and, where it holds a BitFit delta, an intact one (a damaged newer
    checkpoint is skipped with a warning naming it and why)."""
    if not output_dir or not Path(output_dir).is_dir():
        return None
    found = []
    for p in Path(output_dir).iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and _readable_json(p / "trainer_state.json"):
            found.append((int(m.group(1)), p))
    for _, p in sorted(found, reverse=True):
        why = damaged(p)
        if why is None:
            return str(p)
        if warn:
            logger.warning("skipping %s: %s; resuming from an older checkpoint", p, why)
    return None


def damaged(checkpoint: Path) -> str | None:
    """Why a checkpoint's BitFit delta cannot be read (its JSON, checksum, tensors), or None: intact, or no delta."""
    if not is_delta_dir(checkpoint):
        return None
    try:
        Delta.load(checkpoint)
    except UsageError as err:
        return str(err).rstrip(".")
    return None


def _readable_json(path: Path) -> bool:
    """Trainer writes trainer_state.json last, and not atomically: a kill can leave it cut short."""
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def checkpoint_step(path: str) -> int:
    """The optimizer step a checkpoint was written at (its ``trainer_state.json``)."""
    return int(json.loads((Path(path) / "trainer_state.json").read_text()).get("global_step", 0))
