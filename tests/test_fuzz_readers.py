"""Every reader of user files, fed mutated real fixtures (dropped or extra fields, wrong types, lists of
the wrong length, truncated or deleted lines, bytes that are not UTF-8), either returns valid data or
raises the package's one-line ``UsageError`` -- never another exception. Hypothesis draws the
mutations with a fixed seed and a fixed example budget, so CI runs the same cases every time."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, tiny_model
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from bitfit_tasks.utils.errors import UsageError

# BITFIT_FUZZ_EXAMPLES=500 for a longer hunt; CI runs the fixed 40.
BUDGET = settings(max_examples=int(os.environ.get("BITFIT_FUZZ_EXAMPLES", "40")), deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=6), st.lists(st.one_of(st.integers(0, 3), st.text(max_size=3)), max_size=3),
                   st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2))


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (dict keys, list indices), the root included."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def mutate_json(data: st.DataObject, obj: Any, n_max: int = 3) -> Any:
    """1..n_max structure-aware edits of a JSON value: drop a field or item, set it to a value of
    another type, add an unknown field, shorten or lengthen a list."""
    obj = copy.deepcopy(obj)
    for _ in range(data.draw(st.integers(1, n_max))):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = data.draw(st.sampled_from(["drop", "set", "extra", "shorten", "grow"]))
        target = parent[key]
        if op == "drop":
            del parent[key]
        elif op == "set":
            parent[key] = data.draw(VALUES)
        elif op == "extra" and isinstance(target, dict):
            target[data.draw(st.text(min_size=1, max_size=4))] = data.draw(VALUES)
        elif op == "shorten" and isinstance(target, list) and target:
            target.pop(data.draw(st.integers(0, len(target) - 1)))
        elif op == "grow" and isinstance(target, list):
            target.append(copy.deepcopy(target[-1]) if target else data.draw(VALUES))
    return obj


def mutate_bytes(data: st.DataObject, raw: bytes) -> bytes:
    """One raw edit: truncate, delete or duplicate a line, or insert bytes (often not UTF-8)."""
    op = data.draw(st.sampled_from(["truncate", "del_line", "dup_line", "insert", "none"]))
    if op == "truncate":
        return raw[: data.draw(st.integers(0, len(raw)))]
    lines = raw.split(b"\n")
    if op in ("del_line", "dup_line") and lines:
        i = data.draw(st.integers(0, len(lines) - 1))
        return b"\n".join(lines[:i] + ([lines[i]] * 2 if op == "dup_line" else []) + lines[i + 1:])
    if op == "insert":
        at = data.draw(st.integers(0, len(raw)))
        return raw[:at] + data.draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    return raw


def read_jsonl(path: str, limit: int = 6) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()][:limit]


def jsonl(rows: Any) -> bytes:
    rows = rows if isinstance(rows, list) else [rows]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def assert_one_line_user_error(err: BaseException) -> None:
    assert isinstance(err, UsageError), f"{type(err).__name__} is not the package's user error: {err}"
    assert "\n" not in str(err).strip() and str(err).strip(), repr(str(err))


def outcome(fn, *args, **kwargs) -> Any:
    """``fn``'s result, or None after checking that what it raised is one line of UsageError."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 -- the property is about which exceptions escape
        assert_one_line_user_error(err)
        return None


# ---- GLUE: jsonl, csv, tsv ---------------------------------------------------------------------


def _glue_read(path: str, task: str, cache: str):
    from bitfit_tasks.tasks.glue.data import GLUE_TASKS, check_and_encode_labels, load_glue
    from bitfit_tasks.tasks.glue.run import GlueArguments

    args = GlueArguments(task_name=task, train_file=path, validation_file=path)
    raw = load_glue(args, cache_dir=cache)
    return check_and_encode_labels(raw["train"], GLUE_TASKS[task], "train", path)


def _check_glue(ds, task: str) -> None:
    from bitfit_tasks.tasks.glue.data import GLUE_TASKS

    spec = GLUE_TASKS[task]
    for row in ds:
        assert all(isinstance(row[k], str) for k in spec.keys if k)
        if spec.is_regression:
            assert 0 <= row["label"] <= 5
        else:
            assert row["label"] in range(spec.num_labels)


def _delimited(rows: list[dict], sep: str) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter=sep)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


@pytest.mark.parametrize("task", ["mrpc", "stsb", "cola"])
@BUDGET
@seed(1)
@given(data=st.data())
def test_glue_jsonl_reader_fuzzed(task, data):
    rows = read_jsonl(f"{FIXTURES}/glue/{task}/train.jsonl")
    raw = mutate_bytes(data, jsonl(mutate_json(data, rows)))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "train.jsonl")
        Path(path).write_bytes(raw)
        ds = outcome(_glue_read, path, task, os.path.join(d, "cache"))
        if ds is not None:
            _check_glue(ds, task)


