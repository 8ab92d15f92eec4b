"""Resumable grids (tasks x methods x learning rates x seeds) and the paper-style results table.

    python -m bitfit_tasks.sweep --tasks rte mrpc --methods full bitfit qm2 frozen rand_uniform \
        --seeds 1 2 3 --output_dir runs/glue -- --data_dir ../shared/data/glue --num_train_epochs 5

Each run writes ``<output_dir>/<task>/<method>/lr<lr>/seed<seed>/results.json``; a run whose file
exists is skipped, so re-running the same command finishes a half-done grid. The table takes, per
task and method, the learning rate with the best mean dev score over seeds and reports that
score's mean +- std over seeds (the paper's Tables 2/3 protocol), next to the paper's BERT-base
numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError
from .fileio import atomic_write_text
from .recipes import OFFICIAL_BIAS_LRS, PAPER_BIAS_LRS, PAPER_FULL_LRS, recipe_for
from .selection import PRESETS, resolve_terms

logger = logging.getLogger("bitfit_tasks")

# Method name -> (mode, bias terms). Any preset or '+'-joined term list is a bitfit method too.
BASE_METHODS: dict[str, tuple[str, list[str]]] = {
    "full": ("full", ["bitfit"]),
    "bitfit": ("bitfit", ["bitfit"]),
    "frozen": ("frozen", ["bitfit"]),
    "rand_uniform": ("rand_uniform", ["bitfit"]),
    "rand_row_col": ("rand_row_col", ["bitfit"]),
}

# BERT-base dev results (Tables 2 and 3), x100.
PAPER_GLUE: dict[str, dict[str, str]] = {
    "full": {"qnli": "90.7±0.2", "sst2": "92.0±0.4", "mnli": "83.5±0.1", "cola": "56.4±0.9",
             "mrpc": "89.0±1.0", "stsb": "88.9±0.7", "rte": "70.5±0.6", "qqp": "87.1±0.1"},
    "bitfit": {"qnli": "90.2±0.2", "sst2": "92.1±0.3", "mnli": "81.4±0.2", "cola": "58.8±0.5",
               "mrpc": "90.4±0.5", "stsb": "89.2±0.2", "rte": "72.3±0.9", "qqp": "84.0±0.2"},
    "qm2": {"qnli": "89.4±0.1", "sst2": "91.2±0.2", "mnli": "80.4±0.2", "cola": "57.4±0.8",
            "mrpc": "89.0±0.2", "stsb": "88.4±0.1", "rte": "68.6±0.6", "qqp": "83.7±0.2"},
    "m2": {"qnli": "88.9±0.1", "sst2": "91.1±0.3", "mnli": "79.9±0.3", "cola": "54.9±0.9",
           "mrpc": "87.9±0.6", "stsb": "88.2±0.1", "rte": "66.8±0.6", "qqp": "82.1±0.4"},
    "q": {"qnli": "86.8±0.1", "sst2": "89.6±0.2", "mnli": "74.4±0.3", "cola": "49.1±1.5",
          "mrpc": "84.4±0.2", "stsb": "85.6±0.1", "rte": "61.4±1.1", "qqp": "80.6±0.4"},
    "frozen": {"qnli": "68.7±0.3", "sst2": "81.7±0.1", "mnli": "42.4±0.1", "cola": "31.9±1.1",
               "mrpc": "81.1±0.1", "stsb": "71.4±0.1", "rte": "56.9±0.4", "qqp": "62.4±0.2"},
    "rand_uniform": {"qnli": "87.8±0.3", "sst2": "90.5±0.3", "mnli": "78.3±0.3", "cola": "54.1±1.0",
                     "mrpc": "84.3±0.3", "stsb": "87.2±0.4", "rte": "62.9±0.9", "qqp": "82.4±0.3"},
    "rand_row_col": {"qnli": "88.4±0.2", "sst2": "91.0±0.3", "mnli": "79.4±0.3", "cola": "53.4±0.6",
                     "mrpc": "88.0±0.7", "stsb": "87.9±0.2", "rte": "65.1±0.7", "qqp": "82.3±0.2"},
}


def method_spec(method: str) -> tuple[str, list[str]]:
    """``(mode, bias_terms)`` for a method name: a base method, a preset, or terms joined by '+'."""
    if method in BASE_METHODS:
        return BASE_METHODS[method]
    terms = method.split("+")
    try:
        resolve_terms(terms)
    except ValueError as err:
        raise ValueError(f"unknown method {method!r}: use one of {list(BASE_METHODS)}, a preset "
                         f"{sorted(PRESETS)}, or '+'-joined terms like q+m2 ({err})") from None
    return "bitfit", terms


def run_dir(root: Path, task: str, method: str, lr: float, seed: int) -> Path:
    return root / task / method / f"lr{lr:g}" / f"seed{seed}"


RUNNERS = ("glue", "pos", "squad")
RECORD = "sweep_run.json"  # the runner arguments a cell was (or is being) trained with
CELL_LOCK = ".sweep-cell.lock"
# Flags the grid sets for every run: the same flag after '--' would silently override the grid.
GRID_FLAGS = {"--task_name": "--tasks", "--mode": "--methods", "--bias_terms": "--methods",
              "--learning_rate": "--bias_lrs/--full_lrs", "--seed": "--seeds", "--output_dir": "--output_dir"}


def check_runner_args(extra_args: Sequence[str], task_flags: Sequence[str] = ()) -> None:
    """Refuse runner arguments that collide with what the grid sets per run (they would override the
    grid and fake n-seed statistics out of one setting)."""
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        if flag in GRID_FLAGS:
            raise UsageError(f"runner argument {flag} after '--' collides with the grid, which sets it for "
                             f"every run; use the sweep's {GRID_FLAGS[flag]} instead.")
        if flag in task_flags:
            raise UsageError(f"runner argument {flag} after '--' collides with the grid's per-task {flag} "
                             "(from --fractions / --fraction_epochs); drop one of them.")


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
    from .arguments import option_dest

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
    from .arguments import last_complete_checkpoint

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


def runner_module(runner: str):
    """The runner's module (``glue``, ``pos``, ``squad``): its ``main``, ``ARGUMENTS`` and ``DEFAULTS``."""
    import importlib

    if runner not in RUNNERS:
        raise UsageError(f"unknown runner {runner!r}; choose one of {list(RUNNERS)}.")
    return importlib.import_module(f"{__package__}.{runner}")


