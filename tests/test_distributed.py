"""Two gloo processes on CPU through `accelerate launch --multi_gpu --num_processes 2` (and torchrun)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


# What `accelerate config` writes for "multi-GPU, 2 processes". (A MULTI_CPU config with
# use_cpu: true makes accelerate start a single process unless mpirun is set up.)
ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
main_process_port: 29535
mixed_precision: 'no'
use_cpu: false
"""


def command(args: list[str], nproc: int, cwd: Path, launcher: str = "accelerate") -> list[str]:
    if nproc == 1:
        return [sys.executable, *args]
    if launcher == "accelerate-config":
        cfg = cwd / "accelerate.yaml"
        cfg.write_text(ACCELERATE_CONFIG)
        return [str(BIN / "accelerate"), "launch", "--config_file", str(cfg), *args]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", "29533", *args]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
            "--main_process_port", "29531", *args]


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}


def launch(args: list[str], nproc: int, cwd: Path, launcher: str = "accelerate",
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(args, nproc, cwd, launcher), capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=environment(env))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def launch_pair(one: list[str], two: list[str], cwd: Path, launcher: str = "accelerate",
                env_one: dict[str, str] | None = None, env_two: dict[str, str] | None = None):
    """The one-process run and the two-process launch side by side (their start-up overlaps); both must succeed."""
    alone = subprocess.Popen(command(one, 1, cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=cwd, env=environment(env_one))
    pair = launch(two, 2, cwd, launcher, env=env_two)
    out, err = alone.communicate(timeout=600)
    assert alone.returncode == 0, out[-2000:] + err[-4000:]
    return subprocess.CompletedProcess(alone.args, alone.returncode, out, err), pair


def glue_args(model_dir: str, out: Path, batch: int) -> list[str]:
    return [str(ROOT / "run_glue.py"), "--task_name", "mrpc", "--data_dir", f"{FIXTURES}/glue",
            "--model_name_or_path", model_dir, "--output_dir", str(out), "--max_steps", "3",
            "--learning_rate", "1e-2", "--seed", "0", "--disable_tqdm", "true",
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "3",
            "--eval_strategy", "steps", "--eval_steps", "3", "--logging_strategy", "no"]


@pytest.mark.parametrize("launcher", ["accelerate", "accelerate-config", "torchrun"])
def test_run_glue_two_processes_equals_one_process_double_batch(launcher, tiny_model_dir, tmp_path):
    one, two = launch_pair(glue_args(tiny_model_dir, tmp_path / "one", 8), glue_args(tiny_model_dir, tmp_path / "two", 4),
                           tmp_path, launcher)
    # One process logs and writes: a single trainable line, a single save.
    assert (two.stdout + two.stderr).count("trainable params:") == 1
    assert (two.stdout + two.stderr).count("Saved BitFit delta") == 1
    assert "trainable params:" in one.stdout + one.stderr
    a = load_file(tmp_path / "one" / "bitfit_delta.safetensors")
    b = load_file(tmp_path / "two" / "bitfit_delta.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    # 16 dev rows, 2 processes x eval batch 3: sampler padding must not double-count any row.
    e1, e2 = r1["history"][-1], r2["history"][-1]
    assert e1["eval_n_examples"] == e2["eval_n_examples"] == 16
    assert e1["eval_accuracy"] == e2["eval_accuracy"] and e1["eval_f1"] == e2["eval_f1"]


@pytest.mark.parametrize("mode", ["lora", "beft"])
def test_peft_modes_two_processes_equal_one_process_double_batch(mode, tiny_model_dir, tmp_path):
    """PEFT's adapters and the head's trained copy under DDP (ddp_find_unused_parameters off, as in every bias-only
    mode): the same adapter as one process with the doubled batch."""
    pytest.importorskip("peft")
    extra = ["--mode", mode, "--learning_rate", "1e-2"]
    _, two = launch_pair(glue_args(tiny_model_dir, tmp_path / "one", 8) + extra,
                         glue_args(tiny_model_dir, tmp_path / "two", 4) + extra, tmp_path)
    assert (two.stdout + two.stderr).count("trainable params:") == 1
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert set(a) == set(b) and any(k.endswith("classifier.weight") for k in a)  # the head is in the adapter
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r1["history"][-1]["eval_accuracy"] == r2["history"][-1]["eval_accuracy"]
    assert r2["global_batch_size"] == r1["global_batch_size"] == 8


def test_two_process_eval_of_a_fixed_model_equals_one_process(tiny_model_dir, tmp_path):
    """Evaluate the same trained delta with 1 and 2 processes (no training in the second run)."""
    launch(glue_args(tiny_model_dir, tmp_path / "train", 8), 1, tmp_path)
    merged = tmp_path / "merged"
    from bitfit_tasks.delta.merge import export_merged

    export_merged(tiny_model_dir, tmp_path / "train", merged)
    shutil.copy(Path(tiny_model_dir) / "tokenizer.json", merged / "tokenizer.json")
    res = {}
    for n in (1, 2):
        out = tmp_path / f"eval{n}"
        args = glue_args(str(merged), out, 4)
        args[args.index("--max_steps") + 1] = "1"
        args += ["--learning_rate", "1e-30", "--mode", "frozen"]  # effectively no training
        launch(args, n, tmp_path)
        res[n] = json.loads((out / "results.json").read_text())["history"][-1]
    assert res[1]["eval_n_examples"] == res[2]["eval_n_examples"] == 16
    for k in ("eval_accuracy", "eval_f1"):
        assert res[1][k] == res[2][k]


def test_sweep_under_two_processes_runs_each_once_and_resumes(tiny_model_dir, tmp_path):
    args = ["-m", "bitfit_tasks.sweep", "--tasks", "rte", "--methods", "bitfit", "frozen", "--seeds", "1",
            "--bias_lrs", "1e-3", "--output_dir", str(tmp_path / "grid"), "--", "--data_dir", f"{FIXTURES}/glue",
            "--model_name_or_path", tiny_model_dir, "--num_train_epochs", "1", "--disable_tqdm", "true"]
    first = launch(args, 2, ROOT)
    assert first.stdout.count("| method | rte (accuracy) |") == 1  # one table, from the main process
    results = sorted((tmp_path / "grid").glob("*/*/lr*/seed*/results.json"))
    assert len(results) == 2
    stamps = [p.stat().st_mtime_ns for p in results]
    again = launch(args, 2, ROOT)
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert "skip finished run" in again.stderr


def test_allreduce_volume_is_the_trainable_set(tiny_model_dir, tmp_path):
    out = tmp_path / "ar.json"
    launch([str(ROOT / "benchmarks" / "allreduce.py"), "--model", tiny_model_dir, "--json", str(out)], 2, tmp_path)
    rows = json.loads(out.read_text())
    for mode, r in rows.items():
        assert r["bytes_per_step"] == 4 * r["requires_grad"], mode
    assert rows["bitfit"]["requires_grad"] == rows["bitfit"]["trainable"]
    assert rows["full"]["bytes_per_step"] > 5 * rows["bitfit"]["bytes_per_step"]


def test_run_pos_two_processes_equals_one_process_double_batch(tiny_model_dir, tmp_path):
    def args(out, batch):
        return [str(ROOT / "run_pos.py"), "--treebank", f"{FIXTURES}/pos/treebank", "--model_name_or_path",
                tiny_model_dir, "--output_dir", str(out), "--max_steps", "2", "--learning_rate", "1e-2",
                "--seed", "0", "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "1",
                "--unknown_tags", "count_wrong", "--ignore_mismatched_sizes", "true", "--disable_tqdm", "true",
                "--logging_strategy", "no"]

    _, two = launch_pair(args(tmp_path / "one", 2), args(tmp_path / "two", 1), tmp_path)
    assert (two.stdout + two.stderr).count("trainable params:") == 1
    a = load_file(tmp_path / "one" / "bitfit_delta.safetensors")
    b = load_file(tmp_path / "two" / "bitfit_delta.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    # Every word of the dev split (and the test split: 2 sentences, 1 per process) counted once.
    assert r1["history"][-1]["eval_n_words"] == r2["history"][-1]["eval_n_words"] == 5
    assert r1["history"][-1]["eval_accuracy"] == r2["history"][-1]["eval_accuracy"]
    assert r1["test_accuracy"] == r2["test_accuracy"]


def test_run_squad_two_processes_equals_one_process_double_batch(tiny_model_dir, tmp_path):
    def args(out, batch):
        return [str(ROOT / "run_squad.py"), "--train_file", f"{FIXTURES}/squad/official.json", "--validation_file",
                f"{FIXTURES}/squad/official.json", "--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
                "--max_seq_length", "40", "--doc_stride", "16", "--max_steps", "2", "--learning_rate", "1e-2",
                "--seed", "0", "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "3",
                "--disable_tqdm", "true", "--logging_strategy", "no",
                # qa_outputs.bias has a zero gradient in exact arithmetic (it shifts every position's
                # logit alike); Adam would blow its rounding noise up to lr-sized steps. SGD keeps
                # the comparison about the data-parallel arithmetic.
                "--optim", "sgd"]

    _, two = launch_pair(args(tmp_path / "one", 4), args(tmp_path / "two", 2), tmp_path,
                         env_one={"HF_DATASETS_CACHE": str(tmp_path / "cache1")},
                         env_two={"HF_DATASETS_CACHE": str(tmp_path / "cache2")})
    # The windows are built once, by the main process, into one Arrow file per split; rank 1 loads them.
    assert len(list((tmp_path / "cache2" / "bitfit_tasks" / "squad").glob("*.arrow"))) == 2
    assert two.stderr.count("SQuAD train windows: loading the cache") == 1
    assert two.stderr.count("SQuAD eval windows: loading the cache") == 1
    a = load_file(tmp_path / "one" / "bitfit_delta.safetensors")
    b = load_file(tmp_path / "two" / "bitfit_delta.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())["history"][-1]
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())["history"][-1]
    # Windows of all 5 questions gathered once, post-processed over all windows of each question.
    assert r1["eval_n_examples"] == r2["eval_n_examples"] == 5
    assert r1["eval_f1"] == pytest.approx(r2["eval_f1"]) and r1["eval_exact_match"] == pytest.approx(
        r2["eval_exact_match"])
    p1 = json.loads((tmp_path / "one" / "predictions.json").read_text())
    p2 = json.loads((tmp_path / "two" / "predictions.json").read_text())
    assert p1 == p2


# run_glue.py whose rank 1 meets a user error at its first evaluation, while rank 0 scores fine and
# goes on into the next collective.
RANK1_FAILS = """
import os, sys
sys.path.insert(0, {root!r})
import bitfit_tasks.tasks.glue.run as G
from bitfit_tasks.utils.errors import UsageError
metrics = G.compute_glue_metrics
def failing(*a, **k):
    if os.environ.get("RANK") == "1":
        raise UsageError("rank-one data problem")
    return metrics(*a, **k)
G.compute_glue_metrics = failing
from bitfit_tasks.utils.launch import run_cli
run_cli(G.main)
"""


def test_a_user_error_on_one_process_ends_every_process_promptly(tiny_model_dir, tmp_path):
    """Before: the failing rank waited in a barrier while rank 0 sat in an all-gather, so both hung
    until the process group's timeout. Now the failing rank leaves at once and the launcher stops the
    other."""
    import time

    script = tmp_path / "rank1_fails.py"
    script.write_text(RANK1_FAILS.format(root=str(ROOT)))
    args = glue_args(tiny_model_dir, tmp_path / "out", 4)
    args[0] = str(script)
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29537",
           *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    took = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank1_fails.py: error (process 1): rank-one data problem" in proc.stderr
    assert took < 120, f"{took:.0f} s"
    assert not (tmp_path / "out" / "results.json").exists()
