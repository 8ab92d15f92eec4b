"""A sweep cell's state: finished (and trained like this grid's cell), resumable, or fresh. A cell's
identity is what determines its training, not where its folder lives."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..tasks.arguments import option_dest
from ..tasks.checkpoints import last_complete_checkpoint
from ..utils.errors import UsageError

logger = logging.getLogger("bitfit_tasks")
RECORD = "sweep_run.json"  # the runner arguments a cell was (or is being) trained with


# Where a run is written or reported, not how it is trained: left out of a cell's identity, so a
# sweep folder that was copied or moved, or named by a relative or an absolute path, is the same grid.
LOCATION_DESTS = frozenset({"output_dir", "logging_dir", "report_to", "run_name", "cache_dir", "overwrite_output_dir",
                            "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
                            "hub_private_repo", "hub_always_push", "hub_revision", "disable_tqdm"})
# Options that change neither the trained model nor its scores (checkpoint housekeeping, data-loading
# workers, logging): left out too, so finishing a grid with another --save_total_limit is the same grid.
NON_TRAINING_DESTS = frozenset({"save_total_limit", "save_on_each_node", "save_only_model", "dataloader_num_workers",
                                "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
                                "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
                                "log_level", "log_level_replica", "log_on_each_node", "skip_memory_metrics"})
# Arguments that name inputs: the same input when they resolve to the same path, or when what they hold has
# the same content (a grid moved together with its data, or data copied elsewhere).
INPUT_PATH_DESTS = frozenset({"model_name_or_path", "data_dir", "train_file", "validation_file",
                              "validation_mismatched_file", "test_file", "treebank", "dataset_name"})


def _resolve_input(value: str) -> str:
    path, sep, member = value.partition("::")  # archive.zip::member
    p = Path(path)
    return str(p.resolve()) + sep + member if p.exists() else value


def _canonical(action, values: list[str]) -> list[Any]:
    """``values`` as the runner's parser reads them, so spellings of one setting compare equal (``--fp16``,
    ``--fp16 true``, ``--fp16=True``; ``1e-3`` and ``0.001``); as given when the parser cannot read them."""
    if action is None:
        return values
    if action.nargs == 0:  # --no_x (store_false), store_true/const
        return [action.const]
    if not values and action.nargs == "?":
        return [action.const]
    out: list[Any] = []
    for v in values:
        try:
            x = action.type(v) if callable(action.type) else v
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            x = v
        x = getattr(x, "value", x)  # enums (eval_strategy, ...) by value
        out.append(x if isinstance(x, str | int | float | bool) or x is None else str(x))
    return out


def _options(argv: Sequence[str], table: dict | None) -> dict[str, tuple[list[str], Any]]:
    """``{destination: (values as given, parser action)}``, flags resolved through the runner's option
    ``table`` (abbreviations, ``--x=v``, ``--no_x``)."""
    out: dict[str, tuple[list[str], Any]] = {}
    key = ""
    for a in argv:
        if a.startswith("--"):
            flag, eq, value = a.partition("=")
            action = _option_action(table, flag) if table else None
            key = action.dest if action is not None else flag.removeprefix("--")
            out[key] = ([value] if eq else [], action)
        else:
            out.setdefault(key, ([], None))[0].append(a)
    for dest in (LOCATION_DESTS | NON_TRAINING_DESTS) & out.keys():
        del out[dest]
    return out


def _option_action(table: dict, flag: str):
    dest = option_dest(table, flag)
    if dest is None:
        return None
    return table[flag] if flag in table else next(a for o, a in table.items() if o.startswith(flag) and a.dest == dest)


def cell_identity(argv: Sequence[str], table: dict | None = None) -> dict[str, list[Any]]:
    """What determines a cell's training, from its runner arguments: ``{destination: values}``, flags and
    values read through the runner's option ``table`` (abbreviations, ``--x=v``, ``--fp16`` = ``--fp16
    true``), location and non-training options left out, input paths resolved (relative to the current
    folder)."""
    out = {dest: _canonical(action, values) for dest, (values, action) in _options(argv, table).items()}
    for dest in INPUT_PATH_DESTS & out.keys():
        out[dest] = [_resolve_input(str(v)) for v in out[dest]]
    return out


def _hash_file(h, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


def input_digest(path: Path, skip: Path | None = None) -> str:
    """sha256 over a file's bytes, or over a folder's files (relative names, sizes and bytes, in sorted
    order; ``skip``, the grid's own folder if it lies inside, left out)."""
    h = hashlib.sha256()
    if path.is_file():
        _hash_file(h, path)
        return h.hexdigest()
    for folder, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if skip is None or Path(folder, d).resolve() != skip)
        for name in sorted(files):
            f = Path(folder, name)
            h.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\0".encode())
            _hash_file(h, f)
    return h.hexdigest()


