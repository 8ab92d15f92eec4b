"""One mechanism decides the saved model, and a kill anywhere in a checkpoint save loses nothing:

* with ``--load_best_model_at_end`` the user's ``--metric_for_best_model`` and direction decide which
  evaluation is saved (the best-epoch keeper follows them, so it never undoes what Trainer loaded);
* with ``--save_total_limit 1`` a SIGKILL after Trainer wrote ``trainer_state.json`` and deleted the
  older checkpoint, before the ``on_save`` callbacks, leaves a checkpoint that resumes to the same model.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from test_best_epoch import SCRIPT_END, SCRIPT_START, STEPS_PER_EPOCH, glue_args
from test_best_epoch import run_scripted as run_best_epoch_script

from bitfit_tasks.training.best import BEST_FILE, BestEpochKeeper, keeper_rule
from bitfit_tasks.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]

# run_glue.py with the dev F1 and accuracy of epoch e forced to F1[e] / ACC[e] (their best epochs differ
# by construction), and with KILL_AT_STEP set, a SIGKILL when that step's checkpoint is complete and the
# older ones rotated away, just before the on_save callbacks run.
SCRIPTED = SCRIPT_START + """
F1 = {{1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.8}}
ACC = {{1: 0.5, 2: 0.6, 3: 0.7, 4: 0.95, 5: 0.8}}
def scripted_metrics(task, predictions, labels):
    out = metrics(task, predictions, labels)
    if "epoch" in now:
        out["f1"], out["accuracy"] = F1[now["epoch"]], ACC[now["epoch"]]
    return out
G.compute_glue_metrics = scripted_metrics
on_save = TC.CallbackHandler.on_save
def killing(self, args, state, control):
    if state.global_step == int(os.environ.get("KILL_AT_STEP", "-1")):
        os.kill(os.getpid(), signal.SIGKILL)
    return on_save(self, args, state, control)
