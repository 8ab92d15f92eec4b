"""A grid moved together with its data is the same grid, and a sweep never deletes a cell's
checkpoints without a one-line refusal the user answers with a flag."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURES

from bitfit_tasks.experiments import sweep
from bitfit_tasks.utils.errors import UsageError


class Crash(Exception):
    pass


def cell_runner(calls: list, crash_seeds: set[str] = frozenset()):
    """A fake run_glue main: a cell of ``crash_seeds`` dies after writing a complete checkpoint; the others
    write results.json with what the real runner records about its recipe. Paths relative to the cwd."""
    def main(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--output_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        ckpt = out / "checkpoint-1"
        ckpt.mkdir(exist_ok=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": []}))
        if argv[argv.index("--seed") + 1] in crash_seeds:
            raise Crash
        rec = sweep.resolved_recipe("glue", argv)
        (out / "results.json").write_text(json.dumps({"learning_rate": float(argv[argv.index("--learning_rate") + 1]),
                                                      "best": 0.5, "metric": "accuracy", **rec}))
    return main


def tree(tmp_path: Path) -> Path:
    """A project folder holding its data: proj/data/glue (a copy of the fixtures)."""
    proj = tmp_path / "proj"
    shutil.copytree(f"{FIXTURES}/glue", proj / "data" / "glue")
    return proj


KW = dict(tasks=["rte"], methods=["bitfit"], seeds=[1, 2], bias_lrs=[1e-3], runner="glue", output_dir="runs")
EXTRA = ["--data_dir", "data/glue", "--model_name_or_path", "unused", "--max_steps", "2"]


def test_a_grid_moved_with_its_data_skips_finished_cells_and_resumes_unfinished(tmp_path, monkeypatch):
    proj = tree(tmp_path)
    monkeypatch.chdir(proj)
    calls: list = []
    with pytest.raises(Crash):  # seed 2 dies after its first checkpoint
        sweep.run_grid(cell_runner(calls, {"2"}), extra_args=EXTRA, **KW)
    moved = tmp_path / "elsewhere" / "proj2"
    moved.parent.mkdir()
    shutil.move(str(proj), str(moved))  # the whole tree: grid and data
    monkeypatch.chdir(moved)
    calls.clear()
    sweep.run_grid(cell_runner(calls), extra_args=EXTRA, **KW)
    # The finished cell is skipped; the killed one resumes from its checkpoint (nothing deleted).
    assert [(a[a.index("--seed") + 1], a[-2:]) for a in calls] == [("2", ["--resume_from_checkpoint", "true"])]
    assert (moved / "runs/rte/bitfit/lr0.001/seed2/checkpoint-1/trainer_state.json").is_file()
    record = json.loads((moved / "runs/rte/bitfit/lr0.001/seed2/sweep_run.json").read_text())
    assert record["inputs"]["data_dir"][0]["path"] == str(moved / "data" / "glue")  # re-recorded where it is now
    # Other data under the same relative name is another grid: refused, naming the option.
    (moved / "data/glue/rte/train.jsonl").write_text((moved / "data/glue/rte/train.jsonl").read_text() * 2)
    shutil.move(str(moved), str(tmp_path / "proj3"))
    monkeypatch.chdir(tmp_path / "proj3")
    with pytest.raises(UsageError, match=r"seed1 was trained with other runner arguments \(--data_dir: \['data/glue'\] "
                                         r"-> \['data/glue'\] \(another path and other content\)\)"):
        sweep.run_grid(cell_runner(calls), extra_args=EXTRA, **KW)


def test_options_that_do_not_change_training_and_spelling_are_not_differences(tmp_path, monkeypatch):
    proj = tree(tmp_path)
    monkeypatch.chdir(proj)
    calls: list = []
    sweep.run_grid(cell_runner(calls), extra_args=[*EXTRA, "--use_cpu", "true", "--save_total_limit", "3"], **KW)
    assert len(calls) == 2
    sweep.run_grid(cell_runner(calls), extra_args=[*EXTRA, "--use_cpu", "--save_total_limit", "1",
                                                   "--dataloader_num_workers", "0", "--logging_steps", "7"], **KW)
    sweep.run_grid(cell_runner(calls), extra_args=[*EXTRA[:-2], "--max_steps=2", "--use_cpu=True"], **KW)
    assert len(calls) == 2  # every cell finished: nothing trained again, nothing refused
    with pytest.raises(UsageError, match=r"seed1 was trained with other runner arguments \(--use_cpu: \['true'\] -> "
                                         r"\['false'\]\)"):
        sweep.run_grid(cell_runner(calls), extra_args=[*EXTRA, "--use_cpu", "false"], **KW)


def test_an_unfinished_cell_trained_otherwise_is_refused_before_anything_trains(tmp_path, monkeypatch):
    proj = tree(tmp_path)
    monkeypatch.chdir(proj)
    calls: list = []
    with pytest.raises(Crash):
        sweep.run_grid(cell_runner(calls, {"1"}), extra_args=EXTRA, **KW)
    calls.clear()
    other = [*EXTRA[:-1], "3"]  # --max_steps 3
    with pytest.raises(UsageError, match=r"seed1 holds checkpoints of an unfinished run \(checkpoint-1\) trained with "
                                         r"other runner arguments \(--max_steps: \['2'\] -> \['3'\]\); restarting it "
                                         r"would delete them\. Pass --overwrite_unfinished to the sweep"):
        sweep.run_grid(cell_runner(calls), extra_args=other, **KW)
    assert calls == []  # refused before any cell trained (seed 2 included)
    ckpt = proj / "runs/rte/bitfit/lr0.001/seed1/checkpoint-1"
    assert ckpt.is_dir()
    # Unknown arguments (no record) are refused the same way.
    (ckpt.parent / "sweep_run.json").unlink()
    with pytest.raises(UsageError, match=r"whose arguments are unknown \(no readable sweep_run\.json\)"):
        sweep.run_grid(cell_runner(calls), extra_args=EXTRA, **KW)
    # The user's answer: the flag restarts it (the runner's --overwrite_output_dir deletes the checkpoints).
    sweep.run_grid(cell_runner(calls), extra_args=other, overwrite_unfinished=True, **KW)
    assert [(a[a.index("--seed") + 1], a[-2:]) for a in calls] == [("1", ["--overwrite_output_dir", "true"]),
                                                                  ("2", ["--overwrite_output_dir", "true"])]


def test_the_sweep_command_takes_the_flag(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(sweep, "run_grid", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(sweep, "summarize", lambda *a, **kw: {"markdown": ""})
    sweep.main(["--tasks", "rte", "--output_dir", str(tmp_path), "--overwrite_unfinished", "--bias_lrs", "1e-3"])
    assert seen["overwrite_unfinished"] is True
