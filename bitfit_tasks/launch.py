"""Running a runner as a command: a user error ends in one line on stderr, and the process group
(several processes under ``accelerate launch`` / ``torchrun``) is left cleanly on every exit."""

from __future__ import annotations

import os
import sys
from pathlib import Path


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


# Errors whose message is written for the user: the runners print the message alone (a traceback
# would bury it). Set BITFIT_DEBUG=1 to get the traceback as well.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, OSError, ImportError)


def run_cli(main) -> None:
    """A runner script's entry point: ``main()`` from sys.argv, then leave the process group
    cleanly, even on error (a launcher can abort a process that exits with a group alive).
    A user error (bad flag, file or value; a hub download that fails offline) ends in one line
    on stderr and exit code 1."""
    failed = True
    try:
        main()
        failed = False
    except USER_ERRORS as err:
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


