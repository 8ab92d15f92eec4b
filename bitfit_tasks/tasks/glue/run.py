"""run_glue.py: a GLUE task with BitFit, a bias subset, a random baseline, full fine-tuning,
LoRA or BEFT; its arguments, metrics and prediction files. The data: glue_data.py."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
)

from ...core.config import BitFitConfig
from ...training.trainer import BitFitTrainer
from ...utils.errors import UsageError, check_positive, load_pretrained
from ...utils.fileio import atomic_write_lines
from .. import metrics as M
from ..arguments import ModelArguments, RunArguments, model_load_kwargs
from ..callbacks import add_train_sample_eval
from ..runner import check_terms_before_loading, ensure_pad_token, parse_and_run, start_run, train_and_record
from ..sampling import EVAL_SAMPLE_SEED
from .data import (
    GLUE_TASKS,
    LOCAL_FORMATS,
    PACKAGED_DATA,
    GlueTask,
    check_and_encode_labels,
    find_file,
    load_glue,
    sample,
)

logger = logging.getLogger("bitfit_tasks")

@dataclass
class GlueArguments:
    task_name: str = field(
        default="sst2",
        metadata={"help": f"GLUE task: {', '.join(GLUE_TASKS)} (wnli is excluded by the paper)."},
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local training file (jsonl/json/csv/tsv/parquet) with "
                                "nyu-mll/glue column names. Without files the hub's nyu-mll/glue is used."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation file (MNLI: the matched one)."})
    validation_mismatched_file: str | None = field(
        default=None, metadata={"help": "MNLI only: local validation_mismatched file."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder with <task>/train.* and <task>/validation.* files "
                                "(e.g. ../shared/data/glue); 'packaged' uses the sample shipped with "
                                "the package (sst2)."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a seeded random subset of this many examples "
                                "(seed: --data_seed or --seed), not the first N rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a random subset of this size, drawn with the fixed seed "
                                "1234: the same examples for every method and seed."})
    save_full_model: bool = field(
        default=False, metadata={"help": "With --mode full, also save the whole fine-tuned model at the "
                                 "end (bias-only modes always save their small delta)."})

    def __post_init__(self) -> None:
        check_positive(self, "max_seq_length", "max_train_samples", "max_eval_samples")
        self.task_name = self.task_name.lower().replace("-", "")
        if self.task_name not in GLUE_TASKS:
            raise UsageError(f"unknown GLUE task {self.task_name!r}; choose one of {list(GLUE_TASKS)}.")
        if self.task_name == "wnli":
            warnings.warn("WNLI is excluded by the BitFit paper (BERT models do not beat the majority "
                          "baseline on it); running it anyway.", stacklevel=2)
        if self.data_dir == "packaged":
            self.data_dir = str(PACKAGED_DATA)
        if self.data_dir is not None:
            self.train_file = self.train_file or find_file(self.data_dir, self.task_name, "train")
            split = "validation_matched" if self.task_name == "mnli" else "validation"
            self.validation_file = self.validation_file or find_file(self.data_dir, self.task_name, split)
        if (self.train_file is None) != (self.validation_file is None):
            raise UsageError("give both --train_file and --validation_file (or neither, for the hub).")
        for f in (self.train_file, self.validation_file, self.validation_mismatched_file):
            if f is not None and Path(f).suffix.lower() not in LOCAL_FORMATS:
                raise UsageError(f"unsupported data file {f!r}; use one of {sorted(LOCAL_FORMATS)}.")
        if self.validation_mismatched_file and self.task_name != "mnli":
            raise UsageError("--validation_mismatched_file is for --task_name mnli only.")


def compute_glue_metrics(task_name: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The paper's metric plus its usual companion (Table 5)."""
    task = GLUE_TASKS[task_name]
    if task.is_regression:
        preds = np.squeeze(predictions)
        return {"spearmanr": M.spearman(preds, labels), "pearson": M.pearson(preds, labels)}
    preds = np.argmax(predictions, axis=-1)
    out = {"accuracy": M.accuracy(preds, labels)}
    if task.metric == "f1":
        out["f1"] = M.f1_binary(preds, labels)
    if task.metric == "matthews_correlation":
        out["matthews_correlation"] = M.matthews_corrcoef(preds, labels)
    return out


def main_metric_key(task_name: str) -> str:
    task = GLUE_TASKS[task_name]
    split = task.eval_splits[0]
    return f"eval_{split}_{task.metric}" if len(task.eval_splits) > 1 else f"eval_{task.metric}"


DEMO_ARGS = [
    "--task_name", "sst2", "--data_dir", "packaged", "--output_dir", "outputs/glue-demo",
    "--num_train_epochs", "2", "--max_seq_length", "64", "--bias_terms", "bitfit",
    "--overwrite_output_dir", "true",  # the demo is rerun as is
    "--recipe", "linear",  # sized to ~3 min on a laptop CPU; the official recipe runs 20 epochs
]


# This runner's argument dataclass and its defaults beyond RUNNER_DEFAULTS (the sweep parses with them).
ARGUMENTS = GlueArguments
DEFAULTS: dict[str, Any] = {}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv == ["--demo"]:
        argv = list(DEMO_ARGS)
    return parse_and_run(run, ARGUMENTS, argv, defaults=DEFAULTS)


