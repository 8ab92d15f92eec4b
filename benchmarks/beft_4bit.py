"""BitFit's added biases against PEFT's BEFT on the same 4-bit base: same targets, same data, same optimizer.

    python benchmarks/beft_4bit.py --steps 20 --json benchmarks/results/quantized-beft/llama-4bit.json

A Llama classifier (random weights, built without biases) is saved once and loaded twice with bitsandbytes
4-bit NF4 (fp32 compute). One copy gets BitFit (``bias_terms`` q k v m1: zero biases added to the attention
projections, trained with the head), the other PEFT's BEFT on q_proj/k_proj/v_proj/o_proj with the head in
``modules_to_save``. Both train with plain AdamW on the same batches; the losses step by step and the final bias
values are recorded. tests/test_quantized.py runs :func:`compare` at a tiny size and asserts they agree.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings

import torch
import transformers as T

TERMS = ["q", "k", "v", "m1"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def compare(steps: int = 20, hidden: int = 64, layers: int = 2, batch: int = 8, seq: int = 16,
            lr: float = 3e-3) -> dict:
    """Train both sides ``steps`` AdamW steps; returns both loss trajectories and the largest final bias gap."""
    import peft

    from bitfit_tasks import BitFitConfig, prepare_model

    cfg = T.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
                        attention_dropout=0.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (2 * batch, seq), generator=g)
    labels = torch.randint(0, 3, (2 * batch,), generator=g)
    data = [{"input_ids": ids[i:i + batch], "labels": labels[i:i + batch]} for i in (0, batch)]
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        T.LlamaForSequenceClassification(cfg).save_pretrained(folder)
        quant = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.float32)
        ours = T.LlamaForSequenceClassification.from_pretrained(folder, quantization_config=quant)
        theirs = T.LlamaForSequenceClassification.from_pretrained(folder, quantization_config=quant)
    state = prepare_model(ours, BitFitConfig(bias_terms=TERMS))
    with warnings.catch_warnings():  # "cannot merge" on bias-free layers: BEFT's note, nothing to do with training
        warnings.filterwarnings("ignore", message="Detected that the base layer has no bias term")
        theirs = peft.get_peft_model(theirs, peft.BeftConfig(target_modules=TARGETS, task_type="SEQ_CLS",
                                                             modules_to_save=["score"]))
    losses = {"bitfit": train(ours, data, steps, lr), "beft": train(theirs, data, steps, lr)}
    params = dict(ours.named_parameters())
    beft = {n.removeprefix("base_model.model.").removesuffix(".beft_bias.default"): p.detach().flatten()
            for n, p in theirs.named_parameters() if n.endswith(".beft_bias.default")}
    gaps = {n: (params[n + ".bias"].detach() - beft[n]).abs().max().item() for n in beft}
    return {"steps": steps, "config": {"hidden": hidden, "layers": layers, "batch": batch, "seq": seq, "lr": lr,
                                       "terms": TERMS, "targets": TARGETS, "quantization": "bnb nf4, fp32 compute"},
            "trainable": {"bitfit": state.n_trainable,
                          "beft": sum(p.numel() for p in theirs.parameters() if p.requires_grad)},
            "biases": {"bitfit": sorted(n.removesuffix(".bias") for n in state.added), "beft": sorted(beft)},
            "losses": losses,
            "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses["bitfit"], losses["beft"], strict=True)),
            "max_abs_final_bias_diff": max(gaps.values()),
            "smallest_max_abs_bias": min(params[n + ".bias"].detach().abs().max().item() for n in beft)}


def train(model, data: list[dict], steps: int, lr: float) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    out = []
    for step in range(steps):
        loss = model(**data[step % len(data)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", help="write the record here")
    a = ap.parse_args()
    record = {**compare(a.steps, a.hidden, a.layers), "torch": torch.__version__,
              "bitsandbytes": __import__("bitsandbytes").__version__, "peft": __import__("peft").__version__}
    print("| step | BitFit (added biases) | PEFT BEFT | abs diff |\n|---|---|---|---|")
    for i, (x, y) in enumerate(zip(record["losses"]["bitfit"], record["losses"]["beft"], strict=True)):
        print(f"| {i + 1} | {x:.6f} | {y:.6f} | {abs(x - y):.1e} |")
    print(f"max |loss diff| {record['max_abs_loss_diff']:.1e}; max |final bias diff| "
          f"{record['max_abs_final_bias_diff']:.1e}; trainable {record['trainable']}")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json + ".tmp", "w") as f:
            json.dump(record, f, indent=2)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
