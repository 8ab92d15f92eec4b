from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import FIXTURES, tiny_model

from bitfit_tasks.experiments import sweep
from bitfit_tasks.experiments.analysis import bias_change, plot_heatmap, write_csv


class Crash(Exception):
    pass


def test_grid_resumes_and_shards(tmp_path):
    calls: list[list[str]] = []
    crash = {"on": True}

    def fake_main(argv):
        calls.append(argv)
        if crash["on"] and argv[argv.index("--seed") + 1] == "2":
            raise Crash  # the grid dies half-way
        out = tmp_path / argv[argv.index("--output_dir") + 1]
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text("{}")

    kw = dict(tasks=["rte"], methods=["bitfit", "full", "q+m2"], seeds=[1, 2], bias_lrs=[1e-3, 4e-4],
              full_lrs=[2e-5], output_dir=str(tmp_path))
    with pytest.raises(Crash):
        sweep.run_grid(fake_main, **kw)
    assert len(calls) == 6  # seed 1: 2 + 1 + 2 runs, then the first seed-2 run dies
    calls.clear()
    crash["on"] = False
    runs = sweep.run_grid(fake_main, **kw)
    assert len(runs) == 10
    # Only the unfinished seed-2 runs ran again.
    assert [a[a.index("--seed") + 1] for a in calls] == ["2"] * 5
    assert calls[0][calls[0].index("--bias_terms") + 1] == "bitfit"
    qm2 = [a for a in calls if "q" in a and "m2" in a]
    assert qm2 and qm2[0][qm2[0].index("--mode") + 1] == "bitfit"
    # Two workers split a grid without overlap.
    a = sweep.run_grid(lambda argv: None, **{**kw, "output_dir": str(tmp_path / "x")}, shard=(0, 2), dry_run=True)
    b = sweep.run_grid(lambda argv: None, **{**kw, "output_dir": str(tmp_path / "x")}, shard=(1, 2), dry_run=True)
    assert len(a) + len(b) == 10 and not set(a) & set(b)


def test_unknown_method_and_bad_shard():
    with pytest.raises(ValueError, match=r"unknown method 'prefix'"):
        sweep.method_spec("prefix")
    with pytest.raises(ValueError, match=r"--shard must look like i/n"):
        sweep._parse_shard("2")
    with pytest.raises(ValueError, match=r"need 0 <= i < n"):
        sweep._parse_shard("3/2")


def test_summary_picks_best_lr_by_mean_and_reports_std(tmp_path):
    scores = {("bitfit", 1e-3): [0.70, 0.74, 0.72], ("bitfit", 1e-4): [0.75, 0.60, 0.62],
              ("full", 2e-5): [0.71, 0.69, 0.70]}
    for (method, lr), vals in scores.items():
        for seed, v in enumerate(vals, 1):
            d = sweep.run_dir(tmp_path, "rte", method, lr, seed)
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(
                {"learning_rate": lr, "best": v, "final": v - 0.01, "metric": "accuracy"}))
    out = sweep.summarize(str(tmp_path))
    cell = out["table"]["bitfit"]["rte"]
    assert cell["best_lr"] == 1e-3  # mean 0.72 beats 0.6567 despite the single 0.75
    assert cell["mean"] == pytest.approx(0.72)
    assert cell["std"] == pytest.approx(statistics.stdev([0.70, 0.74, 0.72]))
    assert cell["cell"] == "72.0±2.0" and cell["paper"] == "72.3±0.9"
    assert "| bitfit | 72.0±2.0 (lr 0.001, n=3) [paper 72.3±0.9] |" in out["markdown"]
    assert (tmp_path / "results.md").exists() and json.loads((tmp_path / "results.json").read_text())


def test_squad_summary_keeps_the_percent_scale(tmp_path):
    """run_squad.py records F1 in percent (official script): the table shows 10.7, not 1067.3."""
    for seed, v in enumerate([10.5, 10.9], 1):
        d = sweep.run_dir(tmp_path, "frac0.01", "bitfit", 1e-3, seed)
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"learning_rate": 1e-3, "best": v, "final": v, "metric": "f1"}))
    out = sweep.summarize(str(tmp_path), runner="squad")
    assert out["table"]["bitfit"]["frac0.01"]["cell"] == "10.7±0.3"
    assert "| bitfit | 10.7±0.3 (lr 0.001, n=2) |" in out["markdown"]