def run(model_args: ModelArguments, data_args: GlueArguments, bitfit: BitFitConfig,
        training_args: TrainingArguments, run_args: RunArguments | None = None) -> dict[str, Any]:
    task = GLUE_TASKS[data_args.task_name]
    data_seed = start_run(training_args, bitfit, run_args, runner="glue")
    load_kwargs = model_load_kwargs(model_args, bitfit, training_args)  # refused before any data is read

    raw = load_glue(data_args, model_args.cache_dir)
    if "train" not in raw:
        raise UsageError(f"no train split in the data; found {list(raw)}.")
    train = sample(raw["train"], data_args.max_train_samples, data_seed)
    files = {"train": data_args.train_file, task.eval_splits[0]: data_args.validation_file,
             "validation_mismatched": data_args.validation_mismatched_file}
    train = check_and_encode_labels(train, task, "train", files["train"])
    # Evaluation subsets use one fixed seed: every method and seed is scored on the same examples.
    eval_sets = {s: check_and_encode_labels(sample(raw[s], data_args.max_eval_samples, EVAL_SAMPLE_SEED), task, s,
                                            files.get(s))
                 for s in task.eval_splits if s in raw}
    # The rows' own ids where the data has them (nyu-mll/glue's idx), else the row number.
    raw_ids = {s: list(d["idx"]) if "idx" in d.column_names else list(range(len(d))) for s, d in eval_sets.items()}
    if not eval_sets:
        raise UsageError(f"no evaluation split {list(task.eval_splits)} in the data; found {list(raw)}.")
    for s, d in {"train": train, **eval_sets}.items():
        # Checked before the model is loaded: a correlation of one score crashes only after training.
        if len(d) < (2 if task.is_regression else 1):
            raise UsageError(f"the {s} data has {len(d)} row(s); {task.metric} needs at least "
                             f"{2 if task.is_regression else 1}. Check the file or --max_*_samples.")

    config = load_pretrained(
        AutoConfig, model_args.model_name_or_path, num_labels=task.num_labels, cache_dir=model_args.cache_dir,
        finetuning_task=data_args.task_name,
        **({"problem_type": "regression"} if task.is_regression else
           {"id2label": dict(enumerate(task.labels)), "label2id": {n: i for i, n in enumerate(task.labels)}}),
    )
    tokenizer = load_pretrained(AutoTokenizer, model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    ensure_pad_token(tokenizer, config)
    check_terms_before_loading(AutoModelForSequenceClassification, config, bitfit, load_kwargs)
    model = load_pretrained(
        AutoModelForSequenceClassification, model_args.model_name_or_path, config=config,
        cache_dir=model_args.cache_dir, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **load_kwargs)

    k1, k2 = task.keys

    def tokenize(batch):
        texts = (batch[k1],) if k2 is None else (batch[k1], batch[k2])
        return tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)

    def encode(ds):
        return ds.map(tokenize, batched=True, remove_columns=[c for c in ds.column_names if c != "label"])

    with training_args.main_process_first(desc="tokenize"):
        train = encode(train)
        eval_sets = {s: encode(d) for s, d in eval_sets.items()}

    trainer = BitFitTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=eval_sets if len(eval_sets) > 1 else next(iter(eval_sets.values())),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        # n_examples shows every dev example is scored exactly once, whatever the process count.
        compute_metrics=lambda p: {**compute_glue_metrics(data_args.task_name, p.predictions, p.label_ids),
                                   "n_examples": len(p.label_ids)},
        bitfit_config=bitfit,
    )
    add_train_sample_eval(trainer, train, run_args)
    return train_and_record(
        trainer, metric_key=main_metric_key(data_args.task_name), bitfit=bitfit,
        save_full_model=data_args.save_full_model,
        info={"task": data_args.task_name, "metric": task.metric, "train_examples": len(train),
              "eval_examples": {s: len(d) for s, d in eval_sets.items()},
              "model": model_args.model_name_or_path},
        after_training=lambda tr: write_predictions(tr, task, eval_sets, raw_ids, training_args.output_dir),
        keep=getattr(run_args, "keep", "best"),
    )


def write_predictions(trainer: BitFitTrainer, task: GlueTask, eval_sets: dict, ids: dict[str, list],
                      output_dir: str) -> dict[str, Any]:
    """``predictions_<split>.jsonl``: one line per dev example, ``{"idx", "label", "prediction"}`` with
    label names (classification) or scores (STS-B), from the model as saved."""
    files = {}
    for split, ds in eval_sets.items():
        out = trainer.predict(ds, metric_key_prefix=f"predict_{split}")
        if not trainer.is_world_process_zero():
            continue
        preds = np.squeeze(out.predictions) if task.is_regression else np.argmax(out.predictions, axis=-1)

        def name(v):
            return float(v) if task.is_regression else task.labels[int(v)]

        path = Path(output_dir) / f"predictions_{split}.jsonl"
        atomic_write_lines(path, (json.dumps({"idx": i, "label": name(g), "prediction": name(p)})
                                  for i, g, p in zip(ids[split], out.label_ids, np.atleast_1d(preds), strict=True)))
        files[split] = str(path)
    return {"prediction_files": files}
