"""Kills and crashes lose nothing: a run SIGKILLed in the middle of a checkpoint save resumes from
the last complete checkpoint to the same final parameters as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES
from safetensors.torch import load_file

from bitfit_tasks.tasks.checkpoints import last_complete_checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# run_glue.py, except that the checkpoint save at step KILL_AT_STEP SIGKILLs the process after the
# delta and the optimizer state are written and before trainer_state.json: a kill mid-save.
KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from bitfit_tasks.training.trainer import BitFitTrainer
original = BitFitTrainer._save_rng_state
def killing(self, output_dir):
    if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, output_dir)
BitFitTrainer._save_rng_state = killing
from bitfit_tasks.utils.launch import run_cli
from bitfit_tasks.tasks.glue.run import main
run_cli(main)
"""


def glue(model_dir: str, out: Path, *extra: str) -> list[str]:
    return ["--task_name", "mrpc", "--data_dir", f"{FIXTURES}/glue", "--model_name_or_path", model_dir,
            "--output_dir", str(out), "--num_train_epochs", "3", "--max_seq_length", "32", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "4", "--save_strategy", "epoch", "--use_cpu", "true",
            "--disable_tqdm", "true", "--seed", "5", *extra]


def run(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env})


def test_sigkill_during_checkpoint_save_then_resume(tiny_model_dir, tmp_path):
    ref_dir, out = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = run([str(ROOT / "run_glue.py"), *glue(tiny_model_dir, ref_dir)])
    assert ref.returncode == 0, ref.stderr[-3000:]
    steps = sorted(int(p.name.split("-")[1]) for p in ref_dir.glob("checkpoint-*"))
    assert len(steps) == 3
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(root=str(ROOT)))
    killed = run([str(killer), *glue(tiny_model_dir, out)], KILL_AT_STEP=str(steps[1]))
    assert killed.returncode == -9  # SIGKILL, mid-save of the epoch-2 checkpoint
    half = out / f"checkpoint-{steps[1]}"
    assert (half / "bitfit_delta.safetensors").exists() and not (half / "trainer_state.json").exists()
    assert not (out / "results.json").exists()
    assert last_complete_checkpoint(str(out)) == str(out / f"checkpoint-{steps[0]}")
    # Rerunning without saying what to do is refused (the folder holds an unfinished run) ...
    from bitfit_tasks.tasks.glue.run import main as glue_main

    with pytest.raises(ValueError, match=r"holds checkpoints of an unfinished run \(checkpoint-"):
        glue_main(glue(tiny_model_dir, out))
    # ... and resuming picks the last complete checkpoint, not the half-written one.
    resumed = run([str(ROOT / "run_glue.py"), *glue(tiny_model_dir, out, "--resume_from_checkpoint", "true")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["resumed_from"] == str(out / f"checkpoint-{steps[0]}")
    want = json.loads((ref_dir / "results.json").read_text())
    assert res["optimizer_steps"] == want["optimizer_steps"] and res["best"] == want["best"]
    a = load_file(str(ref_dir / "biases_and_head.safetensors"))
    b = load_file(str(out / "biases_and_head.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    a, b = (load_file(str(d / "bitfit_delta.safetensors")) for d in (ref_dir, out))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_two_runners_into_one_folder_second_is_refused(tiny_model_dir, tmp_path):
    """While one run holds --output_dir, a second one is refused at once instead of interleaving."""
    from filelock import FileLock

    from bitfit_tasks.utils.output_dir import LOCK_NAME, OWNER_NAME

    out = tmp_path / "shared"
    out.mkdir()
    with FileLock(str(out / LOCK_NAME)):  # what a running runner holds
        (out / OWNER_NAME).write_text("pid 4242")
        second = run([str(ROOT / "run_glue.py"), *glue(tiny_model_dir, out)])
    assert second.returncode == 1
    assert "run_glue.py: error: another run (pid 4242) is writing to --output_dir" in second.stderr
    assert "Traceback" not in second.stderr and not (out / "results.json").exists()


def test_a_refused_run_releases_its_folder(tiny_model_dir, tmp_path):
    """A run refused (or failing) before training leaves no lock behind in a long-lived process."""
    from filelock import FileLock

    from bitfit_tasks.tasks.glue.run import main as glue_main
    from bitfit_tasks.utils.output_dir import LOCK_NAME

    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds checkpoints of an unfinished run"):
        glue_main(glue(tiny_model_dir, out))
    lock = FileLock(str(out / LOCK_NAME))
    lock.acquire(timeout=0)  # raises Timeout if still held
    lock.release()


def test_the_refusal_names_the_newest_checkpoint_by_step(tiny_model_dir, tmp_path):
    """checkpoint-150 is newer than checkpoint-50, though it sorts before it as a name."""
    from bitfit_tasks.tasks.glue.run import main as glue_main

    out = tmp_path / "run"
    for step in (50, 100, 150):
        (out / f"checkpoint-{step}").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds checkpoints of an unfinished run \(checkpoint-150\)"):
        glue_main(glue(tiny_model_dir, out))
