"""SQuAD v1.1: data (official nested JSON, flattened rows, or the hub), windows with doc stride,
n-best span search over all windows, the official EM/F1, training-size subsets, run_squad main."""

from __future__ import annotations

import collections
import json
import logging
import re
import string
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
)

from .arguments import ModelArguments, RunArguments
from .cache import cache_file, content_digest, tokenizer_digest
from .config import BitFitConfig
from .errors import UsageError, check_positive, read_utf8
from .fileio import atomic_write_text
from .runner import eval_history, parse_and_run, start_run, train_and_record
from .sampling import EVAL_SAMPLE_SEED, sample_list
from .trainer import BitFitTrainer

logger = logging.getLogger("bitfit_tasks")


# ---- the official SQuAD v1.1 metric -----------------------------------------------------------

def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, squeeze whitespace (official v1.1)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_metrics(predictions: dict[str, str], golds: dict[str, list[str]]) -> dict[str, float]:
    """EM and F1 (x100) as the official script: max over gold answers, mean over questions."""
    missing = [q for q in golds if q not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} question(s) have no prediction, e.g. {missing[:3]}; every "
                         "example must be scored.")
    em = [max(exact_match(predictions[q], g) for g in gs) for q, gs in golds.items()]
    f1 = [max(f1_score(predictions[q], g) for g in gs) for q, gs in golds.items()]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1)), "n_examples": len(golds)}


# ---- data ------------------------------------------------------------------------------------

def flatten_official(data: dict, source: str = "<json>") -> list[dict[str, Any]]:
    """``{"version", "data": [articles -> paragraphs -> qas]}`` -> hub-style rows."""
    if not isinstance(data, dict) or "data" not in data:
        raise UsageError(f"{source}: not the official SQuAD format (no top-level 'data' list).")
    rows = []
    for article in data["data"]:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                answers = qa.get("answers", [])
                rows.append({
                    "id": str(qa["id"]), "title": article.get("title", ""), "context": para["context"],
                    "question": qa["question"],
                    "answers": {"text": [a["text"] for a in answers],
                                # Checked (an int offset into the context) by check_squad_rows.
                                "answer_start": [a["answer_start"] for a in answers]},
                })
    return rows


