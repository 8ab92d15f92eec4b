"""SQuAD v1.1 data: the official nested JSON, flattened rows or the hub's; training-size subsets;
question/context windows with a doc stride, cached as Arrow datasets."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ...utils.errors import MissingFileError, UsageError, read_utf8
from ..cache import cache_file, content_digest, tokenizer_digest
from ..sampling import sample_list

logger = logging.getLogger("bitfit_tasks")


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
        raise MissingFileError(f"SQuAD file {path!r} does not exist.")
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