@pytest.mark.parametrize("ext, sep", [(".csv", ","), (".tsv", "\t"), (".csv", "\t"), (".tsv", ",")])
@BUDGET
@seed(2)
@given(data=st.data())
def test_glue_csv_tsv_reader_fuzzed(ext, sep, data):
    rows = read_jsonl(f"{FIXTURES}/glue/mrpc/train.jsonl")
    raw = mutate_bytes(data, _delimited(rows, sep))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "train" + ext)
        Path(path).write_bytes(raw)
        ds = outcome(_glue_read, path, "mrpc", os.path.join(d, "cache"))
        if ds is not None:
            _check_glue(ds, "mrpc")


# ---- SQuAD: official JSON and flat jsonl --------------------------------------------------------


def _check_squad(rows: list[dict]) -> None:
    for r in rows:
        assert isinstance(r["context"], str) and isinstance(r["question"], str)
        assert len(r["answers"]["text"]) == len(r["answers"]["answer_start"]) > 0


@pytest.mark.parametrize("split", ["train", "validation"])
@BUDGET
@seed(3)
@given(data=st.data())
def test_squad_official_json_reader_fuzzed(split, data):
    from bitfit_tasks.tasks.squad.data import read_squad_file

    official = json.loads(Path(f"{FIXTURES}/squad/official.json").read_text())
    raw = mutate_bytes(data, json.dumps(mutate_json(data, official)).encode())
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "train.json")
        Path(path).write_bytes(raw)
        rows = outcome(read_squad_file, path, split)
        if rows is not None:
            _check_squad(rows)


@BUDGET
@seed(4)
@given(data=st.data())
def test_squad_jsonl_reader_fuzzed(data):
    from bitfit_tasks.tasks.squad.data import read_squad_file

    raw = mutate_bytes(data, jsonl(mutate_json(data, read_jsonl(f"{FIXTURES}/squad/flat.jsonl"))))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "dev.jsonl")
        Path(path).write_bytes(raw)
        rows = outcome(read_squad_file, path, "train")
        if rows is not None:
            _check_squad(rows)


# ---- tagging: CoNLL columns, CoNLL-U, bracketed trees, jsonl ----------------------------------------


def _check_sentences(sentences: list[dict]) -> None:
    for s in sentences:
        assert isinstance(s["tokens"], list) and isinstance(s["tags"], list)
        assert len(s["tokens"]) == len(s["tags"])
        assert all(isinstance(t, str) for t in s["tokens"] + s["tags"])


@pytest.mark.parametrize("name", ["conll2000.txt", "chunk_train.txt", "ewt.conllu", "treebank/wsj_0001.mrg"])
@BUDGET
@seed(5)
@given(data=st.data())
def test_tagging_text_readers_fuzzed(name, data):
    from bitfit_tasks.tasks.pos.data import read_file

    raw = mutate_bytes(data, Path(f"{FIXTURES}/pos/{name}").read_bytes()[:1500])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, Path(name).name)
        Path(path).write_bytes(raw)
        sentences = outcome(read_file, path)
        if sentences is not None:
            _check_sentences(sentences)


@pytest.mark.parametrize("name, field", [("tagged.jsonl", "pos_tags"), ("ner.jsonl", "ner_tags")])
@BUDGET
@seed(6)
@given(data=st.data())
def test_tagging_jsonl_reader_fuzzed(name, field, data):
    from bitfit_tasks.tasks.pos.data import read_file

    raw = mutate_bytes(data, jsonl(mutate_json(data, read_jsonl(f"{FIXTURES}/pos/{name}"))))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        Path(path).write_bytes(raw)
        sentences = outcome(read_file, path, tag_field=field)
        if sentences is not None:
            _check_sentences(sentences)


# ---- delta JSON ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def delta_files(tmp_path_factory) -> dict[str, bytes]:
    from bitfit_tasks import save_delta

    model = tiny_model("bert")
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".bias") or n.startswith("classifier"))
    out = save_delta(model, tmp_path_factory.mktemp("delta") / "delta")
    return {f.name: f.read_bytes() for f in out.iterdir()}


@BUDGET
@seed(7)
@given(data=st.data())
def test_delta_json_reader_fuzzed(delta_files, data):
    from bitfit_tasks import Delta, apply_delta

    meta = json.loads(delta_files["bitfit_delta.json"])
    raw = mutate_bytes(data, json.dumps(mutate_json(data, meta)).encode())
    with tempfile.TemporaryDirectory() as d:
        for name, content in delta_files.items():
            Path(d, name).write_bytes(raw if name == "bitfit_delta.json" else content)
        delta = outcome(Delta.load, d)
        if delta is not None:  # what `bitfit-delta info` prints must work on whatever loaded
            assert "BitFit delta" in delta.describe()
            try:  # applying it: accepted, or refused as not fitting this base (a ValueError), nothing else
                apply_delta(tiny_model("bert"), delta)
            except ValueError as err:
                assert "\n" not in str(err).strip()