def read_squad_file(path: str, split: str = "train") -> list[dict[str, Any]]:
    """Official nested JSON, or flattened rows (jsonl / json list) with id, context, question, answers.
    Every row is checked (see :func:`check_squad_rows`); a problem is one line naming file, question
    and value."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"SQuAD file {path!r} does not exist.")
    text = read_utf8(p)
    try:
        if p.suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise UsageError(f"{path}:{lineno}: not a JSON line ({err.msg}, column {err.colno}).") from None
        else:
            data = json.loads(text)
            rows = flatten_official(data, path) if isinstance(data, dict) else data
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}).") from None
    except (KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"{path}: not the official SQuAD layout (data -> paragraphs -> qas with id, question, "
                         f"answers): {type(err).__name__} {err}.") from None
    if not isinstance(rows, list) or not rows:
        raise UsageError(f"{path}: holds no questions; expected the official SQuAD JSON or rows of "
                         "{id, context, question, answers}.")
    check_squad_rows(rows, path, split)
    return rows


def check_squad_rows(rows: list, path: str, split: str) -> None:
    """Fields and types of every row; every training answer must sit at its ``answer_start`` in the
    context (a shifted offset would train on a wrong span); every question needs an answer (SQuAD
    v1.1 has no unanswerable questions)."""
    needed = {"id", "context", "question", "answers"}
    problems: list[str] = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not needed <= set(r):
            raise UsageError(f"{path}: row {i} needs {sorted(needed)}; it has "
                             f"{sorted(r) if isinstance(r, dict) else type(r).__name__}.")
        qid, ctx, ans = r["id"], r["context"], r["answers"]
        if not isinstance(ctx, str) or not isinstance(r["question"], str):
            raise UsageError(f"{path}: question {qid!r}: context and question must be text.")
        if (not isinstance(ans, dict) or not isinstance(ans.get("text"), list)
                or not isinstance(ans.get("answer_start"), list) or len(ans["text"]) != len(ans["answer_start"])):
            raise UsageError(f"{path}: question {qid!r}: answers must be {{'text': [...], 'answer_start': [...]}} "
                             f"of equal length, got {ans!r}.")
        bad = [t for t in ans["text"] if not isinstance(t, str)]
        if bad:
            raise UsageError(f"{path}: question {qid!r}: every answer text must be a string, got {bad[0]!r}.")
        if not ans["text"]:
            problems.append(f"question {qid!r} has no answer (SQuAD v1.1 questions all have one; v2.0's "
                            "unanswerable questions are not supported)")
            continue
        if split != "train":
            continue  # scoring uses the answer texts only
        for text, start in zip(ans["text"], ans["answer_start"], strict=True):
            if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < len(ctx):
                problems.append(f"question {qid!r}: answer_start {start!r} is not an offset inside its "
                                f"{len(ctx)}-character context")
            elif ctx[start:start + len(text)] != text:
                problems.append(f"question {qid!r}: answer_start {start} points at "
                                f"{ctx[start:start + len(text)]!r}, not at its answer {text!r}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(f"{split} file {path}: {problems[0]}{more}; fix the answers (answer_start is the "
                         "character offset of the answer text in the context).")


def sample_examples(rows: list[dict], fraction: float | None, n: int | None, seed: int) -> list[dict]:
    """A seeded random sample of *examples* (questions, before windowing), never a prefix."""
    return sample_list(rows, seed, k=n, fraction=fraction)


# ---- windows ---------------------------------------------------------------------------------

def prepare_train_features(rows: list[dict], tokenizer, max_len: int, stride: int) -> dict[str, list]:
    """Question + context windows; a gold answer outside a window maps to the CLS position.

    Windows are padded to ``max_len``: QA heads put padding positions into the start/end softmax,
    so padding to the longest window of a batch would make the loss depend on how windows are
    batched (and differ between 1 and N processes)."""
    enc = tokenizer([r["question"].lstrip() for r in rows], [r["context"] for r in rows],
                    truncation="only_second", max_length=max_len, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(offsets_all):
        ids = enc["input_ids"][i]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        seq = enc.sequence_ids(i)
        ans = rows[sample_map[i]]["answers"]
        if not ans["answer_start"]:
            starts.append(cls)
            ends.append(cls)
            continue
        a0 = ans["answer_start"][0]
        a1 = a0 + len(ans["text"][0])
        ctx = [j for j, s in enumerate(seq) if s == 1]
        c0, c1 = ctx[0], ctx[-1]
        if not (offsets[c0][0] <= a0 and offsets[c1][1] >= a1):
            starts.append(cls)
            ends.append(cls)
            continue
        s = c0
        while s <= c1 and offsets[s][0] <= a0:
            s += 1
        e = c1
        while e >= c0 and offsets[e][1] >= a1:
            e -= 1
        starts.append(s - 1)
        ends.append(e + 1)
    out = dict(enc)
    out["start_positions"], out["end_positions"] = starts, ends
    return out


def prepare_eval_features(rows: list[dict], tokenizer, max_len: int, stride: int) -> tuple[dict, list, list]:
    """Windows plus, per window, its example index and the context offsets (None elsewhere)."""
    enc = tokenizer([r["question"].lstrip() for r in rows], [r["context"] for r in rows],
                    truncation="only_second", max_length=max_len, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    sample_map = list(enc.pop("overflow_to_sample_mapping"))
    offsets_all = enc.pop("offset_mapping")
    offsets = [[o if enc.sequence_ids(i)[k] == 1 else None for k, o in enumerate(off)]
               for i, off in enumerate(offsets_all)]
    return dict(enc), sample_map, offsets


def offsets_array(offsets: list[list]) -> np.ndarray:
    """Per-window offset lists (``None`` outside the context) as one ``(windows, length, 2)`` int
    array with -1 outside the context: what the vectorised post-processing reads."""
    length = max((len(o) for o in offsets), default=0)
    out = np.full((len(offsets), length, 2), -1, dtype=np.int64)
    for w, off in enumerate(offsets):
        for k, o in enumerate(off):
            if o is not None:
                out[w, k] = o
    return out


def postprocess(rows: list[dict], sample_map, offsets, start_logits: np.ndarray, end_logits: np.ndarray,
                n_best: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """Best context span per example over *all* its windows (n-best start x end search).

    Per window, the ``n_best`` start and end candidates are taken once and their grid scored at
    once (as HF's ``postprocess_qa_predictions``); ties go to the higher-ranked start, then end,
    then the earlier window. ``offsets`` is a list of per-window offset lists (``None`` outside the
    context) or the array from :func:`offsets_array`."""
    offs = offsets if isinstance(offsets, np.ndarray) else offsets_array(offsets)
    n = offs.shape[1]
    best_score = np.full(len(rows), -np.inf)
    best_span: list[tuple[int, int] | None] = [None] * len(rows)
    in_ctx = offs[:, :, 0] >= 0
    for f, ex in enumerate(np.asarray(sample_map)):
        sl, el = start_logits[f, :n], end_logits[f, :n]
        s_idx = np.argsort(sl)[::-1][:n_best]
        e_idx = np.argsort(el)[::-1][:n_best]
        length = e_idx[None, :] - s_idx[:, None] + 1
        ok = in_ctx[f, s_idx][:, None] & in_ctx[f, e_idx][None, :] & (length >= 1) & (length <= max_answer_length)
        if not ok.any():
            continue
        score = np.where(ok, sl[s_idx][:, None] + el[e_idx][None, :], -np.inf)
        i, j = np.unravel_index(np.argmax(score), score.shape)  # first maximum, row-major
        if score[i, j] > best_score[ex]:
            best_score[ex] = score[i, j]
            best_span[ex] = (int(offs[f, s_idx[i], 0]), int(offs[f, e_idx[j], 1]))
    return {row["id"]: (row["context"][span[0]:span[1]] if span else "") for row, span in zip(rows, best_span,
                                                                                               strict=True)}


# ---- windows as cached datasets ----------------------------------------------------------------

CACHE_VERSION = 1  # bump when the window features change


def window_cache_file(kind: str, rows: list[dict], tokenizer, max_len: int, stride: int,
                      cache_dir: str | None = None) -> str:
    key = [CACHE_VERSION, kind, content_digest(rows, ("id", "question", "context", "answers")),
           tokenizer_digest(tokenizer), max_len, stride]
    return cache_file("squad", kind, key, cache_dir)


def window_dataset(kind: str, rows: list[dict], tokenizer, max_len: int, stride: int, training_args=None,
                   cache_dir: str | None = None):
    """The ``train`` or ``eval`` windows of ``rows`` as a memory-mapped ``datasets.Dataset``, built with
    ``map(batched=True)`` into an Arrow file keyed by the questions' content, the tokenizer and the
    window settings: the main process builds it (``main_process_first``), other processes and
    later runs with the same inputs load it. Eval windows carry ``example_index`` and
    ``offset_mapping`` (-1 outside the context) for post-processing."""
    import datasets

    cache = window_cache_file(kind, rows, tokenizer, max_len, stride, cache_dir)
    ctx = training_args.main_process_first(desc=f"SQuAD {kind} windows") if training_args is not None else nullcontext()
    with ctx:
        if Path(cache).exists():
            logger.info("SQuAD %s windows: loading the cache %s", kind, cache)
            return datasets.Dataset.from_file(cache)
        if kind == "train":
            cols = {"question": [r["question"] for r in rows], "context": [r["context"] for r in rows],
                    "answer_text": [r["answers"]["text"][0] if r["answers"]["text"] else "" for r in rows],
                    "answer_start": [r["answers"]["answer_start"][0] if r["answers"]["text"] else -1 for r in rows]}
        else:
            cols = {"question": [r["question"] for r in rows], "context": [r["context"] for r in rows]}
        source = datasets.Dataset.from_dict(cols)
        del cols

        def train_batch(batch):
            batch_rows = [{"question": q, "context": c,
                           "answers": {"text": [t] if s >= 0 else [], "answer_start": [s] if s >= 0 else []}}
                          for q, c, t, s in zip(batch["question"], batch["context"], batch["answer_text"],
                                                batch["answer_start"], strict=True)]
            return prepare_train_features(batch_rows, tokenizer, max_len, stride)

        def eval_batch(batch, indices):
            batch_rows = [{"question": q, "context": c}
                          for q, c in zip(batch["question"], batch["context"], strict=True)]
            enc, sample_map, offsets = prepare_eval_features(batch_rows, tokenizer, max_len, stride)
            enc["example_index"] = [indices[i] for i in sample_map]
            enc["offset_mapping"] = [[o if o is not None else (-1, -1) for o in off] for off in offsets]
            return enc

        return source.map(train_batch if kind == "train" else eval_batch, batched=True, batch_size=1000,
                          with_indices=kind != "train", remove_columns=source.column_names, cache_file_name=cache,
                          writer_batch_size=1000, desc=f"SQuAD {kind} windows")


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
    from .arguments import load_hub_dataset

    ds = load_hub_dataset(a.dataset_name, local_hint="--train_file and --validation_file (the official v1.1 "
                          "JSON, e.g. ../shared/data/squad/train-v1.1.rebuilt.json and dev-v1.1.rebuilt.json)")
    return [dict(r) for r in ds["train"]], [dict(r) for r in ds["validation"]]


class SquadEval:
    """Evaluate = predict start/end logits for every window (gathered over processes, no duplicates),
    then n-best post-processing over each example's windows and the official EM/F1."""

    def __init__(self, rows, windows, args: SquadArguments, output_dir: str):
        self.rows, self.args, self.output_dir = rows, args, output_dir
        self.sample_map = np.asarray(windows["example_index"])
        self.offsets = windows.with_format("numpy", columns=["offset_mapping"])[:]["offset_mapping"]
        self.features = windows.remove_columns(["example_index", "offset_mapping"])

    def score(self, trainer: BitFitTrainer) -> dict[str, float]:
        """EM/F1 of the model as it is now, and its ``predictions.json``; nothing logged."""
        out = trainer.predict(self.features, metric_key_prefix="eval")
        start, end = out.predictions[:2] if isinstance(out.predictions, tuple) else out.predictions
        preds = postprocess(self.rows, self.sample_map, self.offsets, start, end, self.args.n_best_size,
                            self.args.max_answer_length)
        metrics = {f"eval_{k}": v for k, v in squad_metrics(preds, {r["id"]: r["answers"]["text"]
                                                                    for r in self.rows}).items()}
        if trainer.is_world_process_zero():
            atomic_write_text(Path(self.output_dir) / "predictions.json", json.dumps(preds, indent=1))
        return metrics

    def __call__(self, trainer: BitFitTrainer) -> dict[str, float]:
        metrics = self.score(trainer)
        trainer.log(metrics)
        trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
        return metrics


class SquadBitFitTrainer(BitFitTrainer):
    """BitFitTrainer whose evaluate() is SQuAD's (windows -> spans -> EM/F1), during and after training."""

    squad_eval: SquadEval | None = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.squad_eval is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        return self.squad_eval(self)


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
    train_rows, dev_rows = load_rows(data_args)
    train_rows = sample_examples(train_rows, data_args.train_fraction, data_args.max_train_samples, seed)
    # The dev subset depends on the data seed only, so every method is scored on the same questions.
    dev_rows = sample_examples(dev_rows, None, data_args.max_eval_samples, EVAL_SAMPLE_SEED)

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    if not tokenizer.is_fast:
        raise ValueError(f"{model_args.model_name_or_path}: SQuAD preprocessing needs a fast tokenizer "
                         "(offset mappings); this one is slow.")
    model = AutoModelForQuestionAnswering.from_pretrained(model_args.model_name_or_path,
                                                          cache_dir=model_args.cache_dir)
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
