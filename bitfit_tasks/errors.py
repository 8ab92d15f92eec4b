"""The one exception type for input the user can fix, and helpers that turn library errors on
user files into it."""

from __future__ import annotations

from pathlib import Path


class UsageError(ValueError):
    """Bad input the user can fix (a flag, a file, a value): the runners print its message as one
    line instead of a traceback."""


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text, or one line naming the file and the first bad byte (never U+FFFD)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UsageError(f"{source} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                         "re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8.") from None


def read_utf8(path: str | Path) -> str:
    return decode_utf8(Path(path).read_bytes(), str(path))


def check_positive(obj, *names: str) -> None:
    """Each named integer option of a dataclass is unset or >= 1 (0 would mean 'no limit' to a
    tokenizer and a negative size fails deep inside one)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UsageError(f"--{name} must be a positive whole number, got {value!r}.")
