"""Full-size SQuAD preprocessing: peak memory and time, cold and warm cache, 1 and 2 processes.

    python benchmarks/data_scale.py --train_file ../shared/data/squad/train-v1.1.rebuilt.json \
        --validation_file ../shared/data/squad/dev-v1.1.rebuilt.json --json benchmarks/results/data_scale.json

Each measurement is a fresh process (or two, under ``accelerate launch --multi_gpu --num_processes 2``)
running what ``run_squad.py`` runs up to its 5th training step: read and check every question,
build the train and dev windows (``window_dataset``: ``datasets.map`` into Arrow files, main
process first), load the model, and take 5 BitFit steps. It reports, per process, the peak RSS
(``ru_maxrss``), the preprocessing time and the time from start to the first training step; the
cache is cold (an empty ``HF_DATASETS_CACHE``) and then warm (the same folder again). Last, the
post-processing of the whole dev set (n-best span search over every window) is timed on random
logits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T0 = time.time()


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(a: argparse.Namespace) -> None:
    import numpy as np
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, TrainerCallback, TrainingArguments

    from bitfit_tasks import BitFitConfig
    from bitfit_tasks.tasks.arguments import demo_model_path
    from bitfit_tasks.tasks.squad.data import read_squad_file, window_dataset
    from bitfit_tasks.tasks.squad.qa import SquadBitFitTrainer, postprocess

    args = TrainingArguments(output_dir=a.out, max_steps=5, per_device_train_batch_size=a.batch,
                             gradient_accumulation_steps=a.accumulate, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
                             learning_rate=1e-3)
    rank = args.process_index
    t = time.time()
    train_rows = read_squad_file(a.train_file, "train")
    dev_rows = read_squad_file(a.validation_file, "validation")
    t_read = time.time() - t
    model_dir = demo_model_path()
    tok = AutoTokenizer.from_pretrained(model_dir)
    t = time.time()
    train = window_dataset("train", train_rows, tok, 384, 128, args)
    dev = window_dataset("eval", dev_rows, tok, 384, 128, args)
    t_windows = time.time() - t
    rss_pre = rss_mib()
    first_step: dict[str, float] = {}

    class FirstStep(TrainerCallback):
        def on_step_begin(self, *_, **__):
            first_step.setdefault("s", time.time() - T0)

    model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    from transformers import DataCollatorWithPadding

    trainer = SquadBitFitTrainer(model=model, args=args, train_dataset=train, processing_class=tok,
                                 data_collator=DataCollatorWithPadding(tok), bitfit_config=BitFitConfig(),
                                 callbacks=[FirstStep()])
    rss_before_train = rss_mib()
    trainer.train()
    out = {"rank": rank, "world_size": args.world_size, "train_questions": len(train_rows),
           "train_windows": len(train), "dev_questions": len(dev_rows), "dev_windows": len(dev),
           "read_and_check_s": round(t_read, 1), "windows_s": round(t_windows, 1),
           "to_first_step_s": round(first_step["s"], 1), "peak_rss_after_preprocessing_mib": round(rss_pre),
           "peak_rss_before_training_mib": round(rss_before_train), "peak_rss_after_5_steps_mib": round(rss_mib())}
    if a.postprocess and rank == 0:
        rng = np.random.default_rng(0)
        offsets = dev.with_format("numpy", columns=["offset_mapping"])[:]["offset_mapping"]
        start = rng.standard_normal(offsets.shape[:2]).astype(np.float32)
        end = rng.standard_normal(offsets.shape[:2]).astype(np.float32)
        t = time.time()
        preds = postprocess(dev_rows, np.asarray(dev["example_index"]), offsets, start, end, 20, 30)
        out["postprocess_full_dev_s"] = round(time.time() - t, 2)
        out["postprocess_predictions"] = len(preds)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"rank{rank}.json").write_text(json.dumps(out))


def measure(a: argparse.Namespace, nproc: int, cache: str, label: str, postprocess: bool = False) -> dict:
    out = tempfile.mkdtemp(prefix=f"data-scale-{label}-")
    # The runners' global batch of 16 as per-device batch x accumulation x processes: seq-384 activations
    # of a batch of 16 alone take ~3 GB on the CPU, whatever the data pipeline does.
    cmd = [str(Path(__file__)), "--worker", "--train_file", a.train_file, "--validation_file", a.validation_file,
           "--out", out, "--batch", str(a.batch), "--accumulate", str(16 // (a.batch * nproc))]
    cmd += ["--postprocess"] if postprocess else []
    if nproc == 1:
        cmd = [sys.executable, *cmd]
    else:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
               str(nproc), "--main_process_port", "29561", *cmd]
    env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nproc)]
    result = {"label": label, "processes": nproc, "wall_s": round(time.time() - t, 1), "ranks": ranks}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train_file", required=True)
    ap.add_argument("--validation_file", required=True)
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--batch", type=int, default=4, help="per-device train batch (accumulated to a global 16)")
    ap.add_argument("--accumulate", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--postprocess", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    runs = []
    with tempfile.TemporaryDirectory(prefix="hf-cache-1p-") as c1, \
            tempfile.TemporaryDirectory(prefix="hf-cache-2p-") as c2:
        runs.append(measure(a, 1, c1, "1 process, cold cache", postprocess=True))
        runs.append(measure(a, 1, c1, "1 process, warm cache"))
        runs.append(measure(a, 2, c2, "2 processes, cold cache"))
        runs.append(measure(a, 2, c2, "2 processes, warm cache"))
    record = {"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "runs": runs}
    print("| run | process | windows s | to first step s | peak RSS MiB (after preprocessing / 5 steps) |")
    print("|---|---|---|---|---|")
    for r in runs:
        for k in r["ranks"]:
            print(f"| {r['label']} | {k['rank']} | {k['windows_s']} | {k['to_first_step_s']} | "
                  f"{k['peak_rss_after_preprocessing_mib']} / {k['peak_rss_after_5_steps_mib']} |")
    print(f"full dev post-processing ({runs[0]['ranks'][0]['postprocess_predictions']} questions): "
          f"{runs[0]['ranks'][0]['postprocess_full_dev_s']} s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
