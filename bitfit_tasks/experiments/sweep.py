"""Resumable grids (tasks x methods x learning rates x seeds), then the paper-style results table.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from filelock import FileLock, Timeout
from transformers import HfArgumentParser

from ..core.bias_maps import PRESETS, resolve_terms
from ..core.config import PEFT_MODES
from ..tasks.arguments import option_dest, parse_args, runner_dataclasses
from ..tasks.recipes import LORA_LRS, OFFICIAL_BIAS_LRS, PAPER_BIAS_LRS, PAPER_FULL_LRS, apply_recipe, recipe_for
from ..tasks.registry import RUNNERS, runner_module
from ..utils.errors import UsageError
from ..utils.fileio import atomic_write_text
from ..utils.launch import finish_distributed, run_cli
from .cells import RECORD, Inputs, cell_state
from .plots import plot_training_size_curve
from .report import summarize

logger = logging.getLogger("bitfit_tasks")

# Method name -> (mode, bias terms). Any preset or '+'-joined term list is a bitfit method too.
BASE_METHODS: dict[str, tuple[str, list[str]]] = {
    "full": ("full", ["bitfit"]),
    "bitfit": ("bitfit", ["bitfit"]),
    "frozen": ("frozen", ["bitfit"]),
    "rand_uniform": ("rand_uniform", ["bitfit"]),
    "rand_row_col": ("rand_row_col", ["bitfit"]),
    "lora": ("lora", ["bitfit"]),
    "beft": ("beft", ["bitfit"]),
}

def method_spec(method: str) -> tuple[str, list[str]]:
    """``(mode, bias_terms)`` for a method name: a base method, a preset, or terms joined by '+'."""
    if method in BASE_METHODS:
        return BASE_METHODS[method]
    terms = method.split("+")
    try:
        resolve_terms(terms)
    except ValueError as err:
        raise UsageError(f"unknown method {method!r}: use one of {list(BASE_METHODS)}, a preset "
                         f"{sorted(PRESETS)}, or '+'-joined terms like q+m2 ({err})") from None
    return "bitfit", terms


def run_dir(root: Path, task: str, method: str, lr: float, seed: int) -> Path:
    return root / task / method / f"lr{lr:g}" / f"seed{seed}"


CELL_LOCK = ".sweep-cell.lock"
# Flags the grid sets for every run: the same flag after '--' would silently override the grid.
GRID_FLAGS = {"--task_name": "--tasks", "--mode": "--methods", "--bias_terms": "--methods",
              "--learning_rate": "--bias_lrs/--full_lrs/--lora_lrs", "--seed": "--seeds",
              "--output_dir": "--output_dir"}


# Runner options of the LoRA / BEFT modes: a grid passes --peft_targets to its lora and beft runs and LoRA's own
# options to its lora runs only (BitFitConfig refuses them elsewhere), so one command compares every method.
PEFT_OPTIONS = ("--peft_targets", "--lora_r", "--lora_alpha", "--lora_dropout")


def without_peft_options(args: Sequence[str], table: dict | None = None, keep: Sequence[str] = ()) -> list[str]:
    """``args`` without the PEFT modes' options (but ``keep``) and their values (any spelling the runner's parser
    accepts when ``table``, its option table, is given)."""
    dropped = set(PEFT_OPTIONS) - set(keep)

    def is_peft(token: str) -> bool:
        flag = token.split("=", 1)[0]
        dest = option_dest(table, flag) if table is not None else None
        return flag in dropped or (dest is not None and f"--{dest}" in dropped)

    out: list[str] = []
    skipping = False
    for token in args:
        if token.startswith("--"):
            skipping = is_peft(token) and "=" not in token
            if is_peft(token):
                continue
        elif skipping:
            continue
        out.append(token)
    return out


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


def runner_parser(runner: str):
    """The runner's own ``HfArgumentParser`` (option table, abbreviations), with its defaults."""
    return HfArgumentParser(runner_dataclasses(runner_module(runner).ARGUMENTS))


def resolved_recipe(runner: str, argv: Sequence[str]) -> dict[str, Any]:
    """``{"recipe", "recipe_applied"}`` that a run with ``argv`` gets (what its results.json records),
    from the runner's own parsing of the arguments."""
    mod = runner_module(runner)
    _, _, bitfit, run_args, training_args = parse_args(runner_dataclasses(mod.ARGUMENTS), list(argv), mod.DEFAULTS)
    return apply_recipe(training_args, bitfit.mode, run_args.recipe, run_args.explicit_args, runner)


def requested_recipe(runner: str, runner_args: Sequence[str]) -> str:
    """The ``--recipe`` value in ``runner_args`` (any spelling the runner accepts), else the default."""
    ns, _ = runner_parser(runner).parse_known_args(list(runner_args))
    return ns.recipe


