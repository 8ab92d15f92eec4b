"""GLUE: task specs, data (hub or local files), preprocessing, metrics, and the run_glue main."""

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

from . import metrics as M
from .arguments import ModelArguments, RunArguments
from .callbacks import add_train_sample_eval
from .config import BitFitConfig
from .errors import UsageError, check_json_rows, check_positive, first_line, read_utf8
from .fileio import atomic_write_lines
from .hub_data import load_hub_dataset
from .runner import ensure_pad_token, parse_and_run, start_run, train_and_record
from .sampling import EVAL_SAMPLE_SEED, sample_indices
from .trainer import BitFitTrainer

logger = logging.getLogger("bitfit_tasks")

PACKAGED_DATA = Path(__file__).parent / "data" / "glue"


@dataclass(frozen=True)
class GlueTask:
    keys: tuple[str, str | None]
    labels: tuple[str, ...]  # label names in nyu-mll/glue order; () for regression
    metric: str  # the paper's metric (Table 5)
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence", None), ("unacceptable", "acceptable"), "matthews_correlation"),
    "sst2": GlueTask(("sentence", None), ("negative", "positive"), "accuracy"),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1"),
    "qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate"), "f1"),
    "stsb": GlueTask(("sentence1", "sentence2"), (), "spearmanr"),
    "mnli": GlueTask(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy",
                     ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask(("question", "sentence"), ("entailment", "not_entailment"), "accuracy"),
    "rte": GlueTask(("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy"),
    "wnli": GlueTask(("sentence1", "sentence2"), ("not_entailment", "entailment"), "accuracy"),
}

# The paper's BERT-base bias learning rates (Table 6), the default for bias-only modes.

STSB_RANGE = (0.0, 5.0)
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


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
            self.train_file = self.train_file or _find_file(self.data_dir, self.task_name, "train")
            split = "validation_matched" if self.task_name == "mnli" else "validation"
            self.validation_file = self.validation_file or _find_file(self.data_dir, self.task_name, split)
        if (self.train_file is None) != (self.validation_file is None):
            raise UsageError("give both --train_file and --validation_file (or neither, for the hub).")
        for f in (self.train_file, self.validation_file, self.validation_mismatched_file):
            if f is not None and Path(f).suffix.lower() not in LOCAL_FORMATS:
                raise UsageError(f"unsupported data file {f!r}; use one of {sorted(LOCAL_FORMATS)}.")
        if self.validation_mismatched_file and self.task_name != "mnli":
            raise UsageError("--validation_mismatched_file is for --task_name mnli only.")


def _find_file(data_dir: str, task: str, split: str) -> str:
    folder = Path(data_dir) / task
    for ext in LOCAL_FORMATS:
        if (folder / f"{split}{ext}").exists():
            return str(folder / f"{split}{ext}")
    raise FileNotFoundError(f"no {split} file for task {task!r} in {folder} (looked for "
                            f"{split}{{{','.join(LOCAL_FORMATS)}}}); check --data_dir.")


def load_glue(args: GlueArguments, cache_dir: str | None = None):
    """A ``DatasetDict`` with 'train' and the task's eval splits, from local files or the hub."""
    import datasets

    if args.train_file is None:
        return load_hub_dataset("nyu-mll/glue", args.task_name, cache_dir=cache_dir,
                                local_hint="--data_dir DIR holding <task>/train.jsonl and validation.jsonl "
                                "(e.g. ../shared/data/glue), or --train_file and --validation_file")
    files = {"train": args.train_file, GLUE_TASKS[args.task_name].eval_splits[0]: args.validation_file}
    if args.validation_mismatched_file:
        files["validation_mismatched"] = args.validation_mismatched_file
    out = {}
    for split, path in files.items():
        suffix = Path(path).suffix.lower()
        if suffix in (".json", ".jsonl") and Path(path).is_file():
            check_json_rows(path)  # one line for a bad row or encoding, never a pyarrow crash
        elif suffix != ".parquet" and Path(path).is_file():
            read_utf8(path)  # a clear line for a non-UTF-8 file, not a pyarrow error
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        try:
            out[split] = datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=path, split="train",
                                               cache_dir=cache_dir, **kwargs)
        except Exception as err:  # datasets raises many types for a malformed file
            first = first_line(err)
            cause = err.__cause__ or err.__context__
            why = ""
            if cause is not None and str(cause).strip():
                why = f" ({type(cause).__name__}: {first_line(cause)[:200]})"
            raise UsageError(f"could not read {split} file {path!r} as {LOCAL_FORMATS[suffix]}: {first[:200]}{why}"
                             f"{_separator_hint(path, suffix)}") from err
        columns = out[split].column_names
        if suffix in (".csv", ".tsv") and len(columns) == 1:
            # One column: the separator is not the one the file name says (a tab-separated .csv).
            hint = _separator_hint(path, suffix)
            if hint:
                raise UsageError(f"{split} file {path!r} was read as one column {columns[0][:60]!r}{hint}")
    return datasets.DatasetDict(out)