TC.CallbackHandler.on_save = killing
""" + SCRIPT_END


def run_scripted(tmp_path: Path, args: list[str], **env) -> subprocess.CompletedProcess:
    return run_best_epoch_script(tmp_path, args, script_text=SCRIPTED, OMP_NUM_THREADS="1", **env)


def delta(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "bitfit_delta.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_load_best_model_at_end_metric_decides_the_saved_model(tiny_model_dir, tmp_path):
    """The keeper follows --metric_for_best_model accuracy (best at epoch 4), not the task's F1 (epoch 2):
    the saved delta is the checkpoint Trainer loaded as best, and the record says which metric chose it."""
    out = tmp_path / "acc"
    done = run_scripted(tmp_path, glue_args(tiny_model_dir, out, "--load_best_model_at_end", "true",
                                            "--metric_for_best_model", "accuracy"))
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    acc_step = 4 * STEPS_PER_EPOCH
    state = json.loads((out / f"checkpoint-{5 * STEPS_PER_EPOCH}" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{acc_step}")  # what Trainer loaded
    assert (res["best"], res["best_epoch"]) == (0.9, 2.0)  # the headline's task metric, unchanged
    assert max_diff(delta(out), delta(out / f"checkpoint-{acc_step}")) == 0.0
    assert (res["saved"], res["saved_step"], res["saved_by"]) == ("best", acc_step, "eval_accuracy")
    assert res["saved_metrics"]["eval_accuracy"] == 0.95
    head = load_file(str(out / "biases_and_head.safetensors"))
    assert max(float((head[k] - v).abs().max()) for k, v in delta(out / f"checkpoint-{acc_step}").items()) == 0.0


@pytest.mark.slow
def test_kill_inside_the_save_window_with_save_total_limit_1_resumes(tiny_model_dir, tmp_path):
    """SIGKILL at epoch 3's checkpoint after trainer_state.json and the rotation (epoch 2's checkpoint,
    which held the best, is gone) and before on_save: the resumed run saves epoch 2's model all the same."""
    ref = tmp_path / "uninterrupted"
    done = run_scripted(tmp_path, glue_args(tiny_model_dir, ref, "--save_total_limit", "1"))
    assert done.returncode == 0, done.stderr[-3000:]
    want = json.loads((ref / "results.json").read_text())
    assert (want["saved"], want["saved_step"]) == ("best", 2 * STEPS_PER_EPOCH)

    out = tmp_path / "killed"
    kill_at = 3 * STEPS_PER_EPOCH
    killed = run_scripted(tmp_path, glue_args(tiny_model_dir, out, "--save_total_limit", "1"), KILL_AT_STEP=str(kill_at))
    assert killed.returncode == -9, killed.stderr[-3000:]
    # The window: the only checkpoint left is the complete epoch-3 one; the best epoch's checkpoint is gone.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{kill_at}"]
    assert (out / f"checkpoint-{kill_at}" / "trainer_state.json").is_file()
    resumed = run_scripted(tmp_path, glue_args(tiny_model_dir, out, "--save_total_limit", "1",
                                               "--resume_from_checkpoint", "true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["resumed_from"] == str(out / f"checkpoint-{kill_at}")
    assert (res["best"], res["saved"], res["saved_step"]) == (0.9, "best", 2 * STEPS_PER_EPOCH)
    assert max_diff(delta(out), delta(ref)) <= 1e-6


def fake_trainer():
    model = tiny_model("bert")
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias") or n.startswith("classifier"))
    return SimpleNamespace(model=model)


def test_keeper_follows_a_lower_is_better_metric():
    tr = fake_trainer()
    keeper = BestEpochKeeper(tr, "eval_loss", greater_is_better=False)
    bias = dict(tr.model.named_parameters())["classifier.bias"]
    seen = {}
    for step, loss in [(1, 0.7), (2, 0.4), (3, 0.4), (4, 0.9)]:
        with torch.no_grad():
            bias.add_(1.0)
        seen[step] = bias.detach().clone()
        keeper.on_evaluate(None, SimpleNamespace(global_step=step, epoch=float(step)), None,
                           metrics={"eval_loss": loss, "eval_f1": 1.0 - loss})
    assert (keeper.step, keeper.score) == (2, 0.4)  # the lowest loss, the first of equal ones
    assert keeper.restore() and torch.equal(bias, seen[2])


@pytest.mark.parametrize("load_best, metric, greater, want", [
    (False, "f1", None, ("eval_f1", True)),  # no load_best_model_at_end: the task's metric, higher is better
    (True, "loss", False, ("eval_loss", False)),  # Trainer's default when load_best_model_at_end is set
    (True, "eval_accuracy", True, ("eval_accuracy", True)),
    (True, "f1", False, ("eval_f1", False)),  # the user's direction rules, whatever the name says
])
def test_keeper_rule_is_the_users_when_load_best_model_at_end(load_best, metric, greater, want):
    args = SimpleNamespace(load_best_model_at_end=load_best, metric_for_best_model=metric, greater_is_better=greater)
    assert keeper_rule(args, "eval_f1") == want


def test_a_best_copy_kept_by_another_metric_is_refused(tmp_path):
    from safetensors.torch import save_file

    tr = fake_trainer()
    ckpt = tmp_path / "checkpoint-6"
    ckpt.mkdir()
    names = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    save_file({n: torch.zeros(dict(tr.model.named_parameters())[n].shape) for n in names}, str(ckpt / BEST_FILE),
              metadata={"metric": "eval_f1", "score": "0.5", "step": "6", "epoch": "1.0"})
    with pytest.raises(UsageError, match=r"checkpoint-6/bitfit_best.safetensors holds the best evaluation by "
                                         r"eval_f1 \(higher is better\), but this run keeps the best by eval_loss "
                                         r"\(lower is better\); resume with the run's --metric_for_best_model"):
        BestEpochKeeper(tr, "eval_loss", greater_is_better=False).load(str(ckpt))
    BestEpochKeeper(tr, "eval_f1").load(str(ckpt))  # the same rule: accepted


@pytest.mark.slow
def test_full_fine_tuning_checkpoints_hold_the_model_and_the_best_copy(tiny_model_dir, tmp_path):
    """The copy goes in before Trainer's save_pretrained, which must leave it there."""
    from bitfit_tasks.tasks.glue.run import main

    out = tmp_path / "full"
    main(glue_args(tiny_model_dir, out, "--mode", "full", "--num_train_epochs", "2", "--learning_rate", "1e-4"))
    for step in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH):
        folder = out / f"checkpoint-{step}"
        assert (folder / "model.safetensors").is_file() and (folder / "trainer_state.json").is_file()
        kept = load_file(str(folder / BEST_FILE))
        assert len(kept) == len(load_file(str(folder / "model.safetensors")))  # every parameter is trainable


def test_a_checkpoint_without_the_copy_whose_own_evaluation_is_best_resumes_from_its_model(tmp_path):
    """Written by a version that saved the copy after Trainer's files and killed in between: when the
    checkpoint's own step is the best evaluation, its model is the best, so resume takes the copy from it."""
    tr = fake_trainer()
    ckpt = tmp_path / "checkpoint-12"
    ckpt.mkdir()
    history = [{"eval_loss": 0.6, "eval_f1": 0.5, "step": 6, "epoch": 1.0},
               {"eval_loss": 0.7, "eval_f1": 0.9, "step": 12, "epoch": 2.0}]
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 12, "log_history": history}))
    keeper = BestEpochKeeper(tr, "eval_f1")
    keeper.load(str(ckpt))
    assert (keeper.score, keeper.step, keeper.epoch) == (0.9, 12, 2.0)
    keeper.on_train_begin(None, None, None)  # Trainer has loaded the checkpoint into the model by now
    at_resume = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(1.0)  # later epochs, none better
    assert keeper.restore()
    assert all(torch.equal(p, at_resume[n]) for n, p in tr.model.named_parameters() if p.requires_grad)
    # Its best by loss (lower is better) is step 6, whose tensors it does not hold: refused.
    with pytest.raises(UsageError, match=r"checkpoint-12 has scored evaluations but no bitfit_best.safetensors"):
        BestEpochKeeper(tr, "eval_loss", greater_is_better=False).load(str(ckpt))
