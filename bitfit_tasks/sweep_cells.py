"""A sweep cell's state: finished (and trained like this grid's cell), resumable, or fresh. A cell's
identity is what determines its training, not where its folder lives."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .arguments import option_dest
from .checkpoints import last_complete_checkpoint
from .errors import UsageError

logger = logging.getLogger("bitfit_tasks")
RECORD = "sweep_run.json"  # the runner arguments a cell was (or is being) trained with


# Where a run is written or reported, not how it is trained: left out of a cell's identity, so a
# sweep folder that was copied or moved, or named by a relative or an absolute path, is the same grid.
LOCATION_DESTS = frozenset({"output_dir", "logging_dir", "report_to", "run_name", "cache_dir", "overwrite_output_dir",
                            "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
                            "hub_private_repo", "hub_always_push", "hub_revision", "disable_tqdm"})
# Arguments that name inputs: compared by what they point to (the resolved path) when it exists.
INPUT_PATH_DESTS = frozenset({"model_name_or_path", "data_dir", "train_file", "validation_file",
                              "validation_mismatched_file", "test_file", "treebank", "dataset_name"})


def _resolve_input(value: str) -> str:
    path, sep, member = value.partition("::")  # archive.zip::member
    p = Path(path)
    return str(p.resolve()) + sep + member if p.exists() else value


def cell_identity(argv: Sequence[str], table: dict | None = None) -> dict[str, list[str]]:
    """What determines a cell's training, from its runner arguments: ``{destination: values}``, flags
    resolved through the runner's option ``table`` (abbreviations, ``--x=v``), location flags left
    out, input paths resolved (relative to the current folder)."""
    out: dict[str, list[str]] = {}
    key = ""
    for a in argv:
        if a.startswith("--"):
            flag, eq, value = a.partition("=")
            key = (option_dest(table, flag) if table else None) or flag.removeprefix("--")
            out[key] = [value] if eq else []
        else:
            out.setdefault(key, []).append(a)
    for dest in LOCATION_DESTS & out.keys():
        del out[dest]
    for dest in INPUT_PATH_DESTS & out.keys():
        out[dest] = [_resolve_input(v) for v in out[dest]]
    return out


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    return "; ".join(f"--{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def cell_state(out: Path, argv: list[str], table: dict | None = None,
               recipe: Callable[[], dict[str, Any]] | None = None) -> str:
    """'done' (a readable results.json trained like this cell), 'resume' (complete checkpoints of a run
    trained like this cell), or 'fresh' (nothing usable: start over). A finished cell trained otherwise
    is an error -- other runner arguments (compared by :func:`cell_identity`, so where the folder lives
    does not count), or another resolved recipe (``recipe()``: what these arguments resolve to now,
    against the ``recipe``/``recipe_applied`` of its results.json): a table mixing them would lie."""
    recorded = None
    if (out / RECORD).exists():
        try:
            record = json.loads((out / RECORD).read_text())
            recorded = record.get("identity") or cell_identity(record["argv"], table)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            recorded = None
    identity = cell_identity(argv, table)
    if recipe is not None and recorded is not None:
        # Compared by what it resolves to (below): '--recipe linear' finishes a grid that 'auto' began as linear.
        recorded, identity = ({k: v for k, v in d.items() if k != "recipe"} for d in (recorded, identity))
    try:
        results = json.loads((out / "results.json").read_text())
        done = isinstance(results, dict)
    except FileNotFoundError:
        done = False
    except (json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("%s/results.json is unreadable (a write cut short?): running the cell again", out)
        done = False
    if done:
        if recorded is None:
            logger.warning("%s has no %s (made by an older sweep): counted as done, arguments unchecked", out, RECORD)
        elif recorded != identity:
            raise UsageError(f"{out} was trained with other runner arguments ({_differences(recorded, identity)}); "
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
    if recorded == identity and last_complete_checkpoint(str(out)):
        return "resume"
    return "fresh"