def test_sweep_cli_real_runner_resumes(tiny_model_dir, tmp_path, capsys):
    argv = ["--tasks", "rte", "--methods", "bitfit", "frozen", "--seeds", "1", "--bias_lrs", "1e-3",
            "--output_dir", str(tmp_path), "--", "--data_dir", f"{FIXTURES}/glue",
            "--model_name_or_path", tiny_model_dir, "--num_train_epochs", "1", "--use_cpu", "true"]
    sweep.main(argv)
    first = capsys.readouterr().out
    stamp = (tmp_path / "rte/bitfit/lr0.001/seed1/results.json").stat().st_mtime_ns
    sweep.main(argv)
    assert (tmp_path / "rte/bitfit/lr0.001/seed1/results.json").stat().st_mtime_ns == stamp
    assert "| frozen |" in first and "| bitfit |" in first


def test_bias_change_known_values(tmp_path):
    model = tiny_model("bert")
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".bias")}
    trained["bert.encoder.layer.1.attention.self.query.bias"] += 0.5
    trained["bert.encoder.layer.0.intermediate.dense.bias"][:16] -= 2.0  # half of 32 dims
    change = bias_change(model, trained)
    assert change["q"] == {0: 0.0, 1: pytest.approx(0.5)}
    assert change["m2"] == {0: pytest.approx(1.0), 1: 0.0}
    assert change["k"] == {0: 0.0, 1: 0.0}
    write_csv(change, tmp_path / "c.csv")
    assert (tmp_path / "c.csv").read_text().splitlines()[0] == "term,layer0,layer1"
    plot_heatmap(change, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"hold none of the base model's per-layer biases"):
        bias_change(model, {"x.bias": torch.zeros(1)})


def fake_runner(tmp_path, calls):
    def main(argv):
        calls.append(argv)
        out = tmp_path / argv[argv.index("--output_dir") + 1]
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"learning_rate": float(argv[argv.index("--learning_rate") + 1]),
                                                      "best": 0.5, "metric": "accuracy"}))
    return main


def test_rerun_with_changed_runner_args_never_mixes(tmp_path):
    calls: list = []
    kw = dict(tasks=["rte"], methods=["bitfit"], seeds=[1, 2], bias_lrs=[1e-3], output_dir=str(tmp_path))
    sweep.run_grid(fake_runner(tmp_path, calls), extra_args=["--num_train_epochs", "1"], **kw)
    assert len(calls) == 2
    with pytest.raises(ValueError, match=r"seed1 was trained with other runner arguments \(--num_train_epochs: "
                                         r"\['1'\] -> \['2'\]\); a table mixing them would lie"):
        sweep.run_grid(fake_runner(tmp_path, calls), extra_args=["--num_train_epochs", "2"], **kw)
    assert len(calls) == 2  # nothing trained, nothing mixed
    sweep.run_grid(fake_runner(tmp_path, calls), extra_args=["--num_train_epochs", "1"], **kw)
    assert len(calls) == 2  # same arguments: every cell is done


@pytest.mark.parametrize("flag, grid", [("--seed", "--seeds"), ("--learning_rate", "--bias_lrs/--full_lrs/--lora_lrs"),
                                        ("--mode", "--methods"), ("--output_dir", "--output_dir")])
def test_runner_args_colliding_with_the_grid_are_refused(flag, grid, tmp_path):
    with pytest.raises(ValueError, match=rf"runner argument {flag} after '--' collides with the grid, which sets it "
                                         rf"for every run; use the sweep's {grid} instead"):
        sweep.run_grid(lambda argv: None, tasks=["rte"], methods=["bitfit"], seeds=[1], output_dir=str(tmp_path),
                       extra_args=[flag, "3"])
    with pytest.raises(ValueError, match=r"--train_fraction after '--' collides with the grid's per-task"):
        sweep.check_runner_args(["--train_fraction=0.5"], ["--train_fraction"])


