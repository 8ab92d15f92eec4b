"""The model a run saves is the one its headline scores: the best evaluation's tensors are kept in
memory (and in each checkpoint), put back at the end, and saved, with or without a kill + resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FIXTURES, tiny_model
from safetensors.torch import load_file

from bitfit_tasks.training.best import BEST_FILE, BestEpochKeeper
from bitfit_tasks.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]

# run_glue.py with the dev F1 of epoch e forced to SCORES[e] (so best != last by construction) and,
# with KILL_AT_STEP set, a SIGKILL in the middle of that step's checkpoint save (after the delta,
# before trainer_state.json), as in test_faults.py.
# The start of every scripted run_glue.py: the epoch of the running evaluation in now["epoch"] and the
# metric function to wrap (each script then forces that epoch's scores); SCRIPT_END runs the runner.
SCRIPT_START = """
import os, signal, sys
sys.path.insert(0, {root!r})
import transformers.trainer_callback as TC
import bitfit_tasks.tasks.glue.run as G
from bitfit_tasks.training.trainer import BitFitTrainer
now = {{}}
evaluate = BitFitTrainer.evaluate
def scripted_evaluate(self, *a, **k):
    now["epoch"] = round(self.state.epoch or 0)
    try:
        return evaluate(self, *a, **k)
    finally:
        now.clear()
BitFitTrainer.evaluate = scripted_evaluate
metrics = G.compute_glue_metrics
"""
SCRIPT_END = """
from bitfit_tasks.utils.launch import run_cli
run_cli(G.main)
"""
SCRIPTED = SCRIPT_START + """
SCORES = {{1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.8}}
def scripted_metrics(task, predictions, labels):
    out = metrics(task, predictions, labels)
    if "epoch" in now:
        out["f1"] = SCORES[now["epoch"]]
    return out