class Inputs:
    """The inputs a grid's cells name, each described once per sweep (its content digest is read once)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._digests: dict[str, str] = {}

    def _digest(self, resolved: Path) -> str:
        key = str(resolved)
        if key not in self._digests:
            self._digests[key] = input_digest(resolved, skip=self.root)
        return self._digests[key]

    def describe(self, value: str) -> dict[str, str]:
        """``{"given", "path", "digest"}`` for a path that exists (``archive.zip::member`` included),
        ``{"given"}`` for anything else (a hub id)."""
        path, sep, member = str(value).partition("::")
        p = Path(path)
        if not p.exists():
            return {"given": str(value)}
        resolved = p.resolve()
        return {"given": str(value), "path": str(resolved) + sep + member,
                "digest": self._digest(resolved) + sep + member}

    def same(self, then: dict[str, str], value: str) -> bool:
        """Whether input ``value`` (as given now) is the one recorded as ``then``: the same resolved path,
        or the same content (read only when the paths differ)."""
        path, sep, member = str(value).partition("::")
        p = Path(path)
        if "path" not in then or not p.exists():
            return then.get("path", then.get("given")) == _resolve_input(str(value))
        if then["path"] == str(p.resolve()) + sep + member:
            return True
        return then.get("digest") == self._digest(p.resolve()) + sep + member

    def record(self, argv: Sequence[str], table: dict | None) -> dict[str, Any]:
        """What a cell's ``sweep_run.json`` holds: the arguments, their identity, and each input's
        resolved path and content digest (so a grid moved together with its data still matches)."""
        opts = _options(argv, table)
        return {"argv": list(argv), "identity": cell_identity(argv, table),
                "inputs": {d: [self.describe(v) for v in opts[d][0]] for d in sorted(INPUT_PATH_DESTS & opts.keys())}}


def _differences(record: dict[str, Any], argv: list[str], table: dict | None, inputs: Inputs,
                 ignore: frozenset[str] = frozenset()) -> str:
    """'' when a cell recorded with ``record`` was trained like ``argv``, else what differs, as given:
    ``--max_steps: ['2'] -> ['3']``. Options are compared as the runner's parser reads them; inputs by
    path or content (records from older sweeps: by the path they resolved to then)."""
    then_argv = record.get("argv")
    then = cell_identity(then_argv, table) if isinstance(then_argv, list) else {}
    old_identity = record.get("identity") if isinstance(record.get("identity"), dict) else {}
    if not isinstance(then_argv, list):
        then = dict(old_identity)
    now_opts = _options(argv, table)
    now = cell_identity(argv, table)
    shown_then = {d: v for d, (v, _) in _options(then_argv, table).items()} if isinstance(then_argv, list) else then
    shown_now = {d: v for d, (v, _) in now_opts.items()}
    recorded_inputs = record.get("inputs") if isinstance(record.get("inputs"), dict) else None
    diffs = []
    for k in sorted((set(then) | set(now)) - ignore):
        note = ""
        if k in INPUT_PATH_DESTS and k in now:
            if recorded_inputs is not None:
                a, b = recorded_inputs.get(k, []), now_opts[k][0]
                same = len(a) == len(b) and all(map(inputs.same, a, b))
                note = " (another path and other content)"
            else:  # an older record: the paths it resolved to
                same = old_identity.get(k, then.get(k)) == now[k]
        else:
            same = then.get(k) == now.get(k)
        if not same:
            diffs.append(f"--{k}: {shown_then.get(k)} -> {shown_now.get(k)}{note if k in shown_then else ''}")
    return "; ".join(diffs)


def _read_record(out: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("argv", record.get("identity")), list | dict):
        return None
    return record


def cell_state(out: Path, argv: list[str], table: dict | None = None,
               recipe: Callable[[], dict[str, Any]] | None = None, inputs: Inputs | None = None,
               overwrite_unfinished: bool = False) -> str:
    """'done' (a readable results.json trained like this cell), 'resume' (complete checkpoints of a run
    trained like this cell), or 'fresh' (start over: nothing to keep). Trained like this cell: the same
    arguments by :func:`cell_identity` (where the folder lives, non-training options and spelling do
    not count; inputs match by path or by content), and the same resolved recipe (``recipe()``: what
    these arguments resolve to now, against the ``recipe``/``recipe_applied`` of its results.json).

    Refused in one line: a finished cell trained otherwise (a table mixing them would lie), and an
    unfinished cell whose complete checkpoints were trained otherwise or by unknown arguments --
    restarting would delete them -- unless ``overwrite_unfinished`` (the sweep's
    ``--overwrite_unfinished``)."""
    inputs = inputs or Inputs(out.parent)
    record = _read_record(out) if (out / RECORD).exists() else None
    # Compared by what it resolves to (below): '--recipe linear' finishes a grid that 'auto' began as linear.
    ignore = frozenset({"recipe"}) if recipe is not None else frozenset()
    differs = _differences(record, argv, table, inputs, ignore) if record is not None else None
    try:
        results = json.loads((out / "results.json").read_text())
        done = isinstance(results, dict)
    except FileNotFoundError:
        done = False
    except (json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("%s/results.json is unreadable (a write cut short?): running the cell again", out)
        done = False
    if done:
        if record is None:
            logger.warning("%s has no %s (made by an older sweep): counted as done, arguments unchecked", out, RECORD)
        elif differs:
            raise UsageError(f"{out} was trained with other runner arguments ({differs}); "
                             "a table mixing them would lie. Use another --output_dir, or delete that run folder.")
        if recipe is not None and "recipe" in results:
            now = json.loads(json.dumps(recipe()))  # the JSON types results.json holds
            then = {k: results.get(k) for k in now}
            if then != now:
                raise UsageError(f"{out} was trained under recipe {then['recipe']!r} ({then.get('recipe_applied')}), "
                                 f"but this grid's arguments now resolve to {now['recipe']!r} "
                                 f"({now.get('recipe_applied')}); a table mixing them would lie. Pass --recipe "
                                 f"{then['recipe']} after '--' to finish the grid as it was started, or use another "
                                 "--output_dir.")
        return "done"
    complete = last_complete_checkpoint(str(out))
    if record is not None and not differs and complete:
        return "resume"
    if complete and not overwrite_unfinished:
        why = (f"trained with other runner arguments ({differs})" if record is not None else
               f"whose arguments are unknown (no readable {RECORD})")
        raise UsageError(f"{out} holds checkpoints of an unfinished run ({Path(complete).name}) {why}; restarting "
                         "it would delete them. Pass --overwrite_unfinished to the sweep to delete them and train "
                         "the cell again, or use another --output_dir.")
    return "fresh"