def test_half_written_results_are_run_again_not_skipped(tmp_path):
    calls: list = []
    kw = dict(tasks=["rte"], methods=["bitfit"], seeds=[1], bias_lrs=[1e-3], output_dir=str(tmp_path))
    sweep.run_grid(fake_runner(tmp_path, calls), **kw)
    res = next(tmp_path.glob("*/*/lr*/seed*/results.json"))
    res.write_text('{"learning_rate": 0.001, "be')  # a kill in the middle of a (non-atomic) write
    sweep.run_grid(fake_runner(tmp_path, calls), **kw)
    assert len(calls) == 2 and calls[1][-2:] == ["--overwrite_output_dir", "true"]
    assert json.loads(res.read_text())["best"] == 0.5


@pytest.mark.slow
def test_two_sweeps_at_once_run_each_cell_once(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "bitfit_tasks.sweep", "--tasks", "rte", "mrpc", "--methods", "bitfit", "frozen",
            "--seeds", "1", "--bias_lrs", "1e-3", "--output_dir", str(tmp_path / "grid"), "--", "--data_dir",
            f"{FIXTURES}/glue", "--model_name_or_path", tiny_model_dir, "--num_train_epochs", "1",
            "--disable_tqdm", "true", "--use_cpu", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    ran = [line.split(" run ", 1)[1].split(" --output_dir ")[1].split()[0]
           for _, err in outs for line in err.splitlines() if " INFO bitfit_tasks: run --task_name" in line]
    assert len(ran) == 4 and len(set(ran)) == 4  # 4 cells, each trained by exactly one sweep
    for out, _ in outs:  # both print the full, correct table
        assert "| bitfit |" in out and "| frozen |" in out and "n=1" in out
    table = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert set(table) == {"bitfit", "frozen"} and all(set(v) == {"rte", "mrpc"} for v in table.values())


@pytest.mark.parametrize("runner, extra, grid", [
    ("glue", [], "official"), ("pos", ["--recipe", "auto"], "official"), ("glue", ["--recipe=linear"], "paper"),
    ("glue", ["--recipe", "official"], "official"), ("squad", [], "paper"), ("squad", ["--recipe", "official"], "official"),
    ("glue", ["--rec", "linear"], "paper")])  # an abbreviation, read by the runner's own parser
def test_default_bias_grid_follows_the_runs_recipe(monkeypatch, tmp_path, runner, extra, grid):
    from bitfit_tasks.tasks.recipes import OFFICIAL_BIAS_LRS, PAPER_BIAS_LRS

    seen = {}
    monkeypatch.setattr(sweep, "run_grid", lambda *a, **kw: seen.update(kw))
    fractions = ["--fractions", "0.01"] if runner == "squad" else ["--tasks", "x"]
    sweep.main(["--runner", runner, *fractions, "--methods", "bitfit", "--output_dir", str(tmp_path), "--dry_run",
                "--", *extra])
    assert seen["bias_lrs"] == list(OFFICIAL_BIAS_LRS[runner] if grid == "official" else PAPER_BIAS_LRS)
    assert seen["runner"] == runner


def test_official_grid_leaves_out_the_rates_that_collapsed_glue():
    from bitfit_tasks.tasks.recipes import OFFICIAL_BIAS_LRS

    # MRPC/CoLA collapsed at 3e-3 and MRPC/STS-B at 1e-2 under the constant rate; POS trained at all three.
    assert not {3e-3, 1e-2} & set(OFFICIAL_BIAS_LRS["glue"]) and 1e-3 in OFFICIAL_BIAS_LRS["glue"]
    assert set(OFFICIAL_BIAS_LRS["pos"]) == {1e-3, 3e-3, 1e-2}


def glue_cell_runner(tmp_path, calls, recipe: dict | None = None):
    """A fake run_glue main that writes what the real one records about its recipe."""
    def main(argv):
        calls.append(argv)
        out = tmp_path / argv[argv.index("--output_dir") + 1]
        out.mkdir(parents=True, exist_ok=True)
        rec = recipe or sweep.resolved_recipe("glue", argv)
        (out / "results.json").write_text(json.dumps({"learning_rate": float(argv[argv.index("--learning_rate") + 1]),
                                                      "best": 0.5, "metric": "accuracy", **rec}))
    return main


GLUE_EXTRA = ["--data_dir", f"{FIXTURES}/glue", "--model_name_or_path", "unused"]


def test_resuming_a_grid_under_another_recipe_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls: list = []
    kw = dict(tasks=["rte"], methods=["bitfit"], seeds=[1, 2], bias_lrs=[1e-3], output_dir="grid", runner="glue")
    # A grid started when 'auto' meant the linear recipe (its cells recorded linear) ...
    linear = {"recipe": "linear", "recipe_applied": {"lr_scheduler_type": "linear", "per_device_train_batch_size": 16,
                                                     "num_train_epochs": 3.0}}
    sweep.run_grid(glue_cell_runner(tmp_path, calls, linear), extra_args=GLUE_EXTRA, seeds=[1],
                   **{k: v for k, v in kw.items() if k != "seeds"})
    # ... resumed now that 'auto' resolves to official: refused, naming both, before anything trains.
    with pytest.raises(ValueError, match=r"grid/rte/bitfit/lr0\.001/seed1 was trained under recipe 'linear' \(.*"
                                         r"\), but this grid's arguments now resolve to 'official' \(.*'constant'.*\); "
                                         r"a table mixing them would lie\. Pass --recipe linear after '--'"):
        sweep.run_grid(glue_cell_runner(tmp_path, calls), extra_args=GLUE_EXTRA, **kw)
    assert len(calls) == 1
    # Finishing it as it was started, as the message says, works: the new cell trains, the old one is kept.
    sweep.run_grid(glue_cell_runner(tmp_path, calls), extra_args=[*GLUE_EXTRA, "--recipe", "linear"], **kw)
    assert [a[a.index("--seed") + 1] for a in calls] == ["1", "2"]
    assert json.loads((tmp_path / "grid/rte/bitfit/lr0.001/seed2/results.json").read_text())["recipe"] == "linear"


def test_same_recipe_resolution_skips_finished_cells(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls: list = []
    kw = dict(tasks=["rte"], methods=["bitfit"], seeds=[1, 2], bias_lrs=[1e-3], output_dir="grid", runner="glue",
              extra_args=[*GLUE_EXTRA, "--recipe", "linear"])
    sweep.run_grid(glue_cell_runner(tmp_path, calls), **kw)
    sweep.run_grid(glue_cell_runner(tmp_path, calls), **kw)
    assert len(calls) == 2
    done = json.loads((tmp_path / "grid/rte/bitfit/lr0.001/seed1/results.json").read_text())
    assert done["recipe"] == "linear" and done["recipe_applied"]["lr_scheduler_type"] == "linear"


def test_a_copied_or_moved_sweep_skips_its_finished_cells(tmp_path, monkeypatch):
    """A project folder holding the grid and its data (a relative --data_dir), copied (a backup, another
    disk) and the same command rerun in the copy, or with absolute paths from anywhere, skips every cell."""
    import shutil

    proj = tmp_path / "proj"
    shutil.copytree(f"{FIXTURES}/glue", proj / "data" / "glue")
    monkeypatch.chdir(proj)
    calls: list = []
    extra = ["--data_dir", "data/glue", "--model_name_or_path", "unused", "--max_steps", "2"]
    kw = dict(tasks=["rte"], methods=["bitfit"], seeds=[1, 2], bias_lrs=[1e-3], runner="glue")
    sweep.run_grid(glue_cell_runner(proj, calls), output_dir="S", extra_args=extra, **kw)
    assert len(calls) == 2
    copy = tmp_path / "backup" / "proj"
    shutil.copytree(proj, copy)
    shutil.rmtree(proj)  # the original is gone: only the copy's own data can match
    monkeypatch.chdir(copy)
    sweep.run_grid(glue_cell_runner(copy, calls), output_dir="S", extra_args=extra, **kw)  # the same command
    sweep.run_grid(glue_cell_runner(copy, calls), output_dir=str(copy / "S"), extra_args=extra, **kw)  # absolute
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # another working folder, the copy's data named by an absolute path
    absolute = ["--data_dir", str(copy / "data" / "glue"), *extra[2:]]
    sweep.run_grid(glue_cell_runner(copy, calls), output_dir=str(copy / "S"), extra_args=absolute, **kw)
    assert len(calls) == 2  # every cell finished, nothing trained again
    assert sweep.summarize(str(copy / "S"))["markdown"].count("| bitfit | 50") == 1  # one row of scores
    # A real difference is still refused, naming it.
    with pytest.raises(ValueError, match=r"seed1 was trained with other runner arguments \(--max_steps: \['2'\] -> "
                                         r"\['3'\]\)"):
        sweep.run_grid(glue_cell_runner(copy, calls), output_dir=str(copy / "S"),
                       extra_args=[*absolute[:-1], "3"], **kw)


def test_cell_identity_resolves_inputs_and_drops_locations(tmp_path, monkeypatch):
    from bitfit_tasks.experiments.cells import cell_identity

    monkeypatch.chdir(FIXTURES)
    table = sweep.runner_parser("glue")._option_string_actions
    a = cell_identity(["--task_name", "rte", "--output_dir", "x", "--data_dir", "glue", "--num_train=3",
                       "--report_to", "none", "--logging_steps", "5", "--use_cpu"], table)
    b = cell_identity(["--task_name", "rte", "--output_dir", "/elsewhere/y", "--data_dir", f"{FIXTURES}/glue",
                       "--num_train_epochs", "3.0", "--logging_steps", "50", "--save_total_limit", "1",
                       "--use_cpu", "true"], table)
    # Values as the runner reads them (3 = 3.0, --use_cpu = --use_cpu true); logging and checkpoint
    # housekeeping change no training, so they are not part of it.
    assert a == b == {"task_name": ["rte"], "data_dir": [f"{FIXTURES}/glue"], "num_train_epochs": [3.0],
                      "use_cpu": [True]}
    # A hub id (no such path) stays as given.
    assert cell_identity(["--model_name_or_path", "bert-base-uncased"], table) == {
        "model_name_or_path": ["bert-base-uncased"]}


@pytest.mark.slow
def test_sweep_copied_to_another_folder_reruns_nothing_end_to_end(tiny_model_dir, tmp_path):
    """As a user: a project folder with its data, model and a sweep (one run killed after its checkpoints),
    copied elsewhere and the original deleted; the same command rerun in the copy skips the finished run,
    resumes the killed one from its checkpoint, and prints the same table."""
    import os
    import shutil
    import subprocess
    import sys

    def sweep_cmd(cwd, steps: str = "2") -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "bitfit_tasks.sweep", "--tasks", "rte", "--methods", "bitfit", "--seeds", "1", "2",
                "--bias_lrs", "1e-3", "--output_dir", "S", "--", "--data_dir", "data/glue", "--model_name_or_path",
                "model", "--max_steps", steps, "--save_strategy", "steps", "--save_steps", "1", "--disable_tqdm",
                "true", "--use_cpu", "true"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)

    from pathlib import Path

    proj = tmp_path / "proj"
    shutil.copytree(f"{FIXTURES}/glue", proj / "data" / "glue")
    shutil.copytree(tiny_model_dir, proj / "model")
    first = sweep_cmd(proj)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stderr.count("INFO bitfit_tasks: run --task_name") == 2
    killed = proj / "S/rte/bitfit/lr0.001/seed2"
    (killed / "results.json").unlink()  # as if killed after its last checkpoint
    checkpoints = sorted(p.name for p in killed.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    copy = tmp_path / "backup" / "proj"
    shutil.copytree(proj, copy)
    shutil.rmtree(proj)
    again = sweep_cmd(copy)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("skip finished run") == 1
    resumed = [line for line in again.stderr.splitlines() if "INFO bitfit_tasks: run --task_name" in line]
    assert len(resumed) == 1 and "seed2" in resumed[0] and resumed[0].endswith("--resume_from_checkpoint true")
    res = json.loads((copy / "S/rte/bitfit/lr0.001/seed2/results.json").read_text())
    assert res["resumed_from"].endswith("seed2/checkpoint-2")
    # The score rows (the cost rows' step times are this process's own: a resumed run times only what it ran).
    table = lambda out: [line for line in out.splitlines() if line.startswith("| bitfit |") and "(lr " in line]  # noqa: E731
    assert table(again.stdout) == table(first.stdout) and table(first.stdout)
    refused = sweep_cmd(copy, steps="3")
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert "seed1 was trained with other runner arguments (--max_steps: ['2'] -> ['3'])" in refused.stderr
