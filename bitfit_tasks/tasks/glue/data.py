"""GLUE data: the task specs, local files (jsonl/json/csv/tsv/parquet) or the hub's nyu-mll/glue,
labels checked and encoded as ``ClassLabel``, seeded subsets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...utils.errors import MissingFileError, UsageError, check_json_rows, first_line, read_utf8
from ..hub_data import load_hub_dataset
from ..sampling import sample_indices

PACKAGED_DATA = Path(__file__).parents[2] / "data" / "glue"  # bitfit_tasks/data/glue


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

STSB_RANGE = (0.0, 5.0)
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}



def find_file(data_dir: str, task: str, split: str) -> str:
    folder = Path(data_dir) / task
    for ext in LOCAL_FORMATS:
        if (folder / f"{split}{ext}").exists():
            return str(folder / f"{split}{ext}")
    raise MissingFileError(f"no {split} file for task {task!r} in {folder} (looked for "
                            f"{split}{{{','.join(LOCAL_FORMATS)}}}); check --data_dir.")


def load_glue(args: Any, cache_dir: str | None = None):
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


