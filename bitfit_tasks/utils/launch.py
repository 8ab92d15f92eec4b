"""Running a runner as a command: a user error ends in one line on stderr, and the process group
(several processes under ``accelerate launch`` / ``torchrun``) is left cleanly on every exit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import UsageError


def cpu_only_multiprocess() -> bool:
    """Launched as one of several processes (torchrun / accelerate launch) on a machine without an
    accelerator. accelerate then needs ``cpu=True`` (``--use_cpu``) to form a gloo group of all
    processes; without it every process believes it is alone, trains on its own and writes the
    same files."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    has_acc = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return not has_acc


FSDP_REFUSAL = ("FSDP shards parameters; BitFitTrainer's bias-only checkpoints read the live parameters and would "
                "save shards. Train with DDP instead (accelerate launch --multi_gpu, no FSDP config): BitFit's "
                "optimizer state and gradients are ~0.1% of the model, so DDP fits where full fine-tuning needed FSDP.")
DEEPSPEED_REFUSAL = ("DeepSpeed is not supported by BitFitTrainer (ZeRO-3 shards the parameters its bias-only "
                     "checkpoints read, and it was never tested). Train with DDP instead: accelerate launch "
                     "--multi_gpu, without a DeepSpeed config.")


def refuse_sharded_launch() -> None:
    """``accelerate launch --use_fsdp`` / ``--use_deepspeed`` (and ``accelerate config`` files that turn them
    on) tell the processes through ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``, read with
    accelerate's own parser. Refused before TrainingArguments is built: it sets DeepSpeed up from that
    variable (and fails with a packaging error where DeepSpeed is not installed)."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise UsageError(FSDP_REFUSAL)
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise UsageError(DEEPSPEED_REFUSAL)


def finish_distributed(failed: bool = False) -> None:
    """Destroy the process group at exit: launchers can abort a process that leaves one behind. After
    a success every rank meets at a barrier first; after a failure this rank leaves at once, since
    the others may sit in another collective (a barrier would hang it until the group's timeout) --
    its exit code makes the launcher (accelerate launch, torchrun) stop the other ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def run_cli(main) -> None:
    """A runner script's entry point: ``main()`` from sys.argv, then leave the process group
    cleanly, even on error (a launcher can abort a process that exits with a group alive).
    A user error -- a :class:`~bitfit_tasks.errors.UsageError`: bad flag, file or value, or a library
    error translated where it was caught (a hub download that fails offline, an argument Trainer
    refuses) -- ends in one line on stderr and exit code 1. Anything else is a bug to report and
    keeps its traceback."""
    failed = True
    try:
        main()
        failed = False
    except UsageError as err:
        if os.environ.get("BITFIT_DEBUG", "").lower() in ("1", "true", "yes"):
            raise
        msg = " ".join(str(err).split()) or type(err).__name__
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "bitfit-tasks"
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        where = f" (process {rank})" if rank is not None else ""
        print(f"{prog}: error{where}: {msg} (BITFIT_DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        finish_distributed(failed)
