"""Writes that are never half-done: a temporary file in the same folder, then an atomic rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError


def _umask() -> int:
    """The process's umask, read without setting it where Linux tells it (setting it, even back, races with
    other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_created(path: str | os.PathLike, folder: bool = False) -> None:
    """Give ``path`` the permissions an ordinary ``open`` / ``mkdir`` would (0666 / 0777 less the umask):
    ``tempfile`` makes its files 0600 and folders 0700, which a rename would hand on to the result."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so that a reader (or a rerun after a kill) sees the old file or the
    whole new one, never a prefix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        as_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_lines(path: str | os.PathLike, lines) -> Path:
    return atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def check_new_folder(out: Path, what: str, name: str = "--output") -> None:
    """``out`` must be new or an empty folder: a result is never written over another. ``name``: how the user
    gave ``out`` (a flag, or a positional argument's name)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        kind = "a file" if not out.is_dir() else "a folder that is not empty"
        raise UsageError(f"{name} {out} is {kind}; give a new or empty folder for the {what}.")


def publish_folder(out: Path, write) -> Path:
    """``write(tmp)`` fills a temporary folder beside ``out``, which is then renamed to ``out`` (new or
    empty, see :func:`check_new_folder`): a kill leaves no half-written result under that name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        as_created(tmp, folder=True)
        write(tmp)
        if out.is_dir():
            out.rmdir()  # empty, checked before
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
