"""Bytes DDP all-reduces per training step: BitFit vs full fine-tuning.

    accelerate launch --multi_gpu --num_processes 2 benchmarks/allreduce.py [--model PATH] [--json OUT]

Frozen tensors (requires_grad=False) never enter DDP's reducer, so BitFit should all-reduce
exactly 4 bytes per trainable fp32 value per step. A comm hook counts the bucket bytes that
actually go through all-reduce.
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import AutoModelForSequenceClassification

from bitfit_tasks import BitFitConfig, prepare_model
from bitfit_tasks.tasks.arguments import demo_model_path
from bitfit_tasks.utils.launch import cpu_only_multiprocess, finish_distributed

MODES = {"full": BitFitConfig(mode="full"), "bitfit": BitFitConfig(), "qm2": BitFitConfig(bias_terms=["qm2"]),
         "frozen": BitFitConfig(mode="frozen")}


def measure(model_path: str, cfg: BitFitConfig, accelerator: Accelerator, steps: int = 3) -> dict:
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    state = prepare_model(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ddp, opt = accelerator.prepare(model, opt)
    counter = {"bytes": 0, "calls": 0}

    def hook(st, bucket):
        buf = bucket.buffer()
        counter["bytes"] += buf.numel() * buf.element_size()
        counter["calls"] += 1
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(accelerator.process_index)
    for _ in range(steps):
        ids = torch.randint(1000, vocab, (8, 64), generator=g).to(accelerator.device)
        out = ddp(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(8, dtype=torch.long,
                                                                                         device=ids.device))
        accelerator.backward(out.loss)
        opt.step()
        opt.zero_grad()
    n_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": state.n_trainable, "requires_grad": n_grad, "bytes_per_step": counter["bytes"] / steps,
            "allreduce_calls_per_step": counter["calls"] / steps, "expected_bytes": 4 * n_grad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="model folder (default: the demo model)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--json", default=None, help="write the measurements here (main process)")
    a = ap.parse_args()
    path = a.model or demo_model_path()
    accelerator = Accelerator(cpu=cpu_only_multiprocess())
    rows = {m: measure(path, MODES[m], accelerator) for m in a.modes}
    if accelerator.is_main_process:
        full = rows.get("full", {}).get("bytes_per_step")
        print(f"{accelerator.num_processes} processes, model {path}")
        print("| mode | trainable params | all-reduced bytes/step | 4 x trainable | vs full |")
        print("|---|---|---|---|---|")
        for m, r in rows.items():
            ratio = f"{r['bytes_per_step'] / full:.5f}" if full else "-"
            print(f"| {m} | {r['trainable']:,d} | {r['bytes_per_step']:,.0f} | {r['expected_bytes']:,d} | {ratio} |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=2)
    finish_distributed()


if __name__ == "__main__":
    main()
