"""Tagging data (POS, chunks, NER) in the formats its users have: bracketed treebank trees, CoNLL
columns, CoNLL-U, and datasets with ``tokens`` + a tag column (``pos_tags``, ``chunk_tags``,
``ner_tags``). Every reader returns a list of ``{"tokens": [...], "tags": [...]}`` sentences.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

from ...utils.errors import MissingFileError, UsageError, check_json_rows, decode_utf8, first_line, read_utf8
from ..hub_data import load_hub_dataset

Sentence = dict[str, list[str]]

# A preterminal: "(TAG word)" with neither part containing whitespace or parentheses.
_PRETERMINAL = re.compile(r"\(([^\s()]+)\s+([^\s()]+)\)")
TRACE_TAG = "-NONE-"


def parse_ptb_trees(text: str, source: str = "<text>") -> list[Sentence]:
    """Sentences of a bracketed (``.mrg``) file; ``-NONE-`` traces (empty elements) are dropped."""
    sentences: list[Sentence] = []
    depth, start = 0, None
    for i, ch in enumerate(text):
        if ch == "(":
            if depth == 0:
                start = i
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise UsageError(f"{source}: unbalanced ')' at character {i}; is this a bracketed .mrg file?")
            if depth == 0:
                tree = text[start:i + 1]
                pairs = [(t, w) for t, w in _PRETERMINAL.findall(tree) if t != TRACE_TAG]
                if pairs:
                    sentences.append({"tokens": [w for _, w in pairs], "tags": [t for t, _ in pairs]})
    if depth != 0:
        raise UsageError(f"{source}: {depth} unclosed '(' at the end; the file is truncated or not a treebank.")
    return sentences


def _mrg_members(path: Path) -> list[tuple[str, str]]:
    """(name, text) of every .mrg file in a folder (recursively) or a zip such as NLTK's treebank.zip."""
    if path.is_dir():
        files = sorted(path.rglob("*.mrg"))
        return [(str(f.relative_to(path)), read_utf8(f)) for f in files]
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if n.endswith(".mrg"))
            return [(n, decode_utf8(z.read(n), f"{path}::{n}")) for n in names]
    if path.suffix == ".mrg":
        return [(path.name, read_utf8(path))]
    raise UsageError(f"{path}: not a .mrg file, a folder of them, or a zip holding them.")


def wsj_section(name: str) -> int | None:
    """WSJ section of a file named like ``wsj_2201.mrg`` (section 22), else None."""
    m = re.search(r"wsj_(\d\d)\d\d", name)
    return int(m.group(1)) if m else None


# The NLTK 10% sample holds wsj_0001..wsj_0199 (sections 00-01 only), so the standard section
# split is impossible there; this file split keeps whole documents apart (~80/10/10).
NLTK_SAMPLE_SPLIT = {"train": range(1, 160), "validation": range(160, 180), "test": range(180, 200)}
STANDARD_SECTIONS = {"train": range(0, 19), "validation": range(19, 22), "test": range(22, 25)}