G.compute_glue_metrics = scripted_metrics
save_rng = BitFitTrainer._save_rng_state
def killing(self, output_dir):
    if self.state.global_step == int(os.environ.get("KILL_AT_STEP", "-1")):
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng(self, output_dir)
BitFitTrainer._save_rng_state = killing
""" + SCRIPT_END
STEPS_PER_EPOCH = 6  # 24 MRPC fixture rows, batch 4


def glue_args(model_dir: str, out: Path, *extra: str) -> list[str]:
    return ["--task_name", "mrpc", "--data_dir", f"{FIXTURES}/glue", "--model_name_or_path", model_dir,
            "--output_dir", str(out), "--num_train_epochs", "5", "--max_seq_length", "32", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "4", "--save_strategy", "epoch", "--use_cpu", "true",
            "--disable_tqdm", "true", "--seed", "5", "--train_eval_samples", "0", *extra]


def run_scripted(tmp_path: Path, args: list[str], script_text: str = SCRIPTED, **env) -> subprocess.CompletedProcess:
    script = tmp_path / "scripted.py"
    script.write_text(script_text.format(root=str(ROOT)))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env})


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def delta(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "bitfit_delta.safetensors"))


@pytest.mark.slow
def test_saved_model_is_the_best_epoch_with_and_without_kill_and_resume(tiny_model_dir, tmp_path):
    ref = tmp_path / "uninterrupted"
    done = run_scripted(tmp_path, glue_args(tiny_model_dir, ref))
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((ref / "results.json").read_text())
    best_step = 2 * STEPS_PER_EPOCH
    assert (res["best"], res["best_epoch"], res["final"]) == (0.9, 2.0, 0.8)
    assert (res["saved"], res["saved_epoch"], res["saved_step"]) == ("best", 2.0, best_step)
    assert res["saved_metrics"]["eval_f1"] == res["best_metrics"]["eval_f1"] == 0.9
    assert res["final_metrics"]["eval_f1"] == 0.8
    assert "saved: best (epoch 2.0)" in done.stdout
    # The saved delta and biases_and_head are the epoch-2 tensors, not the last epoch's.
    at_best, at_last = delta(ref / f"checkpoint-{best_step}"), delta(ref / f"checkpoint-{5 * STEPS_PER_EPOCH}")
    assert max_diff(delta(ref), at_best) == 0.0
    assert max_diff(delta(ref), at_last) > 1e-4
    head = load_file(str(ref / "biases_and_head.safetensors"))
    assert max(float((head[k] - at_best[k]).abs().max()) for k in at_best) == 0.0
    # Every checkpoint carries the best copy so far (epoch 1's until epoch 2 beats it).
    kept = load_file(str(ref / f"checkpoint-{4 * STEPS_PER_EPOCH}" / BEST_FILE))
    assert max(float((kept[k] - at_best[k]).abs().max()) for k in kept) == 0.0
    # The delta's model card describes the saved (best) evaluation.
    assert "eval_f1 0.9" in (ref / "README.md").read_text()

    # Killed mid-save of epoch 4's checkpoint, resumed from epoch 3's: the best (epoch 2) was only in
    # the checkpoint's copy, and epochs 4-5 score below it; the saved model is still epoch 2's.
    out = tmp_path / "killed"
    killed = run_scripted(tmp_path, glue_args(tiny_model_dir, out), KILL_AT_STEP=str(4 * STEPS_PER_EPOCH))
    assert killed.returncode == -9
    resumed = run_scripted(tmp_path, glue_args(tiny_model_dir, out, "--resume_from_checkpoint", "true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert again["resumed_from"] == str(out / f"checkpoint-{3 * STEPS_PER_EPOCH}")
    assert (again["best"], again["saved"], again["saved_step"]) == (0.9, "best", best_step)
    assert max_diff(delta(out), at_best) <= 1e-6
    assert (out / "predictions_validation.jsonl").read_text() == (ref / "predictions_validation.jsonl").read_text()


@pytest.mark.slow
def test_keep_last_saves_the_last_epoch(tiny_model_dir, tmp_path):
    out = tmp_path / "last"
    done = run_scripted(tmp_path, glue_args(tiny_model_dir, out, "--keep", "last"))
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert (res["best"], res["saved"], res["saved_step"]) == (0.9, "last", 5 * STEPS_PER_EPOCH)
    assert max_diff(delta(out), delta(out / f"checkpoint-{5 * STEPS_PER_EPOCH}")) == 0.0
    assert not (out / f"checkpoint-{5 * STEPS_PER_EPOCH}" / BEST_FILE).exists()


def test_keep_last_with_load_best_model_at_end_is_refused(tiny_model_dir, tmp_path):
    from bitfit_tasks.tasks.glue.run import main

    with pytest.raises(ValueError, match=r"--keep last contradicts --load_best_model_at_end true"):
        main(glue_args(tiny_model_dir, tmp_path / "x", "--keep", "last", "--load_best_model_at_end", "true",
                       "--eval_strategy", "epoch", "--metric_for_best_model", "f1"))


def fake_trainer():
    model = tiny_model("bert")
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias") or n.startswith("classifier"))
    return SimpleNamespace(model=model)


def state(step: int, epoch: float):
    return SimpleNamespace(global_step=step, epoch=epoch)


def test_keeper_keeps_the_first_best_and_restores_it():
    tr = fake_trainer()
    keeper = BestEpochKeeper(tr, "eval_f1")
    params = dict(tr.model.named_parameters())
    snapshots = {}
    for step, score in [(1, 0.5), (2, 0.9), (3, 0.9), (4, float("nan")), (5, 0.7)]:
        with torch.no_grad():
            params["classifier.bias"].add_(1.0)
            params["bert.encoder.layer.0.attention.self.query.bias"].add_(0.5)
        snapshots[step] = {n: p.detach().clone() for n, p in params.items()}
        keeper.on_evaluate(None, state(step, float(step)), None, metrics={"eval_f1": score, "eval_loss": 1.0})
        keeper.on_evaluate(None, state(step, float(step)), None, metrics={"eval_mm_accuracy": 0.1})  # other set
    assert (keeper.step, keeper.epoch, keeper.score) == (2, 2.0, 0.9)  # ties keep the first, NaN never wins
    assert keeper.restore()
    assert all(torch.equal(p, snapshots[2][n]) for n, p in tr.model.named_parameters())
    # Only trainable tensors are copied (the frozen ones never change).
    assert set(keeper.tensors) == {n for n, p in params.items() if p.requires_grad}


def test_keeper_without_an_evaluation_restores_nothing():
    keeper = BestEpochKeeper(fake_trainer(), "eval_f1")
    assert not keeper.restore()


def test_checkpoint_with_scores_but_no_best_copy_is_refused(tmp_path):
    ckpt = tmp_path / "checkpoint-6"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": [{"eval_f1": 0.5, "step": 6}]}))
    with pytest.raises(UsageError, match=r"checkpoint .*checkpoint-6 has scored evaluations but no "
                                         r"bitfit_best.safetensors.*pass --keep last"):
        BestEpochKeeper(fake_trainer(), "eval_f1").load(str(ckpt))
    # A checkpoint written before any evaluation needs no copy.
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 0.7, "step": 6}]}))
    keeper = BestEpochKeeper(fake_trainer(), "eval_f1")
    keeper.load(str(ckpt))
    assert keeper.score is None


def test_best_copy_of_another_selection_is_refused(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoint-6"
    ckpt.mkdir()
    save_file({"classifier.bias": torch.zeros(2)}, str(ckpt / BEST_FILE),
              metadata={"metric": "eval_f1", "score": "0.5", "step": "6", "epoch": "1.0"})
    with pytest.raises(UsageError, match=r"lacks trainable tensor\(s\) .* other --mode/--bias_terms"):
        BestEpochKeeper(fake_trainer(), "eval_f1").load(str(ckpt))