def run_grid(
    main: Callable[[list[str]], Any],
    *,
    tasks: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    output_dir: str,
    bias_lrs: Sequence[float] = PAPER_BIAS_LRS,
    full_lrs: Sequence[float] = PAPER_FULL_LRS,
    lora_lrs: Sequence[float] = LORA_LRS,
    extra_args: Sequence[str] = (),
    dry_run: bool = False,
    shard: tuple[int, int] = (0, 1),
    task_args: Callable[[str], list[str]] | None = None,
    runner: str | None = None,
    overwrite_unfinished: bool = False,
) -> list[Path]:
    """Run every unfinished (task, method, lr, seed) with the runner's ``main(argv)``; returns run dirs.

    A cell is finished when its results.json is readable and it was trained like this grid's cell
    (same arguments, and -- given ``runner``, whose parser reads them -- the same resolved recipe);
    a cell killed after a checkpoint resumes from it. Every cell is checked before any trains: a finished
    cell trained otherwise, and an unfinished one whose checkpoints were trained otherwise (restarting
    would delete them; ``overwrite_unfinished`` allows it), are refused. Cells another sweep is training
    (same --output_dir, another process) are skipped, then waited for at the end, so each runs once."""
    root = Path(output_dir)
    inputs = Inputs(root)
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
                for lr in {"full": full_lrs, "lora": lora_lrs}.get(mode, bias_lrs):
                    index += 1
                    if index % shard[1] != shard[0]:  # another worker's run
                        continue
                    out = run_dir(root, task, method, lr, seed)
                    extra = extra_args if mode == "lora" else without_peft_options(
                        extra_args, table, keep=("--peft_targets",) if mode in PEFT_MODES else ())
                    argv = ["--task_name", task, "--mode", mode, "--bias_terms", *terms,
                            "--learning_rate", str(lr), "--seed", str(seed),
                            "--output_dir", str(out), *(task_args(task) if task_args else []), *extra]
                    cells.append((out, argv))

    def state_of(out: Path, argv: list[str]) -> str:
        recipe = (lambda: resolved_recipe(runner, argv)) if runner else None
        return cell_state(out, argv, table, recipe, inputs, overwrite_unfinished)

    def run_cell(out: Path, argv: list[str]) -> None:
        state = state_of(out, argv)  # again: another sweep may have finished it meanwhile
        if state == "done":
            logger.info("skip finished run %s", out)
            return
        flag = ["--resume_from_checkpoint", "true"] if state == "resume" else ["--overwrite_output_dir", "true"]
        logger.info("run %s", " ".join(argv + flag))
        if writer:
            atomic_write_text(out / RECORD, json.dumps(inputs.record(argv, table), indent=1))
        main(argv + flag)

    # A lock per cell, so two sweeps into one --output_dir train each cell once; the kernel drops it
    # when its process dies.
    if not dry_run:  # refuse before any cell trains, not after hours of the others
        for out, argv in cells:
            if runner:
                resolved_recipe(runner, argv)  # every cell's arguments, as its runner will parse them
            state_of(out, argv)
    pending: list[tuple[Path, list[str], FileLock]] = []
    for out, argv in cells:
        if dry_run:
            logger.info("run %s", " ".join(argv))
            continue
        if multi:
            run_cell(out, argv)
            continue
        out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out / CELL_LOCK))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("another sweep is training %s; coming back to it at the end", out)
            pending.append((out, argv, lock))
            continue
        try:
            run_cell(out, argv)
        finally:
            lock.release()
    for out, argv, lock in pending:
        with lock:  # the other sweep's run ends (or dies) first
            run_cell(out, argv)
    return [out for out, _ in cells]


def fraction_task_args(fractions: Sequence[float], epochs: Sequence[float] | None = None,
                       extra_args: Sequence[str] = ()) -> tuple[list[str], Callable[[str], list[str]]]:
    """SQuAD curve: the task names (``frac<F>``) and each task's runner arguments. ``epochs`` gives
    one epoch count per fraction, so small subsets can train for more epochs than large ones in
    one command."""
    if epochs is not None and len(epochs) != len(fractions):
        raise UsageError(f"--fraction_epochs needs one value per fraction: got {len(epochs)} for "
                         f"{len(fractions)} fractions {list(fractions)}.")
    if epochs is not None and any(a.split("=")[0] == "--num_train_epochs" for a in extra_args):
        raise UsageError("--fraction_epochs and --num_train_epochs both set the epochs; pass one of them.")
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
        raise UsageError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: need 0 <= i < n.")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bitfit_tasks.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    parser.add_argument("--lora_lrs", nargs="+", type=float, default=list(LORA_LRS),
                        help="learning rates of the lora method (default: the LoRA paper's GLUE rates); beft, "
                        "a bias method, takes --bias_lrs")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--score", default="best", choices=["best", "final"],
                        help="best dev score over epochs (the paper) or the last epoch's")
    parser.add_argument("--shard", default="0/1",
                        help="i/n: run only every n-th run starting at i, for n parallel workers sharing "
                        "--output_dir and the table; each worker uses the devices its process sees (one GPU "
                        "per worker: CUDA_VISIBLE_DEVICES=i)")
    parser.add_argument("--dry_run", action="store_true", help="list the runs, train nothing")
    parser.add_argument("--overwrite_unfinished", action="store_true",
                        help="restart unfinished runs whose checkpoints were trained with other runner arguments "
                        "(or unknown ones), deleting those checkpoints; without it such a run is refused")
    parser.add_argument("runner_args", nargs=argparse.REMAINDER,
                        help="after '--': arguments passed to every run")
    return parser


def split_runner_args(runner_args: list[str]) -> list[str]:
    """The runner arguments after the sweep's own: what follows ``--``."""
    return runner_args[1:] if runner_args[:1] == ["--"] else runner_args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    extra = split_runner_args(args.runner_args)
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
             full_lrs=args.full_lrs, lora_lrs=args.lora_lrs, extra_args=extra, dry_run=args.dry_run,
             shard=_parse_shard(args.shard), overwrite_unfinished=args.overwrite_unfinished)
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
    run_cli(main)
