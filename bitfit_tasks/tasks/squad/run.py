"""run_squad.py: SQuAD v1.1 with BitFit, full fine-tuning, LoRA or BEFT, on training-size subsets (the
paper's Figure 2). Data and windows: squad_data.py; span search and the QA trainer: squad_qa.py."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
)

from ...core.config import BitFitConfig
from ...utils.errors import UsageError, check_positive, load_pretrained
from ..arguments import ModelArguments, RunArguments, model_load_kwargs
from ..hub_data import load_hub_dataset
from ..results import eval_history
from ..runner import check_terms_before_loading, ensure_pad_token, parse_and_run, start_run, train_and_record
from ..sampling import EVAL_SAMPLE_SEED
from .data import read_squad_file, sample_examples, window_dataset
from .qa import SquadBitFitTrainer, SquadEval

logger = logging.getLogger("bitfit_tasks")


# ---- runner ----------------------------------------------------------------------------------

@dataclass
class SquadArguments:
    task_name: str = field(default="squad", metadata={"help": "A label for results and sweeps."})
    train_file: str | None = field(default=None, metadata={"help": "Official SQuAD v1.1 JSON or flattened "
                                   "jsonl/json rows. Without files the hub's rajpurkar/squad is used."})
    validation_file: str | None = field(default=None, metadata={"help": "Dev file (same formats)."})
    dataset_name: str = field(default="rajpurkar/squad", metadata={"help": "Hub dataset when no files are given."})
    max_seq_length: int = field(default=384, metadata={"help": "Window length in tokens."})
    doc_stride: int = field(default=128, metadata={"help": "Overlap between windows of a long context."})
    n_best_size: int = field(default=20, metadata={"help": "Start/end candidates searched per window."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer, in tokens."})
    train_fraction: float | None = field(default=None, metadata={"help": "0 < F <= 1: train on a seeded random "
                                         "fraction of the training *questions* (ids saved to train_ids.json)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "At most this many training questions "
                                          "(seeded random, after --train_fraction)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a seeded random subset of "
                                         "this many dev questions, drawn with the fixed seed 1234 (the same for every "
                                         "method and seed)."})
    save_full_model: bool = field(default=False, metadata={"help": "With --mode full, save the whole model."})

    def __post_init__(self) -> None:
        check_positive(self, "max_seq_length", "doc_stride", "n_best_size", "max_answer_length",
                       "max_train_samples", "max_eval_samples")
        if self.train_fraction is not None and not 0 < self.train_fraction <= 1:
            raise UsageError(f"--train_fraction must be in (0, 1], got {self.train_fraction}.")
        if (self.train_file is None) != (self.validation_file is None):
            raise UsageError("give both --train_file and --validation_file (or neither, for the hub).")
        if self.doc_stride >= self.max_seq_length:
            raise UsageError(f"--doc_stride {self.doc_stride} must be smaller than --max_seq_length "
                             f"{self.max_seq_length}.")


def load_rows(a: SquadArguments) -> tuple[list[dict], list[dict]]:
    if a.train_file:
        return read_squad_file(a.train_file, "train"), read_squad_file(a.validation_file, "validation")
    ds = load_hub_dataset(a.dataset_name, local_hint="--train_file and --validation_file (the official v1.1 "
                          "JSON, e.g. ../shared/data/squad/train-v1.1.rebuilt.json and dev-v1.1.rebuilt.json)")
    return [dict(r) for r in ds["train"]], [dict(r) for r in ds["validation"]]


# This runner's argument dataclass and its defaults beyond RUNNER_DEFAULTS (the sweep parses with them).
# Dev scoring (window post-processing) is costly: once at the end unless --eval_strategy says
# otherwise. Learning rate, schedule, batch size and epochs come from the recipe (recipes.py).
ARGUMENTS = SquadArguments
DEFAULTS: dict[str, Any] = {"eval_strategy": "no"}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return parse_and_run(run, ARGUMENTS, argv, defaults=DEFAULTS)


def run(model_args: ModelArguments, data_args: SquadArguments, bitfit: BitFitConfig,
        training_args: TrainingArguments, run_args: RunArguments | None = None) -> dict[str, Any]:

    seed = start_run(training_args, bitfit, run_args, runner="squad")
    load_kwargs = model_load_kwargs(model_args, bitfit, training_args)  # refused before any data is read
    train_rows, dev_rows = load_rows(data_args)
    train_rows = sample_examples(train_rows, data_args.train_fraction, data_args.max_train_samples, seed)
    # The dev subset depends on the data seed only, so every method is scored on the same questions.
    dev_rows = sample_examples(dev_rows, None, data_args.max_eval_samples, EVAL_SAMPLE_SEED)

    tokenizer = load_pretrained(AutoTokenizer, model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    if not tokenizer.is_fast:
        raise UsageError(f"{model_args.model_name_or_path}: SQuAD preprocessing needs a fast tokenizer "
                         "(offset mappings); this one is slow.")
    config = load_pretrained(AutoConfig, model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    ensure_pad_token(tokenizer, config)  # decoder tokenizers (Llama, Qwen3, ...) often have none
    check_terms_before_loading(AutoModelForQuestionAnswering, config, bitfit, load_kwargs)
    model = load_pretrained(AutoModelForQuestionAnswering, model_args.model_name_or_path, config=config,
                            cache_dir=model_args.cache_dir, **load_kwargs)
    train_windows = window_dataset("train", train_rows, tokenizer, data_args.max_seq_length, data_args.doc_stride,
                                   training_args)
    dev_windows = window_dataset("eval", dev_rows, tokenizer, data_args.max_seq_length, data_args.doc_stride,
                                 training_args)
    squad_eval = SquadEval(dev_rows, dev_windows, data_args, training_args.output_dir)
    trainer = SquadBitFitTrainer(
        # eval_dataset: Trainer requires one under --eval_strategy epoch/steps; evaluate() is SquadEval's.
        model=model, args=training_args, train_dataset=train_windows, eval_dataset=squad_eval.features,
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        bitfit_config=bitfit,
    )
    trainer.squad_eval = squad_eval
    if trainer.is_world_process_zero():
        out = Path(training_args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_ids.json").write_text(json.dumps([r["id"] for r in train_rows]))
    return train_and_record(
        trainer, metric_key="eval_f1", bitfit=bitfit, save_full_model=data_args.save_full_model,
        info={"task": data_args.task_name, "metric": "f1", "train_examples": len(train_rows),
              "train_features": len(train_windows), "train_fraction": data_args.train_fraction,
              "eval_examples": len(dev_rows), "model": model_args.model_name_or_path},
        after_training=final_em_f1,
        keep=getattr(run_args, "keep", "best"),
    )


def final_em_f1(trainer: SquadBitFitTrainer) -> dict[str, float]:
    """The saved model's official EM and F1, top level in results.json. predictions.json is rewritten
    from the saved model when that is an earlier (best) evaluation's, not the last one's."""
    last = eval_history(trainer.state.log_history)[-1]
    saved = trainer.saved_metrics or last
    if saved.get("step") != last.get("step") and trainer.squad_eval is not None:
        trainer.squad_eval.score(trainer)
    return {"exact_match": saved["eval_exact_match"], "f1": saved["eval_f1"]}
