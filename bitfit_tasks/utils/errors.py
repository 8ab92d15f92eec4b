"""The one exception type for input the user can fix, and helpers that turn library errors on
user files into it."""

from __future__ import annotations

import json
from pathlib import Path


class UsageError(ValueError):
    """Bad input the user can fix (a flag, a file, a value): the runners print its message as one
    line instead of a traceback."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist: a user error, and still a ``FileNotFoundError``
    for code that catches that."""


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text, or one line naming the file and the first bad byte (never U+FFFD)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UsageError(f"{source} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                         "re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8.") from None


def first_line(err: BaseException) -> str:
    """The first line of a library's error message (or its type's name): what a one-line message quotes."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_pretrained(cls, name_or_path: str, **kwargs):
    """``cls.from_pretrained(name_or_path, **kwargs)`` (a config, tokenizer or model class), with the
    ``OSError`` transformers raises for a folder that does not exist or a hub id it cannot reach
    (offline, unknown, private) turned into one line naming the value."""
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise UsageError(f"could not load --model_name_or_path {str(name_or_path)!r} ({type(err).__name__}: "
                         f"{first_line(err)[:300]}); pass a local model folder, or a hub id (online, or in the "
                         "hub cache).") from err


def read_utf8(path: str | Path) -> str:
    return decode_utf8(Path(path).read_bytes(), str(path))


def check_json_rows(path: str | Path) -> None:
    """A ``.json``/``.jsonl`` data file holds rows that are JSON objects: one JSON array of them, or one
    object per line. Checked here because datasets' JSON reader handles other rows badly (a first line
    ``null`` crashes the process in pyarrow) or with errors that do not name the line."""
    text = read_utf8(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    else:
        rows = whole if isinstance(whole, list) else [whole]
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise UsageError(f"{path}: row {i} is a JSON {_json_kind(row)}, not an object "
                                 "{...}; a data file holds one object per row.")
        if isinstance(whole, list):
            return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{lineno}: not a JSON line ({err.msg}, column {err.colno}); a .jsonl file "
                             "holds one JSON object per line.") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{lineno}: {line.strip()[:40]!r} is a JSON {_json_kind(row)}, not an object "
                             "{...}; a .jsonl file holds one object per line.")


def _json_kind(value: object) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def check_positive(obj, *names: str) -> None:
    """Each named integer option of a dataclass is unset or >= 1 (0 would mean 'no limit' to a
    tokenizer and a negative size fails deep inside one)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UsageError(f"--{name} must be a positive whole number, got {value!r}.")
