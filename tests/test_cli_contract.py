"""The runners' Hugging Face contract as a user meets it: --help, resume, JSON argument files,
offline hub defaults, honest records, prediction files, the trainable-parameter table."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import FIXTURES, tiny_model
from safetensors.torch import load_file

from bitfit_tasks import BitFitConfig, BitFitTrainer
from bitfit_tasks.core.config import BitFitConfig as Cfg
from bitfit_tasks.tasks.arguments import ModelArguments, parse_args
from bitfit_tasks.tasks.checkpoints import last_complete_checkpoint
from bitfit_tasks.tasks.glue.run import GlueArguments
from bitfit_tasks.tasks.glue.run import main as glue_main
from bitfit_tasks.tasks.pos.run import main as pos_main
from bitfit_tasks.tasks.squad.run import main as squad_main
from bitfit_tasks.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = os.path.join(FIXTURES, "glue")
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# Every entry point a user types, with an option its --help must list.
ENTRY_POINTS = {
    "run_glue.py": ([str(ROOT / "run_glue.py")], "--bias_terms"),
    "run_squad.py": ([str(ROOT / "run_squad.py")], "--train_fraction"),
    "run_pos.py": ([str(ROOT / "run_pos.py")], "--treebank"),
    "sweep": (["-m", "bitfit_tasks.sweep"], "--methods"),
    "analysis": (["-m", "bitfit_tasks.analysis"], "--output"),
    "bitfit-delta": (["-m", "bitfit_tasks.serving.cli"], "export"),
    "bitfit-delta info": (["-m", "bitfit_tasks.serving.cli", "info"], "--tensors"),
    "bitfit-delta export": (["-m", "bitfit_tasks.serving.cli", "export"], "--base"),
}


def bitfit_delta_exe() -> str:
    exe = shutil.which("bitfit-delta", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("the bitfit-delta console script is not installed next to this python (pip install -e .)")
    return exe


# Commands a user types, run as subprocesses, all started at once (each pays the transformers
# import): name -> (argv, extra environment).
HUB_OFFLINE = {
    "run_glue.py": (["--task_name", "rte"], "--data_dir"),
    "run_squad.py": (["--train_fraction", "0.1"], "--train_file and --validation_file"),
    "run_pos.py": (["--dataset_name", "batterydata/pos_tagging"], "--treebank"),
}


@pytest.fixture(scope="module")
def user_commands(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cmds: dict[str, tuple[list[str], dict[str, str]]] = {
        f"help {name}": ([sys.executable, *cmd, "--help"], {}) for name, (cmd, _) in ENTRY_POINTS.items()}
    cmds["console help"] = ([bitfit_delta_exe(), "--help"], {})
    cmds["console bad path"] = ([bitfit_delta_exe(), "info", str(tmp / "nope")], {})
    for script, (args, _) in HUB_OFFLINE.items():
        cmds[f"hub {script}"] = ([sys.executable, str(ROOT / script), *args, "--output_dir", str(tmp / script)], {})
    cmds["debug"] = ([sys.executable, str(ROOT / "run_glue.py"), "--task_name", "nope"], {"BITFIT_DEBUG": "1"})
    procs = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**OFFLINE, **env}, cwd=tmp)
             for name, (argv, env) in cmds.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[name] = (p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_help_exits_zero(name, user_commands):
    rc, out, err = user_commands[f"help {name}"]
    assert rc == 0, err[-2000:]
    assert ENTRY_POINTS[name][1] in out
    assert "Traceback" not in err
    if name.startswith("run_"):  # the shared options, resume included, are documented
        assert "--resume_from_checkpoint" in out and "--mode" in out and "--lean" in out
        assert "--overwrite_output_dir" in out


def test_bitfit_delta_console_script_help(user_commands):
    rc, out, _ = user_commands["console help"]
    assert rc == 0 and "info" in out and "export" in out


def test_bitfit_delta_bad_path_is_one_line(user_commands):
    rc, _, err = user_commands["console bad path"]
    assert rc == 1 and "Traceback" not in err
    assert re.fullmatch(r"bitfit-delta: error: delta folder '.*nope' does not exist \(and it is not a Hub id, which "
                        r"looks like user/name\); check the path. .*\n", err)


@pytest.mark.parametrize("script", list(HUB_OFFLINE))
def test_hub_default_offline_is_one_line(script, user_commands):
    rc, _, err = user_commands[f"hub {script}"]
    assert rc == 1
    assert "Traceback" not in err
    errors = [x for x in err.splitlines() if f"{script}: error:" in x]
    assert len(errors) == 1, err[-3000:]
    assert "could not load the hub dataset" in errors[0] and HUB_OFFLINE[script][1] in errors[0]


def test_debug_switch_shows_the_traceback(user_commands):
    rc, _, err = user_commands["debug"]
    assert rc != 0 and "Traceback" in err and "unknown GLUE task 'nope'" in err


# ---- JSON argument files ----------------------------------------------------------------------

def test_json_args_keep_null_dict_list_and_bool_types(tmp_path):
    cfg = {"task_name": "rte", "data_dir": GLUE_DIR, "model_name_or_path": "x", "output_dir": str(tmp_path),
           "bias_terms": ["q", "m2"], "max_eval_samples": None, "lr_scheduler_kwargs": {},
           "optim_args": None, "report_to": [], "train_head": False, "lean": False, "num_train_epochs": 2}
    f = tmp_path / "args.json"
    f.write_text(json.dumps(cfg))
    model, data, bitfit, targs = parse_args((ModelArguments, GlueArguments, Cfg, type_targs()), [str(f)])
    assert bitfit.bias_terms == ["q", "m2"] and bitfit.train_head is False
    assert data.max_eval_samples is None and targs.lr_scheduler_kwargs == {} and targs.optim_args is None
    assert targs.report_to == [] and targs.num_train_epochs == 2
    # Runner defaults apply to a JSON file as to the command line.
    assert targs.per_device_train_batch_size == 16 and str(targs.eval_strategy.value) == "epoch"


def type_targs():
    from transformers import TrainingArguments

    return TrainingArguments


def test_json_args_file_runs_with_null_dict_list_values(tiny_model_dir, tmp_path):
    cfg = {"task_name": "mrpc", "data_dir": GLUE_DIR, "model_name_or_path": tiny_model_dir,
           "output_dir": str(tmp_path / "out"), "bias_terms": ["q", "m2"], "max_eval_samples": None,
           "lr_scheduler_kwargs": {}, "report_to": [], "num_train_epochs": 1, "use_cpu": True,
           "max_seq_length": 32, "learning_rate": 1e-3, "disable_tqdm": True}
    f = tmp_path / "args.json"
    f.write_text(json.dumps(cfg))
    res = glue_main([str(f)])
    assert res["bias_terms"] == ["q", "m2"] and res["learning_rate"] == 1e-3
    assert (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("text, msg", [
    ("{not json", r"argument file '.*args.json' is not valid JSON"),
    ("[1, 2]", r"must hold one JSON object of argument names to values, got a list"),
    ('{"task_name": "rte", "bias_term": ["q"]}', r"unknown argument\(s\) \['bias_term'\]; see --help"),
])
def test_json_args_errors(text, msg, tmp_path):
    f = tmp_path / "args.json"
    f.write_text(text)
    with pytest.raises(ValueError, match=msg):
        parse_args((ModelArguments, GlueArguments, Cfg, type_targs()), [str(f)])


# ---- resume through the runner ---------------------------------------------------------------

def glue_argv(model_dir: str, out: Path, mode: str, *extra: str) -> list[str]:
    return ["--task_name", "mrpc", "--data_dir", GLUE_DIR, "--model_name_or_path", model_dir,
            "--output_dir", str(out), "--num_train_epochs", "3", "--max_seq_length", "32", "--mode", mode,
            "--learning_rate", "1e-2" if mode != "full" else "1e-4", "--per_device_train_batch_size", "4",
            "--save_strategy", "epoch", "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "3", *extra]


@pytest.mark.parametrize("mode", ["bitfit", "full"])
def test_resume_through_runner_equals_uninterrupted_run(mode, tiny_model_dir, tmp_path):
    full_run, resumed = tmp_path / "a", tmp_path / "b"
    with mock.patch.object(sys, "argv", ["run_glue.py", *glue_argv(tiny_model_dir, full_run, mode)]):
        ref = glue_main()
    ckpts = sorted(full_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(ckpts) == 3
    # The "interrupted" run: only what existed after epoch 1 (its checkpoint), then a resume.
    shutil.copytree(ckpts[0], resumed / ckpts[0].name)
    # A newer checkpoint killed mid-save (no trainer_state.json) must be skipped by 'true'.
    (resumed / "checkpoint-999").mkdir()
    (resumed / "checkpoint-999" / "bitfit_delta.json").write_text("")
    (resumed / "checkpoint-1000").mkdir()  # killed while writing its trainer_state.json
    (resumed / "checkpoint-1000" / "trainer_state.json").write_text('{"global_step": 10')
    assert last_complete_checkpoint(str(resumed)) == str(resumed / ckpts[0].name)
    res = glue_main(glue_argv(tiny_model_dir, resumed, mode, "--resume_from_checkpoint", "true"))
    assert res["resumed_from"] == str(resumed / ckpts[0].name)
    a = load_file(str(full_run / "biases_and_head.safetensors"))
    b = load_file(str(resumed / "biases_and_head.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    # The records cover the whole run, not only the resumed part.
    for key in ("optimizer_steps", "epochs", "best", "final"):
        assert res[key] == ref[key], key
    assert len(res["history"]) == len(ref["history"]) == 3
    assert [h["step"] for h in res["history"]] == [h["step"] for h in ref["history"]]
    assert res["train_loss_steps"] == ref["train_loss_steps"] == ref["optimizer_steps"]
    assert abs(res["train_loss"] - ref["train_loss"]) <= 1e-6
    assert len(res["train_loss_history"]) == 3


def test_resume_explicit_checkpoint_dir_and_errors(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    glue_main(glue_argv(tiny_model_dir, out, "bitfit", "--num_train_epochs", "2"))
    first = min(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    res = glue_main(glue_argv(tiny_model_dir, out, "bitfit", "--num_train_epochs", "2",
                              "--resume_from_checkpoint", str(first)))
    assert res["resumed_from"] == str(first) and res["epochs"] == 2.0
    with pytest.raises(UsageError, match=r"--resume_from_checkpoint true: no complete checkpoint-\* folder in "
                                         r"--output_dir '.*empty'; train with --save_strategy epoch"):
        glue_main(glue_argv(tiny_model_dir, tmp_path / "empty", "bitfit", "--resume_from_checkpoint", "true"))
    with pytest.raises(UsageError, match=r"--resume_from_checkpoint '.*nowhere' is not a folder"):
        glue_main(glue_argv(tiny_model_dir, out, "bitfit", "--resume_from_checkpoint", str(tmp_path / "nowhere")))
    with pytest.raises(UsageError, match=r"has no trainer_state.json, so it is not a complete Trainer checkpoint"):
        glue_main(glue_argv(tiny_model_dir, out, "bitfit", "--resume_from_checkpoint", str(tmp_path)))


# ---- honest records and prediction files -----------------------------------------------------

def test_records_say_what_was_trained_and_glue_writes_predictions(tiny_model_dir, tmp_path):
    res = glue_main(["--task_name", "mrpc", "--data_dir", GLUE_DIR, "--model_name_or_path", tiny_model_dir,
                     "--output_dir", str(tmp_path), "--max_steps", "2", "--num_train_epochs", "3",
                     "--max_seq_length", "32", "--mode", "full", "--use_cpu", "true", "--disable_tqdm", "true",
                     "--per_device_train_batch_size", "4"])
    assert res["optimizer_steps"] == 2 and res["num_train_epochs"] == 3.0 and res["max_steps"] == 2
    assert 0 < res["epochs"] < 1  # max_steps stopped it early: the record says so
    assert res["bias_terms"] is None  # full fine-tuning trains no bias subset
    assert res["eval_examples"] == {"validation": res["final_metrics"]["eval_n_examples"]}
    lines = [json.loads(x) for x in (tmp_path / "predictions_validation.jsonl").read_text().splitlines()]
    dev = [json.loads(x) for x in Path(GLUE_DIR, "mrpc", "validation.jsonl").read_text().splitlines()]
    assert len(lines) == len(dev) and [x["idx"] for x in lines] == [r["idx"] for r in dev]
    names = {0: "not_equivalent", 1: "equivalent"}
    assert [x["label"] for x in lines] == [names[r["label"]] for r in dev]
    assert {x["prediction"] for x in lines} <= set(names.values())
    # The file's predictions score to the recorded accuracy of the model as saved.
    acc = sum(x["label"] == x["prediction"] for x in lines) / len(lines)
    assert acc == pytest.approx(res["saved_metrics"]["eval_accuracy"])


def test_stsb_predictions_are_scores(tiny_model_dir, tmp_path):
    glue_main(["--task_name", "stsb", "--data_dir", GLUE_DIR, "--model_name_or_path", tiny_model_dir,
               "--output_dir", str(tmp_path), "--num_train_epochs", "1", "--use_cpu", "true",
               "--ignore_mismatched_sizes", "true", "--disable_tqdm", "true"])
    row = json.loads((tmp_path / "predictions_validation.jsonl").read_text().splitlines()[0])
    assert isinstance(row["label"], float) and isinstance(row["prediction"], float)


def test_pos_writes_word_predictions_for_validation_and_test(tiny_model_dir, tmp_path):
    res = pos_main(["--treebank", f"{FIXTURES}/pos/treebank", "--model_name_or_path", tiny_model_dir,
                    "--output_dir", str(tmp_path), "--num_train_epochs", "1", "--use_cpu", "true",
                    "--ignore_mismatched_sizes", "true", "--disable_tqdm", "true", "--unknown_tags", "count_wrong"])
    for split in ("validation", "test"):
        rows = [json.loads(x) for x in (tmp_path / f"predictions_{split}.jsonl").read_text().splitlines()]
        assert rows and all(len(r["tokens"]) == len(r["gold"]) == len(r["predicted"]) for r in rows)
    rows = [json.loads(x) for x in (tmp_path / "predictions_test.jsonl").read_text().splitlines()]
    words = sum(len(r["tokens"]) for r in rows)
    right = sum(g == p for r in rows for g, p in zip(r["gold"], r["predicted"], strict=True))
    assert res["test_n_words"] == words and res["test_accuracy"] == pytest.approx(right / words)
    assert res["bias_terms"] == ["bitfit"] and res["optimizer_steps"] > 0


def test_squad_records_em_and_f1_and_prints_both(tiny_model_dir, tmp_path, capsys):
    sq = f"{FIXTURES}/squad"
    res = squad_main(["--train_file", f"{sq}/official.json", "--validation_file", f"{sq}/flat.jsonl",
                      "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path),
                      "--max_seq_length", "40", "--doc_stride", "16", "--num_train_epochs", "1",
                      "--use_cpu", "true", "--disable_tqdm", "true"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["exact_match"] == res["saved_metrics"]["eval_exact_match"]
    assert saved["f1"] == res["saved_metrics"]["eval_f1"] == saved["final"]  # one evaluation: saved = last
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("squad (bitfit)")][0]
    assert re.search(r"exact_match \d+\.\d{4}, f1 \d+\.\d{4}, n_examples 5", line)


def test_squad_keeps_the_best_evaluation_and_rewrites_its_predictions(tiny_model_dir, tmp_path, monkeypatch):
    """With an evaluation per epoch and the first one best (scripted), the saved model, the top-level
    EM/F1 and predictions.json are the first evaluation's: predictions.json is written again from the
    restored model after training."""
    import bitfit_tasks.tasks.squad.qa as S

    real, calls = S.squad_metrics, []

    def scripted(preds, golds):
        out = real(preds, golds)
        calls.append(json.dumps(preds, sort_keys=True))
        if len(calls) <= 2:  # the two epoch evaluations
            out = {**out, "f1": [90.0, 50.0][len(calls) - 1], "exact_match": [80.0, 40.0][len(calls) - 1]}
        return out

    monkeypatch.setattr(S, "squad_metrics", scripted)
    sq = f"{FIXTURES}/squad"
    res = squad_main(["--train_file", f"{sq}/official.json", "--validation_file", f"{sq}/flat.jsonl",
                      "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), "--max_seq_length", "40",
                      "--doc_stride", "16", "--num_train_epochs", "2", "--eval_strategy", "epoch",
                      "--learning_rate", "5e-2", "--use_cpu", "true", "--disable_tqdm", "true"])
    assert (res["best"], res["final"], res["saved"]) == (90.0, 50.0, "best")
    assert res["saved_step"] == res["history"][0]["step"] and (res["f1"], res["exact_match"]) == (90.0, 80.0)
    assert len(calls) == 3  # two evaluations, then the saved (first) model scored again for predictions.json
    written = json.dumps(json.loads((tmp_path / "predictions.json").read_text()), sort_keys=True)
    assert written == calls[2] == calls[0]  # the restored model predicts what the first evaluation did


# ---- optional dependencies -------------------------------------------------------------------

def test_squad_sweep_checks_matplotlib_before_training(tmp_path, capsys):
    from bitfit_tasks.experiments import sweep

    ran = []
    with mock.patch.dict(sys.modules, {"matplotlib": None}), \
            mock.patch("bitfit_tasks.experiments.sweep.run_grid", side_effect=lambda *a, **k: ran.append(1)):
        with pytest.raises(SystemExit) as exc:
            sweep.main(["--runner", "squad", "--fractions", "0.01", "--output_dir", str(tmp_path)])
    assert exc.value.code == 2 and not ran
    assert "pip install 'bitfit-tasks[plot]'" in capsys.readouterr().err


# ---- the trainable-parameter table -----------------------------------------------------------

def test_trainable_table_logged_on_the_main_process_and_printed_on_request(tmp_path, capsys, caplog):
    """Before: every construction printed the table to stdout, on every process."""
    import logging

    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with caplog.at_level(logging.INFO, logger="bitfit_tasks"):
        trainer = BitFitTrainer(model=tiny_model("bert"), bitfit_config=BitFitConfig(bias_terms=["qm2"]), args=args)
    assert capsys.readouterr().out == ""
    logged = [r.getMessage() for r in caplog.records if "trainable params:" in r.getMessage()]
    assert len(logged) == 1 and logged[0] == trainer.trainable_table()
    n = trainer.bitfit_state.n_trainable
    table = trainer.trainable_table()
    assert re.search(rf"trainable params: {n:,d} \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{{4}}", table)
    assert re.search(r"^\s+q: [\d,]+ \(", table, re.M) and re.search(r"^\s+head: [\d,]+ \(", table, re.M)
    trainer.print_trainable_parameters()
    assert capsys.readouterr().out == table + "\n"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bitfit_tasks"), \
            mock.patch.object(TrainingArguments, "process_index", new_callable=mock.PropertyMock, return_value=1):
        BitFitTrainer(model=tiny_model("bert"), bitfit_config=BitFitConfig(bias_terms=["qm2"]), args=args)
    assert "trainable params:" not in caplog.text and capsys.readouterr().out == ""
    assert sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) == n
    assert isinstance(trainer.model.bert.encoder.layer[0].attention.self.query.bias, torch.nn.Parameter)



def test_no_pinned_memory_without_an_accelerator_unless_asked(tiny_model_dir, tmp_path):
    """Trainer pins dataloader memory by default; on a machine without an accelerator torch then warns once per
    dataloader. The runners ask for none there, a user's explicit flag still wins, and a CPU run prints no such
    warning."""
    from transformers import TrainingArguments

    from bitfit_tasks.tasks.arguments import RunArguments, accelerator_present

    types = (ModelArguments, GlueArguments, Cfg, RunArguments, TrainingArguments)
    base = ["--output_dir", str(tmp_path / "x")]
    assert parse_args(types, base)[-1].dataloader_pin_memory is accelerator_present()
    assert parse_args(types, [*base, "--dataloader_pin_memory", "true"])[-1].dataloader_pin_memory is True
    if accelerator_present():
        return
    proc = subprocess.run([sys.executable, str(ROOT / "run_glue.py"), "--task_name", "rte", "--data_dir", GLUE_DIR,
                           "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "run"),
                           "--max_seq_length", "32", "--num_train_epochs", "1", "--train_eval_samples", "0"],
                          capture_output=True, text=True, env=OFFLINE, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pin_memory" not in proc.stderr and "pin_memory" not in proc.stdout
    # What the run writes is as readable as any file the user makes (safetensors and tempfile make theirs 0600).
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("results.json", "bitfit_delta.safetensors", "bitfit_delta.json", "biases_and_head.safetensors",
                 "README.md", "predictions_validation.jsonl"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