def _separator_hint(path: str, suffix: str) -> str:
    """The fix when a .csv holds tabs (or a .tsv commas) in its header line, else ''."""
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline()
    except (OSError, UnicodeDecodeError):
        return ""
    named, other, ext = (",", "\t", ".tsv") if suffix == ".csv" else ("\t", ",", ".csv")
    if other in header and named not in header:
        sep = "tab" if other == "\t" else "comma"
        return (f"; its header line is {sep}-separated, but a {suffix} file is read as "
                f"{'comma' if suffix == '.csv' else 'tab'}-separated: rename it to {ext} (or convert it).")
    return ""


def check_and_encode_labels(ds, task: GlueTask, split: str, source: str | None = None):
    """Validate columns, texts and labels row by row; map label names to ids. Every problem is one
    line naming the file (or split), the row and the value."""
    where = f"{split} file {source!r}" if source else f"{split} data"
    needed = [k for k in task.keys if k] + ["label"]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise UsageError(f"{where} lacks column(s) {missing} for this task; it has {ds.column_names}. "
                         f"Rename columns to the nyu-mll/glue names {needed}.")
    from datasets import ClassLabel, Value

    # The label column becomes a datasets ClassLabel over the nyu-mll/glue names (as the hub's glue
    # has it), so names and ids convert through one object.
    feature = Value("float32") if task.is_regression else ClassLabel(names=list(task.labels))
    allowed = (f"a similarity score in {STSB_RANGE[0]:g}..{STSB_RANGE[1]:g}" if task.is_regression else
               f"one of {list(task.labels)} or ids 0..{len(task.labels) - 1}")
    texts = [k for k in task.keys if k]

    def encode(ex, i):
        for k in texts:
            if not isinstance(ex[k], str):
                raise UsageError(f"{where}, row {i}: column {k!r} is {ex[k]!r}, not text; every row needs "
                                 "its sentence(s).")
        lab = ex["label"]
        if isinstance(lab, str):
            if not task.is_regression and lab in task.labels:
                return {"label": feature.str2int(lab)}
            try:
                lab = float(lab)
            except ValueError:
                raise UsageError(f"{where}, row {i}: unknown label {ex['label']!r}; allowed: {allowed}.") from None
        if lab is None or isinstance(lab, bool) or not isinstance(lab, int | float):
            raise UsageError(f"{where}, row {i}: label {lab!r} is not {allowed}.")
        if task.is_regression:
            if not STSB_RANGE[0] <= lab <= STSB_RANGE[1]:
                raise UsageError(f"{where}, row {i}: score {lab!r} is outside {STSB_RANGE[0]:g}..{STSB_RANGE[1]:g} "
                                 "(STS-B similarity); fix or drop the row.")
            return {"label": float(lab)}
        if float(lab) != int(lab):
            raise UsageError(f"{where}, row {i}: label {lab!r} is not a class id; allowed: {allowed} "
                             "(a regression score belongs to --task_name stsb).")
        if not 0 <= int(lab) < len(task.labels):
            hint = " (-1 marks the unlabelled GLUE test split)" if int(lab) == -1 else ""
            raise UsageError(f"{where}, row {i}: label {lab!r} out of range 0..{len(task.labels) - 1}{hint}.")
        return {"label": int(lab)}

    try:
        return ds.map(encode, with_indices=True).cast_column("label", feature)
    except UsageError:
        raise
    except Exception as err:  # pyarrow failing on odd nested fields while it builds rows
        first = first_line(err)
        raise UsageError(f"{where}: could not read its rows: {first[:200]}; check the file's fields.") from err


def sample(ds, n: int | None, seed: int):
    """A seeded random subset of ``n`` rows (all rows if n is None or >= len), in file order."""
    idx = sample_indices(len(ds), seed, k=n)
    return ds if idx is None else ds.select(idx)


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

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, num_labels=task.num_labels, cache_dir=model_args.cache_dir,
        finetuning_task=data_args.task_name,
        **({"problem_type": "regression"} if task.is_regression else
           {"id2label": dict(enumerate(task.labels)), "label2id": {n: i for i, n in enumerate(task.labels)}}),
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    ensure_pad_token(tokenizer, config)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes)

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