def read_treebank_splits(path: str | Path) -> dict[str, list[Sentence]]:
    """Train/validation/test from one WSJ treebank (folder or zip of .mrg files).

    Sections 00-18 / 19-21 / 22-24 when the files span them (the standard POS split); otherwise
    (e.g. the NLTK sample, sections 00-01) files wsj_0001-0159 / 0160-0179 / 0180-0199.
    """
    members = _mrg_members(Path(path))
    if not members:
        raise UsageError(f"no .mrg files in {path}.")
    sections = {wsj_section(n) for n, _ in members}
    if None in sections:
        raise UsageError(f"{path}: file names must look like wsj_SSNN.mrg to split by section; give "
                         "--train_file/--validation_file instead.")
    standard = any(s >= 19 for s in sections)  # type: ignore[operator]
    out: dict[str, list[Sentence]] = {"train": [], "validation": [], "test": []}
    for name, text in members:
        number = int(re.search(r"wsj_(\d{4})", name).group(1))  # type: ignore[union-attr]
        key = (number // 100) if standard else number
        table = STANDARD_SECTIONS if standard else NLTK_SAMPLE_SPLIT
        split = next((s for s, r in table.items() if key in r), None)
        if split:
            out[split].extend(parse_ptb_trees(text, name))
    return out


def read_conll_columns(lines: Iterable[str], word_column: int = 0, tag_column: int = 1,
                       source: str = "<text>") -> list[Sentence]:
    """Whitespace-separated columns, one token a line, blank lines between sentences (CoNLL-2000)."""
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("-DOCSTART-"):
            if tokens:
                sentences.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        cols = line.split()
        if len(cols) <= max(word_column, tag_column):
            raise UsageError(f"{source}:{lineno}: {len(cols)} column(s) but --word_column {word_column} and "
                             f"--tag_column {tag_column} need {max(word_column, tag_column) + 1}: {line!r}")
        tokens.append(cols[word_column])
        tags.append(cols[tag_column])
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    return sentences


def read_conllu(lines: Iterable[str], tag_field: str = "xpos", source: str = "<text>") -> list[Sentence]:
    """CoNLL-U: XPOS (column 5, PTB tags in English treebanks) of each syntactic word.

    Multiword-token lines (``3-4 don't``) are skipped: their parts (``do``, ``n't``) follow as
    words with their own tags, as PTB tokenises them. Empty nodes (``8.1``) are skipped.
    """
    col = {"upos": 3, "xpos": 4}[tag_field]
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\n")
        if not line.strip():
            if tokens:
                sentences.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise UsageError(f"{source}:{lineno}: a CoNLL-U line has 10 tab-separated fields, this has "
                             f"{len(cols)}: {line[:80]!r}")
        if "-" in cols[0] or "." in cols[0]:
            continue
        if cols[col] == "_":
            raise UsageError(f"{source}:{lineno}: no {tag_field.upper()} tag ('_'); this treebank lacks it — "
                             f"use --conllu_tag_field {'upos' if tag_field == 'xpos' else 'xpos'}.")
        tokens.append(cols[1])
        tags.append(cols[col])
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    return sentences


FORMATS = ("auto", "ptb", "conll", "conllu", "json")


def detect_format(path: str) -> str:
    p = Path(path)
    if p.is_dir() or p.suffix == ".mrg" or (p.suffix == ".zip" and "conll" not in p.name):
        return "ptb"
    if p.suffix == ".conllu":
        return "conllu"
    if p.suffix in (".jsonl", ".json", ".parquet"):
        return "json"
    if p.suffix in (".txt", ".conll", ".tsv") or p.suffix == ".zip":
        return "conll"
    raise UsageError(f"cannot tell the format of {path!r}; pass --data_format one of {list(FORMATS[1:])}.")


def read_file(path: str, fmt: str = "auto", *, word_column: int = 0, tag_column: int = 1,
              conllu_tag_field: str = "xpos", tag_field: str = "pos_tags") -> list[Sentence]:
    """One file (or folder/zip for trees) in any supported format, as sentences."""
    if "::" in path:
        member = path.split("::", 1)[1]
        fmt = ("conllu" if member.endswith(".conllu") else "conll") if fmt == "auto" else fmt
        return read_zip_member(path, fmt, word_column=word_column, tag_column=tag_column,
                               conllu_tag_field=conllu_tag_field)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS[1:]:
        raise UsageError(f"unknown --data_format {fmt!r}; choose one of {list(FORMATS)}.")
    if not Path(path).exists():
        raise MissingFileError(f"data file {path!r} does not exist.")
    if fmt == "ptb":
        return [s for name, text in _mrg_members(Path(path)) for s in parse_ptb_trees(text, name)]
    if fmt == "json":
        return read_token_tag_dataset(path, tag_field=tag_field)
    if Path(path).suffix == ".zip":
        raise UsageError(f"{path}: name one member of the zip as {path}::member (e.g. conll2000.zip::"
                         "conll2000/train.txt).")
    lines = read_utf8(path).splitlines()
    if fmt == "conllu":
        return read_conllu(lines, conllu_tag_field, source=path)
    return read_conll_columns(lines, word_column, tag_column, source=path)


def read_zip_member(spec: str, fmt: str = "conll", **kw) -> list[Sentence]:
    """``archive.zip::member`` (e.g. NLTK's conll2000.zip::conll2000/train.txt)."""
    archive, member = spec.split("::", 1)
    try:
        with zipfile.ZipFile(archive) as z:
            lines = decode_utf8(z.read(member), spec).splitlines()
    except FileNotFoundError:
        raise UsageError(f"zip archive {archive!r} (from {spec!r}) does not exist.") from None
    except zipfile.BadZipFile:
        raise UsageError(f"{archive!r} is not a zip archive (from {spec!r}).") from None
    except KeyError:
        raise UsageError(f"{archive!r} has no member {member!r}; give archive.zip::path/inside/it.") from None
    if fmt == "conllu":
        return read_conllu(lines, kw.get("conllu_tag_field", "xpos"), source=spec)
    return read_conll_columns(lines, kw.get("word_column", 0), kw.get("tag_column", 1), source=spec)


def read_token_tag_dataset(path_or_name: str, split: str = "train", config: str | None = None,
                           tag_field: str = "pos_tags") -> list[Sentence]:
    """A local json/jsonl/parquet file or a hub dataset with a ``tokens`` column and a tag column
    (``tag_field``: ``pos_tags``, ``chunk_tags``, ``ner_tags``...; string tags or ``ClassLabel`` ids,
    which are mapped back to their names with the feature's ``int2str``)."""
    import datasets

    p = Path(path_or_name)
    if p.exists():
        builder = "parquet" if p.suffix == ".parquet" else "json"
        if builder == "json":
            check_json_rows(p)  # one line for a bad row or encoding, never a pyarrow crash
        try:
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        except Exception as err:  # pyarrow / datasets raise many types for a malformed file
            first = first_line(err)
            raise UsageError(f"could not read {path_or_name!r} as {builder}: {first[:200]}") from err
    else:
        ds = load_hub_dataset(path_or_name, config, split=split,
                              local_hint="--treebank (a WSJ .mrg folder or zip, e.g. ../shared/data/pos/nltk_data/"
                              "corpora/treebank.zip) or --train_file/--validation_file")
    missing = [c for c in ("tokens", tag_field) if c not in ds.column_names]
    if missing:
        tag_like = [c for c in ds.column_names if c.endswith("tags")]
        raise UsageError(f"{path_or_name}: needs columns tokens and {tag_field}; missing {missing}, has "
                         f"{ds.column_names}" + (f" (pick the tag column with --tag_field, e.g. {tag_like[0]})"
                                                 if tag_like and "tokens" not in missing else "") + ".")
    from datasets import ClassLabel

    inner = getattr(ds.features[tag_field], "feature", None)
    to_name = inner.int2str if isinstance(inner, ClassLabel) else str
    try:
        examples = list(ds)  # pyarrow builds the Python rows here; odd nested fields fail in it
    except Exception as err:  # pyarrow raises ValueError, ArrowInvalid, ... for such rows
        first = first_line(err)
        raise UsageError(f"could not read the rows of {path_or_name!r}: {first[:200]}; check the file's "
                         "fields.") from err
    out: list[Sentence] = []
    for i, ex in enumerate(examples, 1):
        tokens, tags = ex["tokens"], ex[tag_field]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise UsageError(f"{path_or_name}, row {i}: 'tokens' must be a list of words (strings), got "
                             f"{_short(tokens)}; fix that row.")
        if not isinstance(tags, list) or any(t is None or isinstance(t, bool | list | dict) for t in tags):
            raise UsageError(f"{path_or_name}, row {i}: {tag_field!r} must be a list of tags (strings or ids), got "
                             f"{_short(tags)}; fix that row.")
        if len(tags) != len(tokens):
            raise UsageError(f"{path_or_name}, row {i}: {len(tokens)} tokens but {len(tags)} {tag_field}; every "
                             "token needs exactly one tag. Fix that row.")
        out.append({"tokens": tokens, "tags": [to_name(t) for t in tags]})
    return out


def _short(value: object, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"
