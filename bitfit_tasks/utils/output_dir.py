"""One run per ``--output_dir``: a lock for the run's life, and no silent overwrite of another run."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from filelock import FileLock, Timeout
from transformers import TrainingArguments

from .errors import UsageError

logger = logging.getLogger("bitfit_tasks")

LOCK_NAME = ".bitfit-run.lock"
# Who holds the lock, for the refusal message: a file of its own, since a lock file's content is the
# lock library's business (it may truncate or replace the file while others try to acquire it).
OWNER_NAME = ".bitfit-run.owner"
# Output folders this process holds a lock on (released at the end of the run): a second process
# (another runner, a second sweep) into the same folder is refused instead of interleaving.
_claims: dict[str, FileLock] = {}


def _lock(out: Path) -> None:
    key = str(out.resolve())
    if key in _claims:
        return
    lock = FileLock(str(out / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = (out / OWNER_NAME).read_text().strip()
        except OSError:
            holder = ""
        raise UsageError(f"another run ({holder or 'another process'}) is writing to --output_dir {out}; wait for "
                         "it to finish or pick another --output_dir.") from None
    (out / OWNER_NAME).write_text(f"pid {os.getpid()}")
    _claims[key] = lock


def claim_output_dir(training_args: TrainingArguments, overwrite: bool = False) -> None:
    """Lock ``--output_dir`` for this run and refuse a folder holding another run (a finished one,
    or checkpoints of an unfinished one) unless resuming or ``--overwrite_output_dir true``."""
    out = Path(training_args.output_dir)
    main = training_args.process_index == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _lock(out)
    if training_args.resume_from_checkpoint:
        return
    finished = (out / "results.json").exists()
    # By step, not by name: checkpoint-150 comes after checkpoint-50.
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit()
                   else -1) if out.is_dir() else []
    if not (finished or ckpts):
        return
    if not overwrite:
        what = "a finished run (results.json)" if finished else f"checkpoints of an unfinished run ({ckpts[-1].name})"
        raise UsageError(f"--output_dir {out} holds {what}; resume it with --resume_from_checkpoint true, "
                         "replace it with --overwrite_output_dir true, or pick another --output_dir.")
    if main:
        for c in ckpts:
            shutil.rmtree(c)
        (out / "results.json").unlink(missing_ok=True)
        logger.warning("--overwrite_output_dir: removed the previous run's results.json and %d checkpoint(s) in %s",
                       len(ckpts), out)


def release_output_dir(output_dir: str) -> None:
    lock = _claims.pop(str(Path(output_dir).resolve()), None)
    if lock is not None:
        lock.release()