def runner_parser(runner: str):
    """The runner's own ``HfArgumentParser`` (option table, abbreviations), with its defaults."""
    from transformers import HfArgumentParser

    from .arguments import runner_dataclasses

    return HfArgumentParser(runner_dataclasses(runner_module(runner).ARGUMENTS))


def resolved_recipe(runner: str, argv: Sequence[str]) -> dict[str, Any]:
    """``{"recipe", "recipe_applied"}`` that a run with ``argv`` gets (what its results.json records),
    from the runner's own parsing of the arguments."""
    from .arguments import parse_args, runner_dataclasses
    from .recipes import apply_recipe

    mod = runner_module(runner)
    _, _, bitfit, run_args, training_args = parse_args(runner_dataclasses(mod.ARGUMENTS), list(argv), mod.DEFAULTS)
    return apply_recipe(training_args, bitfit.mode, run_args.recipe, run_args.explicit_args, runner)


def requested_recipe(runner: str, runner_args: Sequence[str]) -> str:
    """The ``--recipe`` value in ``runner_args`` (any spelling the runner accepts), else the default."""
    ns, _ = runner_parser(runner).parse_known_args(list(runner_args))
    return ns.recipe


class _CellLock:
    """An exclusive flock on a cell's folder, so two sweeps into one --output_dir train each cell once;
    the kernel drops it when its process dies."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.f = open(out / CELL_LOCK, "a+")  # noqa: SIM115

    def acquire(self, wait: bool) -> bool:
        import fcntl

        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.f.close()


def run_grid(
    main: Callable[[list[str]], Any],
    *,
    tasks: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    output_dir: str,
    bias_lrs: Sequence[float] = PAPER_BIAS_LRS,
    full_lrs: Sequence[float] = PAPER_FULL_LRS,
    extra_args: Sequence[str] = (),
    dry_run: bool = False,
    shard: tuple[int, int] = (0, 1),
    task_args: Callable[[str], list[str]] | None = None,
    runner: str | None = None,
) -> list[Path]:
    """Run every unfinished (task, method, lr, seed) with the runner's ``main(argv)``; returns run dirs.

    A cell is finished when its results.json is readable and it was trained like this grid's cell
    (same arguments, and -- given ``runner``, whose parser reads them -- the same resolved recipe);
    a cell killed after a checkpoint resumes from it. Cells another sweep is training (same
    --output_dir, another process) are skipped, then waited for at the end, so each runs once."""
    root = Path(output_dir)
    table = runner_parser(runner)._option_string_actions if runner else None
    specs = {m: method_spec(m) for m in methods}  # fail fast on a bad name, before any training
    check_runner_args(extra_args, sorted({a for t in tasks for a in (task_args(t) if task_args else [])
                                          if a.startswith("--")}))
    # Several processes of one launched sweep train every cell together: no per-cell claims then.
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    writer = os.environ.get("RANK", "0") == "0"
    cells: list[tuple[Path, list[str]]] = []
    index = -1
    # Seeds outermost: a grid cut short still has every cell, with fewer seeds.
    for seed in seeds:
        for task in tasks:
            for method, (mode, terms) in specs.items():
                for lr in (full_lrs if mode == "full" else bias_lrs):
                    index += 1
                    if index % shard[1] != shard[0]:  # another worker's run
                        continue
                    out = run_dir(root, task, method, lr, seed)
                    argv = ["--task_name", task, "--mode", mode, "--bias_terms", *terms,
                            "--learning_rate", str(lr), "--seed", str(seed),
                            "--output_dir", str(out), *(task_args(task) if task_args else []), *extra_args]
                    cells.append((out, argv))

    def run_cell(out: Path, argv: list[str]) -> None:
        recipe = (lambda: resolved_recipe(runner, argv)) if runner else None
        state = cell_state(out, argv, table, recipe)
        if state == "done":
            logger.info("skip finished run %s", out)
            return
        flag = ["--resume_from_checkpoint", "true"] if state == "resume" else ["--overwrite_output_dir", "true"]
        logger.info("run %s", " ".join(argv + flag))
        if writer:
            atomic_write_text(out / RECORD, json.dumps({"argv": argv, "identity": cell_identity(argv, table)},
                                                       indent=1))
        main(argv + flag)

    pending: list[tuple[Path, list[str], _CellLock]] = []
    for out, argv in cells:
        if dry_run:
            logger.info("run %s", " ".join(argv))
            continue
        if multi:
            run_cell(out, argv)
            continue
        lock = _CellLock(out)
        if not lock.acquire(wait=False):
            logger.info("another sweep is training %s; coming back to it at the end", out)
            pending.append((out, argv, lock))
            continue
        try:
            run_cell(out, argv)
        finally:
            lock.close()
    for out, argv, lock in pending:
        try:
            lock.acquire(wait=True)  # the other sweep's run ends (or dies) first
            run_cell(out, argv)
        finally:
            lock.close()
    return [out for out, _ in cells]


def read_results(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}); rerun the sweep to train that cell again.") from None


def _fmt(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"  # one seed: no spread to report (a "±0.0" would claim one)
    return f"{mean:.1f}±{100 * statistics.stdev(values):.1f}"


# BERT-base PTB POS accuracy (Sec. 4, "Token-level tasks").
PAPER_POS = {"full": "97.2", "bitfit": "97.2"}


def paper_reference(runner: str, method: str, task: str, metric: str = "word accuracy") -> str | None:
    if runner == "pos":  # the paper tags POS only: no reference for chunking/NER span F1
        return PAPER_POS.get(method) if metric == "word accuracy" else None
    if runner == "squad":
        return None  # the paper gives Figure 2 only, no numbers
    return PAPER_GLUE.get(method, {}).get(task)


def summarize(output_dir: str, score: str = "best", runner: str = "glue") -> dict[str, Any]:
    """Collect every results.json below ``output_dir`` into a paper-style table (Markdown + JSON)."""
    root = Path(output_dir)
    runs: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    meta: dict[str, str] = {}
    for path in sorted(root.glob("*/*/lr*/seed*/results.json")):
        r = read_results(path)
        task, method = path.parts[-5], path.parts[-4]
        runs[(task, method)][float(r["learning_rate"])].append(float(r[score]))
        meta[task] = r["metric"]
    table: dict[str, dict[str, Any]] = defaultdict(dict)
    for (task, method), by_lr in runs.items():
        best_lr = max(by_lr, key=lambda lr: statistics.fmean(by_lr[lr]))
        vals = by_lr[best_lr]
        table[method][task] = {
            "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n_seeds": len(vals), "best_lr": best_lr, "scores": vals, "cell": _fmt(vals),
            "all_lrs": {str(lr): _fmt(v) for lr, v in sorted(by_lr.items())},
            "paper": paper_reference(runner, method, task, meta[task]),
        }
    tasks = sorted(meta)
    lines = [
        f"| method | {' | '.join(f'{t} ({meta[t]})' for t in tasks)} |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for method in table:
        cells = []
        for t in tasks:
            c = table[method].get(t)
            if c is None:
                cells.append("–")
            else:
                paper = f" [paper {c['paper']}]" if c["paper"] else ""
                cells.append(f"{c['cell']} (lr {c['best_lr']:g}, n={c['n_seeds']}){paper}")
        lines.append(f"| {method} | {' | '.join(cells)} |")
    md = "\n".join(lines) + "\n"
    atomic_write_text(root / "results.md", md)
    atomic_write_text(root / "results.json", json.dumps(table, indent=2))
    return {"markdown": md, "table": table}


def plot_training_size_curve(output_dir: str) -> str:
    """The paper's Figure 2: EM and F1 (mean +- std over seeds) against the training fraction, per
    method; writes curve.png, curve.md and curve.json next to the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(output_dir)
    data: dict[str, dict[float, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for path in sorted(root.glob("frac*/*/lr*/seed*/results.json")):
        r = read_results(path)
        frac = float(path.parts[-5].removeprefix("frac"))
        fm = r.get("saved_metrics") or r["final_metrics"]  # the saved model's scores
        cell = data[path.parts[-4]][frac]
        cell["em"].append(fm["eval_exact_match"])
        cell["f1"].append(fm["eval_f1"])
        # Recipe facts that differ between cells, so a mixed table says how each cell was made.
        for key in ("train_examples", "epochs", "learning_rate", "device"):
            if r.get(key) is not None and r[key] not in cell[key]:
                cell[key].append(r[key])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines = ["| method | fraction | questions | epochs | lr | EM | F1 | seeds | device |",
             "|---|---|---|---|---|---|---|---|---|"]
    table: dict[str, dict[str, Any]] = {}
    for method, by_frac in sorted(data.items()):
        fracs = sorted(by_frac)
        for ax, key in zip(axes, ("em", "f1"), strict=True):
            means = [statistics.fmean(by_frac[f][key]) for f in fracs]
            stds = [statistics.stdev(by_frac[f][key]) if len(by_frac[f][key]) > 1 else 0.0 for f in fracs]
            ax.errorbar([100 * f for f in fracs], means, yerr=stds, marker="o", capsize=3, label=method)
        for f in fracs:
            em, f1 = by_frac[f]["em"], by_frac[f]["f1"]
            facts = [", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in by_frac[f][k])
                     for k in ("train_examples", "epochs", "learning_rate", "device")]
            lines.append(f"| {method} | {f:g} | {facts[0]} | {facts[1]} | {facts[2]} | {_fmt([x / 100 for x in em])} | "
                         f"{_fmt([x / 100 for x in f1])} | {len(em)} | {facts[3]} |")
            table.setdefault(method, {})[str(f)] = {"em": em, "f1": f1}
    all_pcts = sorted({100 * f for by_frac in data.values() for f in by_frac})
    for ax, name in zip(axes, ("Exact match", "F1"), strict=True):
        ax.set_xscale("log")
        ax.set_xticks(all_pcts, [f"{p:g}" for p in all_pcts])  # plain percentages, not 10^k
        ax.minorticks_off()
        ax.set_xlabel("% of SQuAD training questions")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SQuAD v1.1 dev: BitFit vs full fine-tuning by training-set size (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(root / "curve.png", dpi=120)
    plt.close(fig)
    md = "\n".join(lines) + "\n"
    atomic_write_text(root / "curve.md", md)
    atomic_write_text(root / "curve.json", json.dumps(table, indent=2))
    return md


def fraction_task_args(fractions: Sequence[float], epochs: Sequence[float] | None = None,
                       extra_args: Sequence[str] = ()) -> tuple[list[str], Callable[[str], list[str]]]:
    """SQuAD curve: the task names (``frac<F>``) and each task's runner arguments. ``epochs`` gives
    one epoch count per fraction, so small subsets can train for more epochs than large ones in
    one command."""
    if epochs is not None and len(epochs) != len(fractions):
        raise ValueError(f"--fraction_epochs needs one value per fraction: got {len(epochs)} for "
                         f"{len(fractions)} fractions {list(fractions)}.")
    if epochs is not None and any(a.split("=")[0] == "--num_train_epochs" for a in extra_args):
        raise ValueError("--fraction_epochs and --num_train_epochs both set the epochs; pass one of them.")
    per_task = {f"frac{f:g}": ["--train_fraction", f"{f:g}"] for f in fractions}
    if epochs is not None:
        for f, e in zip(fractions, epochs, strict=True):
            per_task[f"frac{f:g}"] += ["--num_train_epochs", f"{e:g}"]
    return list(per_task), per_task.__getitem__


def default_bias_lrs(runner: str, runner_args: Sequence[str]) -> list[float]:
    """The bias-rate grid for the recipe the runs resolve to: the paper's grid under ``linear``; under
    ``official`` (constant rate) the runner's grid of :data:`OFFICIAL_BIAS_LRS`, which leaves out the
    rates that collapsed the model in the committed scan."""
    requested = requested_recipe(runner, runner_args)
    if recipe_for(requested, "bitfit", runner).name == "official":
        return list(OFFICIAL_BIAS_LRS[runner])
    return list(PAPER_BIAS_LRS)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n.")
    return i, n


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runner", default="glue", choices=list(RUNNERS),
                        help="which runner's main() to call (run_glue.py, run_pos.py, run_squad.py)")
    parser.add_argument("--tasks", nargs="+", help="GLUE tasks, or labels of POS datasets")
    parser.add_argument("--fractions", nargs="+", type=float,
                        help="squad: training fractions (the tasks become frac<F>), e.g. 0.01 0.1 1")
    parser.add_argument("--fraction_epochs", nargs="+", type=float,
                        help="squad: epochs per fraction, one per --fractions value (e.g. 10 3 2), instead "
                        "of one --num_train_epochs for all")
    parser.add_argument("--methods", nargs="+", default=["full", "bitfit"],
                        help=f"{list(BASE_METHODS)}, a preset, or '+'-joined terms (e.g. q+m2)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--bias_lrs", nargs="+", type=float,
                        help=f"bias-only learning rates; default: the paper's {list(PAPER_BIAS_LRS)}, or, when the "
                        f"runs' recipe is 'official' (the default for GLUE and tagging), per runner "
                        f"{ {k: list(v) for k, v in OFFICIAL_BIAS_LRS.items()} } (the rates that collapsed the model "
                        "under a constant rate are left out; benchmarks/RESULTS.md)")
    parser.add_argument("--full_lrs", nargs="+", type=float, default=list(PAPER_FULL_LRS))
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--score", default="best", choices=["best", "final"],
                        help="best dev score over epochs (the paper) or the last epoch's")
    parser.add_argument("--shard", default="0/1",
                        help="i/n: run only every n-th run starting at i, for n parallel workers "
                        "(e.g. one per GPU); workers share --output_dir and the same table")
    parser.add_argument("--dry_run", action="store_true", help="list the runs, train nothing")
    parser.add_argument("runner_args", nargs=argparse.REMAINDER,
                        help="after '--': arguments passed to every run")
    args = parser.parse_args(argv)
    extra = args.runner_args[1:] if args.runner_args[:1] == ["--"] else args.runner_args
    if args.bias_lrs is None:
        args.bias_lrs = default_bias_lrs(args.runner, extra)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    task_args = None
    if args.fraction_epochs and args.runner != "squad":
        parser.error("--fraction_epochs is for --runner squad (with --fractions)")
    if args.runner == "squad":
        if not args.fractions:
            parser.error("--runner squad needs --fractions")
        try:  # the curve's plot comes after hours of training: check for matplotlib first
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--runner squad plots the training-size curve with matplotlib, which is not "
                         "installed; pip install 'bitfit-tasks[plot]' (or matplotlib) first.")
        args.tasks, task_args = fraction_task_args(args.fractions, args.fraction_epochs, extra)
    if not args.tasks:
        parser.error("--tasks is required")

    run_grid(runner_module(args.runner).main, runner=args.runner, task_args=task_args, tasks=args.tasks,
             methods=args.methods, seeds=args.seeds, output_dir=args.output_dir, bias_lrs=args.bias_lrs,
             full_lrs=args.full_lrs, extra_args=extra, dry_run=args.dry_run, shard=_parse_shard(args.shard))
    import torch.distributed as dist

    from .arguments import finish_distributed

    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    summary = {"markdown": ""}
    if is_main and not args.dry_run:  # one writer for the table
        summary = summarize(args.output_dir, args.score, args.runner)
        print(summary["markdown"])
        if args.runner == "squad":
            print(plot_training_size_curve(args.output_dir))
    finish_distributed()
    return summary


if __name__ == "__main__":
    from .arguments import run_cli

    run_cli(main)
