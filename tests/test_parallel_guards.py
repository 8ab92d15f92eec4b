"""The DataParallel / FSDP / DeepSpeed refusals hold with real ``TrainingArguments`` -- the user's, or the
default ones Trainer builds when ``BitFitTrainer`` gets none -- and on every route a user takes to
them: ``--fsdp``, ``--deepspeed ds.json``, and ``accelerate launch --use_deepspeed`` / ``--use_fsdp``
(``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP`` in the environment).

DeepSpeed is not installed here, and ``TrainingArguments`` cannot be built with a DeepSpeed config
without it: those cases run in a subprocess that sees a stub ``deepspeed`` distribution (version
metadata and an empty package), which is all ``TrainingArguments`` reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from conftest import FIXTURES, tiny_model
from transformers import TrainingArguments

from bitfit_tasks import BitFitConfig, BitFitTrainer
from bitfit_tasks.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIG = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}

# Builds a BitFitTrainer the way CASE says and prints what happened on its last line.
SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from transformers import TrainingArguments
from bitfit_tasks import BitFitConfig, BitFitTrainer
case = sys.argv[1]
model = tiny_model("bert")  # first: TrainingArguments with a ZeRO-3 config makes from_config partition weights
kwargs = {{}}
if case == "deepspeed_args":
    kwargs["args"] = TrainingArguments(output_dir={out!r}, use_cpu=True, report_to=[], deepspeed={ds!r})
elif case == "env_args":
    kwargs["args"] = TrainingArguments(output_dir={out!r}, use_cpu=True, report_to=[])
    assert kwargs["args"].deepspeed_plugin is not None  # TrainingArguments read the launcher's setting
try:
    BitFitTrainer(model=model, bitfit_config=BitFitConfig(), **kwargs)
    print("ACCEPTED")
except Exception as err:
    print("REFUSED", type(err).__name__, str(err).splitlines()[0])
"""


def deepspeed_stub(tmp_path: Path) -> Path:
    """A folder that makes ``deepspeed`` look installed to importlib (package + dist-info)."""
    stub = tmp_path / "stub"
    (stub / "deepspeed").mkdir(parents=True)
    (stub / "deepspeed" / "__init__.py").write_text('__version__ = "0.16.0"\n')
    info = stub / "deepspeed-0.16.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.16.0\n")
    (info / "RECORD").write_text("")
    return stub


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_") and k != "BITFIT_DEBUG"}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_deepspeed_is_refused_with_real_training_arguments(tmp_path):
    stub = deepspeed_stub(tmp_path)
    script = tmp_path / "build.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(tmp_path / "o"), ds=DS_CONFIG))
    env = clean_env(PYTHONPATH=str(stub))
    cases = {  # case -> extra environment
        "deepspeed_args": {},  # TrainingArguments(deepspeed=...)
        "env_args": {"ACCELERATE_USE_DEEPSPEED": "true"},  # accelerate launch --use_deepspeed, user's args
        "env_no_args": {"ACCELERATE_USE_DEEPSPEED": "true"},  # ... and BitFitTrainer without args
        "fsdp_env_no_args": {"ACCELERATE_USE_FSDP": "1"},
    }
    procs = {c: subprocess.Popen([sys.executable, str(script), c], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env={**env, **e}) for c, e in cases.items()}
    wrong = {}
    for case, p in procs.items():
        out, err = p.communicate(timeout=300)
        last = (out.strip().splitlines() or [""])[-1]
        want = "FSDP shards parameters" if case.startswith("fsdp") else "DeepSpeed is not supported by BitFitTrainer"
        if not (last.startswith("REFUSED UsageError ") and want in last):
            wrong[case] = last or err[-1000:]
    assert not wrong, wrong


def test_fsdp_is_refused_with_real_training_arguments(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], fsdp="full_shard")
    assert args.fsdp  # what TrainingArguments made of it
    with pytest.raises(UsageError, match=r"FSDP shards parameters; BitFitTrainer's bias-only checkpoints"):
        BitFitTrainer(model=tiny_model("bert"), args=args, bitfit_config=BitFitConfig())


def test_guards_run_when_the_trainer_gets_no_args(monkeypatch):
    """Trainer builds default TrainingArguments when given none; the refusals see those too."""
    with mock.patch.object(TrainingArguments, "n_gpu", new_callable=mock.PropertyMock, return_value=2):
        with pytest.raises(UsageError, match=r"2 GPUs are visible to one process, where Trainer would use "
                                             r"nn\.DataParallel"):
            BitFitTrainer(model=tiny_model("bert"), bitfit_config=BitFitConfig())
    trainer = BitFitTrainer(model=tiny_model("bert"), bitfit_config=BitFitConfig())  # and without a reason to refuse
    assert isinstance(trainer.args, TrainingArguments)


@pytest.mark.slow
@pytest.mark.parametrize("route, extra, env", [
    ("launcher", [], {"ACCELERATE_USE_DEEPSPEED": "true"}),  # accelerate launch --use_deepspeed, no deepspeed here
    ("flag", ["--deepspeed", "ds.json"], {}),
])
def test_runner_refuses_deepspeed_in_one_line(route, extra, env, tiny_model_dir, tmp_path):
    """Before TrainingArguments is built (which, without deepspeed installed, fails with a packaging error)."""
    (tmp_path / "ds.json").write_text("{}")
    done = subprocess.run([sys.executable, str(ROOT / "run_glue.py"), "--task_name", "rte", "--data_dir",
                           f"{FIXTURES}/glue", "--model_name_or_path", tiny_model_dir, "--output_dir",
                           str(tmp_path / "out"), *extra], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=clean_env(**env))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "run_glue.py: error:" in line]
    assert len(errors) == 1 and "DeepSpeed is not supported by BitFitTrainer" in errors[0], done.stderr[-3000:]
